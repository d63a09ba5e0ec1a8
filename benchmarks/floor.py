"""Benchmark: a compile's training time beside the floor this machine sets for the same work.

The floor counts what the training loop cannot avoid, from the bake's own log (rows, response tokens, capped
rows per step) and its model's shapes, at rates measured here and now:

- arithmetic: the matrix-multiply FLOPs of sampling (prefill + one token per row per decode step), of the
  teacher scoring the responses (query + response over the cached prompt) and of the student's forward and
  backward (2 + 2 FLOPs per weight per token: the base is frozen, so the backward only computes input
  gradients; LoRA's own products are under 1 % and left out), plus attention over each token's context;
  all at the best matmul rate measured on the step's own shapes, in the bake's own precision (bf16 where
  the CPU has bf16 instructions, fp32 where it does not: bf16 without them is emulated and far slower);
- memory: decoding reads every weight once per decode step (the rows of a batch share that read; 2 bytes
  each from the bf16 sampler copy, 4 from the fp32 policy), at the read bandwidth measured by summing a
  tensor far larger than the caches.

A decode step is counted for every position up to the longest response of its step (the cap when a row hit
it). The floor is a lower bound of an ideal engine on this machine, not a prediction: the ratio says how far
the loop is from it.

    python benchmarks/floor.py build/safety [--json results/floor.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_rate(shapes: list[tuple[int, int, int]], dtype, seconds: float = 1.0) -> dict[str, float]:
    """FLOP/s for each (M, K, N) product in `dtype`, best of repeated runs."""
    import torch

    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up (kernel selection)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            took = time.perf_counter() - t0
            best, spent = min(best, took), spent + took
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return rates


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a bf16 tensor much larger than the caches (sum: one read, nearly no writes)."""
    import torch

    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 2 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bake", type=Path, help="a compiled adapter folder (bake.json and train_log.jsonl)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from promptbake.artifact import read_manifest
    from promptbake.chat import ChatRenderer
    from promptbake.models import load_tokenizer, manifest_base_dir
    from promptbake.queries import load_queries

    manifest = read_manifest(args.bake)
    log = [json.loads(line) for line in (args.bake / "train_log.jsonl").read_text().splitlines() if line.strip()]
    model_dir = manifest_base_dir(manifest)
    cfg = AutoConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    d, layers, vocab, ffn = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv_dim = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    # Weights that take part in matrix multiplies per token: attention, MLP and the output head.
    matmul_params = layers * (2 * d * d + 2 * d * kv_dim + 3 * d * ffn) + d * vocab
    bf16 = manifest.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # bf16: the sampler's merged copy; fp32: the policy itself, whose tied output layer is the embeddings' table
    weight_bytes = (2 if bf16 else 4) * (matmul_params + (0 if cfg.tie_word_embeddings else d * vocab))
    queries = load_queries(Path(manifest.queries_file))
    renderer = ChatRenderer.for_tokenizer(tokenizer, "", cfg.max_position_embeddings)
    query_tokens = statistics.mean(len(renderer.student_ids(q.messages)) for q in queries)  # what the student sees
    prompt_tokens = manifest.prompt_tokens
    cap = manifest.response_cap

    def attention(tokens: float, context: float) -> float:  # QK^T and PV over `context` keys for `tokens` queries
        return 4 * layers * d * tokens * context

    flops = {"sampling": 0.0, "teacher": 0.0, "student": 0.0}
    decode_steps = 0
    for entry in log:
        rows, tokens = entry["rows"], entry["response_tokens"]
        longest = cap if entry.get("capped_rows") else min(cap, round(2 * entry["mean_response_len"]))
        decode_steps += longest
        prefill = rows * query_tokens
        mean_len = tokens / rows
        flops["sampling"] += 2 * matmul_params * (prefill + rows * longest) \
            + attention(prefill, query_tokens / 2) + attention(rows * longest, query_tokens + longest / 2)
        flops["teacher"] += 2 * matmul_params * (prefill + tokens) \
            + attention(prefill + tokens, prompt_tokens + (query_tokens + mean_len) / 2)
        flops["student"] += 2 * 2 * matmul_params * (prefill + tokens) + 2 * attention(prefill + tokens, (query_tokens + mean_len) / 2)
    shapes = [(4 * int(query_tokens + cap), d, ffn), (4 * int(query_tokens + cap), ffn, d), (4 * cap, d, vocab), (16, d, ffn)]
    rates = matmul_rate(shapes, dtype)
    rate = max(rates.values())
    bandwidth = read_bandwidth()
    reads_s = decode_steps * weight_bytes / bandwidth
    floor = {name: f / rate for name, f in flops.items()}
    floor["sampling"] += reads_s  # arithmetic plus weight reads, as if they never overlapped
    floor_s = sum(floor.values())
    measured = {
        "sampling": sum(e["sample_seconds"] for e in log),
        "teacher": sum(e["teacher_seconds"] for e in log),
        "student": sum(e["student_seconds"] for e in log),
    }
    train_s = sum(e["seconds"] for e in log)
    report = {
        "bake": str(args.bake), "steps": len(log), "response_cap": cap, "response_tokens": sum(e["response_tokens"] for e in log),
        "decode_steps": decode_steps, "weight_reads_s": reads_s, "matmul_params": matmul_params, "weight_bytes": weight_bytes,
        "mean_student_prompt_tokens": query_tokens, "system_prompt_tokens": prompt_tokens,
        "precision": manifest.precision, "matmul_flops_per_s": rates, "best_matmul_flops_per_s": rate, "read_bytes_per_s": bandwidth,
        "flops": flops, "floor_s": floor, "floor_total_s": floor_s, "measured_s": measured, "train_s": train_s,
        "train_vs_floor": train_s / floor_s, "compile_total_s": manifest.timings.get("total_s"),
    }
    print(f"{args.bake}: {len(log)} steps, {report['response_tokens']:,} response tokens, cap {cap}, "
          f"{decode_steps:,} decode steps; {manifest.precision} matmul {rate / 1e9:.0f} GFLOP/s (best of {len(rates)} shapes), "
          f"read {bandwidth / 1e9:.1f} GB/s\n")
    print(f"| phase | FLOPs | floor s | measured s | measured / floor |\n|---|---|---|---|---|")
    for name, seconds in floor.items():
        extra = f" (incl. {reads_s:.1f} s of weight reads)" if name == "sampling" else ""
        print(f"| {name} | {flops[name] / 1e12:.1f} T | {seconds:.1f}{extra} | {measured[name]:.1f} | {measured[name] / seconds:.1f}x |")
    print(f"| training loop | {sum(flops.values()) / 1e12:.1f} T | {floor_s:.1f} | {train_s:.1f} | {train_s / floor_s:.1f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
