"""Benchmark: writing queries through a served model (`promptbake queries --generator-url`), one request at a time
against all of a round's requests at once, side by side on one real vLLM server.

The same documents (one round of `synthesize`'s requests for a shipped prompt's rules) go to the server at each
concurrency, in alternating order, `--repeats` times. Reports seconds per round, generated words per second and the
speedup over concurrency 1.

    python benchmarks/served_synthesis.py [--prompt prompts/support.md] [--documents 32] [--json results/served_synthesis.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptbake.atomic import write_text_atomic  # noqa: E402
from promptbake.models import DEFAULT_MODEL, resolve_model  # noqa: E402
from promptbake.rules import split_rules  # noqa: E402
from promptbake.serve import VLLMServer, free_port  # noqa: E402
from promptbake.spec import load_spec  # noqa: E402
from promptbake.synthesis import ServedGenerator, SynthesisSettings, first_turn_document, plan_requests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=str(REPO / "prompts" / "support.md"))
    parser.add_argument("--documents", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    prompt = load_spec(Path(args.prompt)).system_prompt
    settings = SynthesisSettings()
    requests = plan_requests(split_rules(prompt), args.documents, settings, random.Random(0))
    head = f"The assistant's instructions:\n\n{prompt.strip()}\n\n"
    documents = [first_turn_document(head, r) for r in requests][:args.documents]
    levels = [int(c) for c in args.concurrency.split(",")]
    model_dir = resolve_model(DEFAULT_MODEL)

    seconds: dict[int, list[float]] = {c: [] for c in levels}
    words: dict[int, list[int]] = {c: [] for c in levels}
    port = free_port()
    cmd = ["vllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "4096", "--enforce-eager"]
    with tempfile.TemporaryDirectory() as tmp, VLLMServer(cmd, "127.0.0.1", port, Path(tmp) / "vllm.log") as server:
        server.wait_healthy(timeout=300)
        writer = ServedGenerator(server.url)
        writer.next_lines(documents[:2], max_new_tokens=8, temperature=settings.temperature)  # warm-up
        for repeat in range(args.repeats):
            for c in levels if repeat % 2 == 0 else levels[::-1]:
                writer.concurrency = c
                t0 = time.perf_counter()
                lines = writer.next_lines(documents, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
                seconds[c].append(time.perf_counter() - t0)
                words[c].append(sum(len(line.split()) for line in lines))
                print(f"  concurrency {c:>3}, round {repeat + 1}: {seconds[c][-1]:.1f} s, {words[c][-1]} words", flush=True)

    base = statistics.median(seconds[levels[0]])
    rows = []
    for c in levels:
        median = statistics.median(seconds[c])
        rows.append({"concurrency": c, "seconds_median": round(median, 2), "seconds": [round(s, 2) for s in seconds[c]],
                     "words_per_s": round(statistics.mean(words[c]) / median, 2), "speedup": round(base / median, 2)})
    print(f"\n{len(documents)} requests per round, {settings.max_new_tokens} new tokens at most, median of {args.repeats}")
    print(f"| concurrency | s per round | words/s | speedup |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['seconds_median']:.1f} | {row['words_per_s']:.1f} | {row['speedup']:.2f}x |")
    if args.json:
        out = {"prompt": args.prompt, "documents": len(documents), "max_new_tokens": settings.max_new_tokens,
               "model": str(model_dir), "rows": rows}
        write_text_atomic(Path(args.json), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
