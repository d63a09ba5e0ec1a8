"""Measurements shared by compile and verify: KL to the prompted teacher and responses per condition.

Conditions:
    base    the base model, no system prompt (adapter off, student rendering)
    teacher the base model with the prompt (adapter off, teacher rendering)
    baked   the adapter, no system prompt (adapter on, student rendering)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from promptbake.chat import ChatRenderer
from promptbake.checks import Check, pass_rates
from promptbake.errors import PromptbakeError
from promptbake.lengths import hit_cap
from promptbake.losses import reverse_kl, stop_log_probs
from promptbake.memory import release_free_memory
from promptbake.queries import Query
from promptbake.rollout import adapter_enabled, adapter_set, HFRolloutEngine, Rollout, autocast, eos_token_ids, response_logits
from promptbake.teacher import PromptedTeacher

CONDITIONS = ("base", "teacher", "baked")
# Rows decoded at once when measuring. Decoding is bound by reading the weights, so 24 rows cost little more
# than 16, and the default 24 held-out queries go in one pass instead of two (16 + 8).
MEASURE_BATCH = 32


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class KLResult:
    """Per-query mean per-token KL and each query's token count."""

    per_query: list[float]
    tokens: list[int]
    capped: list[bool] = field(default_factory=list)  # the sampled answer was cut by max_new_tokens
    position_sum: list[float] = field(default_factory=list)  # KL summed over queries at each response position
    position_count: list[int] = field(default_factory=list)  # answers still running at each position

    def mean_between(self, start: int, stop: int) -> float:
        """Mean per-token KL over response positions [start, stop) of all answers: where in an answer the gap is."""
        total = sum(self.position_sum[start:stop])
        count = sum(self.position_count[start:stop])
        return total / count if count else float("nan")

    @property
    def capped_fraction(self) -> float:
        return sum(self.capped) / len(self.capped) if self.capped else 0.0

    @property
    def mean(self) -> float:
        """Mean over all response tokens (long answers weigh more, as in training)."""
        total = sum(self.tokens)
        return sum(k * n for k, n in zip(self.per_query, self.tokens)) / max(total, 1)


@torch.no_grad()
def kl_to_teacher(
    model,
    engine: HFRolloutEngine,
    teacher: PromptedTeacher,
    renderer: ChatRenderer,
    tokenizer,
    queries: list[Query],
    *,
    adapter: bool,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    bf16: bool,
    batch_size: int = MEASURE_BATCH,
    score_batch_size: int = 4,
    on_teacher_samples: bool = False,
    on_answer: Callable[[Query, list[int], list[float], list[tuple[float, float]]], None] | None = None,
) -> KLResult:
    """KL between a policy (adapter on = baked, off = base; never prompted) and the prompted teacher.

    Default: reverse KL(policy || teacher) on the policy's own samples (what OPCD minimises).
    `on_teacher_samples`: forward KL(teacher || policy) on the teacher's samples.
    `on_answer(query, answer ids, per-token KLs, per-token (policy, teacher) probabilities of stopping there)`, if
    given, sees every sampled answer (for per-token analyses).
    """
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device
    per_query: list[float] = []
    tokens: list[int] = []
    capped: list[bool] = []
    position_sum = [0.0] * max_new_tokens
    position_count = [0] * max_new_tokens
    with adapter_set(engine, adapter and not on_teacher_samples), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in _chunks(queries, batch_size):
            prompts = [renderer.student_ids(q.messages) for q in chunk]
            sampler_prompts = [teacher.prompt_ids(q) for q in chunk] if on_teacher_samples else prompts
            rollout: Rollout = engine.sample(sampler_prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                             eos_ids=eos_ids, pad_id=pad_id)
            capped += hit_cap(rollout, max_new_tokens, eos_ids)
            # Sample the whole chunk at once (fast), score it a few rows at a time: full-vocabulary logits of
            # 16 rows x 48 tokens are 150 MB per copy in fp32, and the KL needs several copies.
            for rows in _chunks(list(range(len(chunk))), score_batch_size):
                part = rollout.select(rows)
                with adapter_enabled(model, adapter), autocast(device, bf16):
                    policy_BTV = response_logits(model, [prompts[r] for r in rows], part, pad_id)
                teacher_BTV = teacher.logits([chunk[r] for r in rows], part).to(policy_BTV.device)
                # KL(first || second) over the full vocabulary (in token chunks for large vocabularies: distill_loss).
                first, second = (teacher_BTV, policy_BTV) if on_teacher_samples else (policy_BTV, teacher_BTV)
                kl_BT = reverse_kl("full", first, second, part.response_ids_BT, temperature)
                if on_answer is not None:
                    policy_stop_BT = stop_log_probs(policy_BTV, eos_ids, temperature)[0].exp()
                    teacher_stop_BT = stop_log_probs(teacher_BTV, eos_ids, temperature)[0].exp()
                del policy_BTV, teacher_BTV, first, second
                mask_BT = part.response_mask_BT.to(kl_BT.device).float()
                counts = mask_BT.sum(-1)
                per_query += ((kl_BT * mask_BT).sum(-1) / counts.clamp(min=1)).tolist()
                tokens += counts.long().tolist()
                if on_answer is not None:
                    for i, r in enumerate(rows):
                        n = int(counts[i])
                        on_answer(chunk[r], part.response_ids_BT[i, :n].tolist(), kl_BT[i, :n].float().tolist(),
                                  list(zip(policy_stop_BT[i, :n].tolist(), teacher_stop_BT[i, :n].tolist())))
                for t, (kl_sum, n) in enumerate(zip((kl_BT * mask_BT).sum(0).tolist(), mask_BT.sum(0).long().tolist())):
                    position_sum[t] += kl_sum
                    position_count[t] += n
                del kl_BT
                release_free_memory()
    return KLResult(per_query, tokens, capped, position_sum, position_count)


