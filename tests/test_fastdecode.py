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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_training_pass_attention_equals_sdpa_in_values_and_gradients(dtype, tol):
    """With gradients on, short sequences take the matmul path: outputs and the gradients of queries, keys and
    values match SDPA's at every query that attends to something; a left-padding query that attends to nothing
    stays finite, so no NaN reaches any gradient."""
    import promptbake.fastdecode as fastdecode

    torch.manual_seed(2)
    B, H, KV, L, D = 2, 6, 2, 9, 16
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[0, :, :, :3] = False  # row 0 is left-padded by three tokens: its first three queries attend to nothing
    live_BL = torch.ones(B, L, dtype=torch.bool)
    live_BL[0, :3] = False
    weights = torch.randn(B, L, H, D)  # a loss that reads every live output
    grads = []
    for matmul_path in (True, False):
        q = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
        k = torch.randn(B, KV, L, D, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
        v = torch.randn(B, KV, L, D, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_()
        if matmul_path:
            assert B * H * L * L <= fastdecode.TRAINING_SCORES_BUDGET
            out, _ = decode_attention_forward(_Module(), q, k, v, mask)
        else:  # the reference: SDPA over the keys repeated per head, padding queries given one key so they are defined
            safe = mask.clone()
            safe[0, :, :3, 3] = True
            out = _reference(q, k, v, safe).to(dtype)
        assert torch.isfinite(out).all()
        (out.float() * weights * live_BL[:, :, None, None]).sum().backward()
        grads.append((out.detach().float()[live_BL], q.grad.float(), k.grad.float(), v.grad.float()))
    for ours, theirs in zip(*grads):
        assert torch.isfinite(ours).all()
        assert (ours - theirs).abs().max() < tol * max(1.0, float(theirs.abs().max()))


def test_long_training_sequences_and_passes_without_gradients_keep_sdpa(monkeypatch):
    """Past the budget (scores of 30 layers kept for backward) and without gradients, the path is SDPA's."""
    import promptbake.fastdecode as fastdecode

    calls = []
    monkeypatch.setattr(fastdecode, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or (None, None))
    q, k, v = torch.randn(1, 2, 8, 4, requires_grad=True), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    decode_attention_forward(_Module(), q, k, v, None)
    assert calls == []
    with torch.no_grad():
        decode_attention_forward(_Module(), q, k, v, None)
    assert calls == [1]
    monkeypatch.setattr(fastdecode, "TRAINING_SCORES_BUDGET", 1 * 2 * 8 * 8 - 1)
    decode_attention_forward(_Module(), q, k, v, None)
    assert calls == [1, 1]


def test_student_gradients_through_the_model_equal_sdpa(tiny_model_dir):
    """A left-padded batch through the whole model with a LoRA adapter: the loss and every LoRA gradient are
    what transformers' SDPA path gives."""
    from peft import LoraConfig, get_peft_model

    from promptbake.models import load_model

    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [1, 8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for implementation in (NAME, "sdpa"):
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        model.set_attn_implementation(implementation)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -4:]
        loss = torch.log_softmax(logits.float(), -1)[..., 3].sum()
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ours, grads_ours), (loss_sdpa, grads_sdpa) = results
    assert abs(loss_ours - loss_sdpa) < 1e-4 * abs(loss_sdpa)
    assert grads_ours.keys() == grads_sdpa.keys() and grads_ours
    for name, grad in grads_ours.items():
        assert torch.isfinite(grad).all(), name
        assert (grad - grads_sdpa[name]).abs().max() < 1e-4 * max(1.0, float(grads_sdpa[name].abs().max())), name


def test_unpadded_rows_get_a_causal_mask_while_training_and_none_otherwise(tiny_model_dir):
    """With gradients on, rows that need no padding still get a mask tensor, so the compiled layers see one kind of
    call; it is the causal mask, and the model's outputs and gradients are those of the unmasked (None) path."""
    from peft import LoraConfig, get_peft_model
    from transformers.masking_utils import AttentionMaskInterface

    from promptbake.models import load_model

    build = AttentionMaskInterface()[NAME]
    ones = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert build(batch_size=2, q_length=5, kv_length=5, attention_mask=ones, allow_is_causal_skip=True) is None
    with torch.enable_grad():
        mask = build(batch_size=2, q_length=5, kv_length=5, attention_mask=ones, allow_is_causal_skip=True)
    assert mask is not None and torch.equal(mask[:, 0], torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5))
    with torch.enable_grad():  # accelerators keep SDPA's causal path without a mask
        assert build(batch_size=2, q_length=5, kv_length=5, attention_mask=ones, allow_is_causal_skip=True,
                     device="meta") is None

    seen = []
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.set_attn_implementation(NAME)
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    loss_masked = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[..., 3].sum()
    loss_masked.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_none = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[..., 3].sum()
    assert seen[0] is not None and seen[1] is None
    assert abs(float(loss_masked.detach()) - float(loss_none)) < 1e-5 * abs(float(loss_none))
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_a_trainable_prefix_run_once_gives_the_full_rows_logits_and_gradients(tiny_model_dir):
    """The student's rows after a shared prefix run once (`rollout.TrainablePrefix`), in two micro-batches whose
    backward each stops at the prefix, then one backward through it: the same logits and LoRA gradients as every
    row run whole, in float64 (the attention's softmax is fp32 on both paths: agreement to fp32's rounding)."""
    from peft import LoraConfig, get_peft_model

    from promptbake.fastdecode import shared_prefix
    from promptbake.models import load_model
    from promptbake.rollout import Rollout, response_logits, trainable_prefix

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir).double(),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                                      init_lora_weights=False))
    model.train()
    shared = list(range(30, 48))  # 18 tokens: above MIN_SHARED_PREFIX
    prompts = [shared + [60, 61, 62], shared + [70], shared + [80, 81, 82, 83, 84]]
    rollout = Rollout(torch.tensor([[5, 6, 7], [8, 9, 0], [10, 11, 12]]), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]))
    groups = [[0, 1], [2]]

    def loss_of(logits_BTV, micro):
        logp_BTV = torch.log_softmax(logits_BTV, -1)
        return (logp_BTV.gather(-1, micro.response_ids_BT[..., None])[..., 0] * logp_BTV[..., 3].exp() * micro.response_mask_BT).sum()

    def grads():
        out = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
               if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    whole = []
    for rows in groups:
        micro = rollout.select(rows)
        logits = response_logits(model, [prompts[r] for r in rows], micro, pad_id=0)
        loss_of(logits, micro).backward()
        whole.append(logits.detach())
    want = grads()

    prefix = trainable_prefix(model, prompts)
    assert prefix is not None and prefix.length == len(shared)
    got = []
    for rows in groups:
        micro = rollout.select(rows)
        with shared_prefix(model, prefix.attended):
            logits = response_logits(model, [prompts[r][prefix.length:] for r in rows], micro, pad_id=0,
                                     prefix_len=prefix.length, prefix_attended=True)
            loss_of(logits, micro).backward()
        got.append(logits.detach())
    before = grads()  # what the micro-batches gave the LoRA weights alone: the prefix's share is still missing
    prefix.backward()
    after = grads()
    for a, b in zip(whole, got):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-6
    assert want.keys() == after.keys() and want
    for name, grad in want.items():
        total = before[name] + after[name]
        assert (total - grad).abs().max() < 1e-6 * max(1.0, float(grad.abs().max())), name
    # The prefix's own backward carried a real part of the gradient (the layers' keys and values read it).
    assert any(after[n].abs().max() > 1e-6 for n in after if "k_proj" in n or "v_proj" in n)
