"""Benchmark: what baking saves at serving time, on real vLLM servers, side by side in one run.

Servers, started one after the other with the same settings:
    LoRA, prefix caching on    base model + the baked adapter as a LoRA (vLLM's default caching)
    LoRA, prefix caching off   the same with `--no-enable-prefix-caching`: every prompt is prefilled in full
    merged                     the adapter merged into the base (`promptbake export --to merged`), a plain model
Conditions on the LoRA servers: the base with the adapter's own system prompt in every request ("prompt
(short)"), the base with a ~2,000-token system prompt ("prompt (long)"), and the adapter with no system prompt
("baked (LoRA)"); on the merged server, "baked (merged)". Each at concurrency 1, 8 and 32 (by default), with
streamed greedy responses. Reports per condition: prompt tokens per request, the tokens vLLM found in its prefix
cache, the KV-cache tokens each request holds on its own (prompt + output - cached: cached blocks are shared
by every request that uses them), how many such requests a KV budget of `--kv-budget` tokens admits at once,
TTFT (median, p90), output tokens/s and requests/s, and the TTFT ratio against "baked (LoRA)" on the same server.

    python benchmarks/serving.py build/pirate [--requests 32] [--concurrency 1,8,32] [--json results/serving.json]

The JSON is rewritten after every condition, and a run started again with the same arguments skips the rows it
already holds (`--fresh` starts over): the whole run takes about half an hour on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import long_prompt_file  # noqa: E402
from promptbake.artifact import read_manifest  # noqa: E402
from promptbake.atomic import write_text_atomic  # noqa: E402
from promptbake.queries import load_queries  # noqa: E402
from promptbake.serve import VLLMServer, export_merged, free_port, plan_serving, vllm_command  # noqa: E402
from promptbake.spec import load_spec  # noqa: E402

def stream_request(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, usage = None, {}
    with urllib.request.urlopen(req, timeout=3600) as r:  # 32 uncached long prompts queue for minutes
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
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft if ttft is not None else total, "total": total, "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0), "cached_tokens": details.get("cached_tokens") or 0}


def run_condition(url: str, model: str, system: str | None, queries: list, concurrency: int, max_tokens: int,
                  kv_budget: int = 0) -> dict:
    def one(q):
        msgs = ([{"role": "system", "content": system}] if system else []) + q.messages
        return stream_request(url, model, msgs, max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, queries))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    own = statistics.mean(r["prompt_tokens"] + r["completion_tokens"] - r["cached_tokens"] for r in results)
    shared = statistics.median(r["cached_tokens"] for r in results)  # held once, by all requests that hit it
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "prompt_tokens_per_request": statistics.mean(r["prompt_tokens"] for r in results),
        "cached_tokens_per_request": statistics.mean(r["cached_tokens"] for r in results),
        "kv_tokens_own_per_request": own,
        "requests_admitted_by_kv_budget": int((kv_budget - shared) // own) if kv_budget and own else None,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
        "requests_per_s": len(results) / wall,
    }


def previous_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with the same settings (to resume it); none if the file is absent or differs."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if any(old.get(key) != value for key, value in settings.items()):
        return []
    return [{k: v for k, v in r.items() if k != "ttft_vs_baked_lora"} for r in old.get("rows", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--requests", type=int, default=32, help="requests per condition and concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--kv-budget", type=int, default=65_536, help="KV-cache tokens for the 'admitted' column")
    parser.add_argument("--json", type=Path, default=REPO / "results" / "serving.json")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows a previous run left in --json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    manifest = read_manifest(args.adapter)
    short_prompt = load_spec(manifest.prompt_file).system_prompt
    tmp = Path(tempfile.mkdtemp(prefix="promptbake-serving-"))
    long_prompt = load_spec(long_prompt_file(tmp)).system_prompt
    queries = load_queries(manifest.queries_file)
    queries = (queries * (args.requests // len(queries) + 1))[: args.requests]
    base, served = plan_serving([args.adapter])
    merged = export_merged(args.adapter, tmp / "merged")
    common = ["--max-model-len", "4096", "--enforce-eager", "--enable-prompt-tokens-details"]
    lora = {"prompt (short)": (str(base), short_prompt), "prompt (long)": (str(base), long_prompt),
            "baked (LoRA)": (served[0].name, None)}
    servers = {
        "LoRA, prefix caching on": (vllm_command(base, served, "127.0.0.1", 0, common), lora),
        "LoRA, prefix caching off": (vllm_command(base, served, "127.0.0.1", 0, common + ["--no-enable-prefix-caching"]), lora),
        "merged": (["vllm", "serve", str(merged), "--host", "127.0.0.1", "--port", "0", *common],
                   {"baked (merged)": (str(merged), None)}),
    }
    settings = {"adapter": str(args.adapter), "requests": args.requests, "max_tokens": args.max_tokens,
                "kv_budget": args.kv_budget}
    rows = previous_rows(args.json, settings) if not args.fresh else []
    done = {(r["server"], r["condition"], r["concurrency"]) for r in rows}
    for server_name, (cmd, conditions) in servers.items():
        if all((server_name, name, c) in done for name in conditions for c in levels):
            continue
        port = free_port()
        cmd = [str(port) if prev == "--port" else part for prev, part in zip([""] + cmd, cmd)]
        with VLLMServer(cmd, "127.0.0.1", port, tmp / f"vllm-{len(rows)}.log") as server:
            server.wait_healthy(timeout=600)
            first_model = next(iter(conditions.values()))[0]
            run_condition(server.url, first_model, None, queries[:2], 1, 4)  # warm-up
            for i, concurrency in enumerate(levels):
                names = list(conditions) if i % 2 == 0 else list(conditions)[::-1]  # alternate the order
                for name in names:
                    if (server_name, name, concurrency) in done:
                        continue
                    model, system = conditions[name]
                    row = run_condition(server.url, model, system, queries, concurrency, args.max_tokens, args.kv_budget)
                    rows.append({"server": server_name, "condition": name, **row})
                    # Rewritten after every condition: a crash keeps what ran, and a rerun resumes from it.
                    write_text_atomic(args.json, json.dumps({**settings, "rows": rows, "complete": False}, indent=1) + "\n")
                    print(f"{server_name:26} {name:16} c={concurrency:<3} TTFT {row['ttft_median_s']:.3f} s  "
                          f"{row['output_tokens_per_s']:.1f} tok/s  KV own {row['kv_tokens_own_per_request']:.0f}", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["server"] == row["server"] and r["concurrency"] == row["concurrency"]
                    and r["condition"] == "baked (LoRA)"), None)
        ref = ref or next(r for r in rows if r["server"] == "LoRA, prefix caching on" and r["concurrency"] == row["concurrency"]
                          and r["condition"] == "baked (LoRA)")
        row["ttft_vs_baked_lora"] = row["ttft_median_s"] / ref["ttft_median_s"]
    lines = ["| server | condition | concurrency | prompt tokens/req | cached/req | KV tokens own/req | "
             f"admitted by {args.kv_budget:,} KV tokens | TTFT median s | TTFT p90 s | output tok/s | req/s | TTFT vs baked (LoRA) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['condition']} | {r['concurrency']} | {r['prompt_tokens_per_request']:.0f} | "
                     f"{r['cached_tokens_per_request']:.0f} | {r['kv_tokens_own_per_request']:.0f} | "
                     f"{r['requests_admitted_by_kv_budget']} | {r['ttft_median_s']:.3f} | {r['ttft_p90_s']:.3f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['ttft_vs_baked_lora']:.2f}x |")
    markdown = "\n".join(lines)
    print(markdown)
    write_text_atomic(args.json, json.dumps({**settings, "rows": rows, "markdown": markdown, "complete": True}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
