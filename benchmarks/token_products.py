"""Benchmark: one decode token's base-model products, with the model's own weights read from memory.

A decoded token multiplies every frozen weight of the model once by a few rows of activations. Timing one
product in a loop measures a weight the caches already hold; this walks all of the default model's weights in
model order (513 MB in fp32), so each one comes from memory as it does while sampling. Ways of computing the same
products are timed side by side, alternating round after round in one process:

- `weight-first`: `W @ x.T`, what promptbake's sampler runs;
- `linear`: `F.linear(x, W)`, the usual layout;
- `mkl-packed`: MKL's packed weights for this row count (`_mkl_reorder_linear_weight`, then `_mkl_linear`), the
  form inductor's freezing gives constant fp32 weights;
- `onednn-packed`: oneDNN's blocked layout (`mkldnn._reorder_linear_weight`, then `_linear_pointwise`);
- `fused`: weight first with q, k, v concatenated into one weight and gate, up into another (fewer, larger products).

`benchmarks/packed_linear.py` asks the same of bf16 weights on a CPU with bf16 instructions; this one is fp32, what
the sampler runs on a CPU without them. Rows and threads vary too (`--rows 16,32 --threads 2,1`). Each cell is the
median of `--repeats` tokens; each layout's outputs are checked against `F.linear` first.

    python benchmarks/token_products.py [--rows 16,32,64] [--threads 2,1] [--layouts weight-first,linear,...]
        [--rounds 2] [--json results/token_products.json]
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

LAYOUTS = ("weight-first", "linear", "mkl-packed", "onednn-packed", "fused")


def frozen_weights(model) -> tuple[list, list]:
    """(every decoder layer's seven weights in order, then the output layer; the same with q/k/v and gate/up
    concatenated)."""
    import torch

    plain, fused = [], []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        q, k, v, o, g, u, d = (p.weight.detach() for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj))
        plain += [q, k, v, o, g, u, d]
        fused += [torch.cat([q, k, v]), o, torch.cat([g, u]), d]
    head = model.lm_head.weight.detach()
    return plain + [head], fused + [head]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder or hub id (default: the default model)")
    p.add_argument("--rows", default="16", help="comma-separated rows per product (the batch being decoded)")
    p.add_argument("--threads", default="", help="comma-separated torch thread counts (default: torch's own)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--json", type=Path, default=REPO / "results" / "token_products.json")
    args = p.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        p.error(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")

    import torch
    import torch.nn.functional as F

    from promptbake.models import load_model, resolve_model

    rows_list = [int(x) for x in args.rows.split(",")]
    threads_list = [int(x) for x in args.threads.split(",") if x] or [torch.get_num_threads()]
    model_dir = resolve_model(args.model)
    model = load_model(model_dir)
    plain, fused = frozen_weights(model)
    weight_mb = sum(w.numel() * w.element_size() for w in plain) / 2**20
    torch.manual_seed(0)
    inputs = {rows: {w.shape[1]: torch.randn(rows, w.shape[1]) for w in plain} for rows in rows_list}
    packed = {(layout, rows): [pack(w, rows) for w in plain] for rows in rows_list
              for layout, pack in (("mkl-packed", torch.ops.mkl._mkl_reorder_linear_weight),
                                   ("onednn-packed", torch.ops.mkldnn._reorder_linear_weight)) if layout in layouts}

    def products(layout: str, rows: int) -> list:
        xs = inputs[rows]
        if layout == "weight-first":
            return [torch.mm(w, xs[w.shape[1]].t()) for w in plain]
        if layout == "linear":
            return [F.linear(xs[w.shape[1]], w) for w in plain]
        if layout == "mkl-packed":
            return [torch.ops.mkl._mkl_linear(xs[w.shape[1]], pw, w, None, rows)
                    for w, pw in zip(plain, packed[layout, rows])]
        if layout == "onednn-packed":
            return [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], pw, None, "none", [], "")
                    for w, pw in zip(plain, packed[layout, rows])]
        return [torch.mm(w, xs[w.shape[1]].t()) for w in fused]

    def token_seconds(layout: str, rows: int) -> float:
        start = time.perf_counter()
        products(layout, rows)
        return time.perf_counter() - start

    with torch.no_grad():
        rows = rows_list[0]

        def output_major(layout: str, outs: list):  # every product as [out, rows], flattened in model order
            return torch.cat([(y if layout in ("weight-first", "fused") else y.t()).flatten() for y in outs])

        reference = output_major("linear", products("linear", rows))
        # fused: q, k, v's outputs stacked are the concatenated weight's output, so the same flattened order
        agreement = {layout: (output_major(layout, products(layout, rows)) - reference).abs().max().item()
                     for layout in layouts}
        cells: dict[tuple[str, int, int], list[float]] = {}
        torch_threads = torch.get_num_threads()
        try:
            for rnd in range(args.rounds):
                for threads in threads_list:
                    torch.set_num_threads(threads)
                    for rows in rows_list:
                        for layout in (layouts if rnd % 2 == 0 else layouts[::-1]):
                            token_seconds(layout, rows)  # one token to settle the threads and MKL's buffers
                            median = statistics.median(token_seconds(layout, rows) for _ in range(args.repeats))
                            cells.setdefault((layout, rows, threads), []).append(median)
                            print(f"round {rnd + 1}: {layout:12} rows {rows:3} threads {threads}: {median * 1000:7.1f} ms",
                                  flush=True)
        finally:
            torch.set_num_threads(torch_threads)  # the thread count is the process's: leave it as found

    print(f"\none token's base products, {len(plain)} weights ({weight_mb:.0f} MB fp32) read from memory; "
          f"ms per token, each round's median of {args.repeats}\n")
    print("| layout | rows | threads | ms per token (rounds) | GB/s of weights | speed against weight-first |\n|---|---|---|---|---|---|")
    table = []
    for (layout, rows, threads), values in cells.items():
        best = min(values)
        base = min(cells.get(("weight-first", rows, threads), [float("nan")]))
        row = {"layout": layout, "rows": rows, "threads": threads, "ms": [v * 1000 for v in values],
               "weight_gb_per_s": weight_mb * 2**20 / best / 1e9, "weight_first_over_this": base / best}
        table.append(row)
        print(f"| {layout} | {rows} | {threads} | {', '.join(f'{v * 1000:.1f}' for v in values)} | "
              f"{row['weight_gb_per_s']:.1f} | {row['weight_first_over_this']:.2f}x |")
    print("\nlargest difference from F.linear's outputs: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv), "model": str(model_dir), "weights": len(plain), "weight_mb": weight_mb,
        "repeats": args.repeats, "rounds": args.rounds, "cells": table, "agreement_with_linear": agreement}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
