"""What the sampler benchmarks decode with: the default model, a LoRA adapter that does something, its sampler."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def drawn_adapter_sampler(precision: str, prompt: str):
    """(runtime, engine, every training query of `prompts/<prompt>.md` as the student's token ids). The adapter's B
    matrices are drawn (seed 0) instead of zero, which would make every LoRA branch add nothing, as a trained one's do
    not; the engine is synced to it."""
    import torch

    from promptbake.config import BakeConfig
    from promptbake.models import resolve_model
    from promptbake.queries import load_queries
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec

    runtime = load_runtime(resolve_model(None), train=BakeConfig(), precision=precision)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in runtime.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    engine = runtime.engine()
    engine.sync()
    spec = load_spec(REPO / "prompts" / f"{prompt}.md")
    renderer = runtime.renderer(spec.system_prompt)
    return runtime, engine, [renderer.student_ids(q.messages) for q in load_queries(spec.queries_path)]
