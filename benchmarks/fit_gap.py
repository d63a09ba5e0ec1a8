"""Does a bake fall short of its teacher because it cannot fit, or because it does not generalise?

Measures a quality-study adapter with the study's own protocol (benchmarks/quality.py: reverse KL on the baked
model's samples, forward KL on the teacher's, temperature 1, answers up to 256 tokens) on N of the queries it
was *trained* on, and sets that beside its saved measurement on the separate held-out file. If the gap closed
on training queries is about the held-out one, the bake generalises as far as it fits, and more or more varied
queries will not close the rest; if it is clearly higher, they might.

Training queries are N lines spread evenly over the prompt's query file (the same lines every time). Base and
teacher on them are measured once per prompt and kept in `<out>/fit/reference-<prompt>-train<N>.json`.

    python benchmarks/fit_gap.py --prompt safety --runs preset-faithful+fwd0.5+steps80+ema0.9-s0-b0k-last-step
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from quality import BUCKETS, Measurer, gaps, reference_path, run_path, train_sample, write_json  # noqa: E402


def heldout_result(out: Path, prompt: str, run: str) -> dict:
    """The run's saved held-out measurement (a '-last-step' name: the last-step weights of an averaged run)."""
    name = run.removesuffix("-last-step")
    saved = json.loads(run_path(out, prompt, name).read_text())
    return saved["last_step"] if run.endswith("-last-step") else saved


def gap_ci(measured: dict, reference: dict, kind: str):
    from promptbake.stats import gap_closed_ci

    m, r = measured[kind], reference[kind]
    return gap_closed_ci(m["per_query"], r["per_query"], m["tokens"], r["tokens"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--runs", required=True, help="comma list of adapter folders under build/quality/<prompt>/")
    p.add_argument("--queries", type=int, default=40, help="training queries measured")
    p.add_argument("--measure-cap", type=int, default=256)
    p.add_argument("--out", type=Path, default=REPO / "results" / "quality")
    p.add_argument("--build", type=Path, default=REPO / "build" / "quality")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    sample = train_sample(args.prompt, args.queries, args.build)
    measurer = Measurer(REPO / "prompts" / f"{args.prompt}.md", args.measure_cap, query_path=sample)
    fit_dir = args.out / "fit"
    reference = measurer.reference(fit_dir / f"reference-{args.prompt}-train{args.queries}-cap{args.measure_cap}.json")
    heldout_ref = json.loads(reference_path(args.out, args.prompt, args.measure_cap).read_text())

    rows = []
    for run in args.runs.split(","):
        path = fit_dir / f"{args.prompt}-{run}-train{args.queries}.json"
        if path.is_file():
            result = json.loads(path.read_text())
        else:
            adapter = args.build / args.prompt / run
            if not (adapter / "bake.json").is_file():
                raise SystemExit(f"{adapter}: no adapter there (the quality study keeps them under build/quality/)")
            print(f"[{args.prompt}] {run} on {args.queries} training queries", flush=True)
            measured = measurer.measure(adapter)
            result = {"prompt": args.prompt, "run": run, "queries": args.queries, "query_file": str(sample.relative_to(REPO)),
                      "command": " ".join(["python", "benchmarks/fit_gap.py"] + (argv or sys.argv[1:])),
                      **gaps(measured, reference), "measured": measured}
            write_json(path, result)
        held = heldout_result(args.out, args.prompt, run)
        held_measured = held["measured"]
        rows.append({
            "run": run,
            "train": {"reverse": gap_ci(result["measured"], reference, "reverse").to_dict(),
                      "forward": gap_ci(result["measured"], reference, "forward").to_dict(),
                      "buckets": result["bucket_gaps"], "base_reverse_kl": reference["reverse"]["mean"]},
            "heldout": {"reverse": gap_ci(held_measured, heldout_ref, "reverse").to_dict(),
                        "forward": gap_ci(held_measured, heldout_ref, "forward").to_dict(),
                        "buckets": held["bucket_gaps"], "base_reverse_kl": heldout_ref["reverse"]["mean"]},
        })

    fmt = lambda e: f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
    lines = [f"| {args.prompt} adapter | queries | base reverse KL | reverse KL gap closed | by position "
             f"({' / '.join(f'{a}-{min(b, args.measure_cap) - 1}' for a, b in BUCKETS)}) | forward KL gap closed |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for where, label in (("train", f"{args.queries} training"), ("heldout", "held-out file")):
            d = row[where]
            buckets = " / ".join(f"{v:.2f}" if v is not None else "-" for v in d["buckets"].values())
            lines.append(f"| {row['run']} | {label} | {d['base_reverse_kl']:.4f} | {fmt(d['reverse'])} | {buckets} | "
                         f"{fmt(d['forward'])} |")
    table = "\n".join(lines)
    print(table)
    write_json(fit_dir / f"summary-{args.prompt}.json", {"rows": rows, "table": table})


if __name__ == "__main__":
    main()
