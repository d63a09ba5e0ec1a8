"""Fast token-by-token decoding on CPUs, plugged into transformers through its attention interface.

Two things made sampling slow here, both measured on this project's 2-core AVX-512/AMX CPUs, torch 2.13:

1. `scaled_dot_product_attention` for one query token over a bf16 KV cache runs 8-16x slower than two plain
   matmuls (32 rows x 9 heads: 2.3 ms vs 0.25 ms per layer at 100 cached tokens, 14 ms vs 0.9 ms at 600).
   Every sampled token pays it in every layer.
2. With a long system prompt every row carries its own copy of the prompt's keys and values: prefilled once
   per row, then read (and, by the growing cache, copied) once per row for every new token. With a
   1,600-token prompt and 24 rows that was 30 MB per layer per token.

So: the CPU decode step is two matmuls with an fp32 softmax, and a prompt prefix shared by every row
(`shared_prefix`) is computed once and attended to as a single copy, with the rows' queries folded into one
matmul per KV head.

A third cost showed on a 2-core AMD EPYC with AVX2 only, where sampling runs in fp32: MKL's product of a few
rows with a transposed weight (`x @ W.T`, what `F.linear` asks for) ran slower than the same product taken weight
first (`(W @ x.T).T`): 1.45x at 16 rows and 2.1-2.3x at 2-4 rows for the MLP's 1536 x 576 weights, 1.3-3.4x for the
49k-row output layer, 1.30x over a whole token of 16 rows. One row (MKL's vector path) and hundreds of rows were
as fast or faster as `F.linear` has them. While the static-cache sampler decodes (`rollout.sample_static`, whose
step training compiles), `weight_first_linears` takes every fp32 linear of 2 to `WEIGHT_FIRST_MAX_ROWS` rows weight
first (benchmarks/decode_linears.py). The eager sampler goes without: there the mode's Python call on every
operation cost more than the products saved.

The same two matmuls serve the student's training pass on the CPU while its scores stay small
(`TRAINING_SCORES_BUDGET`): for a few hundred tokens SDPA's CPU flash kernel costs more than the FLOPs, and a
step runs it 240 times forward and backward; the matmuls made the student's pass 1.08x faster at the 128-token
cap (benchmarks/train_step.py, docs/performance.md). Everything else (prefill without a shared
prefix, long training sequences, CUDA) goes to transformers' own SDPA path unchanged. Masks are built
exactly as for SDPA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "promptbake_cpu_decode"
# Largest fp32 score tensor (rows x heads x queries x keys) of one layer for which a pass with gradients takes the
# matmul path: backward keeps the softmax's output, so 30 layers hold 30x this (4 MiB each here); past it, SDPA.
TRAINING_SCORES_BUDGET = 1 << 20
_PREFIX = "_promptbake_shared_prefix_kv"  # attribute set on attention modules while a shared prefix is active


def _masked_scores(scores_BKGQS: torch.Tensor, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """Apply an SDPA-style mask (bool: True attends; float: added) of shape (B, 1, Q, S) to grouped scores;
    without a mask, a prefill of Q > 1 tokens is causal. Masked scores get the lowest finite fp32 value, not
    -inf: a left-padding query that may attend to nothing then averages its keys instead of turning NaN, which
    its backward would spread to every gradient; every other query's softmax is the same."""
    S = scores_BKGQS.shape[-1]
    lowest = torch.finfo(scores_BKGQS.dtype).min
    if attention_mask is None:
        if q_len == 1:
            return scores_BKGQS
        causal_QS = torch.ones(q_len, S, dtype=torch.bool, device=scores_BKGQS.device).tril(S - q_len)
        return scores_BKGQS.masked_fill(~causal_QS, lowest)
    mask_B1QS = attention_mask[:, :, -q_len:, -S:][:, :, None]
    if mask_B1QS.dtype == torch.bool:
        return scores_BKGQS.masked_fill(~mask_B1QS, lowest)
    return scores_BKGQS + mask_B1QS.float()


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """Grouped-query matmul attention with an fp32 softmax for the CPU decode step, for rows that share a
    prompt prefix and for short passes with gradients; SDPA for everything else."""
    prefix = getattr(module, _PREFIX, None)
    q_len = query.shape[2]
    plain = query.device.type == "cpu" and not dropout and not kwargs.get("position_bias") \
        and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    short_training = torch.is_grad_enabled() and \
        query.shape[0] * query.shape[1] * q_len * key.shape[2] <= TRAINING_SCORES_BUDGET
    if not plain or (prefix is None and q_len != 1 and not short_training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, _, D = query.shape
    KV = key.shape[1]
    G = H // KV  # head h reads kv head h // G, as transformers' repeat_kv lays them out
    scale = scaling if scaling is not None else D ** -0.5
    S = key.shape[2]
    q_BKGQD = query.reshape(B, KV, G, q_len, D)
    # Groups and queries share the KV head's keys: one (G*Q x D) @ (D x S) matmul per row and KV head.
    scores_BKGQS = torch.matmul(q_BKGQD.reshape(B, KV, G * q_len, D), key.transpose(-1, -2)).float().reshape(
        B, KV, G, q_len, S) * scale
    scores_BKGQS = _masked_scores(scores_BKGQS, attention_mask, q_len)
    if prefix is None:
        probs_BKGQS = torch.softmax(scores_BKGQS, dim=-1).to(value.dtype)
        out_BKGQD = torch.matmul(probs_BKGQS.reshape(B, KV, G * q_len, S), value).reshape(B, KV, G, q_len, D)
    else:
        # One copy of the prefix for all rows: fold rows, groups and queries into the matmul's rows per KV head.
        key_KPD, value_KPD = prefix
        P = key_KPD.shape[1]
        q_KND = q_BKGQD.permute(1, 0, 2, 3, 4).reshape(KV, B * G * q_len, D)
        pre_KNP = torch.bmm(q_KND, key_KPD.transpose(1, 2)).float() * scale
        pre_BKGQP = pre_KNP.reshape(KV, B, G, q_len, P).permute(1, 0, 2, 3, 4)
        probs_BKGQL = torch.softmax(torch.cat([pre_BKGQP, scores_BKGQS], dim=-1), dim=-1).to(value.dtype)
        pre_probs_KNP = probs_BKGQL[..., :P].permute(1, 0, 2, 3, 4).reshape(KV, B * G * q_len, P)
        out_KND = torch.bmm(pre_probs_KNP, value_KPD)
        own_BKND = torch.matmul(probs_BKGQL[..., P:].reshape(B, KV, G * q_len, S), value)
        out_BKGQD = out_KND.reshape(KV, B, G, q_len, D).permute(1, 0, 2, 3, 4) + own_BKND.reshape(B, KV, G, q_len, D)
    out_BQHD = out_BKGQD.reshape(B, H, q_len, D).transpose(1, 2).contiguous()
    return out_BQHD, None  # (batch, query length, heads, head dim), as SDPA's path returns it


def training_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask, always built on a CPU while gradients are on. Unpadded rows would otherwise get no mask (None),
    and the compiled decoder layers one more graph, forward and backward, for micro-batches that happen to need no
    padding: two of the four layer graphs a compile traced. The attention is the same either way (causal).
    Accelerators keep the skip: there SDPA's flash kernels run causal without a mask, and long masks cost memory."""
    if torch.is_grad_enabled() and torch.device(kwargs.get("device", "cpu")).type == "cpu":
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, decode_attention_forward)
AttentionMaskInterface.register(NAME, training_mask)


