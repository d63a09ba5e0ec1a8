"""promptbake: compile a system prompt into a LoRA adapter with on-policy context distillation."""

from promptbake.artifact import BakeManifest, read_manifest
from promptbake.bake import BakeResult, compile_prompt
from promptbake.config import BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.queries import Query, load_queries, split_queries
from promptbake.spec import PromptSpec, load_spec

__all__ = [
    "BakeConfig", "BakeManifest", "BakeResult", "PromptSpec", "PromptbakeError", "Query",
    "compile_prompt", "load_queries", "load_spec", "read_manifest", "split_queries",
]
__version__ = "0.1.0"
