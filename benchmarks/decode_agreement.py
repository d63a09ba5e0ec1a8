"""Diagnostic: inside a compiled fp32 training run, does the decode step compiled through the policy give the eager
step's logits and tokens, call by call?

The fp32 decode step compiled through the policy (`rollout.COMPILE_POLICY_DECODING`) is off by default: on an Intel
Xeon with AVX-512 but no bf16 instructions it made a compiled training run differ from eager beyond rounding, while
outside training it sampled the eager tokens (docs/performance.md). This runs a short compile with `torch_compile`
on and that switch on, and at every sampling call draws the same batch twice from one random state: first through the
eager `decode_step`, then through the compiled step the run uses. Per call it prints whether every sampled token
agrees, the largest logit difference over the decode steps fed the same tokens so far, and where the two first drew
different tokens: which rows, and how far the two steps' distributions were apart there (a rounding-sized difference
that moved a draw across a token boundary, or a real one). Prints a table and writes JSON.

    python benchmarks/decode_agreement.py [--model tiny|default] [--steps 3] [--json results/decode_agreement.json]

`tiny` is a 2-layer model with SmolLM2's tokenizer and config shape (random weights: near-uniform next-token
distributions, where a small logit difference turns into another token most easily); `default` is SmolLM2 itself
(16 pirate queries per step, 48 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with SmolLM2's config shape and tokenizer, random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptbake.models import load_tokenizer, resolve_model

    source = resolve_model(None)
    config = AutoConfig.from_pretrained(source)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(source).save_pretrained(folder)
    return folder


def sampling_twice(calls: list[dict], echo: bool = False):
    """A stand-in for `rollout.sample_static` that draws each batch twice from one random state, through the eager
    `decode_step` and then through the step it was given, appends a comparison to `calls` and returns the second
    draw (the run goes on with it, as it would by itself)."""
    import torch

    import promptbake.rollout as rollout

    plain_sample_static = rollout.sample_static

    def recording(step, store):
        def call(model, input_ids_B1, *rest):
            logits_BV = step(model, input_ids_B1, *rest)
            store.append((input_ids_B1.detach().clone(), logits_BV.detach().clone()))
            return logits_BV
        return call

    def both_ways(model, step, prompts, **kw):
        eager_calls, compiled_calls = [], []
        state = torch.get_rng_state()
        with torch.compiler.set_stance("force_eager"):
            eager = plain_sample_static(model, recording(rollout.decode_step, eager_calls), prompts, **kw)
        torch.set_rng_state(state)
        compiled = plain_sample_static(model, recording(step, compiled_calls), prompts, **kw)
        same = eager.response_ids_BT.shape == compiled.response_ids_BT.shape and bool(
            torch.equal(eager.response_ids_BT, compiled.response_ids_BT))
        # Only decode steps fed the same tokens so far compare like with like; the first that is not was drawn from
        # logits that differed by the step before it.
        agreed, first_other = 0, None
        for (ids_e, _), (ids_c, _) in zip(eager_calls, compiled_calls):
            if not torch.equal(ids_e, ids_c):
                first_other = agreed + 1
                break
            agreed += 1
        diffs = [float((le - lc).abs().max()) for (_, le), (_, lc) in zip(eager_calls[:agreed], compiled_calls[:agreed])]
        row = {"call": len(calls) + 1, "rows": len(prompts), "tokens_equal": same, "decode_steps_agreed": agreed,
               "first_other_input_step": first_other, "max_abs_logit_diff": max(diffs, default=0.0),
               "logit_scale": float(eager_calls[0][1].abs().max()) if eager_calls else 0.0}
        if first_other is not None and diffs:
            # The draw that parted them came from the logits of the last agreed step: how close were the two there?
            (_, le), (_, lc) = eager_calls[agreed - 1], compiled_calls[agreed - 1]
            ids_e, ids_c = eager_calls[agreed][0][:, 0], compiled_calls[agreed][0][:, 0]
            rows = (ids_e != ids_c).nonzero().flatten().tolist()
            pe, pc = torch.softmax(le.float(), -1), torch.softmax(lc.float(), -1)
            row["parting_rows"] = [{"row": r, "eager_token": int(ids_e[r]), "compiled_token": int(ids_c[r]),
                                    "max_abs_logit_diff": float((le[r] - lc[r]).abs().max()),
                                    "cdf_shift_at_eager_token": float((pe[r].cumsum(-1) - pc[r].cumsum(-1))[ids_e[r]].abs())}
                                   for r in rows]
        calls.append(row)
        if echo:
            print(f"call {row['call']}: tokens equal {same}; {agreed} decode steps on equal inputs, max |logit difference| "
                  f"{row['max_abs_logit_diff']:.3g} (logits up to {row['logit_scale']:.3g})"
                  + (f"; parted at decode step {first_other}: {row.get('parting_rows')}" if first_other else ""), flush=True)
        return compiled

    return both_ways


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "results" / "decode_agreement.json")
    args = p.parse_args(argv)

    import torch

    import promptbake.rollout as rollout
    from promptbake.bake import compile_prompt

    work = Path(tempfile.mkdtemp(prefix="decode-agreement-"))
    if args.model == "tiny":
        model = str(tiny_model(work / "model"))
        queries = work / "queries.txt"
        queries.write_text("".join(f"Question number {i}: what is {i} plus {i}?\n" for i in range(40)))
        prompt = work / "prompt.md"
        prompt.write_text("---\nqueries: queries.txt\n---\nYou are a pirate. Say ahoy.\n")
        overrides = dict(batch_size=4, max_new_tokens=10)
    else:
        model, prompt = None, REPO / "prompts" / "pirate.md"
        overrides = dict(batch_size=16, max_new_tokens=48)
    overrides.update(steps=args.steps, heldout=0, precision="fp32", torch_compile=True, checkpoint_every=10_000)

    rollout.COMPILE_POLICY_DECODING = True
    plain_sample_static = rollout.sample_static
    calls: list[dict] = []
    both_ways = sampling_twice(calls, echo=True)
    rollout.sample_static = both_ways
    try:
        result = compile_prompt(prompt, out=work / "out", model=model, overrides=overrides, force=True)
    finally:
        rollout.sample_static = plain_sample_static
    import torch.backends.cpu

    report = {"model": args.model, "steps": args.steps, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cores": os.cpu_count(), "calls": calls,
              "log": [{"kl": e.kl, "grad_norm": e.grad_norm} for e in result.train.log]}
    print(f"\n{'call':>4} {'tokens equal':>12} {'steps agreed':>12} {'max |dlogit| there':>18} {'logit scale':>11}")
    for row in calls:
        print(f"{row['call']:>4} {str(row['tokens_equal']):>12} {row['decode_steps_agreed']:>12} "
              f"{row['max_abs_logit_diff']:>18.3g} {row['logit_scale']:>11.3g}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
