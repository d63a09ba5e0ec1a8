"""Benchmark: a decode step's fp32 linears taken as `F.linear` takes them (x @ W.T) against weight first ((W @ x.T).T).

A decode step multiplies a few rows (one per sampled row) by each of the model's weights, every weight read from
memory once. This times both orders on the default model's shapes (every projection of a SmolLM2-135M layer and the
49k-row output layer), with as many distinct weights as the model has so they come from memory as in decoding, for
several row counts; alternating the two orders in rounds, best of each. It also reports the whole token (all 211
products at 16 rows) and the floor a read of those bytes sets at the measured bandwidth, and checks both orders give
the same numbers (to fp32 rounding). Prints a table and writes JSON.

    python benchmarks/decode_linears.py [--rows 1,2,4,8,16,32,64,340] [--json results/decode_linears.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptbake.fastdecode import weight_first_linear  # noqa: E402

# (name, out features, in features, weights of this shape in SmolLM2-135M)
SHAPES = [("q_proj / o_proj", 576, 576, 60), ("k_proj / v_proj", 192, 576, 60), ("gate_proj / up_proj", 1536, 576, 60),
          ("down_proj", 576, 1536, 30), ("output layer", 49152, 576, 1)]


def best_us(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Microseconds per product, best over `repeats` passes over every weight."""
    fn(x, weights[0], None)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w, None)
        best = min(best, (time.perf_counter() - t0) / len(weights))
    return best * 1e6


def read_bandwidth() -> float:
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,340")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both orders; best of each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "results" / "decode_linears.json")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    orders = {"x first (F.linear)": F.linear, "weight first": weight_first_linear}
    table, token_us = [], {name: 0.0 for name in orders}
    for name, out_f, in_f, count in SHAPES:
        copies = count if out_f * in_f * count * 4 < 2**30 else 2  # the output layer: two copies, one is 113 MB
        weights = [torch.randn(out_f, in_f) for _ in range(copies)]
        for rows in rows_list:
            if out_f == 49152 and rows > 64:
                continue
            x = torch.randn(rows, in_f)
            diff = float((F.linear(x, weights[0]) - weight_first_linear(x, weights[0], None)).abs().max())
            us = {order: float("inf") for order in orders}
            for _ in range(args.rounds):
                for order, fn in orders.items():
                    us[order] = min(us[order], best_us(fn, weights, x, args.repeats))
            table.append({"weight": name, "out": out_f, "in": in_f, "rows": rows, "us": us,
                          "ratio": us["x first (F.linear)"] / us["weight first"], "max_abs_diff": diff})
            if rows == 16:
                for order in orders:
                    token_us[order] += us[order] * count
    bandwidth = read_bandwidth()
    token_bytes = sum(out_f * in_f * count * 4 for _, out_f, in_f, count in SHAPES)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"fp32; read {bandwidth / 1e9:.1f} GB/s\n")
    print("| weight (out x in) | rows | x first us | weight first us | ratio | max abs diff |\n|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['weight']} ({r['out']} x {r['in']}) | {r['rows']} | {r['us']['x first (F.linear)']:.1f} | "
              f"{r['us']['weight first']:.1f} | {r['ratio']:.2f}x | {r['max_abs_diff']:.1e} |")
    read_ms = token_bytes / bandwidth * 1e3
    print(f"\none token at 16 rows, all 211 products: x first {token_us['x first (F.linear)'] / 1e3:.1f} ms, weight first "
          f"{token_us['weight first'] / 1e3:.1f} ms ({token_us['x first (F.linear)'] / token_us['weight first']:.2f}x); "
          f"reading the {token_bytes / 1e6:.0f} MB once: {read_ms:.1f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "read_bytes_per_s": bandwidth, "products": table,
                                     "token_ms_16_rows": {k: v / 1e3 for k, v in token_us.items()},
                                     "token_read_ms": read_ms}, indent=1) + "\n")


if __name__ == "__main__":
    main()
