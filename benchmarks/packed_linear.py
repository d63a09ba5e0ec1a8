"""Benchmark: the sampler's bf16 linears, plain against packed in oneDNN's layout, on the default model's shapes.

A decode step multiplies a few rows (the sampling batch) against every weight of the model; in a profile of the
compiled decode step those multiplies were 69 % of a token. oneDNN can hold a weight packed in its own blocked
layout, which the sampler copy could repack at every `sync()`. For each of SmolLM2-135M's linear shapes this
times, in one process: a bf16 `F.linear` on a parameter that requires grad (how the sampler copy keeps its
weights, the baseline), the same on a plain tensor, the packed weight through oneDNN's op called directly (what
eager code could do), and through a custom op (what `torch.compile` needs: inductor lowers the oneDNN op only for
constant weights). It checks that packed results equal plain ones, and sums one token of the model's shapes.
Each shape's weight is reused call after call and so sits in the CPU's caches; a second table times a whole
token through all 211 weights, each distinct and so read from memory as decoding reads them, beside one plain
read of the same bytes (the bandwidth floor).
Tried and not kept (docs/performance.md): in a training step the sampler packed through the custom op sampled
no faster. Prints a table and writes JSON.

    python benchmarks/packed_linear.py [--rows 16] [--calls 200] [--json results/packed_linear.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# SmolLM2-135M: hidden 576, MLP 1536, 3 key-value heads of 64, 30 layers, a 49,152-token output layer.
SHAPES = [("q_proj / o_proj", 576, 576, 2), ("k_proj / v_proj", 192, 576, 2), ("gate_proj / up_proj", 1536, 576, 2),
          ("down_proj", 576, 1536, 1), ("output layer", 49152, 576, None)]
LAYERS = 30


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="rows per call: a training step's sampling batch")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path, default=REPO / "results" / "packed_linear.json")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        sys.exit("this CPU's oneDNN has no bf16 kernels")

    def direct(x, packed_OI):
        return torch.ops.mkldnn._linear_pointwise(x, packed_OI, None, "none", [], "")

    @torch.library.custom_op("promptbake_bench::packed_linear", mutates_args=(),
                             schema="(Tensor x, Tensor packed_OI, int out_features) -> Tensor")
    def through_op(x, packed_OI, out_features):
        return direct(x, packed_OI)

    @through_op.register_fake
    def _(x, packed_OI, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    torch.manual_seed(0)
    rows, token = [], {"parameter": 0.0, "packed, direct": 0.0, "packed, custom op": 0.0}
    with torch.no_grad():
        for label, out_f, in_f, per_layer in SHAPES:
            x = torch.randn(args.rows, 1, in_f).bfloat16()
            weight = (torch.randn(out_f, in_f) * 0.05).bfloat16()
            as_param = torch.nn.Parameter(weight.clone())
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, args.rows)
            want = F.linear(x, weight)
            same = torch.equal(direct(x, packed), want) and torch.equal(through_op(x, packed, out_f), want)
            param_us = per_call_us(lambda: F.linear(x, as_param), args.calls)
            plain_us = per_call_us(lambda: F.linear(x, weight), args.calls)
            direct_us = per_call_us(lambda: direct(x, packed), args.calls)
            op_us = per_call_us(lambda: through_op(x, packed, out_f), args.calls)
            times = per_layer * LAYERS if per_layer else 1
            token["parameter"] += param_us * times
            token["packed, direct"] += direct_us * times
            token["packed, custom op"] += op_us * times
            rows.append({"shape": label, "out": out_f, "in": in_f, "param_us": param_us, "plain_us": plain_us,
                         "direct_us": direct_us, "op_us": op_us, "equal": same})
        # A whole token as decoding meets it: every weight distinct (270 MB in bf16, far above the caches), so each is
        # read from memory. Beside it, reading the same bytes once (a sum over them): the bandwidth floor of a token.
        weights = [(torch.randn(out_f, in_f) * 0.05).bfloat16()
                   for _, out_f, in_f, per_layer in SHAPES for _ in range(per_layer * LAYERS if per_layer else 1)]
        params = [torch.nn.Parameter(w) for w in weights]
        packs = [torch.ops.mkldnn._reorder_linear_weight(w, args.rows) for w in weights]
        inputs = {n: torch.randn(args.rows, 1, n).bfloat16() for n in {w.shape[1] for w in weights}}
        flat = torch.randn(sum(w.numel() for w in weights) // 2)  # fp32: as many bytes as the bf16 weights
        passes = max(3, args.calls // 40)
        cold = {
            "parameter": per_call_us(lambda: [F.linear(inputs[p.shape[1]], p) for p in params], passes) / 1e3,
            "packed, direct": per_call_us(lambda: [direct(inputs[w.shape[1]], k) for w, k in zip(weights, packs)],
                                          passes) / 1e3,
            "packed, custom op": per_call_us(lambda: [through_op(inputs[w.shape[1]], k, w.shape[0])
                                                     for w, k in zip(weights, packs)], passes) / 1e3,
            "read the weights once": per_call_us(lambda: flat.sum(), passes) / 1e3,
        }
        gigabytes = flat.numel() * flat.element_size() / 1e9
    print(f"\nbf16 linear, {args.rows} rows x 1 token, mean of {args.calls} calls (us)\n")
    print("| shape (out x in) | parameter (baseline) | plain tensor | packed, oneDNN op | packed, custom op | equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} ({r['out']} x {r['in']}) | {r['param_us']:.0f} | {r['plain_us']:.0f} | "
              f"{r['direct_us']:.0f} ({r['param_us'] / r['direct_us']:.2f}x) | {r['op_us']:.0f} ({r['param_us'] / r['op_us']:.2f}x) | "
              f"{r['equal']} |")
    print(f"| one token of the model (ms) | {token['parameter'] / 1e3:.1f} | | {token['packed, direct'] / 1e3:.1f} "
          f"({token['parameter'] / token['packed, direct']:.2f}x) | {token['packed, custom op'] / 1e3:.1f} "
          f"({token['parameter'] / token['packed, custom op']:.2f}x) | |")
    print(f"\none token through all {len(weights)} weights, each distinct ({gigabytes:.2f} GB), mean of {passes} passes\n")
    print("| one token, weights read from memory | ms | vs parameter |\n|---|---|---|")
    for label, ms in cold.items():
        print(f"| {label} | {ms:.1f} | {cold['parameter'] / ms:.2f}x |")
    print(f"(reading the weights once: {gigabytes / cold['read the weights once'] * 1e3:.1f} GB/s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": args.rows, "calls": args.calls, "command": " ".join(["python"] + sys.argv),
                                     "shapes": rows, "token_ms": {k: v / 1e3 for k, v in token.items()},
                                     "token_from_memory_ms": cold, "weights_gb": gigabytes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
