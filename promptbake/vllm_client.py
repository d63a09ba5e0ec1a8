"""A small client for vLLM's OpenAI-compatible server, shared by the served teacher and the served rollouts:
JSON over HTTP with retries, the tokenizer check, and sampling by token ids."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import torch

from promptbake.errors import PromptbakeError

TOKENIZER_PROBE = "Hello, wörld! 1234 <answer>B</answer>\n  indented\tcode()"


class VLLMClient:
    """`option` names the flag the URL came from, so every error says which server is meant."""

    def __init__(self, url: str, option: str, *, timeout: float = 300.0, retries: int = 3):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.option, self.timeout, self.retries = option, timeout, retries
        models = self.call("GET", "/v1/models").get("data") or []
        if not models:
            raise PromptbakeError(f"{option} {self.url}: the server lists no model")
        self.model_id: str = models[0]["id"]
        self.max_model_len = int(models[0].get("max_model_len") or 0)

    def call(self, method: str, path: str, body: dict | None = None, *, raw: bool = False):
        """One JSON request, retried with backoff on connection errors and server errors (5xx)."""
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read()
                    return text if raw else json.loads(text)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500:
                    raise PromptbakeError(f"{self.option} {self.url}{path}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(min(2.0 ** attempt, 10.0))
        raise PromptbakeError(f"{self.option} {self.url}: no answer after {self.retries + 1} tries ({last})")

    def check_tokenizer(self, tokenizer) -> None:
        """The server works on our token ids, so its tokenizer must map text to the same ids."""
        theirs = self.call("POST", "/tokenize", {"model": self.model_id, "prompt": TOKENIZER_PROBE,
                                                 "add_special_tokens": False}).get("tokens")
        ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            raise PromptbakeError(f"{self.option} {self.url}: the served model '{self.model_id}' tokenizes text "
                                  "differently from the student; they must share the tokenizer")

    def sample_ids(self, model: str, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   eos_ids: list[int], greedy: bool = False, rows_per_request: int = 16) -> list[list[int]]:
        """Sampled response token ids for token-id prompts, each ending with its EOS when it stopped."""
        responses: list[list[int]] = []
        for start in range(0, len(prompts), rows_per_request):
            chunk = prompts[start:start + rows_per_request]
            answer = self.call("POST", "/v1/completions", {
                "model": model, "prompt": chunk, "max_tokens": max_new_tokens,
                "temperature": 0.0 if greedy else temperature, "top_p": 1.0, "top_k": -1,
                "stop_token_ids": eos_ids, "skip_special_tokens": False, "return_token_ids": True,
                "seed": int(torch.randint(0, 2**31 - 1, (1,))),
            })
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                tokens = choice.get("token_ids")
                if tokens is None:
                    raise PromptbakeError(f"{self.option} {self.url}: the server does not return token ids "
                                          "(return_token_ids needs a recent vLLM)")
                if choice.get("finish_reason") == "stop" and (not tokens or tokens[-1] not in eos_ids):
                    tokens = [*tokens, eos_ids[0]]  # vLLM leaves the stop token out; the batch layout keeps it
                responses.append(tokens or [eos_ids[0]])
        return responses
