"""Per-token reverse KL(student || teacher) estimators, and the masked mean over response tokens.

Shapes: B batch, T response positions, V vocabulary. Inputs are log-probabilities already divided by the
temperature and log-softmaxed. Gradients flow through the student only; teacher inputs are detached.

- full:    sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary (exact).
- topk:    the same sum restricted to the student's top-k tokens, log-probs from the full softmax and not
           renormalised (as the OPCD reference code does); a lower bound that is tight when the tail is small.
- sampled: only the sampled token y ~ p_s is known on the teacher side (a teacher behind an API that returns
           log-probs of given tokens). The value is the k3 estimator exp(r) - 1 - r with r = log p_t(y) - log p_s(y),
           unbiased and non-negative; its gradient is the score-function estimator (log p_s(y) - log p_t(y)) *
           grad log p_s(y), whose expectation under p_s is the exact gradient of the per-token reverse KL.
"""

from __future__ import annotations

import torch


def log_probs(logits_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of logits / temperature; at temperature 1 no scaled copy is made (each copy of
    full-vocabulary logits is ~38 MB per 4 x 48 tokens, and they set a step's peak memory)."""
    logits_BTV = logits_BTV.float()
    return torch.log_softmax(logits_BTV if temperature == 1.0 else logits_BTV / temperature, dim=-1)


def full_reverse_kl(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor) -> torch.Tensor:
    p_student_BTV = student_logp_BTV.exp()
    return (p_student_BTV * (student_logp_BTV - teacher_logp_BTV.detach())).sum(-1)


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


def reverse_kl(
    kind: str,
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor | None,
    sampled_ids_BT: torch.Tensor,
    temperature: float = 1.0,
    topk: int = 256,
    teacher_sampled_logp_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token reverse KL (kl_BT) from raw logits, dividing both sides by the temperature."""
    student_logp_BTV = log_probs(student_logits_BTV, temperature)
    if kind == "sampled":
        if teacher_sampled_logp_BT is None:
            teacher_logp_BTV = log_probs(teacher_logits_BTV, temperature)
            teacher_sampled_logp_BT = teacher_logp_BTV.gather(-1, sampled_ids_BT.unsqueeze(-1)).squeeze(-1)
        student_sampled_BT = student_logp_BTV.gather(-1, sampled_ids_BT.unsqueeze(-1)).squeeze(-1)
        return sampled_reverse_kl(student_sampled_BT, teacher_sampled_logp_BT)
    teacher_logp_BTV = log_probs(teacher_logits_BTV, temperature)
    if kind == "full":
        return full_reverse_kl(student_logp_BTV, teacher_logp_BTV)
    if kind == "topk":
        return topk_reverse_kl(student_logp_BTV, teacher_logp_BTV, topk)
    raise ValueError(f"unknown KL estimator '{kind}'")


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over valid response tokens of the whole batch (long answers weigh more, as in the paper)."""
    mask_BT = mask_BT.to(values_BT.dtype)
    return (values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


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


def distill_loss(
    method: str,
    kl: str,
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor | None,
    ids_BT: torch.Tensor,
    temperature: float,
    topk: int,
) -> torch.Tensor:
    """Per-token loss of each training method (opcd: reverse KL on the student's samples; offpolicy:
    forward KL over the teacher's top-k on the teacher's samples; sft: cross-entropy on the teacher's samples)."""
    if method == "opcd":
        return reverse_kl(kl, student_logits_BTV, teacher_logits_BTV, ids_BT, temperature=temperature, topk=topk)
    student_logp_BTV = log_probs(student_logits_BTV, temperature)
    if method == "sft":
        return token_cross_entropy(student_logp_BTV, ids_BT)
    if method == "offpolicy":
        teacher_logp_BTV = log_probs(teacher_logits_BTV, temperature)
        return forward_kl_topk(student_logp_BTV, teacher_logp_BTV, topk)
    raise ValueError(f"unknown method '{method}'")
