"""Rollouts on a vLLM server (`--rollout-url`): the student samples there, its adapter loaded at runtime.

After every optimizer step `sync()` writes the current LoRA weights to a folder the server can read and asks the
server to load them in place under one name (vLLM's runtime LoRA loading, enabled on the server with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora), so the next `sample()` uses the updated adapter. The
server must see this machine's files (the same machine, or a shared filesystem).
"""

from __future__ import annotations

import os
import tempfile
import uuid

from promptbake.errors import PromptbakeError
from promptbake.rollout import Rollout, rollout_from_lists
from promptbake.vllm_client import VLLMClient


class ServedRolloutEngine:
    """The rollout engine interface (`sync`, `sample`) over a vLLM server; the base model's id samples the base."""

    def __init__(self, policy, url: str, tokenizer, *, rows_per_request: int = 16):
        self.policy, self.rows_per_request = policy, rows_per_request
        self.client = VLLMClient(url, "--rollout-url")
        self.client.check_tokenizer(tokenizer)
        self.name = f"promptbake-policy-{uuid.uuid4().hex[:12]}"  # one name per compile; updates load in place
        self._dir = tempfile.TemporaryDirectory(prefix="promptbake-rollouts-")
        self._loaded = False
        self.with_adapter = True
        self.sync()

    def sync(self, with_adapter: bool = True) -> None:
        """Write the current adapter and load it on the server in place (with the adapter off: sample the base)."""
        self.with_adapter = with_adapter
        if not with_adapter:
            return
        path = os.path.join(self._dir.name, "adapter")
        self.policy.save_pretrained(path, safe_serialization=True)
        try:
            self.client.call("POST", "/v1/load_lora_adapter",
                             {"lora_name": self.name, "lora_path": path, "load_inplace": self._loaded}, raw=True)
        except PromptbakeError as e:
            if "HTTP 404" in str(e) or "HTTP 405" in str(e):
                raise PromptbakeError(f"--rollout-url {self.client.url}: the server cannot load adapters at runtime; "
                                      "start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True") from None
            raise
        self._loaded = True

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_ids: list[int],
               pad_id: int, greedy: bool = False) -> Rollout:
        model = self.name if self.with_adapter else self.client.model_id
        responses = self.client.sample_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                           eos_ids=eos_ids, greedy=greedy, rows_per_request=self.rows_per_request)
        return rollout_from_lists(responses, pad_id)
