"""Benchmark: is bf16 faster than fp32 on this CPU? The check behind `precision: auto`.

`auto` uses bf16 autocast only where the CPU has bf16 instructions (AVX512_BF16 or AMX): there bf16 matmuls run
natively and a compile is several times faster. Elsewhere bf16 is emulated: on AVX2-only CPUs (many AMD EPYC and
older Intel parts), and on Intel Xeons with AVX-512 but without AVX512_BF16, which torch reports as "AVX512" too. This times the default model's largest linear shape (576 -> 1536) at a decode
batch (16 rows) and a training batch (256 rows) in fp32, in bf16, and under bf16 autocast (which also casts
the fp32 weight on every call), side by side in one run, and prints what `auto` picks here.

`--kl-queries N` also asks whether bf16 limits how close a bake can get: on N held-out queries of the support
prompt, the base model samples answers (fp32), then the student's and the prompted teacher's logits are
computed in fp32 and under bf16 autocast, and the full-vocabulary KL between the two precisions of the same
model is set beside the base-to-teacher gap in each precision.

    python benchmarks/precision.py [--kl-queries 12] [--json results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (576, 1536)  # SmolLM2-135M's MLP up/gate projection (in, out)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up (oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="16,256", help="comma list of batch rows (tokens) per matmul")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--kl-queries", type=int, default=0, help="held-out support queries for the KL part (0: skip it)")
    p.add_argument("--kl-tokens", type=int, default=128, help="answer length of the KL part")
    p.add_argument("--json", type=Path, default=REPO / "results" / "precision.json")
    args = p.parse_args(argv)

    import torch

    from promptbake.runtime import cpu_has_native_bf16, use_bf16

    capability = torch.backends.cpu.get_cpu_capability()
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        x32 = torch.randn(rows, SHAPE[0])
        w32 = torch.randn(SHAPE[1], SHAPE[0])
        x16, w16 = x32.bfloat16(), w32.bfloat16()
        fp32 = _median_ms(lambda: x32 @ w32.T, args.repeats)
        bf16 = _median_ms(lambda: x16 @ w16.T, args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = _median_ms(lambda: x32 @ w32.T, args.repeats)
        rows_out.append({"rows": rows, "fp32_ms": fp32, "bf16_ms": bf16, "autocast_ms": autocast,
                         "bf16_speedup": fp32 / bf16, "autocast_speedup": fp32 / autocast})

    auto = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    native = cpu_has_native_bf16()
    print(f"CPU capability {capability}, bf16 instructions {'yes' if native else 'no'}, {torch.get_num_threads()} "
          f"threads; precision auto picks {auto}")
    print(f"| rows x {SHAPE[0]} @ {SHAPE[0]} x {SHAPE[1]} | fp32 ms | bf16 ms | bf16 autocast ms | bf16 vs fp32 | autocast vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['fp32_ms']:.3f} | {r['bf16_ms']:.3f} | {r['autocast_ms']:.3f} | "
              f"{r['bf16_speedup']:.2f}x | {r['autocast_speedup']:.2f}x |")
    report = {"cpu_capability": capability, "bf16_instructions": native, "threads": torch.get_num_threads(), "auto_picks": auto, "shape": SHAPE,
              "rows": rows_out}
    if args.kl_queries:
        report["kl"] = kl_between_precisions(args.kl_queries, args.kl_tokens)
        k = report["kl"]
        print(f"\nKL on {args.kl_queries} held-out support queries, base answers of up to {args.kl_tokens} tokens (per-token mean)")
        print("| KL | value |\n|---|---|")
        for name in ("student bf16 || fp32", "teacher bf16 || fp32", "base gap, fp32", "base gap, bf16"):
            print(f"| {name} | {k[name]:.5f} |")
    from promptbake.atomic import write_text_atomic

    write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")


def kl_between_precisions(n_queries: int, max_new_tokens: int, rows: int = 4) -> dict:
    """Per-token KL between bf16-autocast and fp32 logits of one model on the same tokens, beside the base gap."""
    import torch

    from benchmarks.heldout_samples import sample_heldout
    from promptbake.losses import reverse_kl
    from promptbake.rollout import autocast, response_logits

    held = sample_heldout(REPO / "prompts" / "support.md", n_queries, max_new_tokens)
    runtime, teacher, queries, prompts, rollout = held.runtime, held.teacher, held.queries, held.prompts, held.rollout
    tok = runtime.tokenizer
    sums: dict[str, float] = {}
    tokens = 0.0
    for start in range(0, len(queries), rows):
        index = list(range(start, min(start + rows, len(queries))))
        part = rollout.select(index)
        mask_BT = part.response_mask_BT.float()
        with torch.no_grad():
            logits = {}
            for bf16 in (False, True):
                with autocast(runtime.device, bf16):
                    logits[("student", bf16)] = response_logits(runtime.model, [prompts[i] for i in index], part,
                                                                tok.pad_token_id).float()
                teacher.bf16 = bf16
                teacher.refresh()  # the prompt's cache in this precision
                logits[("teacher", bf16)] = teacher.logits([queries[i] for i in index], part).float()
        pairs = {"student bf16 || fp32": (("student", True), ("student", False)),
                 "teacher bf16 || fp32": (("teacher", True), ("teacher", False)),
                 "base gap, fp32": (("student", False), ("teacher", False)),
                 "base gap, bf16": (("student", True), ("teacher", True))}
        for name, (first, second) in pairs.items():
            kl_BT = reverse_kl("full", logits[first], logits[second], part.response_ids_BT, 1.0)
            sums[name] = sums.get(name, 0.0) + float((kl_BT * mask_BT).sum())
        tokens += float(mask_BT.sum())
    return {name: total / tokens for name, total in sums.items()} | {"tokens": tokens, "queries": n_queries}


if __name__ == "__main__":
    main()
