"""Whether torch's on-disk compile cache already holds a compile's graphs, so that compiling pays in a short run.

Compiling the layers, the decode step and the loss costs about 1-2 minutes in step 1 with a cold cache, which only
a long run repays; with the cache warm it costs about 25 s more than an eager step 1, and a 16-step compile finishes
sooner compiled (docs/performance.md). torch cannot say in advance whether its cache will hit, so promptbake
records, after the first compiled step of a run, what that run compiled: the torch version, the CPU's kernels, the
model's architecture and the precision, and where inductor kept its cache. A later run with the same record and the
cache folder still in place counts as warm. In bf16 the response cap is left out: the layers compile for any length,
and the merged copy's decode step for a new cap cost about 22 s more in step 1, which a 16-step run at cap 64 still
repaid. In fp32 the decode step compiles through the policy (`rollout.COMPILE_POLICY_DECODING`), LoRA branches
included, and a new cap cost about 114 s: an 8-step run at a cap the cache did not hold ran 0.77x eager, at one it
held 1.15x (docs/performance.md), so there the cap is part of the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from promptbake.atomic import write_text_atomic
from promptbake.models import promptbake_home

RECORD_FILE = "compiled.json"
# Model config fields that a run flips (gradient checkpointing turns the KV cache off; storing the frozen weights
# in bf16 changes the recorded dtype, which the key's precision stands for) or that say nothing of the architecture.
RUNTIME_FIELDS = {"use_cache", "dtype", "torch_dtype", "transformers_version", "output_hidden_states",
                  "output_attentions", "return_dict"}


def inductor_cache_dir() -> Path | None:
    """Where inductor keeps its compiled graphs: $TORCHINDUCTOR_CACHE_DIR, else torch's default under the temp folder
    (None where this torch keeps that default elsewhere in its modules: then no run counts as warm)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).absolute()
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return Path(default_cache_dir()).absolute()


def compile_key(model_config, bf16: bool, cap: int | str | None = None, activation_budget: float = 1.0) -> str:
    """What decides the compiled graphs of a run: torch, the CPU's kernels, the architecture and the precision, and
    where given the response cap (the decode step's static cache length) and the partitioner's activation budget
    (1 is torch's default)."""
    import torch

    arch = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    arch = {k: v for k, v in arch.items() if not k.startswith("_") and k not in RUNTIME_FIELDS}
    what = [torch.__version__, torch.backends.cpu.get_cpu_capability(), arch, bool(bf16)] + ([cap] if cap else [])
    what += [f"activation budget {activation_budget}"] if activation_budget != 1.0 else []
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _record_path() -> Path:
    return promptbake_home() / RECORD_FILE


def _read_record() -> dict:
    try:
        record = json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def cache_is_warm(key: str) -> bool:
    """A run with this key compiled before on this machine and its inductor cache folder is still there."""
    cache = inductor_cache_dir()
    if cache is None or _read_record().get(key) != str(cache):
        return False
    return cache.is_dir() and any(cache.iterdir())


def remember_compiled(key: str) -> None:
    """Record that a run with this key has compiled its graphs into the current inductor cache. Best effort: a
    read-only home only means the next short run stays eager."""
    cache, record = inductor_cache_dir(), _read_record()
    if cache is None or record.get(key) == str(cache):
        return
    record[key] = str(cache)
    try:
        _record_path().parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_record_path(), json.dumps(record, indent=1, sort_keys=True))
    except OSError:
        pass