@torch.no_grad()
def generate_ids(
    engine: HFRolloutEngine, tokenizer, prompts: list[list[int]], *, adapter: bool, max_new_tokens: int,
    batch_size: int = MEASURE_BATCH,
) -> list[list[int]]:
    """Greedy response token ids (up to and including EOS), in the order of `prompts`.

    Prompts are batched by length, so a batch pads little (eval questions range from 30 to 500 tokens)."""
    if batch_size <= 0:
        raise PromptbakeError(f"batch size must be positive, got {batch_size}")
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with adapter_set(engine, adapter):
        for chunk in _chunks(order, batch_size):
            rollout = engine.sample([prompts[i] for i in chunk], max_new_tokens=max_new_tokens, temperature=1.0,
                                    eos_ids=eos_ids, pad_id=pad_id, greedy=True)
            for i, ids, mask in zip(chunk, rollout.response_ids_BT, rollout.response_mask_BT):
                out[i] = ids[mask.bool()].tolist()
            release_free_memory()
    return out


def condition_ids(
    engine: HFRolloutEngine, tokenizer, renderer: ChatRenderer, queries: list[Query], *, max_new_tokens: int,
    conditions: tuple[str, ...] = CONDITIONS,
) -> dict[str, list[list[int]]]:
    """Greedy response ids of each condition to the same queries."""
    out: dict[str, list[list[int]]] = {}
    for cond in conditions:
        render = renderer.teacher_ids if cond == "teacher" else renderer.student_ids
        prompts = [render(q.messages) for q in queries]
        out[cond] = generate_ids(engine, tokenizer, prompts, adapter=cond == "baked", max_new_tokens=max_new_tokens)
    return out


def decode_all(tokenizer, ids: dict[str, list[list[int]]]) -> dict[str, list[str]]:
    return {cond: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows] for cond, rows in ids.items()}


def check_rates(checks: list[Check], responses: dict[str, list[str]], queries: list[Query]) -> dict[str, dict[str, float]]:
    """{condition: {check name: pass rate}} over the queries each check applies to."""
    tags = [q.tags for q in queries]
    return {cond: pass_rates(checks, texts, tags) for cond, texts in responses.items()}
