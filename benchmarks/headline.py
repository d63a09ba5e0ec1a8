"""The published results: the medical and safety bakes with the default settings, their domain evals and
out-of-domain retention, run as the plain `promptbake` commands a user would type.

Every step is one command; its output file under `results/headline/` is committed. A step whose output
exists is skipped, so the sequence continues where it stopped (these runs take hours on a 2-core CPU).
`results/headline/commands.md` lists the commands in the order they ran.

    python benchmarks/headline.py [--only medical|safety|retention] [--label DATE] [--dry-run]

`--label 2026-12-04` publishes a re-bake beside the earlier ones: each bake's results, its retention evals
included, go to `results/headline/<medical|safety>-<label>/`, and the earlier folders stay as they are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path("../shared/datasets")  # relative to the project root, where every command runs
BUILD = Path("build/headline")
RESULTS = Path("results/headline")


def results_dir(group: str, label: str | None) -> Path:
    """Where a group's outputs are published: `results/headline/<group>`, or `<group>-<label>` for a re-bake."""
    return RESULTS / (f"{group}-{label}" if label else group)


def steps(data: Path, label: str | None = None) -> list[tuple[str, list[str], Path]]:
    """(group, command, output that marks it done), in order. With a label, retention is evaluated per bake into
    its own folder, so that a re-bake's folder holds all of its results."""
    d = str(data)
    med, safe = BUILD / "medical", BUILD / "safety"
    res_med, res_safe = results_dir("medical", label), results_dir("safety", label)
    train_q = BUILD / "medmcqa_train.jsonl"
    # Retention: both adapters, out of their domain, against the base (decoded once) and each prompted baseline;
    # with a label, each bake on its own into its folder.
    retention_runs = [([med], res_med), ([safe], res_safe)] if label else [([med, safe], RESULTS / "retention")]
    pb = ["promptbake"]
    return [
        # Medical: bake on questions from MedMCQA's train-half subjects, evaluate on the other half's subjects.
        ("medical", pb + ["eval", "--suite", "medmcqa", "--groups", "train", "--limit", "640", "--data", d,
                          "--export-queries", str(train_q)], train_q),
        ("medical", pb + ["compile", "prompts/medical.md", "--queries", str(train_q), "-o", str(med), "--force"],
         med / "bake.json"),
        ("medical", pb + ["verify", str(med), "--json", str(res_med / "verify.json")],
         res_med / "verify.json"),
        ("medical", pb + ["eval", str(med), "--suite", "medmcqa", "--groups", "test", "--limit", "1000", "--data", d,
                          "--batch-size", "32", "--json", str(res_med / "eval-medmcqa.json")],
         res_med / "eval-medmcqa.json"),
        # Safety: the shipped safety prompt and its queries.
        ("safety", pb + ["compile", "prompts/safety.md", "-o", str(safe), "--force"], safe / "bake.json"),
        ("safety", pb + ["verify", str(safe), "--json", str(res_safe / "verify.json")],
         res_safe / "verify.json"),
        *[("safety", pb + ["eval", str(safe), "--suite", suite, "--data", d, "--batch-size", "32", *limit,
                           "--json", str(res_safe / f"eval-{suite}.json")], res_safe / f"eval-{suite}.json")
          for suite, limit in (("xstest", []), ("harmbench", []), ("advbench", []),
                               ("hatecheck", ["--limit", "1000"]), ("ethos", []))],
        *[("retention", pb + ["eval", *map(str, bakes), "--suite", suite, "--data", d, "--batch-size", "32", *limit,
                              "--json", str(res / f"eval-{suite}.json")], res / f"eval-{suite}.json")
          for bakes, res in retention_runs for suite, limit in (("mmlu", []), ("gsm8k", ["--limit", "200"]))],
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["medical", "safety", "retention"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--label", help="publish into results/headline/<group>-<label>/ (a re-bake beside the earlier ones)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    bin_dir = Path(sys.executable).parent
    log = RESULTS / "commands.md"
    for group, command, done in steps(args.data, args.label):
        if args.only and group != args.only:
            continue
        shown = shlex.join(command)
        if args.dry_run:
            print(shown)
            continue
        if done.exists():
            print(f"done already: {shown}")
            continue
        done.parent.mkdir(parents=True, exist_ok=True)
        print(f"running: {shown}", flush=True)
        t = time.perf_counter()
        subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True, cwd=REPO)
        minutes = (time.perf_counter() - t) / 60
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"- `{shown}` ({minutes:.1f} min)\n")
        if command[1] == "compile":  # the adapter's manifest and report beside the results (the weights stay in build/)
            out = results_dir(group, args.label)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(done, out / "bake.json")
            shutil.copyfile(done.parent / "train_log.jsonl", out / "train_log.jsonl")
    if not args.dry_run:
        for group in ("medical", "safety"):
            adapter = BUILD / group
            if (adapter / "bake.json").is_file():
                reports = adapter / "reports"
                reports.mkdir(exist_ok=True)
                published = results_dir(group, args.label)
                for path in published.glob("*.json"):
                    if path.name.startswith(("verify", "eval-")):
                        shutil.copyfile(path, reports / path.name)
                baked = json.loads((adapter / "bake.json").read_text()).get("adapter_sha256")
                retention = [] if args.label else (RESULTS / "retention").glob("eval-*.json")  # labelled: in its folder
                for path in retention:
                    name = reports / path.name.replace("eval-", "eval-retention-")
                    measured = json.loads(path.read_text()).get("adapter_sha256", {})
                    if baked and measured.get(group) == baked:
                        shutil.copyfile(path, name)
                    else:  # an earlier bake's retention: leave it out of this bake's report
                        name.unlink(missing_ok=True)
                        print(f"left out of {group}'s report: {path} measured another bake of {group}", flush=True)
                subprocess.run([str(bin_dir / "promptbake"), "report", str(adapter)], check=True, cwd=REPO)
                for name in ("report.html", "report.md"):
                    shutil.copyfile(adapter / name, published / name)


if __name__ == "__main__":
    main()
