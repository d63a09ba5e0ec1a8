"""The prompted teacher behind an OpenAI-compatible vLLM server (`--teacher-url`), for teachers that do not fit
beside the student.

OPCD with `kl=sampled` needs, for every sampled token, the teacher's log-prob of it given system prompt + query
+ the response before it. vLLM returns exactly that as the prompt log-probs of a completion request whose prompt
is those token ids (`prompt_logprobs`, a vLLM extension to the OpenAI API) with one token to generate. Token ids
are sent, so the server's chat template never applies and the teacher sees what the in-process teacher sees;
vLLM's prefix caching keeps the system prompt's keys and values between requests.
"""

from __future__ import annotations

from typing import Any

import torch

from promptbake.chat import ChatRenderer
from promptbake.errors import PromptbakeError
from promptbake.queries import Query
from promptbake.rollout import Rollout, rollout_from_lists
from promptbake.teacher import query_key
from promptbake.vllm_client import VLLMClient


class ServedTeacher:
    """Scores and samples the prompted teacher through a vLLM server; the same calls as `PromptedTeacher` where a
    server can answer them (log-probs of given tokens, samples), a clear error where it cannot (full logits)."""

    is_student = False

    def __init__(self, url: str, renderer: ChatRenderer, tokenizer, *, rows_per_request: int = 16):
        self.client = VLLMClient(url, "--teacher-url")
        self.client.check_tokenizer(tokenizer)
        self.url, self.model_id, self.max_model_len = self.client.url, self.client.model_id, self.client.max_model_len
        self.renderer, self.tokenizer, self.rows_per_request = renderer, tokenizer, rows_per_request
        self.live = False
        self._ids: dict[tuple, list[int]] = {}

    # -- what the compile asks of a teacher ---------------------------------------------------------------------
    def prompt_ids(self, query: Query) -> list[int]:
        key = query_key(query)
        if key not in self._ids:
            self._ids[key] = self.renderer.teacher_ids(query.messages)
        return self._ids[key]

    def prepare(self, queries: list[Query], max_new_tokens: int, where: str, keep: bool = False) -> None:
        for q in queries:
            self.prompt_ids(q)
        self.check_room(max_new_tokens)

    def check_room(self, max_new_tokens: int) -> None:
        """Never cut a prompt: each prompt plus the longest response must fit the server's context."""
        if not self.max_model_len:
            return
        longest = max((len(ids) for ids in self._ids.values()), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise PromptbakeError(f"--teacher-url {self.url}: a prompt of {longest} tokens plus {max_new_tokens} "
                                  f"response tokens exceeds the server's max_model_len of {self.max_model_len}")

    def refresh(self) -> None:
        """Nothing cached here; the server's prefix cache keys on the tokens themselves."""

    def logits(self, queries: list[Query], rollout: Rollout) -> torch.Tensor:
        raise PromptbakeError("a served teacher returns log-probs of given tokens, not whole distributions; "
                              "use kl=sampled (held-out KL over whole distributions: promptbake verify)")

    @torch.no_grad()
    def sampled_logprobs(self, queries: list[Query], rollout: Rollout, temperature: float) -> torch.Tensor:
        """Log-probs (logp_BT) of the response tokens under the prompted teacher; 0 where the mask is 0."""
        if temperature != 1.0:
            raise PromptbakeError("a served teacher scores at temperature 1; set temperature: 1.0")
        ids_BT, mask_BT = rollout.response_ids_BT, rollout.response_mask_BT
        out_BT = torch.zeros(ids_BT.shape, dtype=torch.float32)
        rows = []
        for b, query in enumerate(queries):
            response = ids_BT[b][mask_BT[b].bool()].tolist()
            rows.append((b, self.prompt_ids(query), response))
        for start in range(0, len(rows), self.rows_per_request):
            chunk = rows[start:start + self.rows_per_request]
            answer = self.client.call("POST", "/v1/completions", {
                "model": self.model_id, "prompt": [prompt + response for _, prompt, response in chunk],
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
            })
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            for (b, prompt, response), choice in zip(chunk, choices):
                per_position = choice.get("prompt_logprobs")
                if not per_position or len(per_position) != len(prompt) + len(response):
                    raise PromptbakeError(f"--teacher-url {self.url}: the server returned no prompt log-probs "
                                          "(it needs vLLM's prompt_logprobs)")
                for t, token in enumerate(response):
                    out_BT[b, t] = _logprob_of(per_position[len(prompt) + t], token)
        return out_BT.to(ids_BT.device)

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_ids: list[int],
               pad_id: int, greedy: bool = False) -> Rollout:
        """The prompted teacher's own answers (the response-cap probe samples them)."""
        responses = self.client.sample_ids(self.model_id, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                           eos_ids=eos_ids, greedy=greedy, rows_per_request=self.rows_per_request)
        return rollout_from_lists(responses, pad_id)


def _logprob_of(position: dict[str, Any] | None, token: int) -> float:
    """vLLM's prompt log-probs: per position a map token id -> {logprob, rank, decoded_token}, holding the
    prompt's own token."""
    if not position or str(token) not in position:
        raise PromptbakeError("the teacher server's prompt log-probs miss a response token")
    entry = position[str(token)]
    return float(entry["logprob"] if isinstance(entry, dict) else entry)
