"""Benchmark: what graph-captured decoding would buy on this machine, before building it into the sampler.

The student's sampling is 40-50 % of a faithful step, and the README's profile puts most of it in the overhead
of many small eager operations, which graph capture removes. This times, side by side in one process on the
default model with a LoRA adapter, greedy decoding of `--rows` student prompts for `--new-tokens` tokens (no
early stop):

- promptbake's sampler (`HFRolloutEngine.sample`, the one a compile uses);
- transformers `generate`, static cache, eager, then compiled (one graph for every decode step of a fixed batch);
- the compiled `generate` with promptbake's CPU decode attention (`promptbake/fastdecode.py`) in place of SDPA;
- promptbake's own decode loop over a static KV cache, eager and with its decode step compiled: prompts
  left-padded to a multiple of `--bucket` tokens, so batches of different prompt lengths share one graph.

Every call decodes a different batch of the prompt's training queries (`--calls` batches, the first call
compiles), as a compile's steps do: a variant that recompiles for every new prompt width pays it here. Greedy
tokens are compared with promptbake's sampler on the same batch. Prints a table and writes JSON.

    python benchmarks/compiled_decode.py [--new-tokens 128] [--rows 16] [--calls 3] [--precision auto]
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
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--calls", type=int, default=3, help="calls per variant, each on its own batch; the first compiles")
    p.add_argument("--bucket", type=int, default=64, help="static loop: prompts padded to a multiple of this")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16, as a compile takes it")
    p.add_argument("--prompt", default="pirate")
    p.add_argument("--json", type=Path, default=REPO / "results" / "compiled_decode.json")
    args = p.parse_args(argv)

    import torch
    from transformers import GenerationConfig, StaticCache
    from transformers.generation import CompileConfig

    from promptbake.rollout import left_pad, position_ids
    from sampler_setup import drawn_adapter_sampler

    runtime, engine, every = drawn_adapter_sampler(args.precision, args.prompt)
    tok, student = runtime.tokenizer, runtime.model
    batches = [every[i * args.rows:(i + 1) * args.rows] for i in range(args.calls)]
    if len(batches[-1]) < args.rows:
        raise SystemExit(f"prompts/{args.prompt}.md: {len(every)} queries, fewer than --calls x --rows")
    T, pad = args.new_tokens, tok.pad_token_id
    model = engine.model or student  # what the sampler decodes with: its merged bf16 copy, or the PEFT model
    base_impl = student.get_base_model().config._attn_implementation

    def ours(prompts):
        return engine.sample(prompts, max_new_tokens=T, temperature=1.0, eos_ids=[-1], pad_id=pad,
                             greedy=True).response_ids_BT

    def hf(compiled: bool):
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        config = GenerationConfig(max_new_tokens=T, min_new_tokens=T, do_sample=False, cache_implementation="static",
                                  pad_token_id=pad, eos_token_id=None,
                                  compile_config=compile_config if compiled else None, disable_compile=not compiled)

        def run(prompts):
            ids_BL, mask_BL = left_pad(prompts, pad)
            with torch.no_grad():
                out = model.generate(input_ids=ids_BL, attention_mask=mask_BL, generation_config=config)
            return out[:, ids_BL.shape[1]:]
        return run

    def decode_step(input_ids, attention_mask, position_ids, past_key_values, cache_position):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, cache_position=cache_position, use_cache=True).logits[:, -1, :]

    def static_loop(step):
        """Greedy decoding over a static cache of (bucketed prompt width + T) positions; one graph per width."""
        @torch.no_grad()
        def run(prompts):
            ids_BL, mask_BL = left_pad(prompts, pad)
            B, L = ids_BL.shape
            W = -(-L // args.bucket) * args.bucket
            ids_BW = torch.cat([torch.full((B, W - L), pad), ids_BL], dim=1)
            mask_BW = torch.cat([torch.zeros(B, W - L, dtype=torch.long), mask_BL], dim=1)
            cache = StaticCache(config=model.config, max_cache_len=W + T)
            mask_BS = torch.zeros(B, W + T, dtype=torch.long)  # one width for every decode step: no new shapes
            mask_BS[:, :W] = mask_BW
            logits_BV = model(input_ids=ids_BW, attention_mask=mask_BW, position_ids=position_ids(mask_BW),
                              past_key_values=cache, cache_position=torch.arange(W), use_cache=True,
                              logits_to_keep=1).logits[:, -1, :]
            pos_B1 = mask_BW.sum(-1, keepdim=True) - 1
            out_BT = torch.full((B, T), pad)
            for t in range(T):
                out_BT[:, t] = logits_BV.argmax(-1)
                if t == T - 1:
                    break
                mask_BS[:, W + t] = 1
                pos_B1 = pos_B1 + 1
                logits_BV = step(out_BT[:, t:t + 1], mask_BS, pos_B1, cache, torch.tensor([W + t]))
            return out_BT
        return run

    variants = [("promptbake sampler (eager)", ours, base_impl),
                ("transformers generate, static cache, eager", hf(False), "sdpa"),
                ("transformers generate, static cache, compiled", hf(True), "sdpa"),
                ("the same, promptbake's decode attention", hf(True), base_impl),
                ("promptbake loop, static cache, eager", static_loop(decode_step), base_impl),
                ("promptbake loop, static cache, compiled step", static_loop(torch.compile(decode_step, dynamic=False)),
                 base_impl)]
    results, reference = [], []
    for label, run, impl in variants:
        student.get_base_model().set_attn_implementation(impl)
        if model is not student:
            model.set_attn_implementation(impl)
        times, same = [], []
        for i, prompts in enumerate(batches):
            t = time.perf_counter()
            out = run(prompts)
            times.append(time.perf_counter() - t)
            if not results:
                reference.append(out)
            same.append(float((out == reference[i]).float().mean()))
        first, steady = times[0], statistics.median(times[1:])
        row = {"variant": label, "first_call_s": first, "seconds": steady, "calls_s": times,
               "ms_per_token": 1000 * steady / T, "speedup": results[0]["seconds"] / steady if results else 1.0,
               "greedy_tokens_same": statistics.mean(same)}
        results.append(row)
        print(f"{label:48} first {first:7.2f} s  then {steady:7.2f} s  {row['ms_per_token']:6.1f} ms/token  "
              f"{row['speedup']:5.2f}x  same greedy tokens {row['greedy_tokens_same']:.0%}", flush=True)
    student.get_base_model().set_attn_implementation(base_impl)
    widths = [max(len(x) for x in b) for b in batches]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": args.rows, "new_tokens": T, "prompt_widths": widths, "bucket": args.bucket,
                                     "precision": args.precision, "command": " ".join(["python"] + sys.argv),
                                     "results": results}, indent=1) + "\n")
    print(f"\n{args.rows} rows x {T} new tokens, {args.calls} batches of prompts {widths} tokens wide\n")
    print("| variant | first call | then (median) | ms per token | speedup | same greedy tokens |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['first_call_s']:.1f} s | {r['seconds']:.2f} s | {r['ms_per_token']:.1f} | "
              f"{r['speedup']:.2f}x | {r['greedy_tokens_same']:.0%} |")


if __name__ == "__main__":
    main()