def use_fast_decode(model) -> bool:
    """Switch a model that uses SDPA to this attention (SDPA except for the CPU paths above); returns whether
    it switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True


def can_share_prefix(model) -> bool:
    """Whether `shared_prefix` works for this model: this attention, on the CPU, plain full-attention layers."""
    config = model.config
    return (getattr(config, "_attn_implementation", None) == NAME and next(model.parameters()).device.type == "cpu"
            and not getattr(config, "sliding_window", None) and bool(_attention_modules(model)))


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")}


@contextlib.contextmanager
def shared_prefix(model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """While active, every attention layer attends to one copy of a prefix's keys and values (per layer, each
    (1, kv heads, P, head dim), computed for one row) in addition to each row's own. The prefix holds
    positions 0..P-1; callers place the rest after it and leave it out of their attention masks."""
    modules = _attention_modules(model)
    for index, (keys, values) in enumerate(prefix_kv):
        setattr(modules[index], _PREFIX, (keys[0], values[0]))
    try:
        yield
    finally:
        for module in modules.values():
            if hasattr(module, _PREFIX):
                delattr(module, _PREFIX)


# False: decoding's linears run as `F.linear` does (x @ W.T), on every CPU and precision.
WEIGHT_FIRST_LINEARS = True
# Most rows a linear may have to go weight first: a decode step has one per sampled row; prefills and training passes
# have hundreds, where weight first measured 0.8-0.9x (340 rows). One row stays with `F.linear` too (0.8-1.0x).
WEIGHT_FIRST_MAX_ROWS = 64


def weight_first_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as (weight @ x.T).T: the same dot products, the weight as the
    product's first factor."""
    x_MK = x.reshape(-1, x.shape[-1])
    y_MN = torch.mm(weight, x_MK.t()).t().contiguous()
    if bias is not None:
        y_MN = y_MN + bias
    return y_MN.reshape(*x.shape[:-1], weight.shape[0])


class _WeightFirstLinears(TorchFunctionMode):
    """Routes fp32 CPU `F.linear` calls of 2 to `WEIGHT_FIRST_MAX_ROWS` rows to `weight_first_linear`; everything
    else runs unchanged. `torch.compile` traces through the mode, so a compiled decode step holds the weight-first
    products (and recompiles if later called without the mode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and weight.dim() == 2 \
                    and x.dim() >= 2 and 2 <= x.numel() // max(1, x.shape[-1]) <= WEIGHT_FIRST_MAX_ROWS \
                    and not torch.is_autocast_enabled("cpu"):
                return weight_first_linear(x, weight, bias)
        return func(*args, **kwargs)


def weight_first_linears(model) -> contextlib.AbstractContextManager:
    """While active, `model`'s fp32 linears of few rows run weight first (see the module's docstring): for a model
    whose parameters start in fp32 on a CPU, while `WEIGHT_FIRST_LINEARS` is on; a no-op otherwise."""
    param = next(model.parameters(), None)
    if WEIGHT_FIRST_LINEARS and param is not None and param.device.type == "cpu" and param.dtype == torch.float32:
        return _WeightFirstLinears()
    return contextlib.nullcontext()
