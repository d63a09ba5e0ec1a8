"""Benchmark: promptbake against TRL's on-policy self-distillation trainer (SDFT), same work, one run.

Both train the default model with the same LoRA (r, alpha, targets), the same training queries (the
prompt's query file minus a seeded held-out split), 16 queries per optimizer step in micro-batches of 4,
one sample per query, the same max new tokens, temperature, learning rate (constant, no warm-up), AdamW
weight decay, grad clip, seed and number of steps. The objective is the same too: TRL runs with
`distillation_mode="full_logits"` and `distillation_alpha=1.0` (reverse KL over the full vocabulary, the
student's own samples, teacher = the base weights with the adapter off) and no importance-sampling clip.

One deliberate change to TRL: its SDFT trainer appends the privileged context to the user's message;
here the teacher prompt is the system prompt as a system message, as promptbake's teacher sees it, so
both minimise the same KL and the held-out numbers compare like with like.

Each trainer runs in its own process (peak RSS is its own), in alternating order over rounds. Then one
measuring process computes the held-out reverse KL to the prompted teacher of the base model and of each
adapter with promptbake's own `kl_to_teacher` (same queries, same sampling seed).
Rounds repeat one training seed (timing); `--seeds` gives each round its own, so the held-out KLs show how far
the two trainers' results lie apart against the spread of each over seeds.

TRL is a benchmark-only dependency: `pip install -e ".[bench]"` (see the Makefile's `bench-trl`).

    python benchmarks/vs_trl.py [--steps 8] [--rounds 1] [--prompt prompts/pirate.md] [--seeds 0,1,2]
        [--variant NAME:KEY=VALUE[,KEY=VALUE]] [--skip-trl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HELDOUT = 24
SEED = 0
CAP = 48  # response cap of both trainers (--max-new-tokens); a fixed number, so TRL gets the same one


def split_files(prompt: Path, folder: Path) -> tuple[Path, list]:
    """Write the training queries to a JSONL file beside a copy of the prompt; return (prompt copy, held-out)."""
    from promptbake.queries import load_queries, split_queries
    from promptbake.spec import load_spec

    spec = load_spec(prompt)
    train, heldout = split_queries(load_queries(spec.queries_path), HELDOUT, SEED)
    (folder / "train_queries.jsonl").write_text("".join(json.dumps({"messages": q.messages}) + "\n" for q in train))
    _, front, body = prompt.read_text().split("---", 2)
    meta = yaml.safe_load(front)
    meta["queries"] = "train_queries.jsonl"
    meta.pop("train", None)  # the benchmark sets the training knobs itself
    meta.pop("heldout", None)  # and measures on its own seeded split, the same queries for both trainers
    copy = folder / "prompt.md"
    copy.write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---{body}")
    return copy, heldout


def common_settings(steps: int) -> dict:
    from promptbake.config import BakeConfig

    c = BakeConfig(steps=steps, max_new_tokens=CAP)
    return dict(steps=steps, batch_size=c.batch_size, micro_batch_size=c.micro_batch_size, max_new_tokens=c.max_new_tokens,
                temperature=c.temperature, lr=c.lr, weight_decay=c.weight_decay, grad_clip=c.grad_clip,
                lora_r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, lora_targets=list(c.lora_targets))


def run_promptbake(prompt_copy: Path, out: Path, steps: int, torch_compile: bool | None = None, seed: int = SEED,
                   extra: dict | None = None) -> dict:
    from code_switches import apply_code_switches
    from promptbake.bake import compile_prompt

    s = common_settings(steps)
    extra = apply_code_switches(extra or {})  # a variant may name a code switch (benchmarks/code_switches.py)
    result = compile_prompt(prompt_copy, out=out, overrides=dict(steps=steps, max_new_tokens=s["max_new_tokens"], heldout=0,
                                                                  checkpoint_every=10_000, seed=seed, torch_compile=torch_compile,
                                                                  # TRL's SDFT: reverse KL only, no layer term
                                                                  forward_kl_weight=0.0, hidden_match_weight=0.0)
                            | extra,
                            force=True)
    log = result.train.log
    return {"step_seconds": [e.seconds for e in log], "step_tokens": [e.response_tokens for e in log],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "settings": s, "seed": seed}


def run_trl(prompt_copy: Path, out: Path, steps: int, bf16: bool, micro_batch: int = 0, seed: int = SEED) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    s = common_settings(steps)
    rows = micro_batch or s["micro_batch_size"] or 8  # rows per device per pass (0: promptbake's; unset there, 8)
    spec = load_spec(prompt_copy)
    queries = load_queries(spec.queries_path)
    dataset = Dataset.from_list([{"prompt": q.messages, "privileged_context": spec.system_prompt} for q in queries])
    runtime = load_runtime(resolve_model(None), precision="fp32")  # the plain base; TRL adds its LoRA and precision
    tokenizer, model = runtime.tokenizer, runtime.model
    torch.manual_seed(seed)
    args = SDFTConfig(
        output_dir=str(out / "trl-work"), max_steps=steps, seed=seed, use_cpu=not torch.cuda.is_available(), bf16=bf16,
        per_device_train_batch_size=rows, gradient_accumulation_steps=s["batch_size"] // rows,
        num_generations=1, max_completion_length=s["max_new_tokens"], temperature=s["temperature"],
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"], distillation_mode="full_logits", distillation_alpha=1.0, distillation_is_clip=None,
        teacher_model_kind="base", logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
    )
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules=s["lora_targets"], task_type="CAUSAL_LM", bias="none")

    seconds: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                tokens.append(round(logs["completions/mean_length"] * s["batch_size"]))

    trainer = SDFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                          callbacks=[Timer()])
    # The teacher sees the prompt as a system message (TRL's default appends it to the user turn).
    trainer.teacher_context_builder._compose_teacher_prompt = (
        lambda prompt, context: [{"role": "system", "content": context}, *prompt])
    trainer.train()
    trainer.model.save_pretrained(str(out))
    return {"step_seconds": seconds, "step_tokens": tokens,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "settings": {**s, "micro_batch_size": rows}, "seed": seed}


def measure(prompt: Path, adapters: dict[str, str]) -> dict:
    """Held-out reverse KL(policy || prompted teacher) for the base model and each adapter."""
    from promptbake.measure import kl_to_teacher
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries, split_queries
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    s = common_settings(1)
    spec = load_spec(prompt)
    _, heldout = split_queries(load_queries(spec.queries_path), HELDOUT, SEED)
    names = list(adapters)
    runtime = load_runtime(resolve_model(None), adapters=[(n, Path(adapters[n])) for n in names])
    model, tokenizer, bf16 = runtime.model, runtime.tokenizer, runtime.bf16
    renderer = runtime.renderer(spec.system_prompt)
    teacher = runtime.teacher(renderer)
    teacher.prepare(heldout, s["max_new_tokens"], "held-out")
    engine = runtime.engine()
    kw = dict(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], seed=SEED + 1, bf16=bf16)
    kls = {"base": kl_to_teacher(model, engine, teacher, renderer, tokenizer, heldout, adapter=False, **kw).mean}
    for name in names:
        model.set_adapter(name)
        engine.sync()
        kls[name] = kl_to_teacher(model, engine, teacher, renderer, tokenizer, heldout, adapter=True, **kw).mean
    return kls


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (NAME, {KEY: VALUE}), each value read as YAML (numbers, booleans, words)."""
    name, _, settings = text.partition(":")
    if not name or not settings:
        sys.exit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    pairs = [item.split("=", 1) for item in settings.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        sys.exit(f"--variant {text!r}: every setting is KEY=VALUE")
    return name, {key.strip(): yaml.safe_load(value) for key, value in pairs}


def paired(kls: dict, who: str, against: str, rounds: int) -> dict:
    """`who`'s held-out KL minus `against`'s, seed by seed (same queries and held-out samples), with mean and sd."""
    by_seed = [kls[f"{who}-{i}"] - kls[f"{against}-{i}"] for i in range(rounds)]
    return {"mean": statistics.mean(by_seed), "stdev": statistics.stdev(by_seed), "by_seed": by_seed}


def paired_text(d: dict) -> str:
    return f"{d['mean']:+.4f} (sd {d['stdev']:.4f}; by seed " + ", ".join(f"{x:+.4f}" for x in d["by_seed"]) + ")"


def _call(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[7:])


def main() -> None:
    global CAP
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=CAP, help="response cap of both trainers")
    parser.add_argument("--prompt", type=Path, default=REPO / "prompts" / "pirate.md")
    parser.add_argument("--trl-precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="TRL's mixed precision (auto: bf16 where promptbake's own default picks it, on CPUs with "
                             "bf16 instructions; runs before 2026-12-07 passed bf16 or fp32 by hand)")
    parser.add_argument("--torch-compile", choices=["auto", "on", "off"], default="auto",
                        help="promptbake's torch_compile (auto: on for 40+ steps on CPUs, or 8+ once the compile "
                             "cache is warm); with "
                             "it on, step 1 carries the compile and the table shows it apart from the steady state")
    parser.add_argument("--trl-micro-batch", type=int, default=0,
                        help="TRL's rows per device per pass (0: promptbake's micro_batch_size where set, else 8, "
                             "TRL's own default and promptbake's in bf16; runs before 2026-12-06 used 2)")
    parser.add_argument("--seeds", default="",
                        help="comma list of training seeds, one round each (overrides --rounds); the held-out split and "
                             "its sampling stay fixed, so the spread of each trainer's KL over seeds is its own noise")
    parser.add_argument("--eager-too", action="store_true",
                        help="also train promptbake with torch_compile off on every seed (the row 'promptbake eager'), "
                             "so that whether compiling moves the held-out KL is measured in the same run")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also train promptbake with these settings on every seed (the row 'promptbake NAME'), e.g. "
                             "answers:loss_average=answers; its held-out KL is compared with promptbake's and TRL's by seed")
    parser.add_argument("--skip-trl", action="store_true",
                        help="train promptbake's rows alone (with --variant: a promptbake change measured over seeds, "
                             "without TRL's time)")
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vs_trl.json")
    parser.add_argument("--worker", nargs=3, metavar=("WHO", "PROMPT_COPY", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("PROMPT", "ADAPTERS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    CAP = args.max_new_tokens
    if args.trl_precision == "auto":
        import torch

        from promptbake.runtime import use_bf16

        args.trl_precision = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    if args.worker:
        who, prompt_copy, out = args.worker
        compile_flag = False if who == "promptbake-eager" else {"auto": None, "on": True, "off": False}[args.torch_compile]
        fn = (lambda p, o, n: run_promptbake(p, o, n, torch_compile=compile_flag, seed=args.seed,
                                             extra=json.loads(args.extra))) if who.startswith("promptbake") else (
            lambda p, o, n: run_trl(p, o, n, bf16=args.trl_precision == "bf16", micro_batch=args.trl_micro_batch,
                                    seed=args.seed))
        print("RESULT " + json.dumps(fn(Path(prompt_copy), Path(out), args.steps)))
        return
    if args.measure:
        print("RESULT " + json.dumps(measure(Path(args.measure[0]), json.loads(args.measure[1]))))
        return

    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    prompt_copy, heldout = split_files(args.prompt, tmp)
    runs: dict[str, list[dict]] = ({"promptbake": []} | ({} if args.skip_trl else {"trl": []})
                                   | ({"promptbake-eager": []} if args.eager_too else {}))
    variants = dict(parse_variant(v) for v in args.variant)
    runs |= {f"promptbake-{name}": [] for name in variants}
    adapters: dict[str, str] = {}
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [SEED] * args.rounds
    args.rounds = len(seeds)
    for rnd, seed in enumerate(seeds):
        order = list(runs) if rnd % 2 == 0 else list(runs)[::-1]
        for who in order:
            out = tmp / f"{who}-{rnd}"
            print(f"round {rnd + 1} (seed {seed}): {who} ...", flush=True)
            runs[who].append(_call("--steps", str(args.steps), "--max-new-tokens", str(CAP), "--trl-precision", args.trl_precision,
                                   "--torch-compile", args.torch_compile, "--trl-micro-batch", str(args.trl_micro_batch),
                                   "--seed", str(seed), "--extra", json.dumps(variants.get(who.removeprefix("promptbake-"), {})),
                                   "--worker", who, str(prompt_copy), str(out)))
            adapters[f"{who}-{rnd}"] = str(out)
    print("measuring held-out KL ...", flush=True)
    kls = _call("--max-new-tokens", str(CAP), "--measure", str(args.prompt), json.dumps(adapters))

    report: dict = {"machine": f"{os.cpu_count()} cores, {sys.platform}", "steps": args.steps, "rounds": args.rounds,
                    "prompt": str(args.prompt), "heldout_queries": len(heldout), "trl_precision": args.trl_precision,
                    "torch_compile": args.torch_compile, "trl_micro_batch": args.trl_micro_batch or None, "seeds": seeds,
                    "settings": runs["promptbake"][0]["settings"], "variants": variants, "kl_base": kls["base"],
                    "trainers": {}}
    print(f"\n{args.steps} steps x 16 queries x <= {report['settings']['max_new_tokens']} tokens, {args.rounds} round(s); "
          f"held-out reverse KL to the prompted teacher on {len(heldout)} queries (base model: {kls['base']:.4f})")
    print(f"{'trainer':16} {'s/step':>7} {'tok/s':>6} {'step 1 s':>8} {'peak RSS GiB':>12} {'held-out KL':>11}")
    for who, rs in runs.items():
        # step 1 carries one-off warm-up in both trainers; the median of the rest is the steady state
        secs = [x for r in rs for x in (r["step_seconds"][1:] or r["step_seconds"])]
        toks = [x for r in rs for x in (r["step_tokens"][1:] or r["step_tokens"])]
        row = {"s_per_step": statistics.median(secs), "tokens_per_s": sum(toks) / sum(secs),
               "first_step_s": statistics.mean(r["step_seconds"][0] for r in rs),
               "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
               "heldout_kl": statistics.mean(kls[f"{who}-{i}"] for i in range(len(rs))), "runs": rs}
        report["trainers"][who] = row
        print(f"{who.replace('-', ' '):16} {row['s_per_step']:>7.2f} {row['tokens_per_s']:>6.1f} {row['first_step_s']:>8.1f} {row['peak_rss_gb']:>12.2f} {row['heldout_kl']:>11.4f}")
    with_trl = "trl" in runs
    if with_trl:
        pb, trl = report["trainers"]["promptbake"], report["trainers"]["trl"]
        report["tokens_per_s_ratio"] = pb["tokens_per_s"] / trl["tokens_per_s"]
        print(f"promptbake / TRL tokens/s: {report['tokens_per_s_ratio']:.2f}x")
    if len(set(seeds)) > 1:  # per seed, the same queries and held-out samples: a paired difference
        report["heldout_kl_by_seed"] = {who: [kls[f"{who}-{i}"] for i in range(len(seeds))] for who in runs}
        if with_trl:
            report["heldout_kl_diff"] = paired(kls, "promptbake", "trl", len(seeds))
        if args.eager_too:
            report["heldout_kl_compiled_minus_eager"] = paired(kls, "promptbake", "promptbake-eager", len(seeds))
        for name in variants:
            report.setdefault("heldout_kl_variant_diffs", {})[name] = {
                against: paired(kls, f"promptbake-{name}", against, len(seeds))
                for against in ("promptbake", "trl") if against in runs}
        for who in runs:
            print(f"held-out KL {who:16} by seed {seeds}: " + ", ".join(f"{k:.4f}" for k in report["heldout_kl_by_seed"][who]))
        if with_trl:
            d = report["heldout_kl_diff"]
            print(f"promptbake - TRL held-out KL: {d['mean']:+.4f} (sd {d['stdev']:.4f} over "
                  f"{len(seeds)} seeds; negative is promptbake closer to the teacher)")
        if args.eager_too:
            print("promptbake compiled - eager held-out KL: " + paired_text(report["heldout_kl_compiled_minus_eager"]))
        for name, diffs_by in report.get("heldout_kl_variant_diffs", {}).items():
            for against, d in diffs_by.items():
                print(f"promptbake {name} - {against} held-out KL: " + paired_text(d))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
