"""Benchmark: the compiled static-cache sampler with a code switch on and off, side by side in one process.

A change to the sampler that moves a step by a few per cent cannot be read from two runs on these machines, whose
speed drifts by more than that between runs. So this samples one batch of the prompt's training queries (greedy,
`--rows` x `--new-tokens`, no early stop) through the sampler a compile uses (`compiled_decoding` on the default
model with a LoRA adapter whose B is drawn, as a trained one), alternating the switch's two values round after
round, and reports each value's median call time, their ratio, the ratio of each round's pair, and whether the
greedy tokens are the same. The first round compiles and is left out. Only switches that the sampler reads at run
time fit here (`skip_repeated_guards`); one read while tracing would need a graph of its own per value.

    python benchmarks/sampler_switch.py --switch skip_repeated_guards [--new-tokens 48] [--rows 16] [--rounds 8]
        [--json results/sampler_switch.json]
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
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="a key of benchmarks/code_switches.py that the sampler reads at run time")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds, each one call per value, after a compiling round")
    p.add_argument("--precision", default="auto")
    p.add_argument("--prompt", default="pirate")
    p.add_argument("--json", type=Path, default=REPO / "results" / "sampler_switch.json")
    args = p.parse_args(argv)

    import torch
    from code_switches import apply_code_switches

    from sampler_setup import drawn_adapter_sampler

    from promptbake.rollout import compiled_decoding

    if apply_code_switches({args.switch: True}):  # a key it does not know comes back
        raise SystemExit(f"--switch: {args.switch!r} is not a code switch (benchmarks/code_switches.py)")
    runtime, engine, every = drawn_adapter_sampler(args.precision, args.prompt)
    tok, batch = runtime.tokenizer, every[:args.rows]
    values = {"off": False, "on": True}
    times: dict[str, list[float]] = {k: [] for k in values}
    tokens: dict[str, torch.Tensor] = {}
    with compiled_decoding(engine, True) as compiled:
        for rnd in range(args.rounds + 1):
            for label, value in values.items():
                apply_code_switches({args.switch: value})
                start = time.perf_counter()
                out = engine.sample(batch, max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=[-1],
                                    pad_id=tok.pad_token_id, greedy=True)
                seconds = time.perf_counter() - start
                tokens.setdefault(label, out.response_ids_BT)
                if rnd:
                    times[label].append(seconds)
                print(f"round {rnd} {args.switch}={label}: {seconds:.2f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    pairs = [off / on for off, on in zip(times["off"], times["on"])]
    same = bool(torch.equal(tokens["off"], tokens["on"]))
    print(f"\n{args.switch}, {args.rows} rows x {args.new_tokens} tokens, compiled step: {compiled}, "
          f"{args.rounds} rounds after a compiling one")
    print("| value | median s per call | ms per token | calls |")
    print("|---|---|---|---|")
    for label in values:
        print(f"| {label} | {median[label]:.2f} | {1000 * median[label] / args.new_tokens:.1f} | "
              f"{', '.join(f'{t:.2f}' for t in times[label])} |")
    print(f"off / on: {median['off'] / median['on']:.3f}x by medians; per round {', '.join(f'{r:.2f}' for r in pairs)} "
          f"(on faster in {sum(r > 1 for r in pairs)} of {len(pairs)}); greedy tokens the same: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "switch": args.switch, "rows": args.rows, "new_tokens": args.new_tokens, "compiled_step": compiled,
        "precision": args.precision, "torch_threads": torch.get_num_threads(), "seconds": times,
        "median_s": median, "ratio_off_over_on": median["off"] / median["on"], "per_round_ratios": pairs,
        "same_tokens": same}, indent=1))


if __name__ == "__main__":
    main()
