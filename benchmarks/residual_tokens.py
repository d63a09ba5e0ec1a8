"""Which tokens hold the gap a bake leaves: the forward KL of base and bake on the same teacher answers, by token class.

The quality study's gaps compare each model on its own samples, so they cannot say which tokens the rest of the
gap sits on. Here the prompted teacher answers each held-out query once (temperature 1, the study's seed, so these
are the study's forward-KL samples), and the base and the bake both read those same tokens. Per token the script
keeps KL(teacher || base) and KL(teacher || bake); summed over a class of tokens they give the class's share of the
base gap, its share of what is left, and the gap it closes (1 - bake / base).

Classes, first match wins, from the teacher's own answer:
    first      the answer's first token
    end        the end-of-turn token (where the answer stops)
    answer     inside an `<answer>...</answer>` tag (the option letter and the tag's own tokens)
    newline    a token that holds a line break (where a line or paragraph ends)
    copied     continues a token pair that occurs in the system prompt but not in the query (copying the prompt)
    other      everything else
The JSON also keeps, per distinct token, its count and both sums; the table lists the tokens that hold the most of
what is left.

`--side reverse` measures the other direction: base and bake each answer the queries themselves (the study's
reverse-KL samples) and KL(model || teacher) is summed by class on each one's own tokens. It also sums, by position,
each model's probability of ending the answer at every token of its own answers and the teacher's there (expected
stops: where the teacher would have ended answers the model goes on with). Without `--runs` it measures the base alone.

    python benchmarks/residual_tokens.py --prompt medical --runs preset-faithful+fwd0.5+steps80+hid30-s1-b0k
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from quality import BUCKETS, MEASURE_SEED, Measurer, reference_path, run_path, write_json  # noqa: E402

CLASSES = ("first", "end", "answer", "newline", "copied", "other")
ANSWER_TAG = re.compile(r"<answer>.*?(</answer>|$)", re.S)  # an unclosed tag runs to the end


def token_classes(response_ids: list[int], query_ids: list[int], prompt_pairs: set[tuple[int, int]], tokenizer,
                  end_ids: tuple[int, ...] = ()) -> list[str]:
    """The class of each token of one answer (see the module docstring)."""
    query_pairs = set(zip(query_ids, query_ids[1:]))
    ends = [len(tokenizer.decode(response_ids[:t + 1])) for t in range(len(response_ids))]
    text = tokenizer.decode(response_ids)
    tags = [(m.start(), m.end()) for m in ANSWER_TAG.finditer(text)]
    classes = []
    for t, token in enumerate(response_ids):
        start, end = (ends[t - 1] if t else 0), ends[t]
        if t == 0:
            classes.append("first")
        elif token in end_ids:
            classes.append("end")
        elif any(start < b and end > a for a, b in tags):
            classes.append("answer")
        elif "\n" in tokenizer.decode([token]):
            classes.append("newline")
        elif (response_ids[t - 1], token) in prompt_pairs - query_pairs:
            classes.append("copied")
        else:
            classes.append("other")
    return classes


def answer_classifier(tokenizer, system_prompt: str, end_ids: list[int]):
    """token_classes for one prompt: (answer ids, query ids) -> classes."""
    system_ids = tokenizer(system_prompt, add_special_tokens=False)["input_ids"]
    prompt_pairs = set(zip(system_ids, system_ids[1:]))
    return lambda ids, query_ids: token_classes(ids, query_ids, prompt_pairs, tokenizer, tuple(end_ids))


def add_token(per_token: dict[str, dict], text: str, **kls: float) -> None:
    """Count one token of an answer under its text and add its KLs (keyword: which model's)."""
    entry = per_token.setdefault(text, {"count": 0, **{name: 0.0 for name in kls}})
    entry["count"] += 1
    for name, value in kls.items():
        entry[name] += value


def measure(measurer: Measurer, adapter_dir: Path) -> dict:
    """Per-token forward KL of base and bake on the teacher's answers, summed by class and by position bucket."""
    import torch

    from promptbake.losses import reverse_kl
    from promptbake.measure import MEASURE_BATCH, _chunks
    from promptbake.rollout import adapter_enabled, adapter_set, autocast, eos_token_ids, response_logits

    model, engine, teacher, renderer, bf16 = measurer._setup(adapter_dir)
    tokenizer = measurer.tokenizer
    device = next(model.parameters()).device
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    classify = answer_classifier(tokenizer, renderer.system_prompt, eos_ids)
    sums = {group: {"tokens": 0, "base": 0.0, "baked": 0.0} for group in
            (*CLASSES, *(f"{a}-{min(b, measurer.cap)}" for a, b in BUCKETS))}
    per_query = {"base": [], "baked": [], "tokens": []}
    per_token: dict[str, dict] = {}
    with adapter_set(engine, False), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(MEASURE_SEED)
        for chunk in _chunks(measurer.queries, MEASURE_BATCH):
            prompts = [renderer.student_ids(q.messages) for q in chunk]
            rollout = engine.sample([teacher.prompt_ids(q) for q in chunk], max_new_tokens=measurer.cap,
                                    temperature=1.0, eos_ids=eos_ids, pad_id=pad_id)
            for rows in _chunks(list(range(len(chunk))), 4):
                part = rollout.select(rows)
                teacher_BTV = teacher.logits([chunk[r] for r in rows], part)
                kl = {}
                for name, on in (("base", False), ("baked", True)):
                    with adapter_enabled(model, on), autocast(device, bf16):
                        policy_BTV = response_logits(model, [prompts[r] for r in rows], part, pad_id)
                    kl[name] = reverse_kl("full", teacher_BTV.to(policy_BTV.device), policy_BTV, part.response_ids_BT, 1.0).float()
                    del policy_BTV
                mask_BT = part.response_mask_BT.bool()
                for i, r in enumerate(rows):
                    n = int(mask_BT[i].sum())
                    ids = part.response_ids_BT[i, :n].tolist()
                    base, baked = kl["base"][i, :n].tolist(), kl["baked"][i, :n].tolist()
                    per_query["base"].append(sum(base) / max(n, 1))
                    per_query["baked"].append(sum(baked) / max(n, 1))
                    per_query["tokens"].append(n)
                    for t, (cls, b, k) in enumerate(zip(classify(ids, prompts[r]), base, baked)):
                        add_token(per_token, tokenizer.decode([ids[t]]), base=b, baked=k)
                        bucket = next(f"{a}-{min(e, measurer.cap)}" for a, e in BUCKETS if a <= t < e)
                        for group in (cls, bucket):
                            sums[group]["tokens"] += 1
                            sums[group]["base"] += b
                            sums[group]["baked"] += k
                del teacher_BTV, kl
    return {"groups": sums, "per_query": per_query, "per_token": per_token}


STOP_BUCKETS = ((0, 32), (32, 64), (64, 128), (128, 10**9))


def measure_reverse(measurer: Measurer, adapter_dir: Path | None) -> dict:
    """`--side reverse`: base and bake each answer the held-out queries themselves (the study's reverse-KL samples)
    and KL(model || teacher) is summed by class on each one's own tokens. The tokens differ, so a class's part is its
    contribution to the model's mean per-token KL (its sum over the model's tokens); the parts add up to the mean.

    Beside it, where each model would stop: at every token of its own answers, its probability of ending the answer
    there and the prompted teacher's, summed by position. Their sums are the expected number of stops along those
    answers; a teacher sum well above the model's says the teacher would have ended answers the model goes on with.
    `adapter_dir` None measures the base alone."""
    from promptbake.measure import kl_to_teacher
    from promptbake.rollout import eos_token_ids

    model, engine, teacher, renderer, bf16 = measurer._setup(adapter_dir)
    tokenizer = measurer.tokenizer
    eos_ids = eos_token_ids(tokenizer)
    classify = answer_classifier(tokenizer, renderer.system_prompt, eos_ids)
    out: dict = {}
    for name, on in (("base", False), ("baked", True))[:1 if adapter_dir is None else 2]:
        sums = {group: {"tokens": 0, "kl": 0.0} for group in CLASSES}
        per_token: dict[str, dict] = {}
        stops = {f"{a}-{b}" if b < 10**9 else f"{a}+": {"tokens": 0, "model": 0.0, "teacher": 0.0}
                 for a, b in STOP_BUCKETS}
        answers = {"count": 0, "tokens": 0, "ended": 0}

        def tally(query, ids: list[int], kls: list[float], stop_pairs: list[tuple[float, float]]) -> None:
            for token, cls, k in zip(ids, classify(ids, renderer.student_ids(query.messages)), kls):
                sums[cls]["tokens"] += 1
                sums[cls]["kl"] += k
                add_token(per_token, tokenizer.decode([token]), kl=k)
            for t, (mine, theirs) in enumerate(stop_pairs):
                bucket = next(stops[key] for key, (a, b) in zip(stops, STOP_BUCKETS) if a <= t < b)
                bucket["tokens"] += 1
                bucket["model"] += mine
                bucket["teacher"] += theirs
            answers["count"] += 1
            answers["tokens"] += len(ids)
            answers["ended"] += bool(ids) and ids[-1] in eos_ids

        # the study's reverse measurement itself (same sampler, seed and batches), each answer seen by `tally`
        kl_to_teacher(model, engine, teacher, renderer, tokenizer, measurer.queries, adapter=on,
                      max_new_tokens=measurer.cap, temperature=1.0, seed=MEASURE_SEED, bf16=bf16, on_answer=tally)
        out[name] = {"groups": sums, "per_token": per_token, "stops": stops, "answers": answers,
                     "mean": sum(g["kl"] for g in sums.values()) / max(sum(g["tokens"] for g in sums.values()), 1)}
    return out


def stop_table(result: dict) -> str:
    """Expected stops per answer along each model's own answers, by position: the model's and the teacher's."""
    names = [n for n in ("base", "baked") if n in result]
    lines = ["| model | tokens per answer | ended by end-of-turn | positions | tokens there | expected stops, model | "
             "expected stops, teacher |", "|---|---|---|---|---|---|---|"]
    for name in names:
        a = result[name]["answers"]
        per = max(a["count"], 1)
        for key, b in list(result[name]["stops"].items()) + [("all", {
                k: sum(b[k] for b in result[name]["stops"].values()) for k in ("tokens", "model", "teacher")})]:
            lines.append(f"| {name} | {a['tokens'] / per:.1f} | {a['ended'] / per:.2f} | {key} | {b['tokens'] / per:.1f} | "
                         f"{b['model'] / per:.3f} | {b['teacher'] / per:.3f} |")
    return "\n".join(lines)


def reverse_table(result: dict, top_tokens: int = 12) -> str:
    n = {name: sum(g["tokens"] for g in result[name]["groups"].values()) for name in ("base", "baked")}
    lines = ["| tokens | share of the base's tokens | part of the base's mean | share of the bake's tokens | part of the bake's mean |",
             "|---|---|---|---|---|"]
    for cls in CLASSES:
        b, k = result["base"]["groups"][cls], result["baked"]["groups"][cls]
        lines.append(f"| {cls} | {b['tokens'] / n['base']:.3f} | {b['kl'] / n['base']:.4f} | "
                     f"{k['tokens'] / n['baked']:.3f} | {k['kl'] / n['baked']:.4f} |")
    lines.append(f"| all | 1 | {result['base']['mean']:.4f} | 1 | {result['baked']['mean']:.4f} "
                 f"(gap closed {1 - result['baked']['mean'] / result['base']['mean']:.3f}) |")
    lines += ["", "| token, the bake's own answers | count | part of the bake's mean |", "|---|---|---|"]
    top = sorted(result["baked"]["per_token"].items(), key=lambda kv: -kv[1]["kl"])[:top_tokens]
    lines += [f"| {json.dumps(text)} | {g['count']} | {g['kl'] / n['baked']:.4f} |" for text, g in top]
    return "\n".join(lines)


def table(result: dict, top_tokens: int = 12) -> str:
    groups = result["groups"]
    total = {key: sum(groups[c][key] for c in CLASSES) for key in ("tokens", "base", "baked")}
    lines = ["| tokens | share of tokens | share of the base gap | share of what is left | gap closed there |",
             "|---|---|---|---|---|"]
    for name, g in groups.items():
        if not g["tokens"]:
            continue
        closed = 1 - g["baked"] / g["base"] if g["base"] else float("nan")
        lines.append(f"| {name} | {g['tokens'] / total['tokens']:.3f} | {g['base'] / total['base']:.3f} | "
                     f"{g['baked'] / total['baked']:.3f} | {closed:.3f} |")
    lines.append(f"| all | 1.000 | 1.000 | 1.000 | {1 - total['baked'] / total['base']:.3f} |")
    lines += ["", "| token | count | share of the base gap | share of what is left | gap closed there |", "|---|---|---|---|---|"]
    top = sorted(result["per_token"].items(), key=lambda kv: -kv[1]["baked"])[:top_tokens]
    for text, g in top:
        closed = 1 - g["baked"] / g["base"] if g["base"] else float("nan")
        lines.append(f"| {json.dumps(text)} | {g['count']} | {g['base'] / total['base']:.3f} | "
                     f"{g['baked'] / total['baked']:.3f} | {closed:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--runs", default="", help="comma list of adapter folders under build/quality/<prompt>/ "
                   "(none with --side reverse: the base alone)")
    p.add_argument("--measure-cap", type=int, default=256)
    p.add_argument("--side", choices=("forward", "reverse"), default="forward",
                   help="forward: base and bake on the teacher's answers; reverse: each on its own answers")
    p.add_argument("--out", type=Path, default=REPO / "results" / "quality")
    p.add_argument("--build", type=Path, default=REPO / "build" / "quality")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    measurer = Measurer(REPO / "prompts" / f"{args.prompt}.md", args.measure_cap)
    reference = json.loads(reference_path(args.out, args.prompt, args.measure_cap).read_text())
    if not args.runs:
        if args.side != "reverse":
            sys.exit("--runs: the forward side compares a bake with the base; name at least one run")
        result = measure_reverse(measurer, None)
        result["study_means"] = {"base": reference["reverse"]["mean"]}
        write_json(args.out / "residual" / f"{args.prompt}-base-reverse.json", result)
        print(f"[{args.prompt}] base, reverse: {result['base']['mean']:.4f} (study {result['study_means']['base']:.4f})")
        print(stop_table(result))
        return
    for run in args.runs.split(","):
        adapter = args.build / args.prompt / run
        if not (adapter / "adapter_model.safetensors").is_file():
            sys.exit(f"{adapter}: no adapter there (the quality study keeps its bakes under {args.build})")
        saved = json.loads(run_path(args.out, args.prompt, run).read_text())
        if args.side == "reverse":
            result = measure_reverse(measurer, adapter)
            result["study_means"] = {"base": reference["reverse"]["mean"], "baked": saved["measured"]["reverse"]["mean"]}
            write_json(args.out / "residual" / f"{args.prompt}-{run}-reverse.json", result)
            print(f"[{args.prompt}] {run}, reverse: base {result['base']['mean']:.4f} (study "
                  f"{result['study_means']['base']:.4f}), bake {result['baked']['mean']:.4f} (study {result['study_means']['baked']:.4f})")
            print(reverse_table(result))
            print(stop_table(result))
            continue
        result = measure(measurer, adapter)
        tokens = result["per_query"]["tokens"]
        for name, mean in (("base", reference["forward"]["mean"]), ("baked", saved["measured"]["forward"]["mean"])):
            mine = sum(k * n for k, n in zip(result["per_query"][name], tokens)) / sum(tokens)
            result[f"{name}_forward_mean"] = {"here": mine, "study": mean}
        write_json(args.out / "residual" / f"{args.prompt}-{run}.json", result)
        print(f"[{args.prompt}] {run}: forward KL base {result['base_forward_mean']['here']:.4f} "
              f"(study {result['base_forward_mean']['study']:.4f}), bake {result['baked_forward_mean']['here']:.4f} "
              f"(study {result['baked_forward_mean']['study']:.4f})")
        print(table(result))


if __name__ == "__main__":
    main()
