"""Per-token training objectives: reverse KL(student || teacher) estimators and the off-policy baselines.

Shapes: B batch, T response positions, V vocabulary. Inputs are log-probabilities already divided by the
temperature and log-softmaxed. Gradients flow through the student only; teacher inputs are detached.

- full:    sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary (exact).
- topk:    the same sum restricted to the student's top-k tokens, log-probs from the full softmax and not
           renormalised (as the OPCD reference code does); a lower bound that is tight when the tail is small.
- mixed:   (1 - w) * reverse + w * forward KL(teacher || student), both exact over the vocabulary, still at the
           student's own samples (config `forward_kl_weight`). Reverse KL moves a token the teacher likes and the
           student rarely samples (a name, a sign-off) with a gradient proportional to the student's own small
           probability of it; the forward term pulls with the teacher's probability instead.
- sampled: only the sampled token y ~ p_s is known on the teacher side (a teacher behind an API that returns
           log-probs of given tokens). The value is the k3 estimator exp(r) - 1 - r with r = log p_t(y) - log p_s(y),
           unbiased and non-negative; its gradient is the score-function estimator (log p_s(y) - log p_t(y)) *
           grad log p_s(y), whose expectation under p_s is the exact gradient of the per-token reverse KL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch


def log_probs(logits_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of logits / temperature; at temperature 1 no scaled copy is made (each copy of
    full-vocabulary logits is ~38 MB per 4 x 48 tokens, and they set a step's peak memory)."""
    logits_BTV = logits_BTV.float()
    return torch.log_softmax(logits_BTV if temperature == 1.0 else logits_BTV / temperature, dim=-1)


def full_reverse_kl(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor) -> torch.Tensor:
    p_student_BTV = student_logp_BTV.exp()
    return (p_student_BTV * (student_logp_BTV - teacher_logp_BTV.detach())).sum(-1)


def mixed_kl(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, forward_weight: float) -> torch.Tensor:
    """(1 - w) KL(s || t) + w KL(t || s) per position, as one sum: ((1 - w) p_s - w p_t) (log p_s - log p_t)."""
    teacher_logp_BTV = teacher_logp_BTV.detach()
    weight_BTV = (1 - forward_weight) * student_logp_BTV.exp() - forward_weight * teacher_logp_BTV.exp()
    return (weight_BTV * (student_logp_BTV - teacher_logp_BTV)).sum(-1)


def topk_reverse_kl(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, student_logp_BTV.shape[-1])
    top_idx_BTK = student_logp_BTV.detach().topk(k, dim=-1).indices
    student_top_BTK = student_logp_BTV.gather(-1, top_idx_BTK)
    teacher_top_BTK = teacher_logp_BTV.detach().gather(-1, top_idx_BTK)
    return (student_top_BTK.exp() * (student_top_BTK - teacher_top_BTK)).sum(-1)


