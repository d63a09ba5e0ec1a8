"""promptbake: compile a system prompt into a LoRA adapter with on-policy context distillation.

Heavy modules (torch, transformers) load on first use, so `promptbake compile` can answer
"up to date" or reject bad input without paying for them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BakeConfig": "promptbake.config",
    "BakeManifest": "promptbake.artifact",
    "read_manifest": "promptbake.artifact",
    "BakeResult": "promptbake.bake",
    "compile_prompt": "promptbake.bake",
    "PromptbakeError": "promptbake.errors",
    "Query": "promptbake.queries",
    "load_queries": "promptbake.queries",
    "split_queries": "promptbake.queries",
    "PromptSpec": "promptbake.spec",
    "load_spec": "promptbake.spec",
    "verify_adapter": "promptbake.verify",
    "run_eval": "promptbake.evals",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'promptbake' has no attribute {name!r}")
