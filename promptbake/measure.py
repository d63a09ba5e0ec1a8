"""Measurements shared by compile and verify: held-out reverse KL and check pass rates per condition.

Conditions:
    base    the base model, no system prompt (adapter off, student rendering)
    teacher the base model with the prompt (adapter off, teacher rendering)
    baked   the adapter, no system prompt (adapter on, student rendering)
"""

from __future__ import annotations

import contextlib

import torch

from promptbake.chat import ChatRenderer
from promptbake.checks import Check, pass_rates
from promptbake.losses import masked_mean, reverse_kl
from promptbake.queries import Query
from promptbake.rollout import HFRolloutEngine, autocast, eos_token_ids, response_logits
from promptbake.teacher import PromptedTeacher

CONDITIONS = ("base", "teacher", "baked")


def _adapter(model, enabled: bool):
    return contextlib.nullcontext() if enabled else model.disable_adapter()


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def heldout_kl(
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
    batch_size: int = 16,
) -> float:
    """Mean per-token full reverse KL(policy || teacher) on the policy's own samples (same seed, same queries)."""
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    total, count = 0.0, 0
    engine.sync(with_adapter=adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in _chunks(queries, batch_size):
            prompts = [renderer.student_ids(q.messages) for q in chunk]
            rollout = engine.sample(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_ids=eos_ids, pad_id=pad_id)
            with _adapter(model, adapter):
                with autocast(next(model.parameters()).device, bf16):
                    student_BTV = response_logits(model, prompts, rollout, pad_id)
            teacher_BTV = teacher.logits(chunk, rollout)
            kl_BT = reverse_kl("full", student_BTV, teacher_BTV, rollout.response_ids_BT.to(student_BTV.device), temperature)
            n = rollout.num_tokens
            total += float(masked_mean(kl_BT, rollout.response_mask_BT.to(kl_BT.device))) * n
            count += n
    engine.sync()
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(
    engine: HFRolloutEngine, tokenizer, prompts: list[list[int]], *, adapter: bool, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy responses, decoded without special tokens."""
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    texts: list[str] = []
    engine.sync(with_adapter=adapter)
    for chunk in _chunks(prompts, batch_size):
        rollout = engine.sample(chunk, max_new_tokens=max_new_tokens, temperature=1.0, eos_ids=eos_ids,
                                pad_id=pad_id, greedy=True)
        for ids, mask in zip(rollout.response_ids_BT, rollout.response_mask_BT):
            texts.append(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip())
    return texts


def condition_responses(
    engine: HFRolloutEngine, tokenizer, renderer: ChatRenderer, queries: list[Query], *, max_new_tokens: int,
    conditions: tuple[str, ...] = CONDITIONS,
) -> dict[str, list[str]]:
    """Greedy responses of each condition to the same queries."""
    out: dict[str, list[str]] = {}
    for cond in conditions:
        if cond == "teacher":
            prompts = [renderer.teacher_ids(q.messages) for q in queries]
        else:
            prompts = [renderer.student_ids(q.messages) for q in queries]
        out[cond] = generate_texts(engine, tokenizer, prompts, adapter=cond == "baked", max_new_tokens=max_new_tokens)
    engine.sync()
    return out


def check_rates(checks: list[Check], responses: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """{condition: {check name: pass rate}}."""
    return {cond: pass_rates(checks, texts) for cond, texts in responses.items()}
