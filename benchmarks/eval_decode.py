"""Benchmark: the decode loop's two batch-shape savings, side by side in one run on the default model:
prompts prefilled in groups of similar length instead of one pass padded to the longest, and finished rows
dropped from the batch (once they are a quarter of it) instead of decoding padding until the longest answer ends.

- eval: the base model's greedy answers to the first N questions of MMLU and GSM8K, as `promptbake eval`
  decodes them (batched by length, its suite's answer cap);
- rollouts: the student sampling 16 answers of up to 128 tokens to the support prompt's training queries.

Prints a table (seconds, speedup, whether every answer is the same) and writes JSON.

    python benchmarks/eval_decode.py [--questions 64] [--batch-size 32] [--json results/eval_decode.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {  # label: (prefill padding allowed per group, fraction of finished rows that drops them)
    "one padded prefill, finished rows kept (before)": (1e9, 2.0),
    "grouped prefill, finished rows kept": (0.25, 2.0),
    "grouped prefill, finished rows dropped (default)": (0.25, 0.25),
    "grouped prefill, rows dropped at every end": (0.25, 0.0),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    p.add_argument("--json", type=Path, default=REPO / "results" / "eval_decode.json")
    args = p.parse_args(argv)

    import torch

    import promptbake.rollout as rollout_module
    from promptbake.config import BakeConfig
    from promptbake.evals.suites import load_items, load_suite
    from promptbake.measure import generate_ids
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    runtime = load_runtime(resolve_model(None), train=BakeConfig(), precision="bf16")  # as a compile sets it up
    tok, engine = runtime.tokenizer, runtime.engine()
    student = runtime.renderer("-")
    jobs = {}
    for suite_name in ("mmlu", "gsm8k"):
        suite = load_suite(suite_name)
        items = load_items(suite, args.data, args.questions, 0, "all")
        prompts = [student.student_ids([{"role": "user", "content": it.prompt}]) for it in items]
        jobs[f"eval {suite_name} ({len(items)} questions, cap {suite.max_new_tokens})"] = (
            lambda prompts=prompts, cap=suite.max_new_tokens: generate_ids(
                engine, tok, prompts, adapter=False, max_new_tokens=cap, batch_size=args.batch_size))
    spec = load_spec(REPO / "prompts" / "support.md")
    rollout_prompts = [student.student_ids(q.messages) for q in load_queries(spec.queries_path)[:16]]

    def rollouts():
        torch.manual_seed(0)
        ro = engine.sample(rollout_prompts, max_new_tokens=128, temperature=1.0, eos_ids=eos_token_ids(tok),
                           pad_id=tok.pad_token_id)
        return [row[mask.bool()].tolist() for row, mask in zip(ro.response_ids_BT, ro.response_mask_BT)]
    jobs["rollouts (16 x up to 128 tokens, temperature 1)"] = rollouts

    results = []
    for job, fn in jobs.items():
        ref_s, ref_out = None, None
        for label, (padding, fraction) in VARIANTS.items():
            rollout_module.PREFILL_PADDING, rollout_module.DROP_FINISHED_FRACTION = padding, fraction
            t = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t
            ref_s, ref_out = ref_s or seconds, ref_out or out
            same = sum(a == b for a, b in zip(out, ref_out)) / len(out)
            lengths = sorted(len(r) for r in out)
            row = {"job": job, "variant": label, "seconds": seconds, "speedup": ref_s / seconds,
                   "answers_same": same, "median_answer_tokens": lengths[len(lengths) // 2], "max_answer_tokens": lengths[-1]}
            results.append(row)
            print(f"{job:50} {label:50} {seconds:7.1f} s {ref_s / seconds:5.2f}x  same answers {same:.0%}  "
                  f"median/max tokens {row['median_answer_tokens']}/{row['max_answer_tokens']}", flush=True)
    rollout_module.PREFILL_PADDING, rollout_module.DROP_FINISHED_FRACTION = VARIANTS[
        "grouped prefill, finished rows dropped (default)"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"questions": args.questions, "batch_size": args.batch_size, "results": results},
                                    indent=1) + "\n")
    print("\n| job | variant | seconds | speedup | same answers | median / max answer tokens |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['job']} | {r['variant']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | {r['answers_same']:.0%} | "
              f"{r['median_answer_tokens']} / {r['max_answer_tokens']} |")


if __name__ == "__main__":
    main()
