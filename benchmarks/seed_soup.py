"""Is what a bake misses noise or bias? Average several finished bakes' weight changes and measure the average.

Each bake's LoRA change is ΔW_i = (alpha / r) B_i A_i. Their exact mean is itself a LoRA adapter, of rank N·r:
A stacks the A_i, B stacks the B_i / N, and alpha grows with r so alpha / r is unchanged. If the mean closes clearly
more of the held-out KL gap than each bake, a large part of what one bake misses is the noise of its own samples,
which more bakes trained apart (on N machines, in the same minutes) average away; if it closes about as much, the
bakes share what they miss. The mean is measured with the quality study's protocol (benchmarks/quality.py) and saved
as a run of its own, so `quality.py --paired` compares it query by query.

    python benchmarks/seed_soup.py --prompt pirate --name soup-40-hidstd-hidinc \\
        --runs preset-faithful+fwd0.5+steps40+hid30+hidstd-s0-b0k,preset-faithful+fwd0.5+steps40+hid30+hidinc-s0-b0k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from quality import Measurer, gaps, load_run, reference_path, run_path, write_json  # noqa: E402


def mean_adapter(adapters: list[Path], out: Path) -> Path:
    """Write the exact mean of the adapters' weight changes as one LoRA adapter of rank N·r at `out`."""
    import torch
    from safetensors.torch import load_file, save_file

    from promptbake.atomic import atomic_folder

    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    first = configs[0]

    def shape(c: dict) -> dict:  # what must agree for the stacked matrices to be the mean
        return {"r": c["r"], "lora_alpha": c["lora_alpha"], "target_modules": sorted(c["target_modules"])}

    for a, c in zip(adapters, configs):
        if c.get("use_rslora") or c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise SystemExit(f"{a}/adapter_config.json: only plain LoRA (no rslora, DoRA or per-module ranks) averages this way")
        for key, value in shape(c).items():
            if value != shape(first)[key]:
                raise SystemExit(f"{a}/adapter_config.json: {key} {value!r} differs from {adapters[0]}'s {shape(first)[key]!r}")
    tensors = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    names = set(tensors[0])
    for a, t in zip(adapters, tensors):
        if set(t) != names:
            raise SystemExit(f"{a}/adapter_model.safetensors: its tensors differ from {adapters[0]}'s")
    n = len(adapters)
    merged = {}
    for name in sorted(names):
        if ".lora_A." in name:
            merged[name] = torch.cat([t[name] for t in tensors], dim=0).contiguous()
        elif ".lora_B." in name:
            merged[name] = (torch.cat([t[name] for t in tensors], dim=1) / n).contiguous()
        else:
            raise SystemExit(f"{adapters[0]}: tensor {name} is neither a LoRA A nor a LoRA B matrix")
    config = {**first, "r": first["r"] * n, "lora_alpha": first["lora_alpha"] * n}
    with atomic_folder(out) as tmp:
        save_file(merged, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--runs", required=True, help="comma list of adapter folders under build/quality/<prompt>/")
    p.add_argument("--name", required=True, help="the mean's run name (results/quality/runs/<prompt>/<name>.json)")
    p.add_argument("--measure-cap", type=int, default=256)
    p.add_argument("--out", type=Path, default=REPO / "results" / "quality")
    p.add_argument("--build", type=Path, default=REPO / "build" / "quality")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = args.runs.split(",")
    if len(runs) < 2:
        p.error("--runs: name at least two bakes")
    adapters = [args.build / args.prompt / run for run in runs]
    for adapter in adapters:
        if not (adapter / "adapter_model.safetensors").is_file():
            raise SystemExit(f"{adapter}: no adapter there (the quality study keeps them under build/quality/)")
    saved = {run: load_run(args.out, args.prompt, run) for run in runs}  # before the work: a missing one stops it here
    reference = json.loads(reference_path(args.out, args.prompt, args.measure_cap).read_text())
    merged = mean_adapter(adapters, args.build / args.prompt / args.name)
    measured = Measurer(REPO / "prompts" / f"{args.prompt}.md", args.measure_cap).measure(merged)
    result = {"prompt": args.prompt, "mean_of": runs,
              "command": " ".join(["python", "benchmarks/seed_soup.py"] + (argv or sys.argv[1:])),
              "measure_cap": args.measure_cap, **gaps(measured, reference), "measured": measured}
    write_json(run_path(args.out, args.prompt, args.name), result)
    print("| adapter | reverse KL gap closed | by position 0–47 / 48–127 / 128+ | forward gap closed | check ratio |")
    print("|---|---|---|---|---|")
    for name, r in [*saved.items(), (args.name, result)]:
        buckets = " / ".join(f"{v:.2f}" for v in r["bucket_gaps"].values())
        print(f"| {name} | {r['reverse_gap']:.3f} | {buckets} | {r['forward_gap']:.3f} | {r['check_ratio'] or 0:.2f} |")


if __name__ == "__main__":
    main()
