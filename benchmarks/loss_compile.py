"""Benchmark: the student's loss over the full vocabulary, eager against `torch.compile`, forward and backward.

The loss of one micro-batch (default: 2 rows x 128 tokens x SmolLM2's 49,152-token vocabulary, bf16 logits from
the model as under autocast, the default objective: `forward_kl_weight` 0.5) is a handful of passes over
full-vocabulary fp32 copies: two log-softmaxes, two exps, the weighted difference, its sum, and as many again
backwards. Compiled, inductor can fuse them into fewer passes over memory. Each variant runs on the same
logits; the table gives the median of `--repeats` calls after one warm-up (compiling, for the compiled one), and
how far its loss and gradient are from eager's.

    python benchmarks/loss_compile.py [--rows 2] [--tokens 128] [--repeats 5] [--json results/loss_compile.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from promptbake.losses import _distill_loss, distill_loss

REPO = Path(__file__).resolve().parents[1]
VOCAB = 49152  # SmolLM2's


def run(loss_fn, student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, ids_BT: torch.Tensor, weight: float,
        repeats: int) -> tuple[list[float], float, torch.Tensor, torch.Tensor]:
    """Seconds of forward + backward per call (the first call apart), the loss and the logits' gradient."""
    times, first = [], 0.0
    for i in range(repeats + 1):
        x = student_BTV.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = loss_fn(x, teacher_BTV, ids_BT, weight).sum()
        loss.backward()
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        else:
            times.append(dt)
    return times, first, loss.detach(), x.grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2, help="rows per micro-batch (the default micro_batch_size)")
    parser.add_argument("--tokens", type=int, default=128, help="response tokens per row (the faithful cap)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward-weight", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "loss_compile.json")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.tokens, VOCAB)
    student_BTV = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
    teacher_BTV = (student_BTV.float() + torch.randn(shape, generator=g)).to(torch.bfloat16)
    ids_BT = torch.randint(0, VOCAB, shape[:2], generator=g)

    compiled = torch.compile(_distill_loss, dynamic=True)
    variants = {
        "eager (distill_loss)": lambda x, t, ids, w: distill_loss("opcd", "full", x, t, ids, 1.0, 256, forward_weight=w),
        "compiled (_distill_loss, dynamic shapes)": lambda x, t, ids, w: compiled("opcd", "full", x, t, ids, 1.0, 256, w),
    }
    rows, reference = [], None
    for name, fn in variants.items():
        times, first, loss, grad = run(fn, student_BTV, teacher_BTV, ids_BT, args.forward_weight, args.repeats)
        if reference is None:
            reference = (loss, grad)
        rows.append({"variant": name, "median_s": statistics.median(times), "first_call_s": first,
                     "loss_rel_diff": float((loss - reference[0]).abs() / reference[0].abs()),
                     "grad_max_abs_diff": float((grad.float() - reference[1].float()).abs().max()),
                     "grad_max_abs": float(reference[1].float().abs().max())})
    base = rows[0]["median_s"]
    print(f"loss over {args.rows} x {args.tokens} x {VOCAB} bf16 logits, forward KL weight {args.forward_weight}, "
          f"forward + backward, median of {args.repeats}")
    print(f"{'variant':42} {'s':>7} {'speed-up':>8} {'first call s':>12} {'loss rel diff':>13} {'grad max |diff|':>15}")
    for r in rows:
        r["speedup"] = base / r["median_s"]
        print(f"{r['variant']:42} {r['median_s']:>7.3f} {r['speedup']:>7.2f}x {r['first_call_s']:>12.1f} "
              f"{r['loss_rel_diff']:>13.2e} {r['grad_max_abs_diff']:>15.2e}")
    report = {"rows": args.rows, "tokens": args.tokens, "vocab": VOCAB, "forward_weight": args.forward_weight,
              "threads": torch.get_num_threads(), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "variants": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
