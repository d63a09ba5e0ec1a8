"""Quality study: which settings make a faithful bake, and what each costs in minutes of compile.

For every prompt x variant x seed: bake with that variant's settings (the compile's own measurement off),
then measure it with one fixed protocol, the same for every variant:

- on the prompt's separate held-out file (queries never trained on);
- reverse KL(baked || prompted teacher) on the baked model's samples at temperature 1, answers up to
  `--measure-cap` tokens (whole answers where they end sooner), and the KL gap closed against the base
  model's reverse KL on its own samples (same queries, same seed); also split by response position
  (tokens 0-47, 48-127, 128+) to show where in an answer the gap is left;
- forward KL(teacher || baked) on the teacher's samples, the same way;
- the prompt's checks on greedy answers (same cap): baked pass rate / teacher pass rate.

Base and teacher measurements are made once per prompt and kept in `<out>/reference-<prompt>-cap<N>.json`. Every
run's result goes to `<out>/runs/<prompt>/<variant>-s<seed>.json` as soon as it is measured, so an
interrupted study continues where it stopped (adapters are kept under `build/quality/`, not committed); a
compile stopped halfway resumes from its last checkpoint (every 5 steps), so a long run may span sessions. A
run that differs from a finished one only in its step count continues from that run's kept last checkpoint
(constant learning rate: its first steps are the shorter run's), and its compile time counts the earlier steps.
A variant with `ema_decay` (ema0.9) writes the moving average of its weights; its training is that of the run
without it, so the same run's last-step weights (from its kept checkpoint) are measured too, under `last_step`.
Variants train on an equal budget of response tokens (`--token-budget`; steps are only an upper bound),
so they are compared at equal training compute; the wall time is reported beside each.

    python benchmarks/quality.py --prompts support --variants default,cap48,lr1e-3 --seeds 0,1,2
    python benchmarks/quality.py --summary            # tables and plot from the saved runs only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Each variant changes a few settings of the default compile. Budgets are equal in response tokens.
VARIANTS: dict[str, dict] = {
    "default": {},
    "old-default": {"lr": 5e-4, "max_new_tokens_limit": 256},  # the defaults before this study
    "cap48": {"max_new_tokens": 48},
    "cap96": {"max_new_tokens": 96},
    "cap64": {"max_new_tokens": 64},
    "cap128": {"max_new_tokens": 128},
    "cap256": {"max_new_tokens": 256},
    "lr2.5e-4": {"lr": 2.5e-4},
    "lr1e-3": {"lr": 1e-3},
    "lr2e-3": {"lr": 2e-3},
    "lr4e-3": {"lr": 4e-3},
    "r64": {"lora_r": 64, "lora_alpha": 128},
    # Rank at an equal update size: with Adam a LoRA update moves the layer's output by about (alpha / r) * sqrt(r),
    # so r16/alpha32 (the default) and r64/alpha64 both give 8; r64/alpha128 above gives 16.
    "r64a64": {"lora_r": 64, "lora_alpha": 64},
    "attn-only": {"lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "batch4": {"batch_size": 4},
    "batch8": {"batch_size": 8},
    "batch32": {"batch_size": 32},
    "rollouts2": {"rollouts": 2, "batch_size": 8},
    "kl-topk": {"kl": "topk"},
    "kl-sampled": {"kl": "sampled"},
    "warmup5": {"warmup_steps": 5},
    "cosine": {"lr_schedule": "cosine"},
    "wsd": {"lr_schedule": "wsd"},  # constant, then linear decay over the last fifth: anneal without losing the lr
    # two or four optimizer updates per round of sampling and teacher scoring: more updates, little more time
    "upb2": {"updates_per_batch": 2},
    "upb4": {"updates_per_batch": 4},
    "loraplus4": {"loraplus_lr_ratio": 4.0},
    "fwd0": {"forward_kl_weight": 0.0},  # reverse KL only (the default before forward_kl_weight 0.5)
    "fwd0.25": {"forward_kl_weight": 0.25},
    "fwd0.5": {"forward_kl_weight": 0.5},
    "fwd1": {"forward_kl_weight": 1.0},
    # The sequence-level (score-function) term beside the per-token loss, MiniLLM-style (config future_kl_weight).
    "fut1": {"future_kl_weight": 1.0},
    "fut4": {"future_kl_weight": 4.0},
    # The residual stream as a second target: each layer's cosine distance to the prompted teacher's (hidden_match_weight;
    # at weight 30 its gradient was about the KL's at step 1 on pirate).
    "hid0": {"hidden_match_weight": 0.0},  # the per-token loss alone (what every run named without hid* trained before 30 was the default)
    # hid10-hid300 compare the raw layers (scale none), as they did when they were run; add +hidstd for dims, so a run
    # name keeps its meaning whichever scale is the default.
    "hid10": {"hidden_match_weight": 10.0, "hidden_match_scale": "none"},
    "hid30": {"hidden_match_weight": 30.0, "hidden_match_scale": "none"},
    "hid100": {"hidden_match_weight": 100.0, "hidden_match_scale": "none"},
    "hid300": {"hidden_match_weight": 300.0, "hidden_match_scale": "none"},
    # the layers matched at the user turn's tokens too (hidden_match_query): targets from every query without sampling
    "hidq": {"hidden_match_query": True},
    "hidstd": {"hidden_match_scale": "dims"},  # the layers compared per dimension scaled by the teacher's RMS (section 17)
    # what each layer adds to the stream compared, not its output (hidden_match_target; section 22)
    "hidinc": {"hidden_match_target": "increments"},
    "steps40": {"steps": 40},  # the faithful preset's steps until the 80-step points made 80 the default
    "steps80": {"steps": 80},  # with --token-budget 0: the faithful default's steps (was twice them when first run)
    "steps100": {"steps": 100},  # with tss40: about the default's compile time (a warm step takes ~0.6 of a sampled one)
    "steps120": {"steps": 120},  # with tss40: the default's 80 student-sampled steps after 40 on the teacher's answers
    "steps160": {"steps": 160},  # the next point on the steps curve: does the gap still rise past 80 steps?
    "steps240": {"steps": 240},  # continues from steps160's kept checkpoint (80 more steps)
    "steps320": {"steps": 320},
    "steps480": {"steps": 480},  # each continues from the longest kept run of the same settings
    "steps640": {"steps": 640},
    # The first 40 steps on the prompted teacher's cached answers, no sampling (teacher_sample_steps): a cheap warm start.
    "tss40": {"teacher_sample_steps": 40},
    "tss20": {"teacher_sample_steps": 20},
    "plm0.1": {"prompt_lm_weight": 0.1},  # a next-token loss on the prompt's own text (section 26)
    "plm0.3": {"prompt_lm_weight": 0.3},
    "plm1": {"prompt_lm_weight": 1.0},
    # Extra weight on the two-outcome KL of ending the answer at each token (stop_kl_weight): medical's bakes run long.
    "stop3": {"stop_kl_weight": 3.0},
    "stop10": {"stop_kl_weight": 10.0},
    "stop30": {"stop_kl_weight": 30.0},
    # The adapter as a moving average of the weights over the last ~10 or ~20 steps; training is unchanged, so the
    # run also measures its own last step's weights (kept in its checkpoint): a paired comparison from one run.
    "ema0.9": {"ema_decay": 0.9},
    "ema0.95": {"ema_decay": 0.95},
    "limit256": {"max_new_tokens_limit": 256},  # the auto cap may grow to 256: rollouts past 128 for long answers
    # The presets as shipped: run these with --token-budget 0 (their own steps, no budget).
    "preset-faithful": {"preset": "faithful"},
    "preset-quick": {"preset": "quick"},
    # Where the training queries come from (benchmarks/query_sources.py): the prompt's hand-written file,
    # 500 written from the prompt's rules by `promptbake queries`, or both files together.
    "queries-synth": {"queries": "synth"},
    "queries-both": {"queries": "both"},
    # Only the 40 training lines that benchmarks/fit_gap.py measures: can the student fit a few queries it sees often?
    "queries-sample40": {"queries": "sample40"},
    # The adapter fitted to the prompt's shift of each layer before the first step (lora_init steer, promptbake/steer.py).
    "steer": {"lora_init": "steer"},
    # Muon in place of AdamW, at AdamW's update size (docs/quality.md section 21).
    "muon": {"optimizer": "muon"},
    # Training rollouts through the eager sampler although torch_compile is on (no user setting; a paired check
    # that the compiled decode step trains what the eager one does).
    "decode-eager": {"eager_decoding": True},
}
BUCKETS = ((0, 48), (48, 128), (128, 10**9))


def variant_settings(name: str) -> dict:
    """A variant's settings; `a+b` combines variants a and b (b wins where both set a field)."""
    settings: dict = {}
    for part in name.split("+"):
        settings.update(VARIANTS[part])
    return settings
