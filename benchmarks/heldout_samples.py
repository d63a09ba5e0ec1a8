"""The base model's own answers to a prompt's held-out queries, with the prompted teacher ready to score them: the
starting point of the benchmarks that compare the student and the teacher on the same sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class HeldoutSamples:
    queries: list  # the first n held-out queries
    runtime: Any  # fp32
    teacher: Any  # prepared for `queries`
    prompts: list[list[int]]  # the student's prompt ids (no system prompt)
    rollout: Any  # the base model's answers, temperature 1


def sample_heldout(prompt_file: Path, n_queries: int, max_new_tokens: int) -> HeldoutSamples:
    """Seeded (torch seed 0), fp32: the same answers on every call on one machine."""
    import torch

    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.rollout import eos_token_ids
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    torch.manual_seed(0)
    spec = load_spec(prompt_file)
    queries = load_queries(spec.heldout_path)[:n_queries]
    runtime = load_runtime(resolve_model(spec.model), precision="fp32")
    renderer = runtime.renderer(spec.system_prompt)
    teacher = runtime.teacher(renderer)
    teacher.prepare(queries, max_new_tokens, str(spec.heldout_path))
    tok = runtime.tokenizer
    prompts = [renderer.student_ids(q.messages) for q in queries]
    rollout = runtime.engine().sample(prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                                      eos_ids=eos_token_ids(tok), pad_id=tok.pad_token_id)
    return HeldoutSamples(queries, runtime, teacher, prompts, rollout)
