"""Benchmark: where a compile's resident memory goes, by stage and by phase of a training step.

Stages (RSS after each): the imports, the runtime (student with bf16 frozen linears), the bf16 sampler copy,
the teacher's prompt prepared, one rollout batch sampled and scored (after the heap trim). Then a short compile
(fixed cap, no held-out measurement) with a thread sampling RSS every few milliseconds, each sample charged to the
phase running at that moment: loading (model, samplers, the teacher's prompt caches), sampling, teacher scoring,
the student's forward, the loss, the backward pass, gradient clipping, the optimizer step, the sampler's weight
sync, checkpoint saves and the artifact write ("between phases" is everything else, and the script says which
phase had just ended when its peak came). Each configuration runs in its own process, so one's heap does not
carry into the next. A configuration may also set a code switch (`benchmarks/code_switches.py`, e.g.
`bf16_output_layer=false`) to measure the code as it was before a change.

    python benchmarks/memory.py [--prompt prompts/pirate.md] [--new-tokens 128] [--steps 3]
        [--configs "default,micro_batch_size=2"] [--json results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("loading", "sampling", "teacher", "student forward", "loss", "backward", "clip", "optimizer", "sampler sync",
          "checkpoint", "artifact", "between phases")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


class PhaseMeter:
    """Samples RSS on a thread and keeps the peak seen during each phase."""

    def __init__(self):
        self.phase = "between phases"
        self.peak: dict[str, float] = {}
        self.last_left = "start"  # the phase that ended most recently
        self.between_peak_after = None  # which phase had just ended when "between phases" peaked
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while True:
            now, phase, last = rss_gib(), self.phase, self.last_left
            if now > self.peak.get(phase, 0.0):
                self.peak[phase] = now
                if phase == "between phases":
                    self.between_peak_after = last
            time.sleep(0.002)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def inside(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return original(*args, **kwargs)
            finally:
                self.phase, self.last_left = before, phase

        setattr(owner, name, inside)


def parse_overrides(spec: str) -> dict:
    overrides = {}
    for item in filter(None, spec.split("+")):
        if item == "default":
            continue
        key, value = item.split("=")
        overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(overrides[key], str):
            for number in (int, float):
                try:
                    overrides[key] = number(value)
                    break
                except ValueError:
                    pass
    return overrides


def worker(prompt: Path, config: str, new_tokens: int, steps: int, part: str) -> dict:
    """part 'stages': RSS after each piece is built; part 'phases': a short compile under the phase meter."""
    stages = {"python": rss_gib()}
    import peft  # noqa: F401  (what a compile imports, counted in "imports")
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from promptbake.config import BakeConfig
    from promptbake.memory import release_free_memory
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    from code_switches import apply_code_switches

    overrides = apply_code_switches(parse_overrides(config))
    stages["imports"] = rss_gib()
    if part == "phases":
        return phases(prompt, overrides, new_tokens, steps)
    settings = BakeConfig(max_new_tokens=new_tokens, **overrides)
    runtime = load_runtime(resolve_model(None), train=settings)
    stages["runtime (student, frozen linears bf16)"] = rss_gib()
    engine = runtime.engine()
    stages["+ bf16 sampler copy"] = rss_gib()
    spec = load_spec(prompt)
    renderer = runtime.renderer(spec.system_prompt)
    teacher = runtime.teacher(renderer)
    queries = load_queries(spec.queries_path)[: settings.batch_size]
    teacher.prepare(queries, new_tokens, "bench")
    prompts = [renderer.student_ids(q.messages) for q in queries]
    rollout = engine.sample(prompts, max_new_tokens=new_tokens, temperature=1.0, eos_ids=eos_token_ids(runtime.tokenizer),
                            pad_id=runtime.tokenizer.pad_token_id)
    rows = settings.student_rows(runtime.bf16)
    scored = teacher.logits(queries[:rows], rollout.select(list(range(rows))))
    del scored, rollout
    release_free_memory()
    stages["+ one batch sampled and scored, heap trimmed"] = rss_gib()
    return {"stages_gib": stages}


def phases(prompt: Path, overrides: dict, new_tokens: int, steps: int) -> dict:
    import resource

    import accelerate
    import torch

    import promptbake.bake
    import promptbake.teacher
    import promptbake.train
    from promptbake.bake import compile_prompt
    from promptbake.rollout import HFRolloutEngine

    meter = PhaseMeter()
    meter.wrap(promptbake.bake, "load", "loading")  # the model, the samplers and the teacher's prompt caches
    meter.wrap(promptbake.bake, "write_artifact", "artifact")
    meter.wrap(HFRolloutEngine, "sample", "sampling")
    meter.wrap(HFRolloutEngine, "sync", "sampler sync")
    meter.wrap(promptbake.train, "save_checkpoint", "checkpoint")
    meter.wrap(promptbake.teacher.PromptedTeacher, "logits", "teacher")
    meter.wrap(promptbake.train, "response_logits", "student forward")
    meter.wrap(promptbake.train, "distill_loss", "loss")
    meter.wrap(accelerate.Accelerator, "backward", "backward")
    meter.wrap(accelerate.Accelerator, "clip_grad_norm_", "clip")
    meter.wrap(torch.optim.AdamW, "step", "optimizer")
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_prompt(prompt, out=Path(tmp) / "out", overrides=dict(
            steps=steps, max_new_tokens=new_tokens, heldout=0, checkpoint_every=10_000, **overrides))
    return {"phase_peak_gib": {p: meter.peak.get(p) for p in PHASES}, "between_peak_after": meter.between_peak_after,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "s_per_step": [round(e.seconds, 2) for e in result.train.log]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=Path, default=REPO / "prompts" / "pirate.md")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", default="default", help="comma list; each 'default' or key=value+key=value")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "PART"))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.prompt, args.worker[0], args.new_tokens, args.steps, args.worker[1])))
        return
    runs = []
    for config in args.configs.split(","):
        run = {"config": config}
        for part in ("stages", "phases"):  # each in its own process: one's heap does not carry into the other
            proc = subprocess.run([sys.executable, __file__, "--worker", config, part, "--prompt", str(args.prompt),
                                   "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)],
                                  capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{config} ({part}): worker failed\n{proc.stderr[-3000:]}")
            run.update(json.loads(line[7:]))
        runs.append(run)
    print(f"\nRSS by stage (GiB), {args.prompt.name}, cap {args.new_tokens}")
    for run in runs:
        print(f"  {run['config']}: " + ", ".join(f"{k} {v:.2f}" for k, v in run["stages_gib"].items()))
    print(f"\nPeak RSS by phase of {args.steps} training steps (GiB)\n| config | " + " | ".join(PHASES) + " | process peak |")
    print("|---" * (len(PHASES) + 2) + "|")
    for run in runs:
        cells = " | ".join(f"{run['phase_peak_gib'][p]:.2f}" if run["phase_peak_gib"][p] else "-" for p in PHASES)
        print(f"| {run['config']} | {cells} | {run['peak_rss_gib']:.2f} |")
    for run in runs:
        print(f"  {run['config']}: the 'between phases' peak came right after: {run.get('between_peak_after')}")
    if args.json:
        from promptbake.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"prompt": str(args.prompt), "new_tokens": args.new_tokens,
                                                 "steps": args.steps, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
