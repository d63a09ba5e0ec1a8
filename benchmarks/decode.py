"""Benchmark: sampling and teacher scoring with transformers' SDPA attention vs promptbake's CPU decode
attention and shared prompt prefix, side by side in one run.

For the short pirate prompt and the 1,600-token support policy, the prompted teacher's prompts (system
prompt + query) and the student's (query only):
- sampling 16 rows x N new tokens with the bf16 sampler: SDPA with a per-row prompt (transformers' way),
  the decode attention alone, and the decode attention with the shared prefix (the default);
- teacher scoring of 4 rows x (query + 64 response tokens) with the prompt's cache: expanded per row
  (SDPA) vs one shared copy (the default);
each timed as the median of `--repeats` runs, with the greedy tokens' agreement and the logits' max
difference against the SDPA path. Prints a table and writes JSON.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3] [--json results/decode.json]
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "results" / "decode.json")
    args = p.parse_args(argv)

    import torch

    import promptbake.rollout as rollout_module
    from promptbake.config import BakeConfig
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import Rollout
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    runtime = load_runtime(resolve_model(None), train=BakeConfig(), precision="bf16")  # as a compile sets it up
    tok, student = runtime.tokenizer, runtime.model
    engine = runtime.engine()
    engine.sync(with_adapter=False)
    sampler = engine.model
    fast = sampler.config._attn_implementation
    results = []

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    for name in ("pirate", "support"):
        spec = load_spec(REPO / "prompts" / f"{name}.md")
        queries = load_queries(spec.queries_path)[: args.rows]
        renderer = runtime.renderer(spec.system_prompt)
        for who, render in (("teacher", renderer.teacher_ids), ("student", renderer.student_ids)):
            prompts = [render(q.messages) for q in queries]
            variants = {"SDPA, prompt per row": ("sdpa", 10**9), "decode attention": (fast, 10**9),
                        "decode attention + shared prefix": (fast, 16)}
            ref_ids, ref_s = None, None
            for label, (impl, min_shared) in variants.items():
                sampler.set_attn_implementation(impl)
                rollout_module.MIN_SHARED_PREFIX = min_shared

                def run():
                    return engine.sample(prompts, max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=[-1],
                                         pad_id=tok.pad_token_id, greedy=True)
                seconds, ro = timed(run)
                same = float((ro.response_ids_BT == ref_ids).float().mean()) if ref_ids is not None else 1.0
                ref_ids = ro.response_ids_BT if ref_ids is None else ref_ids
                ref_s = ref_s or seconds
                row = {"prompt": name, "rendering": who, "prompt_tokens": len(prompts[0]), "part": "sampling",
                       "variant": label, "seconds": seconds, "speedup": ref_s / seconds, "greedy_tokens_same": same}
                results.append(row)
                print(f"{name:8} {who:8} {len(prompts[0]):5} sampling {label:34} {seconds:7.2f} s  {ref_s / seconds:5.2f}x  "
                      f"same greedy tokens {same:.0%}", flush=True)
        sampler.set_attn_implementation(fast)
        rollout_module.MIN_SHARED_PREFIX = 16

        # Teacher scoring: 4 rows x (query + 64 sampled tokens), prompt cache shared vs expanded per row.
        teacher = runtime.teacher(renderer)
        part = queries[:4]
        teacher.prepare(part, 64, name)
        torch.manual_seed(0)
        response = torch.randint(100, 20000, (4, 64))
        rollout = Rollout(response, torch.ones_like(response))
        base = student.get_base_model()
        out = {}
        for label, impl in (("prompt cache expanded per row (SDPA)", "sdpa"), ("one shared copy", fast)):
            base.set_attn_implementation(impl)
            teacher.refresh()
            seconds, logits = timed(lambda: teacher.logits(part, rollout).float())
            out[label] = (seconds, logits)
        base.set_attn_implementation(fast)
        (s_ref, l_ref), (s_new, l_new) = out.values()
        diff = float((l_ref - l_new).abs().max())
        for label, (seconds, _) in out.items():
            results.append({"prompt": name, "prompt_tokens": len(teacher.prefix_ids), "part": "teacher scoring",
                            "variant": label, "seconds": seconds, "speedup": s_ref / seconds, "max_abs_logit_diff": diff})
            print(f"{name:8} teacher  {len(teacher.prefix_ids):5} scoring  {label:34} {seconds:7.2f} s  {s_ref / seconds:5.2f}x  "
                  f"max |logit diff| {diff:.3g} (bf16)", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"new_tokens": args.new_tokens, "rows": args.rows, "results": results}, indent=1) + "\n")
    print("\n| prompt | rendering | prompt tokens | part | variant | seconds | speedup |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['prompt']} | {r.get('rendering', 'teacher')} | {r['prompt_tokens']} | {r['part']} | {r['variant']} | "
              f"{r['seconds']:.2f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
