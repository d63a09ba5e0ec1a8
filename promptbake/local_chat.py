"""Talk to a bake on its base model with PEFT: the baked adapter (no system prompt sent), the base without it,
or the prompted teacher (base + the prompt the adapter was baked from), so a user can compare the three."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from promptbake.artifact import read_manifest
from promptbake.chat import ChatRenderer
from promptbake.models import manifest_base_dir
from promptbake.rollout import adapter_enabled, eos_token_ids, sample
from promptbake.runtime import load_runtime
from promptbake.spec import load_spec

Mode = Literal["baked", "base", "prompted"]


@dataclass
class LocalChat:
    model: object
    tokenizer: object
    renderer: ChatRenderer
    mode: Mode
    bf16: bool

    @classmethod
    def load(cls, adapter_dir: str | Path, mode: Mode = "baked") -> "LocalChat":
        """`prompted` renders the manifest's prompt file as the system prompt (as it is now on disk)."""
        manifest = read_manifest(adapter_dir)
        runtime = load_runtime(manifest_base_dir(manifest), adapters=[("default", Path(adapter_dir))],
                               precision=manifest.precision)
        system_prompt = load_spec(manifest.prompt_file).system_prompt if mode == "prompted" else ""
        return cls(runtime.model, runtime.tokenizer, runtime.renderer(system_prompt), mode, runtime.bf16)

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        ids = self.renderer.teacher_ids(messages) if self.mode == "prompted" else self.renderer.student_ids(messages)
        with adapter_enabled(self.model, self.mode == "baked"):
            rollout = sample(self.model, [ids], max_new_tokens=max_new_tokens, temperature=max(temperature, 1e-5),
                             eos_ids=eos_token_ids(self.tokenizer), pad_id=self.tokenizer.pad_token_id,
                             greedy=temperature == 0, bf16=self.bf16)
        tokens = rollout.response_ids_BT[0][rollout.response_mask_BT[0].bool()]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
