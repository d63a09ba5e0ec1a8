"""Benchmark: does compiling pay in a short compile once torch's on-disk compile cache is warm?

Runs whole compiles of a prompt (the quick preset by default: 16 steps, cap 64; no held-out measurement), each in a
fresh process so nothing compiled stays in memory between them, with `torch_compile` off and unset ("auto", which
compiles a short run only when promptbake.compile_cache finds this model's graphs recorded), in alternating order
over rounds. Prints wall and training seconds, step 1 and the median later step, and what auto chose.
"compiled-floats-traced" compiles as promptbake did before it specialised Python floats (each graph traced twice);
"compiled-mask-skipped" as before training passes always built their attention mask (four layer graphs, not two).
`--cold` gives every compile an empty compile cache; `--steps` overrides the preset's steps.

    python benchmarks/short_compile.py [--prompt prompts/pirate.md] [--rounds 2] [--variants "eager,auto"]
        [--steps N] [--cold] [--out results/short_compile.json]

Run a compiled compile once before (any run with torch_compile on records the cache); otherwise auto stays eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = {"eager": False, "compiled": True, "auto": None, "compiled-floats-traced": True, "compiled-mask-skipped": True}


def one_compile(prompt: Path, variant: str, preset: str, steps: int | None) -> dict:
    import promptbake.train
    from promptbake.bake import compile_prompt
    from promptbake.events import TrainingStarted

    if variant == "compiled-floats-traced":  # before: floats traced as symbols, each graph traced twice
        promptbake.train.SPECIALIZE_FLOATS = False
    if variant == "compiled-mask-skipped":  # before: unpadded micro-batches got no mask, and the layers more graphs
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        from promptbake.fastdecode import NAME
        AttentionMaskInterface.register(NAME, sdpa_mask)
    said = []
    overrides = dict(preset=preset, torch_compile=VARIANTS[variant], checkpoint_every=10_000)
    if steps:
        overrides["steps"] = steps
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = compile_prompt(prompt, out=Path(tmp) / "out", measure=False, on_event=said.append, overrides=overrides)
        wall = time.perf_counter() - t
    steps = [e.seconds for e in result.train.log]
    started = next(e.message for e in said if isinstance(e, TrainingStarted))
    return {"variant": variant, "wall_s": round(wall, 1), "train_s": round(sum(steps), 1), "step1_s": round(steps[0], 1),
            "later_median_s": round(statistics.median(steps[1:]), 2), "steps": len(steps),
            "compiled": "compiled" in started, "training": started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=Path, default=REPO / "prompts" / "pirate.md")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="override the preset's steps")
    parser.add_argument("--cold", action="store_true", help="each compile with its own empty compile cache")
    parser.add_argument("--variants", default="eager,auto")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "short_compile.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_compile(args.prompt, args.worker[0], args.preset, args.steps)))
        return
    names = [v.strip() for v in args.variants.split(",")]
    runs = []
    for rnd in range(args.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):  # alternate: machine noise hits every variant alike
            print(f"round {rnd + 1}: {name} ...", flush=True)
            with tempfile.TemporaryDirectory() as cache:
                # cold: an empty compile cache, and a promptbake home of its own, so the record of this machine's warm
                # cache is left as it was
                env = os.environ | ({"TORCHINDUCTOR_CACHE_DIR": cache, "PROMPTBAKE_HOME": cache} if args.cold else {})
                out = subprocess.run([sys.executable, __file__, "--prompt", str(args.prompt), "--preset", args.preset,
                                      "--worker", name, str(rnd)] + (["--steps", str(args.steps)] if args.steps else []),
                                     capture_output=True, text=True, check=True, env=env)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"round": rnd + 1})
    print(f"\n{args.preset} preset{f', {args.steps} steps' if args.steps else ''}, {args.prompt.name}, one fresh process "
          f"per compile{', each with an empty compile cache' if args.cold else ''}")
    print(f"{'variant':10} {'round':>5} {'compiled':>8} {'train s':>8} {'step 1 s':>8} {'later step s':>12}")
    for run in runs:
        print(f"{run['variant']:10} {run['round']:>5} {str(run['compiled']):>8} {run['train_s']:>8} {run['step1_s']:>8} "
              f"{run['later_median_s']:>12}")
    totals = {n: sum(r["train_s"] for r in runs if r["variant"] == n) for n in names}
    base = "eager" if "eager" in names else names[0]
    for n in names:
        if n != base:
            print(f"{n}: {totals[base] / totals[n]:.2f}x as fast as {base} (training time, all rounds)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "preset": args.preset, "steps": args.steps,
                                    "cold": args.cold, "prompt": args.prompt.name, "rounds": args.rounds,
                                    "runs": runs, "train_s_total": totals}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
