"""What `lora_init: steer` (promptbake/steer.py) gives before any training.

Fits the adapter to the prompt's shift of each layer at each `--shrink`, from the same zero start, and measures
the reverse KL to the prompted teacher on the prompt's held-out file (the base's and the fitted adapter's own
samples), as the fraction of the base gap closed. Prints a table and writes JSON:

    python benchmarks/steer_init.py --prompt pirate --shrink 0.25,0.5,1.0

On pirate (results/steer_init.json) half a step closed 16 % of the gap and a full step overshot (-0.94); a
40-step bake from half a step closed less than one from zero (docs/quality.md, section 20).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="pirate")
    p.add_argument("--fit-queries", type=int, default=48)
    p.add_argument("--fit-cap", type=int, default=96)
    p.add_argument("--eval-queries", type=int, default=16)
    p.add_argument("--eval-cap", type=int, default=96)
    p.add_argument("--shrink", default="0.5,1.0")
    p.add_argument("--ridge", type=float, default=0.01)
    p.add_argument("--model", default=None, help="model folder (default: the prompt's)")
    p.add_argument("--json", type=Path, default=REPO / "results" / "steer_init.json")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from promptbake.atomic import write_text_atomic
    from promptbake.config import BakeConfig
    from promptbake.measure import kl_to_teacher
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec
    from promptbake.steer import fit_steering_lora, sample_fit_data

    log = lambda msg: print(msg, flush=True)
    spec = load_spec(REPO / "prompts" / f"{args.prompt}.md")
    train = load_queries(spec.queries_path)
    train = [train[i * len(train) // args.fit_queries] for i in range(args.fit_queries)]
    heldout = load_queries(spec.heldout_path)[:args.eval_queries]
    rt = load_runtime(Path(args.model) if args.model else resolve_model(spec.model), train=BakeConfig())
    torch.manual_seed(0)
    renderer = rt.renderer(spec.system_prompt)
    teacher = rt.teacher(renderer)
    teacher.prepare(heldout, args.eval_cap, "held-out")
    engine = rt.engine()
    pad = rt.tokenizer.pad_token_id

    # What the fit reads: the base student's own samples (on-policy at step 0) on training queries.
    fit_seqs = sample_fit_data(engine, renderer, rt.tokenizer, train, max_new_tokens=args.fit_cap, temperature=1.0, seed=7)
    log(f"fit data: {len(train)} queries, {sum(fit_seqs['response_lengths'])} response tokens")

    def measure(adapter: bool) -> float:
        r = kl_to_teacher(rt.model, engine, teacher, renderer, rt.tokenizer, heldout, adapter=adapter,
                          max_new_tokens=args.eval_cap, temperature=1.0, seed=1234, bf16=rt.bf16)
        return r.mean

    t0 = time.perf_counter()
    base = measure(False)
    log(f"base reverse KL {base:.4f} ({time.perf_counter() - t0:.0f} s)")
    initial = {n: p.detach().clone() for n, p in rt.model.named_parameters() if "lora_" in n}
    rows = []
    for shrink in [float(s) for s in args.shrink.split(",")]:
        with torch.no_grad():
            for n, p_ in rt.model.named_parameters():
                if n in initial:
                    p_.copy_(initial[n])
        t = time.perf_counter()
        stats = fit_steering_lora(rt.model, pad_id=pad, bf16=rt.bf16, shrink=shrink, ridge=args.ridge,
                                  log=lambda m: log('  ' + m), **fit_seqs)
        fit_s = time.perf_counter() - t
        engine.sync()
        kl = measure(True)
        rows.append({"shrink": shrink, "ridge": args.ridge, "reverse_kl": kl, "gap_closed": 1 - kl / base,
                     "fit_s": fit_s, "layers": stats})
        log(f"shrink {shrink}: reverse KL {kl:.4f}, gap closed {1 - kl / base:.3f} (fit {fit_s:.0f} s)")

    print(f"\n| {args.prompt}, {args.eval_queries} held-out queries, cap {args.eval_cap} | reverse KL | gap closed |")
    print("|---|---|---|")
    print(f"| base | {base:.4f} | 0 |")
    for r in rows:
        print(f"| init, shrink {r['shrink']} | {r['reverse_kl']:.4f} | {r['gap_closed']:.3f} |")
    command = ["python", "benchmarks/steer_init.py"] + (sys.argv[1:] if argv is None else argv)
    write_text_atomic(args.json, json.dumps({"command": " ".join(command), "base_reverse_kl": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
