"""Benchmark: what each optimisation buys, side by side in one run.

Part 1, teacher scoring: batch 4 x (system prompt + query + 64 response tokens) with the prompt's KV
cache vs without, for the shipped pirate prompt and a ~2,000-token prompt, fp32 and bf16; the max abs
difference of the logits is reported too.

Part 2, whole OPCD steps on the default model: each variant (all on, no prefix cache, no bf16 sampler
copy, fp32, no heap trim, torch.compile of the layers) runs in its own process (so peak RSS is its own),
in alternating order over rounds. Step 1 is reported apart: it holds one-off warm-up and compiling.

    python benchmarks/train_step.py [--steps 3] [--rounds 1] [--variants "all on,no heap trim"] [--skip-scoring]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # quality.eager_decoding_only
PIRATE = REPO / "prompts" / "pirate.md"
VARIANTS = {
    "all on": {},
    "no prefix cache": {"prefix_cache": False},
    "no bf16 sampler copy": {"sampler_copy": False},
    "fp32 everywhere": {"precision": "fp32"},
    # fp32 with everything compiled (the setting on CPUs without native bf16: AVX2, or AVX-512 without AVX512_BF16)
    "fp32 compiled": {"precision": "fp32", "torch_compile": True},
    "bf16 compiled": {"precision": "bf16", "torch_compile": True},
    "fp32 compiled + micro-batch 2": {"precision": "fp32", "torch_compile": True, "micro_batch_size": 2,
                                      "micro_batch_tokens": 10**9},
    # fp32 with the rows bf16 takes (up to 8 rows and 400 tokens: six at the 48-token cap), as before 2026-12-07
    "fp32 compiled + micro-batch 8": {"precision": "fp32", "torch_compile": True, "micro_batch_size": 8},
    "no heap trim": {"release_memory": False},
    "torch.compile layers": {"torch_compile": True},  # the setting: decoder layers, the sampler's decode step, the loss
    # Not settings: torch_compile with the sampler's decode step eager, as before compiled decoding; with the loss
    # eager, as before the compiled loss.
    "compiled layers + eager decoding": {"torch_compile": True, "eager_decoding": True},
    "compiled layers + eager loss": {"torch_compile": True, "eager_loss": True},
    # Not a setting: teacher scoring through the compiled layers too (the default keeps it eager).
    "compiled layers + compiled teacher": {"torch_compile": True, "compiled_teacher": True},
    # Not a setting: the student's training pass through SDPA's CPU kernel, as before its matmul attention.
    "compiled layers + SDPA training attention": {"torch_compile": True, "training_scores_budget": 0},
    # Not a setting: teacher scoring one micro-batch per call, as before several were scored together.
    "compiled layers + teacher per micro-batch": {"torch_compile": True, "teacher_scoring_bytes": 0},
    # Not settings: the teacher's budget per call at two and four times the default's 64 MiB (four and eight
    # micro-batches of two rows at the 128-token cap).
    "compiled layers + teacher 128 MiB": {"torch_compile": True, "teacher_scoring_bytes": 128 * 2**20},
    "compiled layers + teacher 256 MiB": {"torch_compile": True, "teacher_scoring_bytes": 256 * 2**20},
    # Not a setting: the output layer tied to the fp32 input embeddings and cast by autocast at every forward (and
    # the sampler holding its own bf16 copy of the table), as before it was stored in bf16.
    "compiled layers + fp32 output layer": {"torch_compile": True, "bf16_output_layer": False},
    # Not a setting: the compiled decode step's prefill over the whole bucket width (its padding included), as before.
    "compiled layers + padded prefill": {"torch_compile": True, "skip_bucket_padding": False},
    # Not a setting: prompts' shared first tokens run by every row (no sharing in the samplers or the student's
    # pass), as before the static prefill shared them.
    "compiled layers + no shared prefix": {"torch_compile": True, "min_shared_prefix": 10**9},
    # Not a setting: the student's training pass runs the prompts' shared first tokens in every row, as before it ran
    # them once per update.
    "compiled layers + student prefix per row": {"torch_compile": True, "share_student_prefix": False},
    # Student micro-batches of a set number of rows whatever their tokens, everything compiled (the default: up to 8
    # rows and 400 tokens; 2 rows was the default before).
    # Not a setting: without bf16 (fp32, no merged copy), the sampler eager, as before its decode step compiled
    # through the policy.
    "compiled layers + eager fp32 decoding": {"torch_compile": True, "compile_policy_decoding": False},
    # Not a setting: fp32 decoding's linears as `F.linear` takes them (x @ W.T), as before they ran weight first.
    "fp32 compiled + x-first linears": {"precision": "fp32", "torch_compile": True, "weight_first_linears": False},
    # The compiled layers' activation budget (`activation_memory_budget`; 1, torch's default partition, is the default),
    # and gradient checkpointing under compiled layers, for the memory each saves.
    "compiled layers + activation budget 0.3": {"torch_compile": True, "activation_memory_budget": 0.3},
    "compiled layers + activation budget 0.1": {"torch_compile": True, "activation_memory_budget": 0.1},
    "compiled layers + activation budget 0": {"torch_compile": True, "activation_memory_budget": 0.0},
    "compiled layers + gradient checkpointing": {"torch_compile": True, "gradient_checkpointing": True},
    "compiled layers + micro-batch 2": {"torch_compile": True, "micro_batch_size": 2, "micro_batch_tokens": 10**9},
    "compiled layers + micro-batch 4": {"torch_compile": True, "micro_batch_size": 4, "micro_batch_tokens": 10**9},
    "compiled layers + micro-batch 8": {"torch_compile": True, "micro_batch_size": 8, "micro_batch_tokens": 10**9},
    # oneDNN's kernel cache at a set size, everything compiled: 256 is what promptbake sets on import (unless
    # ONEDNN_PRIMITIVE_CACHE_CAPACITY is already set), 64 was tried and not kept.
    "compiled layers + oneDNN cache 256": {"torch_compile": True, "onednn_cache": 256},
    "compiled layers + oneDNN cache 64": {"torch_compile": True, "onednn_cache": 64},
    # Not a setting: the loss forced into 256-token chunks (SmolLM2's 49k vocabulary is under the default threshold).
    "loss in 256-token chunks": {"loss_chunk_bytes": 256 * 4 * 49152},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "checkpointing + loss chunks": {"gradient_checkpointing": True, "loss_chunk_bytes": 256 * 4 * 49152},
    # Not a setting: the student's pass in the packed layout (prompt and response from column 0), which CUDA uses.
    "packed student pass": {"packed_layout": True},
    "micro-batch 1": {"micro_batch_size": 1},
    "micro-batch 2": {"micro_batch_size": 2},
    "micro-batch 8": {"micro_batch_size": 8},
    "micro-batch 16": {"micro_batch_size": 16},  # the whole default batch in one pass (for accelerators)
    "micro-batch 2 + checkpointing": {"micro_batch_size": 2, "gradient_checkpointing": True},
    # A setting, off by default: the next-token loss on the prompt's text, one pass over the prompt per update.
    "prompt text loss": {"prompt_lm_weight": 0.1},
}


def long_prompt_file(folder: Path, rules: int = 60) -> Path:
    """A long policy prompt of numbered rules (60: 3,307 tokens; 36: about 2,000), beside a copy of the pirate queries."""
    text = "\n".join(
        f"{i}. When a customer asks about topic {i}, answer politely, cite policy section {i}.{i % 7}, keep it under "
        f"{40 + i % 30} words, never promise refunds above {i * 3} dollars, and close with 'Ahoy, matey!'."
        for i in range(1, rules + 1)
    )
    (folder / "pirate_queries.jsonl").write_text((REPO / "prompts" / "pirate_queries.jsonl").read_text())
    path = folder / "long.md"
    path.write_text("---\nname: long\nqueries: pirate_queries.jsonl\n---\nYou are a support pirate. Follow every rule.\n" + text + "\n")
    return path


def teacher_scoring(prompt_path: Path, repeats: int = 3, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    import torch

    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import Rollout
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec
    from promptbake.teacher import PromptedTeacher

    runtime = load_runtime(resolve_model(None))  # the plain base: scored as a separate teacher, fp32 and bf16
    tok, model = runtime.tokenizer, runtime.model
    spec = load_spec(prompt_path)
    renderer = runtime.renderer(spec.system_prompt)
    queries = load_queries(spec.queries_path)[:4]
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(torch.randint(100, 40000, (4, 64), generator=g), torch.ones(4, 64, dtype=torch.long))
    prompt_tokens = len(tok(spec.system_prompt, add_special_tokens=False)["input_ids"])
    rows = []
    for bf16 in (p == "bf16" for p in precisions):
        timings, logits = {}, {}
        for cached in (True, False):
            teacher = PromptedTeacher(model, renderer, tok.pad_token_id, is_student=False, bf16=bf16, prefix_cache=cached)
            teacher.prepare(queries, 64, "bench")
            t0 = time.perf_counter()
            logits[cached] = teacher.logits(queries, rollout).float()  # first call builds the cache
            first = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                teacher.logits(queries, rollout)
                times.append(time.perf_counter() - t0)
            timings[cached] = (statistics.median(times), first)
        rows.append({
            "prompt": spec.name, "prompt_tokens": prompt_tokens, "precision": "bf16" if bf16 else "fp32",
            "cached_s": timings[True][0], "cache_build_plus_first_call_s": timings[True][1], "uncached_s": timings[False][0],
            "speedup": timings[False][0] / timings[True][0],
            "max_abs_logit_diff": float((logits[True] - logits[False]).abs().max()),
        })
    return rows


def worker(prompt: str, variant: str, steps: int, new_tokens: int) -> dict:
    """One variant, a few steps, in this process; prints its JSON."""
    if "onednn_cache" in VARIANTS[variant]:  # read by oneDNN at its first matmul, so before torch runs any
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(VARIANTS[variant]["onednn_cache"])
    from code_switches import apply_code_switches

    from promptbake.bake import compile_prompt

    settings = dict(VARIANTS[variant])
    settings.pop("onednn_cache", None)
    settings = apply_code_switches(settings)  # module constants: the code as it was before a change
    from quality import eager_decoding_only

    import promptbake.train

    eager_decoding = settings.pop("eager_decoding", False)
    if settings.pop("compiled_teacher", False):  # eager_only guards teacher scoring (and eager sampling, unused here)
        promptbake.train.eager_only = lambda enabled: contextlib.nullcontext()
        import promptbake.teacher
        import torch

        prefix = promptbake.teacher.PromptedTeacher._prefix

        def eager_prefix(self):  # once, with a growing cache: through the compiled layers it recompiles per layer
            with torch.compiler.set_stance("force_eager"):
                return prefix(self)
        promptbake.teacher.PromptedTeacher._prefix = eager_prefix
    if settings.pop("eager_loss", False):
        promptbake.train.compiled_loss = lambda enabled: contextlib.nullcontext(False)
    with tempfile.TemporaryDirectory() as tmp, eager_decoding_only() if eager_decoding else contextlib.nullcontext():
        overrides = dict(steps=steps, max_new_tokens=new_tokens, heldout=0, checkpoint_every=10_000, **settings)
        result = compile_prompt(prompt, out=Path(tmp) / "out", overrides=overrides)
    log = result.train.log[1:] or result.train.log  # step 1 includes one-off warm-up
    return {
        "first_step_s": result.train.log[0].seconds,  # one-off warm-up (and compiling, where on)
        "s_per_step": statistics.median(e.seconds for e in log),
        "tokens_per_s": sum(e.response_tokens for e in log) / sum(e.seconds for e in log),
        "sample_s": statistics.median(e.sample_seconds for e in log),
        "teacher_s": statistics.median(e.teacher_seconds for e in log),
        "student_s": statistics.median(e.student_seconds for e in log),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48, help="rollout cap (48: the first round's default; "
                        "128: today's faithful default)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_step.json")
    parser.add_argument("--worker", nargs=2, metavar=("PROMPT", "VARIANT"))
    parser.add_argument("--skip-steps", action="store_true", help="Only the teacher-scoring part.")
    parser.add_argument("--skip-scoring", action="store_true", help="Only the whole-step part.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Whole-step variants, comma-separated ('all on' always runs).")
    parser.add_argument("--long-rules", type=int, default=60, help="rules in the long prompt (60: 3,307 tokens; 36: about 2,000)")
    parser.add_argument("--precisions", default="fp32,bf16", help="teacher scoring precisions (bf16 is slow on CPUs without AVX-512)")
    parser.add_argument("--step-prompts", default="pirate,long", help="Prompts for the whole-step part (pirate, long, medical, support).")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.new_tokens)))
        return
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:  # before the minutes of the scoring part, not after
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    precisions = tuple(args.precisions.split(","))
    if not set(precisions) <= {"fp32", "bf16"}:  # anything else would silently run as fp32
        parser.error(f"--precisions: {args.precisions!r}; choose from fp32, bf16")
    names = ["all on"] + [v for v in chosen if v != "all on"]

    tmp = Path(tempfile.mkdtemp())
    prompts = {"pirate": PIRATE, "long": long_prompt_file(tmp, args.long_rules)}
    # medical: short answers (most end well before the cap), where finished rows leaving the batch matter most
    step_prompts = {**prompts, "medical": REPO / "prompts" / "medical.md", "support": REPO / "prompts" / "support.md"}
    report: dict = {"machine": f"{os.cpu_count()} cores", "teacher_scoring": [], "steps": {}}
    if not args.skip_scoring:
        for path in prompts.values():
            report["teacher_scoring"] += teacher_scoring(path, precisions=precisions)
        print("\nTeacher scoring, batch 4 x (prompt + query + 64 tokens), median of 3")
        print(f"{'prompt':8} {'tokens':>6} {'prec':>5} {'cached s':>9} {'uncached s':>10} {'speedup':>8} {'max |diff|':>10}")
        for r in report["teacher_scoring"]:
            print(f"{r['prompt']:8} {r['prompt_tokens']:>6} {r['precision']:>5} {r['cached_s']:>9.3f} {r['uncached_s']:>10.3f} "
                  f"{r['speedup']:>7.1f}x {r['max_abs_logit_diff']:>10.2e}")

    if not args.skip_steps:
        runs: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]  # alternate: machine noise hits every variant alike
            for pname, path in step_prompts.items():
                if pname not in args.step_prompts.split(","):
                    continue
                for variant in order:
                    proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--new-tokens",
                                           str(args.new_tokens), "--worker", str(path), variant],
                                          capture_output=True, text=True, check=True)
                    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
                    runs.setdefault((pname, variant), []).append(json.loads(line[7:]))
        print(f"\nOPCD steps on SmolLM2-135M (batch 16, {args.new_tokens} new tokens), median over {args.steps - 1} steps x {args.rounds} round(s)")
        print(f"{'prompt':8} {'variant':22} {'s/step':>7} {'tok/s':>6} {'sample':>7} {'teacher':>8} {'student':>8} {'RSS GiB':>7} {'vs all on':>9} {'step 1':>7}")
        for pname in [p for p in step_prompts if p in args.step_prompts.split(",")]:
            base = statistics.median(r["tokens_per_s"] for r in runs[(pname, "all on")])
            for variant in names:
                rs = runs[(pname, variant)]
                agg = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                agg["tokens_per_s_vs_all_on"] = agg["tokens_per_s"] / base
                report["steps"][f"{pname} / {variant}"] = agg
                print(f"{pname:8} {variant:22} {agg['s_per_step']:>7.2f} {agg['tokens_per_s']:>6.0f} {agg['sample_s']:>7.2f} "
                      f"{agg['teacher_s']:>8.2f} {agg['student_s']:>8.2f} {agg['peak_rss_gb']:>7.2f} {agg['tokens_per_s_vs_all_on']:>8.2f}x {agg['first_step_s']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
