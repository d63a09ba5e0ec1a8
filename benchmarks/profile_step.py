"""Benchmark: where the seconds of an OPCD step go, and what bounds them on this machine.

Three parts, one process:
1. A short compile of the pirate prompt on the default model (the README's default settings, fewer
   steps, no before/after measurement): each step's split into sampling, teacher scoring and the
   student's forward + backward, from the training log.
2. The same steps under the PyTorch profiler: time per kind of operation (matrix multiplies, attention,
   softmax, casts, other ATen ops, and what is left outside ATen: Python, generate's bookkeeping), and
   the matrix multiplies' FLOPs, so the rate they ran at is known.
   The profiler itself slows the step (every operation is recorded); the shares are what to read.
3. The rate matrix multiplies of the student's own shapes reach alone on this CPU in the bake's precision
   (no model around them), and of a large square one: the ceiling for the step's largest share.

    python benchmarks/profile_step.py [--steps 4] [--torch-compile] [--out benchmarks/results/profile_step.json]

With `--torch-compile` (what the default compile turns on) step 1, which compiles, is left out of the
profile and of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
PIRATE = REPO / "prompts" / "pirate.md"
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind_of(name: str) -> str:
    if name in GEMM_OPS or "linear" in name and "mkldnn" in name:
        return "matrix multiplies"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "softmax" in name:
        return "softmax / log-softmax"
    if name in {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}:
        return "casts and copies"
    return "other ATen ops"


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """GFLOP/s of a (m x k) @ (k x n) in `dtype` on this CPU, best of `repeats`."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_step.json")
    parser.add_argument("--torch-compile", action="store_true", help="compiled layers, decode step and loss; step 1 unprofiled")
    args = parser.parse_args()
    first = 2 if args.torch_compile else 1  # the first profiled step

    from promptbake.bake import compile_prompt
    from promptbake.events import StepDone, TrainingStarted

    prof = profile(activities=[ProfilerActivity.CPU], with_flops=True)
    window: dict[str, float] = {}

    def on_event(event) -> None:
        if isinstance(event, TrainingStarted) and first == 1 or isinstance(event, StepDone) and event.entry.step == first - 1:
            window["start"] = time.perf_counter()
            prof.start()
        elif isinstance(event, StepDone) and event.entry.step == args.steps:
            prof.stop()
            window["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        result = compile_prompt(PIRATE, out=Path(tmp) / "pirate", overrides={"steps": args.steps, "torch_compile": args.torch_compile},
                                measure=False,
                                on_event=on_event)
    log = result.train.log[first - 1:]
    wall = window["end"] - window["start"]

    phases = {name: statistics.median(getattr(e, f"{name}_seconds") for e in log) for name in ("sample", "teacher", "student")}
    step_s = statistics.median(e.seconds for e in log)
    tokens = statistics.median(e.response_tokens for e in log)

    kinds: dict[str, float] = {}
    gemm_flops = 0.0
    for avg in prof.key_averages():
        kinds[kind_of(avg.key)] = kinds.get(kind_of(avg.key), 0.0) + avg.self_cpu_time_total / 1e6
        if avg.key in GEMM_OPS:
            gemm_flops += float(avg.flops or 0)
    top = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:15]
    top_ops = [{"op": a.key, "calls": a.count, "self_seconds": a.self_cpu_time_total / 1e6} for a in top]
    kinds["outside ATen (Python, generate, optimizer glue)"] = max(0.0, wall - sum(kinds.values()))
    gemm_s = kinds.get("matrix multiplies", 0.0)

    config = result.manifest.config
    from promptbake.config import BakeConfig

    precision = result.manifest.precision
    rows = BakeConfig(**config).student_rows(precision == "bf16")
    seq = int(tokens / config["batch_size"]) + 60  # response + a typical student prompt
    shapes = {"student q/o proj": (rows * seq, 576, 576), "student MLP up": (rows * seq, 576, 1536),
              "student lm_head": (rows * 48, 576, 49152), "decode MLP up, 16 rows": (16, 576, 1536),
              "large square 2048": (2048, 2048, 2048)}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rates = {name: gemm_rate(*shape, dtype) for name, shape in shapes.items()}

    print(f"\nOPCD step on the default model, pirate prompt, {config['batch_size']} queries x <= {config['max_new_tokens']} tokens, "
          f"{torch.get_num_threads()} threads, {len(log)} steps profiled ({wall:.1f} s)\n")
    print(f"{'phase (median step)':<34}{'seconds':>9}{'share':>8}")
    for name, s in phases.items():
        print(f"{name:<34}{s:>9.2f}{s / step_s:>8.0%}")
    print(f"{'whole step':<34}{step_s:>9.2f}{'':>8}   ({tokens:.0f} response tokens)\n")
    print(f"{'kind of work (all steps)':<50}{'seconds':>9}{'share':>8}")
    for name, s in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{name:<50}{s:>9.2f}{s / wall:>8.0%}")
    print(f"\n{'busiest operations (self time)':<42}{'calls':>9}{'seconds':>9}{'us/call':>9}")
    for t in top_ops:
        print(f"{t['op'][:42]:<42}{t['calls']:>9}{t['self_seconds']:>9.2f}{t['self_seconds'] / t['calls'] * 1e6:>9.0f}")
    achieved = gemm_flops / max(gemm_s, 1e-9) / 1e9
    print(f"\nmatrix multiplies in the steps: {gemm_flops / 1e12:.2f} TFLOP in {gemm_s:.1f} s = {achieved:.0f} GFLOP/s")
    print(f"{precision + ' matmul alone':<34}{'shape (m,k,n)':>22}{'GFLOP/s':>10}")
    for name, shape in shapes.items():
        print(f"{name:<34}{str(shape):>22}{rates[name]:>10.0f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "steps": len(log), "threads": torch.get_num_threads(), "step_seconds_median": step_s, "response_tokens_median": tokens,
        "phase_seconds_median": phases, "profiled_wall_seconds": wall, "seconds_by_kind": kinds, "top_ops": top_ops,
        "precision": precision, "gemm_tflop": gemm_flops / 1e12, "gemm_gflops_achieved": achieved,
        "gemm_gflops_alone": {name: {"shape": shape, "gflops": rates[name]} for name, shape in shapes.items()},
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