MEASURE_SEED = 1234
DEFAULT_BUDGET = 40_000


def reference_path(out: Path, prompt: str, cap: int) -> Path:
    """Where the base and teacher's held-out measurement of a prompt is kept."""
    return out / f"reference-{prompt}-cap{cap}.json"


def run_path(out: Path, prompt: str, name: str) -> Path:
    """Where a run's result is kept (`name`: see run_name)."""
    return out / "runs" / prompt / f"{name}.json"


def run_name(variant: str, seed: int, budget: int) -> str:
    """`<variant>-s<seed>`, plus `-b<k>k` for budgets other than the default (a point further along the curve)."""
    return f"{variant}-s{seed}" + ("" if budget == DEFAULT_BUDGET else f"-b{budget // 1000}k")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="support", help="comma list of prompt names under prompts/")
    p.add_argument("--variants", default="default",
                   help=f"comma list of: {', '.join(VARIANTS)}; a+b combines two (cap128+lr2e-3)")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--token-budget", type=int, default=DEFAULT_BUDGET, help="response tokens each variant trains on; 0: none, the variant's own steps (for the preset-* variants)")
    p.add_argument("--max-steps", type=int, default=400, help="upper bound on steps (the budget normally stops first)")
    p.add_argument("--measure-cap", type=int, default=256, help="longest answer measured (tokens)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "quality")
    p.add_argument("--build", type=Path, default=REPO / "build" / "quality")
    p.add_argument("--summary", action="store_true", help="only print and write the summary of saved runs")
    p.add_argument("--paired", nargs="+", metavar="RUN",
                   help="only compare saved runs of --prompts by query: the first run's gaps minus the mean of the "
                        "others', with a 95 %% bootstrap interval over held-out queries (runs by file name, e.g. "
                        "preset-faithful+fwd0.5+steps80-s3-b0k; NAME:last-step for an averaged run's last-step weights)")
    p.add_argument("--versus", nargs=2, metavar=("VARIANT", "OTHER"),
                   help="only compare two saved variants of --prompts over --seeds (at --token-budget): the mean over "
                        "the seeds where both were run of each seed's paired difference in gap closed, with a 95 %% "
                        "bootstrap interval over held-out queries, and each seed's difference; writes "
                        "<out>/versus/<prompt>-VARIANT-vs-OTHER.json")
    p.add_argument("--lengths", action="store_true",
                   help="only print and write, per saved run of --prompts, how long its own held-out answers run "
                        "(answers cut at the measure cap, median tokens, the answers that ended) and the reverse gap "
                        "on all of them and on the answers that ended")
    args = p.parse_args(argv)
    unknown = [part for v in args.variants.split(",") for part in v.split("+") if part not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


def write_json(path: Path, data: dict) -> None:
    from promptbake.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


class Measurer:
    """One base model and tokenizer; measures the base, the prompted teacher and any adapter on a prompt's held-out
    file (or on another query file: benchmarks/fit_gap.py measures on training queries)."""

    def __init__(self, prompt_path: Path, cap: int, query_path: Path | None = None):
        from promptbake.models import load_tokenizer, resolve_model
        from promptbake.queries import load_queries
        from promptbake.spec import load_spec

        self.spec = load_spec(prompt_path)
        if query_path is None and self.spec.heldout_path is None:
            raise SystemExit(f"{prompt_path}: the study measures on a separate held-out file; add heldout: FILE")
        self.query_path = query_path or self.spec.heldout_path
        self.queries = load_queries(self.query_path)
        self.cap = cap
        self.model_dir = resolve_model(self.spec.model)
        self.tokenizer = load_tokenizer(self.model_dir)

    def _setup(self, adapter_dir: Path | None):
        from promptbake.runtime import load_runtime

        runtime = load_runtime(self.model_dir, adapters=[("default", adapter_dir)] if adapter_dir else ())  # none: the base
        renderer = runtime.renderer(self.spec.system_prompt)
        teacher = runtime.teacher(renderer)
        teacher.prepare(self.queries, self.cap, str(self.query_path))
        return runtime.model, runtime.engine(), teacher, renderer, runtime.bf16

    def reference(self, path: Path) -> dict:
        """The base and the prompted teacher on these queries, measured once and kept at `path`."""
        if path.is_file():
            return json.loads(path.read_text())
        print(f"measuring base and prompted teacher on {len(self.queries)} queries of {self.query_path}", flush=True)
        reference = self.measure(None)
        write_json(path, reference)
        return reference

    def measure(self, adapter_dir: Path | None) -> dict:
        """KLs both ways (with position buckets) and greedy answers' check outcomes; adapter None = base/teacher."""
        from promptbake.checks import check_outcomes
        from promptbake.measure import condition_ids, decode_all, kl_to_teacher

        model, engine, teacher, renderer, bf16 = self._setup(adapter_dir)
        kw = dict(max_new_tokens=self.cap, temperature=1.0, seed=MEASURE_SEED, bf16=bf16)
        out: dict = {}
        for name, on_teacher in (("reverse", False), ("forward", True)):
            t = time.perf_counter()
            r = kl_to_teacher(model, engine, teacher, renderer, self.tokenizer, self.queries, adapter=True,
                              on_teacher_samples=on_teacher, **kw)
            out[name] = {"mean": r.mean, "per_query": r.per_query, "tokens": r.tokens, "capped": r.capped_fraction,
                         "buckets": {f"{a}-{min(b, self.cap)}": r.mean_between(a, b) for a, b in BUCKETS},
                         "seconds": time.perf_counter() - t}
        conditions = ("baked",) if adapter_dir else ("base", "teacher")
        ids = condition_ids(engine, self.tokenizer, renderer, self.queries, max_new_tokens=self.cap, conditions=conditions)
        texts = decode_all(self.tokenizer, ids)
        tags = [q.tags for q in self.queries]
        out["checks"] = {cond: check_outcomes(self.spec.checks, texts[cond], tags) for cond in conditions}
        out["samples"] = {cond: texts[cond] for cond in conditions}  # all of them: a check added later is scored without decoding again
        return out


SYNTH_QUERIES = 500


def train_sample(prompt: str, n: int, build: Path) -> Path:
    """N lines spread evenly over the prompt's training query file, as a query file of their own (the same lines
    every time: benchmarks/fit_gap.py measures a bake on them, and the `queries-sample40` variant trains on them)."""
    from promptbake.atomic import write_text_atomic
    from promptbake.spec import load_spec

    spec = load_spec(REPO / "prompts" / f"{prompt}.md")
    if spec.queries_path.suffix != ".jsonl":
        raise SystemExit(f"{spec.queries_path}: this study samples lines of a .jsonl query file")
    lines = [line for line in spec.queries_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(lines):
        raise SystemExit(f"{spec.queries_path}: {len(lines)} queries, fewer than --queries {n}")
    picked = [lines[i * len(lines) // n] for i in range(n)]
    path = build / f"{prompt}-train-sample-{n}.jsonl"
    write_text_atomic(path, "\n".join(picked) + "\n")
    return path


def query_file(prompt: str, source: str, build: Path) -> Path:
    """The training query file of a query source: 'synth' (written from the prompt's rules, near-copies of its
    held-out queries excluded; cached), 'both' (the hand-written file followed by the synthesised one) or
    'sampleN' (N of the hand-written lines, see train_sample)."""
    if source.startswith("sample"):
        return train_sample(prompt, int(source.removeprefix("sample")), build)
    from promptbake.queries import load_queries
    from promptbake.spec import load_spec
    from promptbake.synthesis import SynthesisSettings, synthesize_for_prompt

    spec = load_spec(REPO / "prompts" / f"{prompt}.md")
    synth = synthesize_for_prompt(spec.system_prompt, model=spec.model, settings=SynthesisSettings(n=SYNTH_QUERIES),
                                  exclude=load_queries(spec.heldout_path) if spec.heldout_path else None).path
    if source == "synth":
        return synth
    both = build / f"{prompt}-queries-both.jsonl"
    text = spec.queries_path.read_text(encoding="utf-8").rstrip("\n") + "\n" + synth.read_text(encoding="utf-8")
    if not both.is_file() or both.read_text(encoding="utf-8") != text:
        from promptbake.atomic import write_text_atomic

        write_text_atomic(both, text)
    return both


def gap(baked: dict, base: dict) -> float:
    return 1 - baked["mean"] / base["mean"] if base["mean"] > 0 else float("nan")


def check_ratio(baked: dict[str, list[bool]], teacher: dict[str, list[bool]]) -> float | None:
    """Baked passes / teacher passes, pooled over the checks the teacher passes at least once."""
    used = [name for name, passes in teacher.items() if sum(passes) > 0]
    if not used:
        return None
    return sum(sum(baked[n]) for n in used) / sum(sum(teacher[n]) for n in used)


def shorter_run(plan) -> Path | None:
    """The run of this prompt whose kept checkpoint this one passes through (same settings and seed, fewer steps;
    constant learning rate), the furthest one; None when there is none."""
    from promptbake.bake import why_not_continue
    from promptbake.checkpoint import load_checkpoint

    best, best_step = None, 0
    if plan.continue_key is None:
        return None
    for work in plan.out_dir.parent.glob(".*.work"):
        checkpoint = None if work == plan.work_dir else load_checkpoint(work, plan.build_key, plan.continue_key)
        if checkpoint and checkpoint.step > best_step and why_not_continue(plan, checkpoint) is None:
            best, best_step = work.parent / work.name[1:-len(".work")], checkpoint.step
    return best


def last_step_adapter(out_dir: Path, build_key: str) -> Path:
    """The last step's weights of an averaged bake (its kept checkpoint holds them) as an adapter folder beside it."""
    from safetensors.torch import load_file, save_file

    from promptbake.artifact import sha256_file
    from promptbake.atomic import write_text_atomic
    from promptbake.checkpoint import load_checkpoint
    from promptbake.plan import work_dir_for

    checkpoint = load_checkpoint(work_dir_for(out_dir), build_key)
    if checkpoint is None:
        raise SystemExit(f"{work_dir_for(out_dir)}: no kept checkpoint of {out_dir.name}'s last step")
    # Trainable parameters carry PEFT's adapter name (".default."); the saved adapter file drops it.
    weights = {name.replace(".default.", "."): t for name, t in checkpoint.lora.items()}
    if set(weights) != set(load_file(str(out_dir / "adapter_model.safetensors"))):
        raise SystemExit(f"{work_dir_for(out_dir)}: its checkpoint's tensors do not match {out_dir}'s adapter")
    raw = out_dir.parent / f"{out_dir.name}-last-step"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.copytree(out_dir, raw)
    save_file(weights, str(raw / "adapter_model.safetensors"))
    manifest = json.loads((raw / "bake.json").read_text())
    manifest["adapter_sha256"] = sha256_file(raw / "adapter_model.safetensors")
    write_text_atomic(raw / "bake.json", json.dumps(manifest, indent=2) + "\n")
    return raw


def gaps(measured: dict, reference: dict) -> dict:
    """An adapter's measurement against the base and teacher's: gaps closed, by position, and checks."""
    ref_checks, baked_checks = reference["checks"], measured["checks"]["baked"]
    return {
        "reverse_gap": gap(measured["reverse"], reference["reverse"]),
        "forward_gap": gap(measured["forward"], reference["forward"]),
        "bucket_gaps": {k: 1 - measured["reverse"]["buckets"][k] / v if v else None
                        for k, v in reference["reverse"]["buckets"].items()},
        "check_ratio": check_ratio(baked_checks, ref_checks["teacher"]),
        "check_rates": {name: {"base": _rate(ref_checks["base"][name]), "teacher": _rate(ref_checks["teacher"][name]),
                               "baked": _rate(baked_checks[name])} for name in baked_checks},
    }


@contextlib.contextmanager
def eager_decoding_only():
    """Training samples through the eager sampler while the student's layers stay compiled."""
    import promptbake.train
    kept = promptbake.train.compiled_decoding
    promptbake.train.compiled_decoding = lambda engine, enabled: contextlib.nullcontext(False)
    try:
        yield
    finally:
        promptbake.train.compiled_decoding = kept


def run_one(args, prompt: str, variant: str, seed: int, reference: dict, measurer: Measurer) -> dict:
    from promptbake.bake import compile_prompt
    from promptbake.events import StepDone
    from promptbake.plan import plan_compile

    overrides = {**variant_settings(variant), "seed": seed, "checkpoint_every": 5}
    source = overrides.pop("queries", "hand")
    eager_decoding = overrides.pop("eager_decoding", False)
    queries = None if source == "hand" else query_file(prompt, source, args.build)
    if args.token_budget:
        overrides.update(token_budget=args.token_budget, steps=args.max_steps)
    out_dir = args.build / prompt / run_name(variant, seed, args.token_budget)
    t0 = time.perf_counter()
    def show(event) -> None:
        if not isinstance(event, StepDone) or event.entry.step % 10 == 0:
            print(f"  [{prompt} {variant} s{seed}] {event.message}", flush=True)

    plan = plan_compile(REPO / "prompts" / f"{prompt}.md", out=out_dir, overrides=overrides, queries=queries)
    plan.resolve()
    # e.g. steps160 trains on from steps80's last checkpoint; a decode-eager run shares its twin's key, never its steps
    plan.continue_from = None if eager_decoding else shorter_run(plan)
    with eager_decoding_only() if eager_decoding else contextlib.nullcontext():
        result = compile_prompt(plan, measure=False, on_event=show)
    compile_s = time.perf_counter() - t0
    m = result.manifest
    if result.up_to_date:
        compile_s = m.timings.get("total_s", compile_s)
    # A resumed or continued compile: add the earlier steps' time (in the log) so that compile_s is a whole run's.
    compile_s += (m.loss_summary.get("seconds") or 0.0) - m.timings.get("train_s", m.loss_summary.get("seconds") or 0.0)
    measured = measurer.measure(out_dir)
    last_step = None
    if m.config.get("ema_decay"):  # the same run without the average: its last step's weights
        raw = last_step_adapter(out_dir, m.build_key)
        raw_measured = measurer.measure(raw)
        last_step = {**gaps(raw_measured, reference), "measured": raw_measured}
    return {
        "prompt": prompt, "variant": variant, "seed": seed, "overrides": variant_settings(variant),
        "token_budget": args.token_budget, "measure_cap": args.measure_cap,
        "command": " ".join(["python", "benchmarks/quality.py"] + sys.argv[1:]),
        "response_cap": m.response_cap, "response_lengths": m.response_lengths, "cap_hit_train": m.cap_hit.get("train_rollouts"),
        "steps": m.loss_summary.get("steps"), "tokens_trained": m.loss_summary.get("response_tokens"),
        "train_loss_last_fifth": m.loss_summary.get("kl_last_fifth_mean"),  # beside the held-out KL: a training gap or a generalisation one
        "train_s": m.loss_summary.get("seconds"), "compile_s": compile_s, "timings": m.timings,
        "resumed_from_step": m.resumed_from_step,
        "continued_from": plan.continue_from.name if plan.continue_from and m.resumed_from_step else None,
        "machine": machine_name(),  # compile minutes compare only between runs on the same kind of machine
        **gaps(measured, reference),
        "measured": measured,
        "last_step": last_step,  # with ema_decay: the same run's last-step weights, measured the same way
    }


def machine_name() -> str:
    """What the compile ran on: the GPU's name, else the CPU's model and whether it has AVX-512."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "cpu")
    return f"{cpu}, {os.cpu_count()} cores" + (", AVX-512" if "avx512f" in info else "")


def weakest_check(run: dict, teacher: dict[str, list[bool]], min_teacher_passes: int = 3) -> tuple[str, float] | None:
    """The check with the lowest baked/teacher ratio among those the teacher passes at least 3 times (fewer
    passes make a ratio too noisy to read)."""
    ratios = {name: run["check_rates"][name]["baked"] / run["check_rates"][name]["teacher"]
              for name, passes in teacher.items()
              if name != "all" and sum(passes) >= min_teacher_passes and name in run["check_rates"]}
    return min(ratios.items(), key=lambda kv: kv[1]) if ratios else None


def _rate(passes: list[bool]) -> float | None:
    return sum(passes) / len(passes) if passes else None


def summarise(out: Path) -> str:
    """Mean and 95 % t-interval over seeds per prompt x variant, as Markdown; also writes summary.json and plot.svg."""
    from promptbake.stats import seeds_mean_ci

    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    runs = [r for r in runs if not r.get("mean_of")]  # benchmarks/seed_soup.py's averages of bakes: no run of a variant
    # An averaged run (ema_decay) also measured its own last step. Its training is the variant's without the
    # average, so where that variant was run too (other seeds), the last step is one more seed of it; otherwise
    # it is a row of its own.
    seen = {(r["prompt"], r["variant"], r["seed"]) for r in runs}
    variants = {(prompt, variant) for prompt, variant, _ in seen}
    for r in [r for r in runs if r.get("last_step")]:
        plain = "+".join(part for part in r["variant"].split("+") if not part.startswith("ema"))
        joins = (r["prompt"], plain) in variants and (r["prompt"], plain, r["seed"]) not in seen
        runs.append({**r, **{k: v for k, v in r["last_step"].items() if k != "measured"},
                     "variant": plain if joins else f"{r['variant']} (last step)"})
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        reference = json.loads(reference_path(out, r["prompt"], r["measure_cap"]).read_text())
        weakest = weakest_check(r, reference["checks"]["teacher"])
        r["weakest_check"], r["weakest_ratio"] = weakest if weakest else (None, None)
        # steps in the key: a preset-* variant run before and after a change of the default's steps is two rows
        groups.setdefault((r["prompt"], r["variant"], r["token_budget"], r["steps"] if not r["token_budget"] else None), []).append(r)
    rows, table = [], []
    for (prompt, variant, budget, _), rs in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][3] or 0)):
        def est(key, bounds=None, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return seeds_mean_ci(vals, bounds) if vals else None
        row = {"prompt": prompt, "variant": variant, "token_budget": budget, "seeds": sorted(r["seed"] for r in rs),
               "response_cap": sorted({r["response_cap"] for r in rs}),
               "reverse_gap": est("reverse_gap"), "forward_gap": est("forward_gap"), "check_ratio": est("check_ratio"),
               "weakest_ratio": est("weakest_ratio"), "weakest_check": sorted({r["weakest_check"] for r in rs if r["weakest_check"]}),
               "compile_min": est("compile_s"), "steps": est("steps"),
               "bucket_gaps": {k: seeds_mean_ci([r["bucket_gaps"][k] for r in rs if r["bucket_gaps"].get(k) is not None])
                               for k in rs[0]["bucket_gaps"]}}
        rows.append(row)
        fmt = lambda e, p=False: "" if e is None else (f"{e.value:.3f}" if e.n == 1 else f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]")
        buckets = " / ".join(f"{e.value:.2f}" for e in row["bucket_gaps"].values())
        table.append(f"| {prompt} | {variant} | {f'{budget // 1000}k' if budget else 'its steps'} | {len(rs)} | {','.join(map(str, row['response_cap']))} | "
                     f"{row['steps'].value:.0f} | {fmt(row['reverse_gap'])} | {buckets} | {fmt(row['forward_gap'])} | "
                     f"{fmt(row['check_ratio'])} | {fmt(row['weakest_ratio'])} {','.join(row['weakest_check'])} | "
                     f"{row['compile_min'].value / 60:.1f} |")
    header = ("| prompt | variant | tokens trained | seeds | cap | steps | reverse KL gap closed | by position (0-47 / 48-127 / 128+) | "
              "forward KL gap closed | check ratio (pooled) | weakest check ratio | compile min |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    md = header + "\n" + "\n".join(table)
    (out / "summary.md").write_text(md + "\n")
    write_json(out / "summary.json", {"rows": [{k: (v.to_dict() if hasattr(v, "to_dict") else
                                                   ({kk: vv.to_dict() for kk, vv in v.items()} if isinstance(v, dict) else v))
                                               for k, v in row.items()} for row in rows]})
    (out / "plot.svg").write_text(scatter_svg(rows))
    return md


def load_run(out: Path, prompt: str, name: str) -> dict:
    """A saved run's result; a missing one stops the script with a line naming where the runs are."""
    path = run_path(out, prompt, name)
    if not path.is_file():
        sys.exit(f"{path}: no saved run of that name (the runs of {prompt} are the .json files in {path.parent})")
    return json.loads(path.read_text())


def measured_of(out: Path, prompt: str, name: str) -> dict:
    """A saved run's per-query measurement; `NAME:last-step` is an averaged run's own last-step weights (`last_step`)."""
    base, _, part = name.partition(":")
    run = load_run(out, prompt, base)
    if part == "last-step":
        if not run.get("last_step"):
            sys.exit(f"{base}: no last-step measurement (only runs with ema_decay have one)")
        return run["last_step"]["measured"]
    if part:
        sys.exit(f"{name}: unknown part '{part}' (only ':last-step')")
    return run["measured"]


def paired_difference(out: Path, prompt: str, first: str, others: list[str], cap: int = 256) -> dict:
    """Gap closed by run `first` minus the mean over runs `others`, reverse and forward, each with a 95 % interval
    that resamples held-out queries jointly: every run is measured on the same queries, so what they share (a hard
    query is hard for every run) cancels, and the interval is the difference's own noise."""
    import numpy as np

    from promptbake.stats import bootstrap

    reference = json.loads(reference_path(out, prompt, cap).read_text())
    runs = [measured_of(out, prompt, name) for name in [first, *others]]
    result = {"prompt": prompt, "first": first, "others": others}
    for kind in ("reverse", "forward"):
        def difference(*columns):
            gaps = gaps_of_columns(*columns)
            return float(gaps[0] - np.mean(gaps[1:]))

        result[kind] = bootstrap(gap_columns(reference, runs, kind), difference, n_boot=4000).to_dict()
    return result


def gap_columns(reference: dict, runs: list[dict], kind: str) -> list:
    """The per-query columns every paired comparison resamples jointly: the base's KL and tokens, then each run's."""
    columns = [reference[kind]["per_query"], reference[kind]["tokens"]]
    for run in runs:
        columns += [run[kind]["per_query"], run[kind]["tokens"]]
    return columns


def gaps_of_columns(base_kl, base_n, *runs_kl_n) -> list[float]:
    """Each run's gap closed from `gap_columns`' layout (one resample of it)."""
    from promptbake.stats import gap_closed

    return [gap_closed(runs_kl_n[i], base_kl, runs_kl_n[i + 1], base_n) for i in range(0, len(runs_kl_n), 2)]


def seeds_difference(out: Path, prompt: str, first: str, other: str, seeds: list[int],
                     budget: int = DEFAULT_BUDGET, cap: int = 256) -> dict:
    """Variant `first` against variant `other` over the seeds where both were run: the mean over those seeds of each
    seed's paired difference in gap closed, with a 95 % interval that resamples held-out queries jointly across every
    run. The interval is the queries' noise given those seeds; the per-seed differences beside it show the seeds'."""
    import numpy as np

    from promptbake.stats import bootstrap

    pairs = [(seed, run_name(first, seed, budget), run_name(other, seed, budget)) for seed in seeds]
    pairs = [p for p in pairs if run_path(out, prompt, p[1]).is_file() and run_path(out, prompt, p[2]).is_file()]
    result = {"prompt": prompt, "first": first, "other": other, "seeds": [seed for seed, _, _ in pairs]}
    if not pairs:
        return result
    reference = json.loads(reference_path(out, prompt, cap).read_text())
    runs = [measured_of(out, prompt, name) for _, a, b in pairs for name in (a, b)]  # first, other, first, other...
    for kind in ("reverse", "forward"):
        columns = gap_columns(reference, runs, kind)

        def per_seed(*columns):
            gaps = gaps_of_columns(*columns)
            return [a - b for a, b in zip(gaps[0::2], gaps[1::2])]

        result[kind] = {**bootstrap(columns, lambda *c: float(np.mean(per_seed(*c))), n_boot=4000).to_dict(),
                        "per_seed": [round(d, 4) for d in per_seed(*(np.asarray(c, dtype=float) for c in columns))]}
    return result


def length_split(measured: dict, cap: int) -> dict:
    """One model's own held-out answers (the reverse-KL samples) split at the measure cap: answers cut there (at a
    135M size mostly loops) against answers that ended. The gap is a mean over tokens, so the cut answers weigh
    `cap` tokens each."""
    import statistics

    tokens, kls = measured["tokens"], measured["per_query"]
    ended = [(k, n) for k, n in zip(kls, tokens) if n < cap]
    cut = [(k, n) for k, n in zip(kls, tokens) if n >= cap]
    mean = lambda pairs: sum(k * n for k, n in pairs) / sum(n for _, n in pairs) if pairs else float("nan")
    return {"answers": len(tokens), "cut": len(cut), "median_tokens": statistics.median(tokens),
            "mean_tokens": sum(tokens) / len(tokens), "ended_mean_tokens": sum(n for _, n in ended) / max(len(ended), 1),
            "cut_token_share": sum(n for _, n in cut) / max(sum(tokens), 1),
            "kl_all": mean(list(zip(kls, tokens))), "kl_ended": mean(ended), "kl_cut": mean(cut)}


def lengths_table(out: Path, prompt: str, cap: int = 256) -> tuple[str, dict]:
    """Every saved run of `prompt` against the base and the teacher: answer lengths and the gap with and without the
    answers cut at the cap (the reverse gap on answers that ended compares them with the base's that ended)."""
    reference = json.loads(reference_path(out, prompt, cap).read_text())
    base = length_split(reference["reverse"], cap)
    rows = {"teacher (its forward-KL samples)": length_split(reference["forward"], cap), "base": base}
    gaps = {}
    for path in sorted((out / "runs" / prompt).glob("*.json")):
        run = json.loads(path.read_text())
        rows[path.stem] = length_split(run["measured"]["reverse"], cap)
        gaps[path.stem] = {"all": run["reverse_gap"], "ended": 1 - rows[path.stem]["kl_ended"] / base["kl_ended"]}
    lines = [f"| {prompt}, own answers to {base['answers']} held-out queries | cut at {cap} | median tokens | mean tokens "
             "| mean tokens, answers that ended | share of tokens in cut answers | KL per token, ended / cut | "
             "reverse gap closed, all / answers that ended |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        g = gaps.get(name)
        kl = "" if name.startswith("teacher") else f"{r['kl_ended']:.4f} / {r['kl_cut']:.4f}"  # the teacher's own KL is 0
        lines.append(f"| {name} | {r['cut']} | {r['median_tokens']:g} | {r['mean_tokens']:.1f} | {r['ended_mean_tokens']:.1f} | "
                     f"{r['cut_token_share']:.2f} | {kl} | " + (f"{g['all']:.3f} / {g['ended']:.3f} |" if g else "|"))
    return "\n".join(lines), {"prompt": prompt, "cap": cap, "rows": rows, "gaps": gaps}


def scatter_svg(rows: list[dict], width: int = 720, height: int = 420) -> str:
    """KL gap closed (mean over seeds, with its interval) against compile minutes, one point per prompt x variant."""
    pts = [(r["compile_min"].value / 60, r["reverse_gap"],
            f"{r['prompt']}/{r['variant']}" + ("" if r["token_budget"] in (DEFAULT_BUDGET, 0) else f" {r['token_budget'] // 1000}k"))
           for r in rows if r["reverse_gap"]]
    if not pts:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    left, bottom, top, right = 56, 40, 16, 200
    xmax = max(p[0] for p in pts) * 1.1 or 1.0
    lo = min(0.0, min(p[1].lo for p in pts))
    x = lambda v: left + v / xmax * (width - left - right)
    y = lambda v: top + (1 - (v - lo) / (1 - lo)) * (height - top - bottom)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">']
    for f in (0, 0.25, 0.5, 0.75, 0.9, 1.0):
        v = lo + f * (1 - lo) if f not in (0.9,) else 0.9
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{"#f99" if v == 0.9 else "#eee"}"/>'
                     f'<text x="6" y="{y(v) + 4:.1f}">{v:.2f}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">compile minutes (2-core CPU) →</text>'
                 f'<text x="6" y="12">reverse KL gap closed on held-out file</text>')
    for i, (mins, est, label) in enumerate(pts):
        c = colors[i % len(colors)]
        parts.append(f'<line x1="{x(mins):.1f}" x2="{x(mins):.1f}" y1="{y(est.hi):.1f}" y2="{y(est.lo):.1f}" stroke="{c}"/>'
                     f'<circle cx="{x(mins):.1f}" cy="{y(est.value):.1f}" r="4" fill="{c}"><title>{label}: {est.value:.3f}</title></circle>'
                     f'<text x="{width - right + 8}" y="{top + 14 * i + 10}" fill="{c}">● {label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summary:
        print(summarise(args.out))
        return
    if args.lengths:
        for prompt in args.prompts.split(","):
            text, data = lengths_table(args.out, prompt, args.measure_cap)
            write_json(args.out / f"lengths-{prompt}.json", data)
            print(text)
        return
    if args.versus:
        first, other = args.versus
        for prompt in args.prompts.split(","):
            d = seeds_difference(args.out, prompt, first, other, [int(s) for s in args.seeds.split(",")],
                                 args.token_budget, args.measure_cap)
            if not d["seeds"]:
                print(f"[{prompt}] no seed of {args.seeds} has both {first} and {other}")
                continue
            write_json(args.out / "versus" / f"{prompt}-{first}-vs-{other}.json", d)
            print(f"[{prompt}] {first} minus {other}, seeds {','.join(map(str, d['seeds']))}: " + "; ".join(
                f"{kind} gap {d[kind]['value']:+.3f} [{d[kind]['ci95'][0]:+.3f}, {d[kind]['ci95'][1]:+.3f}] "
                f"(per seed {', '.join(f'{x:+.3f}' for x in d[kind]['per_seed'])})" for kind in ("reverse", "forward")))
        return
    if args.paired:
        if len(args.paired) < 2:
            sys.exit("--paired needs a run and at least one run to compare it with")
        for prompt in args.prompts.split(","):
            d = paired_difference(args.out, prompt, args.paired[0], args.paired[1:], args.measure_cap)
            print(f"[{prompt}] {d['first']} minus the mean of {', '.join(d['others'])}: " + "; ".join(
                f"{kind} gap {d[kind]['value']:+.3f} [{d[kind]['ci95'][0]:+.3f}, {d[kind]['ci95'][1]:+.3f}]"
                for kind in ("reverse", "forward")))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for prompt in args.prompts.split(","):
        measurer = Measurer(REPO / "prompts" / f"{prompt}.md", args.measure_cap)
        reference = measurer.reference(reference_path(args.out, prompt, args.measure_cap))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                path = run_path(args.out, prompt, run_name(variant, seed, args.token_budget))
                if path.is_file():
                    continue
                print(f"[{prompt}] {variant} seed {seed}", flush=True)
                run = run_one(args, prompt, variant, seed, reference, measurer)
                write_json(path, run)
                print(f"[{prompt}] {variant} s{seed}: reverse gap {run['reverse_gap']:.3f} forward {run['forward_gap']:.3f} "
                      f"check ratio {run['check_ratio']} compile {run['compile_s'] / 60:.1f} min", flush=True)
    print(summarise(args.out))


if __name__ == "__main__":
    main()
