"""promptbake: compile a system prompt into a LoRA adapter with on-policy context distillation.

Heavy modules (torch, transformers) load on first use, so `promptbake compile` can answer
"up to date" or reject bad input without paying for them.
"""

from __future__ import annotations

import importlib
import os

# oneDNN (torch's CPU matmuls) keeps one compiled kernel per matrix shape, up to 1,024 of them. Sampled
# batches change length every micro-batch, so the cache fills with shapes never seen again and RSS creeps
# up over a compile: the default 30-step compile peaked at 2.34 GiB with 1,024 and 2.26 GiB with 256, at
# the same speed within noise (a micro-batch's forward and backward use a few dozen shapes). oneDNN reads
# this when it first runs, so it applies when promptbake is imported before any CPU matmul; a value
# already set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")

__version__ = "0.1.0"

_EXPORTS = {
    "BakeConfig": "promptbake.config",
    "BakeManifest": "promptbake.artifact",
    "read_manifest": "promptbake.artifact",
    "BakeResult": "promptbake.bake",
    "compile_prompt": "promptbake.bake",
    "CompilePlan": "promptbake.plan",
    "plan_compile": "promptbake.plan",
    "load_runtime": "promptbake.runtime",
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
