"""The baked artifact: a PEFT adapter folder plus `bake.json`, written atomically.

Layout of `build/<name>/`:
    adapter_config.json, adapter_model.safetensors   (PeftModel.from_pretrained loads these)
    bake.json                                        (BakeManifest: how it was made, what it measured)
    train_log.jsonl                                  (one line per optimizer step)
The folder is assembled in a temporary sibling, fsynced, and renamed into place; a crash at any point
leaves the previous good artifact untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from promptbake.atomic import atomic_folder
from promptbake.errors import PromptbakeError
from promptbake.faults import fault_point

MANIFEST = "bake.json"
FORMAT_VERSION = 1


class BakeManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    created_at: str
    build_key: str = ""
    prompt_file: str
    prompt_file_sha256: str
    prompt_sha256: str
    prompt_tokens: int
    base_model: str
    base_model_path: str
    base_weights_sha256: str
    tokenizer_sha256: str
    teacher_model: str | None
    queries_file: str
    queries_sha256: str
    queries_synthesized: bool = False  # queries_file was written from the prompt's rules (no query file given)
    num_queries: int
    heldout_ids: list[int]  # rows of heldout_file when there is one, else rows of queries_file kept out of training
    heldout_file: str | None = None
    heldout_sha256: str | None = None
    config: dict[str, Any]
    seed: int
    precision: str
    adapter_sha256: str = ""
    response_cap: int | None = None  # max_new_tokens as used: sampled rollouts and held-out answers
    response_lengths: dict[str, Any] = {}  # how the cap was chosen (the teacher's answer lengths when auto)
    cap_hit: dict[str, float] = {}  # fraction of training rollouts and of held-out answers that the cap cut
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    check_rates: dict[str, dict[str, float]] = {}
    loss_summary: dict[str, Any] = {}
    timings: dict[str, float] = {}  # this run's wall times; loss_summary's seconds include the steps before a resume
    resumed_from_step: int | None = None  # training started from this step's checkpoint (an interrupted or a shorter compile)
    versions: dict[str, str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(out_dir: Path, peft_model, manifest: BakeManifest, train_log: Path | None) -> Path:
    """Save adapter + manifest into a temp folder, then swap it into `out_dir` with renames.

    The caller decided that replacing `out_dir` is allowed (see CompilePlan.existing)."""
    with atomic_folder(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        manifest.adapter_sha256 = sha256_file(tmp / "adapter_model.safetensors")
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        if train_log is not None and train_log.is_file():
            shutil.copyfile(train_log, tmp / "train_log.jsonl")
        readme = tmp / "README.md"
        if readme.exists():  # PEFT writes a model-card stub; the manifest says more
            readme.unlink()
        fault_point("write")
    return out_dir


def read_manifest(adapter_dir: str | Path, verify_weights: bool = True) -> BakeManifest:
    """Load and validate `bake.json`; with `verify_weights`, refuse a tampered or truncated adapter."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / MANIFEST
    if not adapter_dir.is_dir():
        raise PromptbakeError(f"{adapter_dir}: adapter folder not found")
    if not path.is_file():
        raise PromptbakeError(f"{path}: manifest missing; not a promptbake artifact")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PromptbakeError(f"{path}: manifest is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PromptbakeError(f"{path}: manifest must be a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise PromptbakeError(f"{path}: manifest format_version {data.get('format_version')!r}, this promptbake reads {FORMAT_VERSION}")
    try:
        manifest = BakeManifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise PromptbakeError(f"{path}: key '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None
    weights = adapter_dir / "adapter_model.safetensors"
    if verify_weights:
        if not weights.is_file():
            raise PromptbakeError(f"{weights}: adapter weights missing")
        if sha256_file(weights) != manifest.adapter_sha256:
            raise PromptbakeError(f"{weights}: sha256 differs from the manifest; the adapter was modified or truncated")
    return manifest
