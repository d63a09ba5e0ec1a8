"""Experiential knowledge over seeds: does the baked adapter keep the gain of the knowledge in context?

For each seed, `promptbake learn` (one run per seed, resumable: a seed whose learn.json is in results/ is not
run again), then a table of held-out accuracy for base, base + knowledge in context and baked (no context),
mean and 95 % t-interval over seeds, the in-context and baked gains over the base, and the knowledge's tokens.
Writes results/learn/<suite>/summary.{md,json} and each seed's learn.json, lessons.json and knowledge.md.

    python benchmarks/learn_study.py --suite gsm8k --seeds 0,1,2 --train-limit 64 --heldout-limit 100 --rounds 2 --preset quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="gsm8k")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=64)
    p.add_argument("--heldout-limit", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--preset", default="quick")
    p.add_argument("--data", type=Path, default=Path("..") / "shared" / "datasets", help="relative to the repository")
    p.add_argument("--summary", action="store_true", help="only summarise the saved seeds")
    args = p.parse_args(argv)
    results = REPO / "results" / "learn" / args.suite
    commands = results / "commands.md"
    if not args.summary:
        for seed in [int(s) for s in args.seeds.split(",")]:
            seed_dir = results / f"seed{seed}"
            if (seed_dir / "learn.json").is_file():
                print(f"seed {seed}: done already", flush=True)
                continue
            out = REPO / "build" / "learn" / f"{args.suite}-s{seed}"
            command = ["promptbake", "learn", "--suite", args.suite, "-o", str(out.relative_to(REPO)), "--seed", str(seed),
                       "--train-limit", str(args.train_limit), "--heldout-limit", str(args.heldout_limit),
                       "--rounds", str(args.rounds), "--preset", args.preset, "--data", str(args.data), "--force"]
            print("running:", " ".join(command), flush=True)
            t = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "promptbake"), *command[1:]], check=True, cwd=REPO)
            minutes = (time.perf_counter() - t) / 60
            seed_dir.mkdir(parents=True, exist_ok=True)
            for name in ("learn.json", "lessons.json", "knowledge.md"):
                shutil.copyfile(out / name, seed_dir / name)
            with open(commands, "a") as f:
                f.write(f"- `{' '.join(command)}` ({minutes:.1f} min)\n")
    print(summarise(results))


def summarise(results: Path) -> str:
    from promptbake.atomic import write_text_atomic
    from promptbake.stats import seeds_mean_ci

    runs = {int(d.name.removeprefix("seed")): json.loads((d / "learn.json").read_text())
            for d in sorted(results.glob("seed*")) if (d / "learn.json").is_file()}
    if not runs:
        return "no seeds measured yet"
    final = {seed: r["final"] for seed, r in runs.items()}
    rows = {
        "base": [f["heldout_base"]["value"] for f in final.values()],
        "base + knowledge in context": [f["heldout_in_context"]["value"] for f in final.values()],
        "baked, no context": [f["heldout_baked"]["value"] for f in final.values()],
        "gain in context (vs base)": [f["heldout_in_context"]["value"] - f["heldout_base"]["value"] for f in final.values()],
        "gain baked (vs base)": [f["heldout_baked"]["value"] - f["heldout_base"]["value"] for f in final.values()],
    }
    lines = ["| held-out accuracy | " + " | ".join(f"seed {s}" for s in runs) + " | mean [95% CI] |",
             "|---|" + "---|" * (len(runs) + 1)]
    summary = {}
    for name, values in rows.items():
        est = seeds_mean_ci(values, (-1.0, 1.0) if name.startswith("gain") else (0.0, 1.0))
        summary[name] = est.to_dict()
        interval = f"{est.value:+.1%}" if est.n == 1 else f"{est.value:+.1%} [{est.lo:+.1%}, {est.hi:+.1%}]"
        if not name.startswith("gain"):
            interval = interval.lstrip("+").replace("[+", "[").replace(", +", ", ")
        lines.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in values) + f" | {interval} |")
    tokens = [f["knowledge_tokens"] for f in final.values()]
    lessons = [len(r["knowledge"].splitlines()) - 1 for r in runs.values()]
    lines.append(f"| knowledge text | " + " | ".join(f"{n} lessons, {t} tokens" for n, t in zip(lessons, tokens)) + " | |")
    md = "\n".join(lines)
    write_text_atomic(results / "summary.md", md + "\n")
    write_text_atomic(results / "summary.json", json.dumps({"seeds": sorted(runs), "rows": summary,
                                                            "heldout_tasks": [f["heldout_tasks"] for f in final.values()]},
                                                           indent=1) + "\n")
    return md


if __name__ == "__main__":
    main()
