"""The CPU decode attention and the shared prompt prefix give the numbers transformers' SDPA path gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import promptbake.rollout as rollout_module
from promptbake.fastdecode import NAME, decode_attention_forward
from promptbake.rollout import sample

EOS = 2


class _Module:  # the attention function reads a shared prefix from its module, if one is set
    pass


def _reference(query, key, value, mask_B1QS):
    """SDPA over keys repeated per query head (what transformers' SDPA path computes)."""
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(query.float(), key.float().repeat_interleave(groups, 1),
                                          value.float().repeat_interleave(groups, 1), attn_mask=mask_B1QS).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_step_equals_sdpa_with_padding(dtype, tol):
    torch.manual_seed(0)
    B, H, KV, S, D = 3, 6, 2, 17, 16
    q, k, v = torch.randn(B, H, 1, D, dtype=dtype), torch.randn(B, KV, S, D, dtype=dtype), torch.randn(B, KV, S, D, dtype=dtype)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, :, :, :5] = False  # a left-padded row
    out, _ = decode_attention_forward(_Module(), q, k, v, mask)
    assert out.shape == (B, 1, H, D)
    assert (out.float() - _reference(q, k, v, mask)).abs().max() < tol


@pytest.mark.parametrize("q_len,dtype,tol,float_mask", [
    (1, torch.float32, 1e-5, False), (4, torch.float32, 1e-5, False), (4, torch.float32, 1e-5, True),
    (4, torch.bfloat16, 3e-2, False)])
def test_shared_prefix_equals_attention_over_the_prefix_repeated_per_row(q_len, dtype, tol, float_mask):
    """One copy of the prefix for all rows == every row carrying its own copy in front of its keys, including
    query positions whose own keys are all masked (left padding: they attend to the prefix alone)."""
    torch.manual_seed(1)
    B, H, KV, P, S, D = 3, 6, 2, 11, 7, 16
    q = torch.randn(B, H, q_len, D, dtype=dtype)
    k_pre, v_pre = torch.randn(KV, P, D, dtype=dtype), torch.randn(KV, P, D, dtype=dtype)
    k, v = torch.randn(B, KV, S, D, dtype=dtype), torch.randn(B, KV, S, D, dtype=dtype)
    own_mask = torch.ones(B, 1, q_len, S, dtype=torch.bool).tril(S - q_len)  # causal over the row's own tokens
    own_mask[2, :, :, :3] = False  # padding between the prefix and row 2's tokens
    own_mask[1, :, :, :S - q_len + 1] = False  # row 1: its first query sees none of its own keys
    module = _Module()
    setattr(module, "_promptbake_shared_prefix_kv", (k_pre, v_pre))
    mask_arg = own_mask
    if float_mask:  # transformers' additive form: 0 where attended, the dtype's minimum elsewhere
        mask_arg = torch.zeros(own_mask.shape, dtype=dtype).masked_fill(~own_mask, torch.finfo(dtype).min)
    out, _ = decode_attention_forward(module, q, k, v, mask_arg)
    full_k = torch.cat([k_pre.expand(B, -1, -1, -1), k], dim=2)
    full_v = torch.cat([v_pre.expand(B, -1, -1, -1), v], dim=2)
    full_mask = torch.cat([torch.ones(B, 1, q_len, P, dtype=torch.bool), own_mask], dim=-1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - _reference(q, full_k, full_v, full_mask)).abs().max() < tol


def test_models_load_with_the_decode_attention(tiny):
    model, _ = tiny
    assert model.config._attn_implementation == NAME


def test_sampling_with_a_shared_prefix_gives_the_same_tokens_and_logits(tiny, monkeypatch):
    """Prompts that share 20 tokens (a system prompt): sharing their cache changes nothing, in fp32."""
    model, _ = tiny
    prefix = list(range(3, 23))
    prompts = [prefix + [30, 31, 32], prefix + [40], prefix + [50, 51]]
    shared = sample(model, prompts, max_new_tokens=8, temperature=1.0, eos_ids=[EOS], pad_id=0, greedy=True)
    monkeypatch.setattr(rollout_module, "MIN_SHARED_PREFIX", 10**9)  # never share
    plain = sample(model, prompts, max_new_tokens=8, temperature=1.0, eos_ids=[EOS], pad_id=0, greedy=True)
    assert shared.response_ids_BT.tolist() == plain.response_ids_BT.tolist()
    for row, prompt in enumerate(prompts):  # and each row equals decoding it alone
        alone = sample(model, [prompt], max_new_tokens=8, temperature=1.0, eos_ids=[EOS], pad_id=0, greedy=True)
        n = int(alone.response_mask_BT.sum())
        assert shared.response_ids_BT[row, :n].tolist() == alone.response_ids_BT[0, :n].tolist()


def test_decode_attention_model_logits_equal_sdpa_model_logits(tiny_model_dir):
    """The whole model, step by step with a cache: our attention and transformers' SDPA agree."""
    from transformers import DynamicCache

    from promptbake.models import load_model

    ours, theirs = load_model(tiny_model_dir), load_model(tiny_model_dir)
    theirs.set_attn_implementation("sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    logits = []
    for model in (ours, theirs):
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        steps = [model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]]
        m, p = mask, pos[:, -1:]
        for token in (12, 13, 14):
            m, p = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1), p + 1
            steps.append(model(input_ids=torch.full((2, 1), token), attention_mask=m, position_ids=p,
                               past_key_values=cache).logits[:, -1])
        logits.append(torch.stack(steps))
    assert (logits[0] - logits[1]).abs().max() < 1e-4
