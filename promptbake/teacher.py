"""The prompted teacher: scores the student's sampled tokens with the system prompt in context.

Every teacher input starts with the same tokens (the rendered system prompt and the chat scaffolding
around it), so their key/value cache is computed once and shared by every row of every batch; the
teacher then runs only over query + response. The cache is dropped by `refresh()` when the teacher's
weights change (self-distillation with a live teacher).
"""

from __future__ import annotations


import torch
from transformers import DynamicCache

from promptbake.chat import ChatRenderer, common_prefix_length
from promptbake.fastdecode import can_share_prefix, shared_prefix
from promptbake.losses import teacher_sampled_logprobs
from promptbake.queries import Query
from promptbake.rollout import Rollout, adapter_enabled, autocast, prefix_kv, response_logits


def query_key(query: Query) -> tuple:
    """What a query's rendered prompt depends on: its messages (ids are only unique within one file)."""
    return tuple((m["role"], m["content"]) for m in query.messages)


class PromptedTeacher:
    """Teacher = `model` (with its LoRA adapter disabled when it is the student itself) + system prompt."""

    def __init__(self, model, renderer: ChatRenderer, pad_id: int, *, is_student: bool, bf16: bool, prefix_cache: bool = True,
                 live: bool = False):
        self.model = model
        self.live = live  # self-distillation: the current student (adapter on) is the teacher
        self.renderer = renderer
        self.pad_id = pad_id
        self.is_student = is_student
        self.bf16 = bf16
        self.use_prefix_cache = prefix_cache
        self._ids: dict[tuple, list[int]] = {}  # by conversation, not id: ids repeat across query files
        self._where: dict[tuple, str] = {}
        self.prefix_ids: list[int] = []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def prepare(self, queries: list[Query], max_new_tokens: int, where: str, keep: bool = False) -> None:
        """Render every query once, check each fits the context, and find the shared prefix.

        `keep` adds these queries to those already prepared (a separate held-out file)."""
        if not keep:
            self._where = {}
        for q in queries:
            ids = self.renderer.teacher_ids(q.messages)
            self.renderer.check_fits(ids, max_new_tokens, f"{where} query {q.id + 1}")
            self._ids[query_key(q)] = ids
            self._where[query_key(q)] = f"{where} query {q.id + 1}"
        if self.use_prefix_cache:
            rendered = list(self._ids.values())
            # Two probe queries guarantee the prefix stops before any query text, even for one query.
            probes = [self.renderer.teacher_ids([{"role": "user", "content": text}]) for text in ("a", "Z")]
            shared = common_prefix_length(rendered + probes)
            self.prefix_ids = rendered[0][:shared] if rendered else probes[0][:shared]
        self._prefix_kv = None

    def check_room(self, max_new_tokens: int) -> None:
        """Every prepared query still fits with `max_new_tokens` (once the response cap is known)."""
        for key, where in self._where.items():
            self.renderer.check_fits(self._ids[key], max_new_tokens, where)

    def refresh(self) -> None:
        """Forget the prefix cache (call after the teacher's weights changed)."""
        self._prefix_kv = None

    def _adapter_off(self):
        return adapter_enabled(self.model, not (self.is_student and not self.live))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prompt prefix's keys and values per layer, for one row; computed on first use."""
        if self._prefix_kv is None:
            self._prefix_kv = prefix_kv(self.model, self.prefix_ids)
        return self._prefix_kv

    def _prefix_cache(self, batch: int) -> DynamicCache | None:
        if not self.prefix_ids:
            return None
        expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._prefix()]
        return DynamicCache(ddp_cache_data=expanded, config=self.model.config)

    def prompt_ids(self, query: Query) -> list[int]:
        key = query_key(query)
        if key not in self._ids:
            self._ids[key] = self.renderer.teacher_ids(query.messages)
        return self._ids[key]

    def _cached_prefix_length(self, full: list[list[int]]) -> int:
        """How many leading tokens of these prompts come from the prefix cache (0: it is not used for them)."""
        P = len(self.prefix_ids)
        return P if P > 0 and all(ids[:P] == self.prefix_ids and len(ids) > P for ids in full) else 0

    def scored_prompt_lengths(self, queries: list[Query]) -> list[int]:
        """How many of each row's prompt tokens `logits` runs through the layers (those after the cached prefix when
        it is used): how far back its recorded states reach."""
        full = [self.prompt_ids(q) for q in queries]
        P = self._cached_prefix_length(full)
        return [len(ids) - P for ids in full]

    @torch.no_grad()
    def sampled_logprobs(self, queries: list[Query], rollout: Rollout, temperature: float) -> torch.Tensor:
        """Log-probs of the response tokens only (logp_BT) at `temperature`: what a teacher behind a server returns
        for given tokens, and all that kl=sampled needs. The full-vocabulary logits live only inside this call."""
        logits_BTV = self.logits(queries, rollout)
        return teacher_sampled_logprobs(logits_BTV, rollout.response_ids_BT.to(logits_BTV.device), temperature)

    @torch.no_grad()
    def logits(self, queries: list[Query], rollout: Rollout, left_padded: bool = False) -> torch.Tensor:
        """Teacher logits predicting each response token (logits_BTV), on the model's device. `left_padded`: see
        `response_logits` (with the prompt prefix cached, the layout is left-padded anyway)."""
        full = [self.prompt_ids(q) for q in queries]
        P = self._cached_prefix_length(full)
        was_training = self.model.training
        self.model.eval()
        with self._adapter_off(), autocast(self._device(), self.bf16):
            if P and can_share_prefix(self.model):
                # One copy of the prompt's keys and values for all rows (no per-row expansion).
                with shared_prefix(self.model, self._prefix()):
                    logits_BTV = response_logits(self.model, [ids[P:] for ids in full], rollout, self.pad_id,
                                                 prefix_len=P, prefix_attended=True)
            elif P:
                cache = self._prefix_cache(len(queries))
                logits_BTV = response_logits(self.model, [ids[P:] for ids in full], rollout, self.pad_id, cache, P)
            else:
                logits_BTV = response_logits(self.model, full, rollout, self.pad_id, left_padded=left_padded)
        self.model.train(was_training)
        return logits_BTV
