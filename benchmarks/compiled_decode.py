"""Benchmark: what graph-captured decoding would buy on this machine, before building it into the sampler.

The student's sampling is 40-50 % of a faithful step, and the README's profile puts most of it in the overhead
of many small eager operations, which graph capture removes. transformers already has that path: `generate`
with a static KV cache and a compiled forward (one graph for every decode step of a fixed batch). This times,
side by side in one process on the default model with a LoRA adapter, greedy decoding of `--rows` student
prompts for `--new-tokens` tokens (no early stop):

- promptbake's sampler (`HFRolloutEngine.sample`, the one a compile uses);
- transformers `generate`, static cache, eager;
- transformers `generate`, static cache, compiled: the first call (compiling) and the median of the rest;

with each one's greedy tokens against promptbake's. Prints a table and writes JSON.

    python benchmarks/compiled_decode.py [--new-tokens 128] [--rows 16] [--repeats 2] [--precision fp32]
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16, as a compile takes it")
    p.add_argument("--prompt", default="pirate")
    p.add_argument("--json", type=Path, default=REPO / "results" / "compiled_decode.json")
    args = p.parse_args(argv)

    import torch
    from transformers import GenerationConfig
    from transformers.generation import CompileConfig

    from promptbake.config import BakeConfig
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import left_pad
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    runtime = load_runtime(resolve_model(None), train=BakeConfig(), precision=args.precision)
    tok, student = runtime.tokenizer, runtime.model
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at the start, which would make LoRA a no-op
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    engine = runtime.engine()
    engine.sync()
    spec = load_spec(REPO / "prompts" / f"{args.prompt}.md")
    queries = load_queries(spec.queries_path)[: args.rows]
    renderer = runtime.renderer(spec.system_prompt)
    prompts = [renderer.student_ids(q.messages) for q in queries]
    ids_BL, mask_BL = left_pad(prompts, tok.pad_token_id)
    L, T = ids_BL.shape[1], args.new_tokens
    model = engine.model or student  # what the sampler decodes with: its merged bf16 copy, or the PEFT model
    base_impl = student.get_base_model().config._attn_implementation

    def ours():
        return engine.sample(prompts, max_new_tokens=T, temperature=1.0, eos_ids=[-1], pad_id=tok.pad_token_id,
                             greedy=True).response_ids_BT

    def hf(compiled: bool):
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        config = GenerationConfig(max_new_tokens=T, min_new_tokens=T, do_sample=False, cache_implementation="static",
                                  pad_token_id=tok.pad_token_id, eos_token_id=None,
                                  compile_config=compile_config if compiled else None, disable_compile=not compiled)

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=ids_BL, attention_mask=mask_BL, generation_config=config)
            return out[:, L:]
        return run

    results, reference = [], None
    variants = [("promptbake sampler (eager)", ours, base_impl),
                ("transformers generate, static cache, eager", hf(False), "sdpa"),
                ("transformers generate, static cache, compiled", hf(True), "sdpa")]
    for label, run, impl in variants:
        student.get_base_model().set_attn_implementation(impl)
        if model is not student:
            model.set_attn_implementation(impl)
        times, out = [], None
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
        first, steady = times[0], statistics.median(times[1:])
        reference = out if reference is None else reference
        same = float((out == reference).float().mean())
        row = {"variant": label, "first_call_s": first, "seconds": steady, "ms_per_token": 1000 * steady / T,
               "speedup": results[0]["seconds"] / steady if results else 1.0, "greedy_tokens_same": same}
        results.append(row)
        print(f"{label:48} first {first:7.2f} s  then {steady:7.2f} s  {row['ms_per_token']:6.1f} ms/token  "
              f"{row['speedup']:5.2f}x  same greedy tokens {same:.0%}", flush=True)
    student.get_base_model().set_attn_implementation(base_impl)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": args.rows, "new_tokens": T, "prompt_tokens": L,
                                     "precision": args.precision, "results": results}, indent=1) + "\n")
    print(f"\n{args.rows} rows x {T} new tokens, prompts padded to {L} tokens\n")
    print("| variant | first call | then | ms per token | speedup | same greedy tokens |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['first_call_s']:.1f} s | {r['seconds']:.2f} s | {r['ms_per_token']:.1f} | "
              f"{r['speedup']:.2f}x | {r['greedy_tokens_same']:.0%} |")


if __name__ == "__main__":
    main()
