"""How close to its prompted model a bake can agree on answer letters: the prompted model against itself.

The medical headline asks the bake to pick the prompted model's answer letter on >= 90 % of MedMCQA questions.
At 135M the prompted model's greedy letter is near chance, so a change of numerics alone may flip it. This
decodes the prompted model and the bake again in the other precision (fp32 for a bf16 bake) on the questions a
saved eval decoded (its stored answers), and prints every pairwise letter agreement with 95 % intervals: the
prompted model against itself in the other precision is the agreement that rounding alone leaves.

    python benchmarks/agreement_noise.py --result results/headline/medical/eval-medmcqa.json \
        --adapter build/headline/medical --data ../shared/datasets
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", type=Path, default=Path("results/headline/medical/eval-medmcqa.json"))
    p.add_argument("--adapter", type=Path, default=Path("build/headline/medical"))
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("results/headline/medical/agreement_noise.json"))
    args = p.parse_args(argv)

    from promptbake.artifact import read_manifest
    from promptbake.atomic import write_text_atomic
    from promptbake.evals import load_items, load_suite, run_eval
    from cross_run_agreement import agreement_table, letters

    saved = json.loads(args.result.read_text())
    manifest = read_manifest(args.adapter)
    name, was = manifest.name, manifest.precision  # the saved eval decoded in the bake's precision
    other = "fp32" if was == "bf16" else "bf16"
    if name not in saved["responses"] or "prompted" not in saved["responses"]:
        raise SystemExit(f"{args.result}: no stored answers of 'prompted' and '{name}'")
    suite = load_suite(saved["suite"])
    items = load_items(suite, args.data, saved["limit"], saved["seed"], saved["groups"])
    partial = args.out.parent / f".{args.out.name}.partial"  # an interrupted run keeps the conditions it decoded
    fresh = run_eval(saved["suite"], [args.adapter], data=args.data, limit=saved["limit"], seed=saved["seed"],
                     groups=saved["groups"], batch_size=args.batch_size, conditions=["prompted", name], precision=other,
                     resume=partial,
                     on_condition=lambda c: print(f"{c} decoded in {other}", flush=True))
    answers = {
        f"prompted {was}": letters(suite, items, saved["responses"]["prompted"]),
        f"baked {was}": letters(suite, items, saved["responses"][name]),
        f"prompted {other}": letters(suite, items, fresh["responses"]["prompted"]),
        f"baked {other}": letters(suite, items, fresh["responses"][name]),
        f"base {was}": letters(suite, items, saved["responses"]["base"]),
    }
    rows = agreement_table(answers, f"{len(items)} {saved['suite']} questions")
    write_text_atomic(args.out, json.dumps({
        "command": " ".join(["python", "benchmarks/agreement_noise.py"] + (sys.argv[1:] if argv is None else argv)),
        "result": str(args.result), "adapter": str(args.adapter), "n": len(items), "agreements": rows,
        "unparseable": {k: sum(x is None for x in v) / len(v) for k, v in answers.items()},
        "precisions": {"saved": was, "decoded": other},
        f"responses_{other}": fresh["responses"],
    }, indent=1) + "\n")
    shutil.rmtree(partial, ignore_errors=True)  # the decoded answers are in the result now


if __name__ == "__main__":
    main()
