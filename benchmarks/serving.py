"""Benchmark: what baking saves at serving time, against one real vLLM server, side by side.

Conditions, all on the same server (base model + the baked adapter loaded as a LoRA):
    prompt (short)  base model, the adapter's own system prompt sent with every request
    prompt (long)   base model, a ~2,000-token system prompt sent with every request
    baked           the adapter, no system prompt
at concurrency 1 and 8, alternating conditions, with streamed responses. Reports prompt tokens per request,
time to first token (median, p90), output tokens/s, requests/s, and the ratios against "baked".
vLLM's automatic prefix caching stays on (its default), so repeated system prompts are partly cached:
the ratios are what a default deployment sees, not a worst case.

    python benchmarks/serving.py build/pirate [--requests 24] [--out benchmarks/results/serving.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import long_prompt_file  # noqa: E402
from promptbake.artifact import read_manifest  # noqa: E402
from promptbake.queries import load_queries  # noqa: E402
from promptbake.serve import VLLMServer, free_port, plan_serving, vllm_command  # noqa: E402
from promptbake.spec import load_spec  # noqa: E402


def stream_request(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, usage = None, {}
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0)}


def run_condition(url: str, model: str, system: str | None, queries: list, concurrency: int, max_tokens: int) -> dict:
    def one(q):
        msgs = ([{"role": "system", "content": system}] if system else []) + q.messages
        return stream_request(url, model, msgs, max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, queries))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "prompt_tokens_per_request": statistics.mean(r["prompt_tokens"] for r in results),
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
        "requests_per_s": len(results) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args()

    manifest = read_manifest(args.adapter)
    short_prompt = load_spec(manifest.prompt_file).system_prompt
    import tempfile

    long_prompt = load_spec(long_prompt_file(Path(tempfile.mkdtemp()))).system_prompt
    queries = load_queries(manifest.queries_file)[: args.requests]
    base, served = plan_serving([args.adapter])
    port = free_port()
    cmd = vllm_command(base, served, "127.0.0.1", port, ["--max-model-len", "4096", "--enforce-eager"])
    conditions = {"prompt (short)": (str(base), short_prompt), "prompt (long)": (str(base), long_prompt), "baked": (served[0].name, None)}
    table: dict = {}
    with VLLMServer(cmd, "127.0.0.1", port, Path(tempfile.mkdtemp()) / "vllm.log") as server:
        server.wait_healthy(timeout=300)
        run_condition(server.url, served[0].name, None, queries[:2], 1, 4)  # warm-up
        for concurrency in (1, 8):
            names = list(conditions) if concurrency == 1 else list(conditions)[::-1]  # alternate the order
            for name in names:
                model, system = conditions[name]
                table[f"{name} @ c={concurrency}"] = run_condition(server.url, model, system, queries, concurrency, args.max_tokens)
    lines = ["| condition | prompt tokens/req | TTFT median s | TTFT p90 s | output tok/s | req/s | TTFT vs baked |",
             "|---|---|---|---|---|---|---|"]
    for key, row in table.items():
        baked = table[f"baked @ c={key.split('c=')[1]}"]
        row["ttft_ratio_vs_baked"] = row["ttft_median_s"] / baked["ttft_median_s"]
        row["requests_per_s_ratio_vs_baked"] = row["requests_per_s"] / baked["requests_per_s"]
        lines.append(f"| {key} | {row['prompt_tokens_per_request']:.0f} | {row['ttft_median_s']:.3f} | {row['ttft_p90_s']:.3f} | "
                     f"{row['output_tokens_per_s']:.1f} | {row['requests_per_s']:.2f} | {row['ttft_ratio_vs_baked']:.2f}x |")
    markdown = "\n".join(lines)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"table": table, "markdown": markdown, "adapter": str(args.adapter)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
