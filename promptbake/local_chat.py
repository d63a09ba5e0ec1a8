"""Load a baked adapter on its base model with PEFT and answer chats, no system prompt sent."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from promptbake.artifact import read_manifest
from promptbake.models import manifest_base_dir
from promptbake.rollout import eos_token_ids, sample
from promptbake.runtime import load_runtime


@dataclass
class LocalChat:
    model: object
    tokenizer: object
    use_adapter: bool
    bf16: bool

    @classmethod
    def load(cls, adapter_dir: str | Path, use_adapter: bool = True) -> "LocalChat":
        manifest = read_manifest(adapter_dir)
        runtime = load_runtime(manifest_base_dir(manifest), adapters=[("default", Path(adapter_dir))],
                               precision=manifest.precision)
        return cls(runtime.model, runtime.tokenizer, use_adapter, runtime.bf16)

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ctx = self.model.disable_adapter() if not self.use_adapter else contextlib.nullcontext()
        with ctx:
            rollout = sample(self.model, [ids], max_new_tokens=max_new_tokens, temperature=max(temperature, 1e-5),
                             eos_ids=eos_token_ids(self.tokenizer), pad_id=self.tokenizer.pad_token_id,
                             greedy=temperature == 0, bf16=self.bf16)
        tokens = rollout.response_ids_BT[0][rollout.response_mask_BT[0].bool()]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

