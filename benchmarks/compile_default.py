"""Benchmark: the README's default compile (`promptbake compile prompts/pirate.md`), wall time and peak RSS.

Runs the real CLI in a child process into a temporary folder (so build/ is untouched) and reads the
child's peak resident memory from the kernel. The phase split comes from the manifest's timings and the
training log, so a slow run says where it was slow.

    python benchmarks/compile_default.py [--prompt prompts/pirate.md] [--out benchmarks/results/compile_default.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=Path, default=REPO / "prompts" / "pirate.md")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile_default.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "promptbake.cli", "compile", str(args.prompt), "--out", str(adapter)],
                              capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"compile failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        manifest = json.loads((adapter / "bake.json").read_text())
        log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines() if line.strip()]

    timings = manifest["timings"]
    phases = {k: statistics.median(e[f"{k}_seconds"] for e in log) for k in ("sample", "teacher", "student")}
    row = {
        "prompt": str(args.prompt.relative_to(REPO) if args.prompt.is_relative_to(REPO) else args.prompt),
        "wall_seconds": wall, "peak_rss_gb": peak_gb, "steps": len(log),
        "median_step_seconds": statistics.median(e["seconds"] for e in log),
        "median_phase_seconds": phases, "timings": timings,
        "heldout_kl": [manifest["heldout_kl_before"], manifest["heldout_kl_after"]],
    }
    print(f"\ndefault compile of {row['prompt']} ({len(log)} steps, {manifest['config']['batch_size']} queries/step)\n")
    print(f"{'wall (process start to exit)':<40}{wall:>9.1f} s")
    for key in ("load_s", "measure_before_s", "train_s", "measure_after_s"):
        print(f"  {key:<38}{timings.get(key, 0.0):>9.1f} s")
    print(f"{'median step':<40}{row['median_step_seconds']:>9.2f} s  "
          f"(sample {phases['sample']:.2f}, teacher {phases['teacher']:.2f}, student {phases['student']:.2f})")
    print(f"{'peak RSS':<40}{peak_gb:>9.2f} GiB  ({peak_gb * 2**30 / 1e9:.2f} GB)")
    print(f"{'held-out KL before -> after':<40}{row['heldout_kl'][0]:>9.4f} -> {row['heldout_kl'][1]:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
