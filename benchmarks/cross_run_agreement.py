"""Answer letters of two saved evals of the same questions, compared condition by condition.

Two bakes made by the same command on two machines differ by bf16 rounding in their samples, so they are two
draws of one bake. How often they pick the same letter is the noise that a baked-against-prompted agreement is
measured against. The same holds for the prompted model decoded on two machines. Nothing is decoded here: the
stored answers of each result are parsed again with the suite's parser (the items are loaded again with the
first result's suite, limit, seed and groups, and both results must hold answers to them).

    python benchmarks/cross_run_agreement.py results/headline/medical-2026-12-04/eval-medmcqa.json:amd \
        results/headline/medical/eval-medmcqa.json:intel --data ../shared/datasets \
        --out results/headline/medical-2026-12-04/cross_run_agreement.json

`--paired A REF_A B REF_B` (condition labels as printed, e.g. "medical (s160)") also gives how much more often
A agrees with REF_A than B with REF_B, with a 95 % bootstrap interval that resamples the questions jointly: two
bakes of one prompt, each against its own run's prompted answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def letters(suite, items, texts: list[str]) -> list[str | None]:
    """Each stored answer parsed with the suite's parser (None where it cannot be read)."""
    from promptbake.evals import parse

    return [parse(suite, item, text) for item, text in zip(items, texts)]


def agreement_table(answers: dict[str, list[str | None]], what: str) -> list[dict]:
    """Letter agreement of every pair of named answer lists, printed as a table and returned as rows."""
    from promptbake.evals.scoring import answer_agreement

    rows = []
    print(f"| answer letters agree ({what}) | share | 95 % interval |")
    print("|---|---|---|")
    for a, b in itertools.combinations(answers, 2):
        est = answer_agreement(answers[a], answers[b])
        rows.append({"a": a, "b": b, **est.to_dict()})
        print(f"| {a} vs {b} | {est.value:.1%} | [{est.lo:.1%}, {est.hi:.1%}] |")
    return rows


def paired_difference(answers: dict[str, list[str | None]], a: str, ref_a: str, b: str, ref_b: str) -> dict:
    """agreement(a, ref_a) - agreement(b, ref_b), paired by question (an unparseable answer never agrees)."""
    from promptbake.evals.scoring import agreements
    from promptbake.stats import mean_ci

    missing = [k for k in (a, ref_a, b, ref_b) if k not in answers]
    if missing:
        raise SystemExit(f"--paired: no answers labelled {missing[0]!r}; labels are {sorted(answers)}")
    est = mean_ci([x - y for x, y in zip(agreements(answers[a], answers[ref_a]), agreements(answers[b], answers[ref_b]))])
    print(f"| {a} vs {ref_a}, minus {b} vs {ref_b} | {est.value:+.1%} | [{est.lo:+.1%}, {est.hi:+.1%}] |")
    return {"a": a, "ref_a": ref_a, "b": b, "ref_b": ref_b, **est.to_dict()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="saved eval results, each FILE or FILE:LABEL")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--paired", nargs=4, metavar=("A", "REF_A", "B", "REF_B"), default=None,
                   help="also: agreement(A, REF_A) minus agreement(B, REF_B), paired by question")
    args = p.parse_args(argv)

    from promptbake.atomic import write_text_atomic
    from promptbake.evals import load_items, load_suite

    saved = []
    for spec in args.results:
        path, _, label = spec.partition(":")
        saved.append((label or Path(path).parent.name, json.loads(Path(path).read_text())))
    first = saved[0][1]
    for label, result in saved[1:]:
        same = all(result[k] == first[k] for k in ("suite", "limit", "seed", "groups"))
        if not same:
            raise SystemExit(f"{label}: another suite, limit, seed or groups than {saved[0][0]}")
    suite = load_suite(first["suite"])
    items = load_items(suite, args.data, first["limit"], first["seed"], first["groups"])
    answers = {}
    for label, result in saved:
        for condition, texts in result["responses"].items():
            if len(texts) != len(items):
                raise SystemExit(f"{label}: {len(texts)} answers of {condition} for {len(items)} items")
            answers[f"{condition} ({label})"] = letters(suite, items, texts)
    rows = agreement_table(answers, f"{len(items)} {first['suite']} questions")
    paired = paired_difference(answers, *args.paired) if args.paired else None
    if args.out:
        write_text_atomic(args.out, json.dumps({
            "command": " ".join(["python", "benchmarks/cross_run_agreement.py"] + (sys.argv[1:] if argv is None else argv)),
            "n": len(items), "agreements": rows, **({"paired": paired} if paired else {}),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
