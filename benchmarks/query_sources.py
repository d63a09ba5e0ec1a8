"""Query sources side by side: the prompt's hand-written training file, 500 queries written from its rules by
`promptbake queries`, and both together. Prints how varied each set is (distinct 1- and 2-grams, near-duplicate
rate, mean length), how many of the prompt's rules it exercises, and, from the quality study's saved runs
(variants preset-quick, preset-quick+queries-synth, preset-quick+queries-both), what a bake on each reaches on
the prompt's separate held-out file. Writes results/quality/query_sources.{json,md}.

    python benchmarks/quality.py --prompts support --variants preset-quick,preset-quick+queries-synth,preset-quick+queries-both --token-budget 0 --seeds 0
    python benchmarks/query_sources.py --prompt support
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import query_file  # noqa: E402

VARIANT_OF = {"hand": "preset-quick", "synth": "preset-quick+queries-synth", "both": "preset-quick+queries-both"}


def user_text(query) -> str:
    return " ".join(m["content"] for m in query.messages if m["role"] == "user")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="support")
    p.add_argument("--build", type=Path, default=REPO / "build" / "quality")
    p.add_argument("--out", type=Path, default=REPO / "results" / "quality")
    args = p.parse_args(argv)

    from promptbake.atomic import write_text_atomic
    from promptbake.queries import load_queries
    from promptbake.rules import split_rules
    from promptbake.spec import load_spec
    from promptbake.stats import seeds_mean_ci
    from promptbake.synthesis import diversity

    spec = load_spec(REPO / "prompts" / f"{args.prompt}.md")
    rules = split_rules(spec.system_prompt)
    files = {"hand": spec.queries_path, "synth": query_file(args.prompt, "synth", args.build),
             "both": query_file(args.prompt, "both", args.build)}
    import random

    loaded = {source: load_queries(path) for source, path in files.items()}
    smallest = min(len(q) for q in loaded.values())
    rows = []
    for source, path in files.items():
        queries = loaded[source]
        figures = diversity([user_text(q) for q in queries])
        # Distinct n-gram ratios fall as a set grows, so they are also given on a seeded sample of equal size.
        sample = random.Random(0).sample(queries, smallest)
        figures["distinct_2_equal_n"] = diversity([user_text(q) for q in sample])["distinct_2"]
        covered = {q.rule for q in queries if q.rule} & {r.id for r in rules}
        tags = {t for q in queries for t in q.tags}
        runs = [json.loads(f.read_text()) for f in (args.out / "runs" / args.prompt).glob(f"{VARIANT_OF[source]}-s*-b0k.json")]
        row = {"source": source, "file": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name),
               **figures, "rules_covered": len(covered), "rules": len(rules), "tags": len(tags),
               "variant": VARIANT_OF[source], "seeds": sorted(r["seed"] for r in runs)}
        for key in ("reverse_gap", "forward_gap", "check_ratio", "compile_s"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = seeds_mean_ci(values).to_dict() if values else None
        rows.append(row)

    def est(e, scale=1.0, spec=".3f"):
        if e is None:
            return "not run"
        v, (lo, hi) = e["value"] * scale, (x * scale for x in e["ci95"])
        return f"{v:{spec}}" if e["n"] == 1 else f"{v:{spec}} [{lo:{spec}}, {hi:{spec}}]"

    lines = [f"| queries | n | distinct 1-grams | distinct 2-grams | distinct 2-grams, {smallest} sampled | near-duplicate rate | mean words | rules exercised "
             "(tagged by rule) | seeds | reverse KL gap closed | forward KL gap closed | check ratio | compile min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        covered = f"{r['rules_covered']}/{r['rules']}" if r["rules_covered"] else f"- ({r['tags']} topic tags)"
        lines.append(f"| {r['source']} | {r['queries']} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                     f"{r['distinct_2_equal_n']:.3f} | {r['duplicate_rate']:.1%} | {r['mean_words']:.1f} | {covered} | {len(r['seeds'])} | "
                     f"{est(r['reverse_gap'])} | {est(r['forward_gap'])} | {est(r['check_ratio'])} | "
                     f"{est(r['compile_s'], 1 / 60, '.1f')} |")
    md = "\n".join(lines)
    print(md)
    write_text_atomic(args.out / "query_sources.md", md + "\n")
    write_text_atomic(args.out / "query_sources.json", json.dumps({"prompt": args.prompt, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