def sampled_reverse_kl(student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 value with the score-function gradient; both inputs are log-probs of the sampled tokens."""
    log_ratio_BT = (student_logp_BT - teacher_logp_BT.detach()).detach()
    k3_BT = torch.expm1(-log_ratio_BT) + log_ratio_BT
    surrogate_BT = log_ratio_BT * student_logp_BT
    return k3_BT + surrogate_BT - surrogate_BT.detach()


def forward_kl_topk(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor, k: int) -> torch.Tensor:
    """Off-policy baseline: sum over the teacher's top-k tokens of p_t (log p_t - log p_s), per position."""
    k = min(k, teacher_logp_BTV.shape[-1])
    teacher_logp_BTV = teacher_logp_BTV.detach()
    top_idx_BTK = teacher_logp_BTV.topk(k, dim=-1).indices
    teacher_top_BTK = teacher_logp_BTV.gather(-1, top_idx_BTK)
    student_top_BTK = student_logp_BTV.gather(-1, top_idx_BTK)
    return (teacher_top_BTK.exp() * (teacher_top_BTK - student_top_BTK)).sum(-1)


def token_cross_entropy(student_logp_BTV: torch.Tensor, target_ids_BT: torch.Tensor) -> torch.Tensor:
    """SFT on the teacher's text: -log p_s(y_t) per position."""
    return -student_logp_BTV.gather(-1, target_ids_BT.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class TokenLoss:
    """One training objective: what it needs from the teacher and its per-token value.

    `teacher_input` is "logits" (full-vocabulary logits over the response), "sampled_logprobs" (log-probs of the
    sampled tokens only, what a served teacher returns for given tokens) or "none"."""

    name: str
    teacher_input: Literal["logits", "sampled_logprobs", "none"]
    per_token: Callable[..., torch.Tensor]  # (student_logp_BTV, teacher input or None, ids_BT, topk) -> loss_BT


def _sampled(student_logp_BTV, teacher_logp_BT, ids_BT, topk):
    return sampled_reverse_kl(student_logp_BTV.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1), teacher_logp_BT)


REVERSE_KL: dict[str, TokenLoss] = {
    "full": TokenLoss("reverse_kl_full", "logits", lambda s, t, ids, k: full_reverse_kl(s, t)),
    "topk": TokenLoss("reverse_kl_topk", "logits", lambda s, t, ids, k: topk_reverse_kl(s, t, k)),
    "sampled": TokenLoss("reverse_kl_sampled", "sampled_logprobs", _sampled),
}
OFF_POLICY = {  # the teacher's fixed samples instead of the student's
    "offpolicy": TokenLoss("forward_kl_topk", "logits", lambda s, t, ids, k: forward_kl_topk(s, t, k)),
    "sft": TokenLoss("cross_entropy", "none", lambda s, t, ids, k: token_cross_entropy(s, ids)),
}


def token_loss(method: str, kl: str, forward_weight: float = 0.0) -> TokenLoss:
    """The objective of a training method: opcd minimises reverse KL with the chosen estimator on the student's
    samples (mixed with forward KL when `forward_weight` > 0, full vocabulary only); offpolicy (forward KL over
    the teacher's top-k) and sft (cross-entropy) train on the teacher's."""
    if forward_weight and (method, kl) != ("opcd", "full"):
        raise ValueError(f"a forward-KL weight needs opcd with the full-vocabulary KL, not {method} with kl={kl}")
    if method == "opcd":
        if kl not in REVERSE_KL:
            raise ValueError(f"unknown KL estimator '{kl}'")
        if forward_weight:
            return TokenLoss(f"mixed_kl_full_w{forward_weight:g}", "logits",
                             lambda s, t, ids, k: mixed_kl(s, t, forward_weight))
        return REVERSE_KL[kl]
    if method not in OFF_POLICY:
        raise ValueError(f"unknown method '{method}'")
    return OFF_POLICY[method]


def teacher_sampled_logprobs(teacher_logits_BTV: torch.Tensor, ids_BT: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's log-probs of the sampled tokens (logp_BT), at the sampling temperature."""
    return log_probs(teacher_logits_BTV, temperature).gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)


# Full-vocabulary losses run in chunks once one fp32 copy of a micro-batch's logits would exceed this (see
# distill_loss). Measured on SmolLM2 (49k vocabulary, 4 x 128 tokens = 100 MB per copy), forcing 256-token chunks
# lowered peak RSS by 0.08 GiB (3 %) and cost 7 % of a step's speed, so at that size the loss runs whole; a
# 128k-256k vocabulary (Llama 3, Gemma) at the same micro-batch is 260-520 MB per copy and is chunked.
LOSS_CHUNK_BYTES = 256 * 2**20
# Without gradients (the held-out KL of compile and verify) a chunk costs no recomputation, only a loop, so the
# copies are kept small whatever the vocabulary: 32 MiB per fp32 copy is 170 tokens at 49k. Measured on the
# default compile: the held-out KL's copies (4 rows x 128 tokens, ~5 alive at once) had set the process's peak RSS.
NO_GRAD_CHUNK_BYTES = 32 * 2**20

# Set by `compiled_loss` while training runs with `torch_compile`: `_distill_loss` compiled, for the default objective.
_compiled_distill_loss = None


def loss_compiles(method: str, kl: str) -> bool:
    """The objectives `compiled_loss` compiles: on-policy with the full-vocabulary KL (the default), the one measured."""
    return method == "opcd" and kl == "full"


@contextlib.contextmanager
def compiled_loss(enabled: bool):
    """While active, `distill_loss` computes on-policy full-vocabulary losses (`kl: full`, any forward-KL weight)
    through one `torch.compile` of the per-token loss; yields whether it does.

    Eager, each operation (log-softmax, exp, the weighted difference, its sum, and their gradients) makes a fp32
    copy of the micro-batch's full-vocabulary logits and reads the last one back; compiled, they fuse into a few
    passes. On 2 rows x 128 tokens x 49,152 bf16 logits, forward and backward, that measured 11x faster, equal to
    1e-6 (benchmarks/loss_compile.py). Dynamic shapes: one compile serves every response length."""
    global _compiled_distill_loss
    if not enabled:
        yield False
        return
    kept = _compiled_distill_loss
    _compiled_distill_loss = torch.compile(_distill_loss, dynamic=True)
    try:
        yield True
    finally:
        _compiled_distill_loss = kept


def distill_loss(
    method: str,
    kl: str,
    student_logits_BTV: torch.Tensor,
    teacher: torch.Tensor | None,
    ids_BT: torch.Tensor,
    temperature: float,
    topk: int,
    chunk_tokens: int | None = None,
    forward_weight: float = 0.0,
) -> torch.Tensor:
    """Per-token loss (loss_BT) of a method from raw student logits. `teacher` is what the objective's
    `teacher_input` asks for: raw logits (BTV), or log-probs of the sampled tokens (BT), or None; raw logits are
    accepted for "sampled_logprobs" too and reduced here. Both sides are divided by the temperature.

    The fp32 log-softmaxes and their products are several copies of the full-vocabulary logits. With a large
    vocabulary they set a step's peak memory, so the loss then runs over `chunk_tokens` (row, position) pairs at
    a time (default: as many as fit LOSS_CHUNK_BYTES per fp32 copy, NO_GRAD_CHUNK_BYTES without gradients), and
    with gradients each chunk is recomputed in the backward pass (activation checkpointing) instead of kept: only
    the logits themselves and one chunk's fp32 copies are alive at once. The values and gradients are those of
    the unchunked loss. `forward_weight` mixes in forward KL (see mixed_kl; opcd with kl=full)."""
    B, T = ids_BT.shape
    V = student_logits_BTV.shape[-1]
    keep_graph = torch.is_grad_enabled() and student_logits_BTV.requires_grad
    per_token = _distill_loss
    if _compiled_distill_loss is not None and keep_graph and loss_compiles(method, kl):
        per_token = _compiled_distill_loss
    budget = LOSS_CHUNK_BYTES if keep_graph else NO_GRAD_CHUNK_BYTES
    chunk = max(1, budget // (4 * V)) if chunk_tokens is None else chunk_tokens
    if chunk <= 0 or B * T <= chunk:
        return per_token(method, kl, student_logits_BTV, teacher, ids_BT, temperature, topk, forward_weight)
    from torch.utils.checkpoint import checkpoint

    # Flatten (row, position) so a chunk is a fixed number of tokens whatever the batch's shape.
    student_N1V = student_logits_BTV.reshape(B * T, 1, V)
    teacher_N = None if teacher is None else teacher.reshape(B * T, 1, *teacher.shape[2:])
    ids_N1 = ids_BT.reshape(B * T, 1)
    parts = []
    for start in range(0, B * T, chunk):
        args = (method, kl, student_N1V[start:start + chunk], None if teacher_N is None else teacher_N[start:start + chunk],
                ids_N1[start:start + chunk], temperature, topk, forward_weight)
        parts.append(checkpoint(per_token, *args, use_reentrant=False) if keep_graph else per_token(*args))
    return torch.cat(parts).reshape(B, T)


def _distill_loss(method, kl, student_logits_BTV, teacher, ids_BT, temperature, topk, forward_weight=0.0) -> torch.Tensor:
    loss = token_loss(method, kl, forward_weight)
    student_logp_BTV = log_probs(student_logits_BTV, temperature)
    if loss.teacher_input == "logits":
        teacher = log_probs(teacher, temperature)
    elif loss.teacher_input == "sampled_logprobs" and teacher.dim() == 3:
        teacher = teacher_sampled_logprobs(teacher, ids_BT, temperature)
    return loss.per_token(student_logp_BTV, teacher, ids_BT, topk)


def token_weights(mask_BT: torch.Tensor, average: str, part_tokens: int, part_answers: int, world: int = 1) -> torch.Tensor:
    """Weights (weight_BT) that turn a micro-batch's per-token loss into its share of its update's mean:
    `(loss_BT * weight_BT).sum()` over the update's micro-batches adds up to the mean over its `part_tokens` response
    tokens ("tokens") or, "answers", to the mean over its `part_answers` answers of each answer's mean over its own
    tokens (an empty answer counts with a loss of 0). Both counts are over all processes; DDP averages the gradients
    over the `world` processes, so each scales its share by `world`."""
    mask_BT = mask_BT.float()
    if average == "tokens":
        return mask_BT * (world / max(part_tokens, 1))
    if average == "answers":
        return mask_BT / mask_BT.sum(-1, keepdim=True).clamp(min=1.0) * (world / max(part_answers, 1))
    raise ValueError(f"unknown loss average {average!r}")


def future_divergence_surrogate(student_logits_BTV: torch.Tensor, ids_BT: torch.Tensor, cost_BT: torch.Tensor,
                                mask_BT: torch.Tensor, baseline: float, temperature: float) -> torch.Tensor:
    """Per-token surrogate (surrogate_BT) whose gradient is the part of a sequence-level divergence's gradient that
    the per-token loss leaves out: how the token sampled at t steers the divergences at the positions after it.

    The per-token loss sum_t D_t (D_t the divergence of the two next-token distributions after y_<t) is
    differentiated as if the prefixes were fixed. Through the student's sampling they are not: the exact gradient of
    E_y~s[sum_t D_t] adds sum_t grad log p_s(y_t) * sum_{t'>t} D_t' (the score-function term). As MiniLLM does, the
    future divergences here are averaged over the rest of the answer rather than summed (length normalisation,
    which keeps the term on the per-token loss's scale), less a `baseline` that does not depend on this sample (the
    previous step's mean per-token loss), which leaves the expectation unchanged and lowers its variance. Positions
    with nothing after them get no term. `cost_BT` is the per-token loss, detached here."""
    cost_BT = (cost_BT.detach() * mask_BT).float()
    mask_BT = mask_BT.float()
    after_sum_BT = cost_BT.flip(-1).cumsum(-1).flip(-1) - cost_BT
    after_count_BT = mask_BT.flip(-1).cumsum(-1).flip(-1) - mask_BT
    advantage_BT = torch.where(after_count_BT > 0, after_sum_BT / after_count_BT.clamp(min=1) - baseline, 0.0)
    logp_BT = log_probs(student_logits_BTV, temperature).gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
    return advantage_BT * mask_BT * logp_BT


def stop_log_probs(logits_BTV: torch.Tensor, eos_ids: list[int], temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(stop) and log P(go on) per position (logp_stop_BT, logp_go_BT): the mass on the end-of-turn tokens and
    on all the others. Each is its own log-sum-exp less the whole vocabulary's, so neither is 1 - the other in
    fp32 (that loses everything once the other side is within 1e-6 of 1, as after an `<answer>` tag)."""
    logits_BTV = logits_BTV.float()
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    is_eos_V = torch.zeros(logits_BTV.shape[-1], dtype=torch.bool, device=logits_BTV.device)
    is_eos_V[list(eos_ids)] = True
    stop_BT = logits_BTV[..., is_eos_V].logsumexp(-1)
    go_BT = logits_BTV.masked_fill(is_eos_V, float("-inf")).logsumexp(-1)
    total_BT = torch.logaddexp(stop_BT, go_BT)  # the whole vocabulary's, without a third pass over it
    return stop_BT - total_BT, go_BT - total_BT


def stop_kl(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, eos_ids: list[int],
            temperature: float = 1.0, forward_weight: float = 0.0) -> torch.Tensor:
    """The stop-or-go part of the per-token KL (kl_BT): the divergence between the two models' probabilities of
    ending the answer here, as two-outcome distributions, mixed as mixed_kl mixes the whole one.

    The full KL is this plus P(go on) times the KL of what comes next given that the answer goes on, so the stop
    decision is already in it, but weakly: a hazard of 1/90 per token against the teacher's 1/60 costs about 0.001
    nats a position, while it makes answers half as long again. Weighting this term (config `stop_kl_weight`)
    weighs where an answer ends apart from what it says. Gradients flow through the student only."""
    # mixed_kl over a two-entry "vocabulary": stop, go on
    student_logp_BT2 = torch.stack(stop_log_probs(student_logits_BTV, eos_ids, temperature), -1)
    teacher_logp_BT2 = torch.stack(stop_log_probs(teacher_logits_BTV.detach(), eos_ids, temperature), -1)
    return mixed_kl(student_logp_BT2, teacher_logp_BT2, forward_weight)


def reverse_kl(kind: str, student_logits_BTV: torch.Tensor, teacher: torch.Tensor, sampled_ids_BT: torch.Tensor,
               temperature: float = 1.0, topk: int = 256) -> torch.Tensor:
    """Per-token reverse KL (kl_BT) with estimator `kind` from raw logits (see distill_loss for `teacher`)."""
    return distill_loss("opcd", kind, student_logits_BTV, teacher, sampled_ids_BT, temperature, topk)
