"""Sampling, masking, the shared batch layout, the teacher's prefix cache and the bf16 rollout engine."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from promptbake.chat import ChatRenderer
from promptbake.queries import Query
from promptbake.rollout import (HFRolloutEngine, Rollout, compiled_decoding, decode_step, left_pad, mask_after_eos,
                                packed_response_logits, response_logits, sample, sample_static)
from promptbake.teacher import PromptedTeacher

EOS = 2


def test_mask_after_eos_keeps_first_eos_and_drops_the_rest():
    ids = torch.tensor([[5, 6, EOS, 7, EOS], [5, 6, 7, 8, 9], [EOS, 1, 1, 1, 1]])
    assert mask_after_eos(ids, [EOS]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_mask_after_eos_with_several_stop_ids():
    ids = torch.tensor([[5, 9, 6, EOS]])
    assert mask_after_eos(ids, [EOS, 9]).tolist() == [[1, 1, 0, 0]]


def test_left_pad_right_aligns():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sample_pads_and_masks_everything_after_eos(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    # A very peaked EOS preference makes early stops certain for some rows.
    out = sample(model, prompts, max_new_tokens=12, temperature=1.0, eos_ids=[EOS], pad_id=0)
    assert out.response_ids_BT.shape[0] == 3 and out.response_ids_BT.shape[1] <= 12
    for ids, mask in zip(out.response_ids_BT.tolist(), out.response_mask_BT.tolist()):
        if EOS in ids:
            cut = ids.index(EOS)
            assert mask == [1] * (cut + 1) + [0] * (len(ids) - cut - 1)
            assert all(t == 0 for t in ids[cut + 1:])
        else:
            assert all(mask)


def test_greedy_sample_is_deterministic_and_matches_unbatched(tiny):
    model, tok = tiny
    prompts = [[1, 5, 6, 7, 11, 12], [1, 8]]
    batched = sample(model, prompts, max_new_tokens=6, temperature=1.0, eos_ids=[EOS], pad_id=0, greedy=True)
    for row, prompt in enumerate(prompts):
        alone = sample(model, [prompt], max_new_tokens=6, temperature=1.0, eos_ids=[EOS], pad_id=0, greedy=True)
        n = int(alone.response_mask_BT.sum())
        assert batched.response_ids_BT[row, :n].tolist() == alone.response_ids_BT[0, :n].tolist()


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("shared", [0, 20])
def test_dropping_finished_rows_leaves_every_row_unchanged(tiny_model_dir, greedy, shared):
    """Rows that end leave the batch (and the KV cache); the rest must decode exactly what they would have.

    In float64, so that the smaller batches' different summation order cannot move a sample across a CDF step."""
    from promptbake.fastdecode import use_fast_decode
    from promptbake.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir).double(), load_tokenizer(tiny_model_dir)
    use_fast_decode(model)
    prefix = list(range(300, 300 + shared))     # a shared prefix takes the one-copy attention path
    g = torch.Generator().manual_seed(0)
    prompts = [prefix + torch.randint(2, tok.vocab_size, (2 + r % 5,), generator=g).tolist() for r in range(12)]

    def run(stops, drop):
        torch.manual_seed(3)
        return sample(model, prompts, max_new_tokens=40, temperature=1.3, eos_ids=stops, pad_id=0, greedy=greedy,
                      drop_finished=drop)

    # Stop ids picked from a run without them, so that rows end at different steps (stops do not change logits).
    free = run([EOS], False).response_ids_BT.tolist()

    def lengths(stops):
        return {next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in free}

    stops: set[int] = set()
    for r, row in enumerate(free):
        for t in row[2 + 3 * r:]:
            if len(lengths(stops | {t})) > len(lengths(stops)):
                stops.add(t)
                break
    stops = sorted(stops)
    a, b = run(stops, False), run(stops, True)
    lengths = a.response_mask_BT.sum(-1).tolist()
    assert len(set(lengths)) > 3 and min(lengths) < 40 // 2, lengths  # the test exercises several drops
    assert torch.equal(a.response_mask_BT, b.response_mask_BT)
    assert torch.equal(a.response_ids_BT, b.response_ids_BT)


@pytest.mark.parametrize("greedy", [True, False])
def test_static_cache_sampling_draws_what_the_eager_sampler_draws(tiny_model_dir, greedy):
    """The static-cache loop (prompts padded to a bucket, one mask width for every token, finished rows kept)
    draws the same tokens as `sample` (grouped prefill, growing cache, finished rows dropped), stops and all.
    Float64, so that the two layouts' different summation orders cannot move a sample across a CDF step."""
    from promptbake.fastdecode import use_fast_decode
    from promptbake.models import load_model

    model = load_model(tiny_model_dir).double()
    use_fast_decode(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (3, 11, 5, 17, 8, 2)]
    torch.manual_seed(4)
    free = sample(model, prompts, max_new_tokens=30, temperature=1.3, eos_ids=[EOS], pad_id=0, greedy=greedy)
    stops = sorted({row[5 + 4 * r] for r, row in enumerate(free.response_ids_BT.tolist()[:4])})  # rows end at steps 6-18
    runs = []
    widths = []  # of each forward's input: the static prefill runs the prompts' width (17), not the bucket's (24)
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    for sampler in ("eager", "static"):
        torch.manual_seed(4)
        kwargs = dict(max_new_tokens=30, temperature=1.3, eos_ids=stops, pad_id=0, greedy=greedy)
        widths.clear()
        runs.append(sample(model, prompts, **kwargs) if sampler == "eager"
                    else sample_static(model, decode_step, prompts, bucket=8, **kwargs))
    hook.remove()
    assert widths[0] == 17 and set(widths[1:]) == {1}
    eager, static = runs
    lengths = eager.response_mask_BT.sum(-1).tolist()
    assert min(lengths) < 20 and len(set(lengths)) > 2, lengths  # rows end at different steps
    assert torch.equal(eager.response_ids_BT, static.response_ids_BT)
    assert torch.equal(eager.response_mask_BT, static.response_mask_BT)


@pytest.mark.parametrize("greedy", [True, False])
def test_static_cache_prefill_runs_a_shared_prefix_once(tiny_model_dir, greedy, monkeypatch):
    """Prompts that share their first 20 tokens: the static loop computes them once (one row), then the rows' own
    tokens (the longest 9 wide, not the bucket's 32), and draws exactly what the eager sampler and a whole-width
    prefill draw. Float64, as above."""
    import promptbake.rollout
    from promptbake.fastdecode import use_fast_decode
    from promptbake.models import load_model

    model = load_model(tiny_model_dir).double()
    use_fast_decode(model)
    g = torch.Generator().manual_seed(3)
    head = torch.randint(3, 40000, (20,), generator=g).tolist()
    prompts = [head + torch.randint(3, 40000, (n,), generator=g).tolist() for n in (4, 9, 1, 6)]
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    runs = []
    for sampler in ("eager", "static", "static, whole width"):
        torch.manual_seed(5)
        widths.clear()
        kwargs = dict(max_new_tokens=12, temperature=1.1, eos_ids=[], pad_id=0, greedy=greedy)
        if sampler == "eager":
            runs.append(sample(model, prompts, **kwargs))
            continue
        monkeypatch.setattr(promptbake.rollout, "SKIP_BUCKET_PADDING", sampler == "static")
        runs.append(sample_static(model, decode_step, prompts, bucket=32, **kwargs))
        assert widths[:2] == ([(1, 20), (4, 9)] if sampler == "static" else [(4, 32), (4, 1)])
    hook.remove()
    for run in runs[1:]:
        assert torch.equal(runs[0].response_ids_BT, run.response_ids_BT)


def _decode_step_args(model, prompts: list[list[int]]) -> tuple:
    """`decode_step`'s arguments for one new token per row after `prompts` (two rows, five slots) were prefilled into a
    fresh static cache of 12 slots."""
    from transformers import StaticCache

    ids_BL, mask_BL = left_pad(prompts, 0)
    cache = StaticCache(config=model.config, max_cache_len=12)
    model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=(mask_BL.cumsum(-1) - 1).clamp(min=0),
          past_key_values=cache, cache_position=torch.arange(5), use_cache=True)
    mask_BS = torch.cat([mask_BL, torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)], dim=1)
    return torch.tensor([[40], [41]]), mask_BS, torch.tensor([[5], [2]]), cache, torch.tensor([5])


def test_compiled_decode_step_gives_the_eager_step_and_only_while_asked(peft_tiny):
    """`compiled_decoding` puts a compiled step on the bf16 engine for as long as it is active: its logits are
    the eager step's on the same cache, also after an update of the adapter and a `sync()` (training samples the
    current policy, not the one the step was compiled with), and the engine samples through the static cache."""
    engine = HFRolloutEngine(peft_tiny, bf16=True)
    model = engine.model
    prompts = [[1, 5, 6, 7, 8], [1, 9]]

    def step_args():
        return _decode_step_args(model, prompts)

    with torch.no_grad():
        eager = decode_step(model, *step_args()).float()
        with compiled_decoding(engine, True) as on:
            assert on and engine.step is not None
            compiled = engine.step(model, *step_args()).float()
            for name, param in peft_tiny.named_parameters():  # an update of the adapter, as an optimizer step makes
                if "lora_B" in name:
                    param.add_(torch.randn_like(param))
            engine.sync()
            eager_after = decode_step(model, *step_args()).float()
            compiled_after = engine.step(model, *step_args()).float()
            torch.manual_seed(0)
            rollout = engine.sample(prompts, max_new_tokens=6, temperature=1.0, eos_ids=[-1], pad_id=0)
    assert engine.step is None  # eager again afterwards
    torch.testing.assert_close(compiled, eager, atol=0.05 * eager.abs().max().item(), rtol=0)
    assert (eager_after - eager).abs().max() > 0.2 * eager.abs().max()  # the update moved the logits
    torch.testing.assert_close(compiled_after, eager_after, atol=0.05 * eager_after.abs().max().item(), rtol=0)
    assert rollout.response_ids_BT.shape == (2, 6) and bool(rollout.response_mask_BT.all())


def test_fp32_compiled_decode_step_runs_the_policy_with_its_live_adapter(peft_tiny, monkeypatch):
    """Without bf16 there is no merged copy: the compiled step runs the PEFT policy itself. Its logits are the eager
    step's, also after an optimizer-like update of the adapter with no `sync()` (the LoRA weights are the graph's
    inputs, not constants), its greedy tokens are the eager sampler's, and with the adapter off the engine samples
    the base eagerly."""
    import promptbake.rollout

    monkeypatch.setattr(promptbake.rollout, "COMPILE_POLICY_DECODING", True)
    model = peft_tiny
    prompts = [[1, 5, 6, 7, 8], [1, 9]]

    def step_args():
        return _decode_step_args(model, prompts)

    engine = HFRolloutEngine(model, bf16=False)
    assert engine.model is None
    kwargs = dict(max_new_tokens=6, eos_ids=[-1], pad_id=0, greedy=True, temperature=1.0)
    with torch.no_grad():
        eager = decode_step(model, *step_args())
        greedy_eager = sample(model, prompts, **kwargs)
        with compiled_decoding(engine, True) as on:
            assert on and engine.step is not None
            compiled = engine.step(model, *step_args())
            greedy_compiled = engine.sample(prompts, **kwargs)
            for name, param in model.named_parameters():  # an update of the adapter, as an optimizer step makes
                if "lora_B" in name:
                    param.add_(torch.randn_like(param))
            eager_after = decode_step(model, *step_args())
            compiled_after = engine.step(model, *step_args())
            engine.sync(with_adapter=False)
            base_from_engine = engine.sample(prompts, **kwargs)
            engine.sync()
        with model.disable_adapter():
            base_eager = sample(model, prompts, **kwargs)
    assert engine.step is None  # eager again afterwards
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert (eager_after - eager).abs().max() > 0.2 * eager.abs().max()  # the update moved the logits
    torch.testing.assert_close(compiled_after, eager_after, rtol=1e-4, atol=1e-5)
    assert torch.equal(greedy_compiled.response_ids_BT, greedy_eager.response_ids_BT)
    assert torch.equal(base_from_engine.response_ids_BT, base_eager.response_ids_BT)
    monkeypatch.setattr(promptbake.rollout, "COMPILE_POLICY_DECODING", False)
    with compiled_decoding(HFRolloutEngine(peft_tiny, bf16=False), True) as on:
        assert not on  # the switch off: the eager sampler through the PEFT model, as before


def test_compiled_sampler_checks_guards_on_each_calls_first_token_only_and_still_recompiles(peft_tiny, monkeypatch):
    """The compiled static-cache sampler runs torch's full guard check on each call's first decode token and only the
    differentiating guards on the later ones (`SKIP_REPEATED_GUARDS`). Calls with another batch size or prompt width
    in between still get a graph of their own: greedy tokens equal the eager sampler's for every batch, in any order.
    An eager step never skips (the model's own compiled layers may need their guards)."""
    import promptbake.rollout

    monkeypatch.setattr(promptbake.rollout, "COMPILE_POLICY_DECODING", True)
    stances: list[bool] = []
    real_stance = torch.compiler.set_stance

    def recording_stance(*args, **kwargs):
        stances.append(bool(kwargs.get("skip_guard_eval_unsafe", False)))
        return real_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording_stance)
    model, T = peft_tiny, 5
    kwargs = dict(max_new_tokens=T, eos_ids=[-1], pad_id=0, greedy=True, temperature=1.0)
    batches = [[[1, 5, 6, 7, 8], [1, 9]], [[1, 4], [1, 7, 7], [1, 2, 3, 4, 5, 6]], [[1, 3, 3], [1, 8]],
               [[1] + list(range(2, 70))]]  # two rows, three, two again, and a prompt past the 64-wide bucket
    with torch.no_grad():
        eager = [sample(model, prompts, **kwargs).response_ids_BT for prompts in batches]
        engine = HFRolloutEngine(model, bf16=False)
        stances.clear()
        with compiled_decoding(engine, True) as on:
            assert on
            compiled = [engine.sample(prompts, **kwargs).response_ids_BT for prompts in batches]
        skipped = sum(stances)
        stances.clear()
        sample_static(model, decode_step, batches[0], **kwargs)  # an eager step
    for want, got in zip(eager, compiled):
        assert torch.equal(got, want)
    assert skipped == len(batches) * (T - 2)  # T tokens take T - 1 decode calls; all but each call's first skip
    assert not any(stances)


def test_weight_first_linears_give_f_linears_numbers_on_few_fp32_rows_only(peft_tiny, monkeypatch):
    """While sampling in fp32 on a CPU, linears of 2 to 64 rows run as (W @ x.T).T (`fastdecode.weight_first_linears`,
    faster with MKL on an AVX2 EPYC): the numbers of `F.linear` to fp32 rounding, in a whole decode step through the
    LoRA'd policy too. One row, hundreds of rows, fp64 and autocast go to `F.linear` unchanged; the static-cache
    sampler (the one training compiles) decodes through the route while it is on and not once it is off, and the
    eager sampler never does (there the mode's overhead cost more than it saved)."""
    import contextlib

    import torch.nn.functional as F

    import promptbake.fastdecode as fastdecode

    routed: list[int] = []  # rows of every linear taken weight first
    real = fastdecode.weight_first_linear

    def counted(x, weight, bias):
        routed.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(fastdecode, "weight_first_linear", counted)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 32, generator=g), torch.randn(96, generator=g)
    with fastdecode.weight_first_linears(peft_tiny):
        for shape in [(3, 32), (4, 1, 32), (1, 32), (65, 32)]:
            x = torch.randn(*shape, generator=g)
            out = F.linear(x, w, b)
            assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
            torch.testing.assert_close(out, x @ w.T + b, rtol=1e-5, atol=1e-5)
        F.linear(torch.randn(3, 32, dtype=torch.float64, generator=g), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(torch.randn(3, 32, generator=g), w)
    assert routed == [3, 4]

    prompts = [[1, 5, 6, 7, 8], [1, 9]]
    layers = peft_tiny.config.num_hidden_layers
    with torch.no_grad():
        plain = decode_step(peft_tiny, *_decode_step_args(peft_tiny, prompts))
        args = _decode_step_args(peft_tiny, prompts)
        routed.clear()
        with fastdecode.weight_first_linears(peft_tiny):
            first = decode_step(peft_tiny, *args)
    # 7 projections and 3 LoRA'd ones (A and B) per layer, and the output layer, each of the two rows
    assert routed == [2] * (layers * (7 + 3 * 2) + 1)
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))

    kwargs = dict(max_new_tokens=4, temperature=1.0, eos_ids=[-1], pad_id=0, greedy=True)
    routed.clear()
    sample_static(peft_tiny, decode_step, prompts, **kwargs)
    assert routed.count(2) >= 3 * (layers * 13 + 1)  # every token after the first, decoded weight first
    routed.clear()
    sample(peft_tiny, prompts, **kwargs)
    assert routed == []
    monkeypatch.setattr(fastdecode, "WEIGHT_FIRST_LINEARS", False)
    assert isinstance(fastdecode.weight_first_linears(peft_tiny), contextlib.nullcontext)
    sample_static(peft_tiny, decode_step, prompts, **kwargs)
    assert routed == []


@pytest.mark.parametrize("packed", [True, False], ids=["packed layout", "left-padded layout"])
@pytest.mark.parametrize("prompts", [[[1, 5, 6, 7, 11], [1, 8], [1, 9, 10]], [[1, 5, 6], [1, 8, 9]]],
                         ids=["prompts of different lengths", "equal lengths"])
def test_response_logits_align_with_unpadded_forward(tiny, prompts, packed, monkeypatch):
    """Column t of response_logits predicts response token t, for every row despite padding, in both layouts."""
    import promptbake.rollout

    monkeypatch.setattr(promptbake.rollout, "PACKED_LAYOUT", packed)
    model, _ = tiny
    ids_BT = torch.tensor([[20, 21, 22, 23], [30, EOS, 0, 0], [40, 41, 42, EOS]])[:len(prompts)]
    rollout = Rollout(ids_BT, mask_after_eos(ids_BT, [EOS]))
    with torch.no_grad():
        got = response_logits(model, prompts, rollout, pad_id=0)
        assert got.shape == (len(prompts), 4, model.config.vocab_size)
        for row, prompt in enumerate(prompts):
            live = int(rollout.response_mask_BT[row].sum())
            full = torch.tensor([prompt + ids_BT[row, :live].tolist()])
            ref = model(input_ids=full).logits[0, len(prompt) - 1: len(prompt) - 1 + live]
            torch.testing.assert_close(got[row, :live], ref, atol=1e-4, rtol=1e-4)


def _attention_with_nan_backward_on_empty_rows(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Matmul attention whose forward gives 0 where a query has no key to attend to and whose backward gives NaN
    there: what some fused kernels do with fully masked rows (finite loss, NaN gradient)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    bias = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, float("-inf"))[:, :, :, : key.shape[-2]]
    scores = scores + bias  # added, not filled in: the NaN of the softmax's backward reaches the queries and keys
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # 0/0 -> NaN in the forward, hidden; its backward is NaN
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def test_training_layout_has_no_fully_masked_rows_so_such_kernels_give_finite_gradients(tiny_model_dir, monkeypatch):
    """The packed layout (the student's pass on accelerators) under an attention that turns fully masked rows
    into NaN gradients: finite gradients, while the same rows left-padded get NaN from that attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import promptbake.rollout
    from promptbake.models import load_model

    AttentionInterface.register("nan_backward_test", _attention_with_nan_backward_on_empty_rows)
    AttentionMaskInterface.register("nan_backward_test", sdpa_mask)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "k_proj"],
                                                                 init_lora_weights=False))
    model.set_attn_implementation("nan_backward_test")
    prompts = [[1, 5, 6, 7, 11, 12], [1, 8]]
    ids_BT = torch.tensor([[20, 21, EOS], [30, 31, 32]])
    rollout = Rollout(ids_BT, mask_after_eos(ids_BT, [EOS]))
    lora = [p for p in model.parameters() if p.requires_grad]

    def grads(logits_BTV):
        model.zero_grad()
        logits_BTV.float().log_softmax(-1).mean().backward()
        return torch.cat([p.grad.flatten() for p in lora])

    packed = grads(packed_response_logits(model, prompts, rollout, pad_id=0))
    assert torch.isfinite(packed).all() and packed.abs().sum() > 0
    monkeypatch.setattr(promptbake.rollout, "PACKED_LAYOUT", False)
    left = response_logits(model, prompts, rollout, pad_id=0)
    assert torch.isfinite(left).all()  # the forward (and so the loss) is finite ...
    assert not torch.isfinite(grads(left)).all()  # ... and the gradient is not: what the packed layout avoids


@pytest.fixture
def peft_tiny(tiny_model_dir):
    from promptbake.models import load_model

    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(load_model(tiny_model_dir), lora)


def _queries():
    texts = ["What is two plus two?", "Name a colour.", "Why is the sea salty and the sky blue?"]
    return [Query(i, [{"role": "user", "content": t}]) for i, t in enumerate(texts)]


@pytest.mark.parametrize("attention", ["promptbake_cpu_decode", "sdpa"])
def test_teacher_prefix_cache_equals_uncached_forward(peft_tiny, tiny, attention):
    """The prompt's keys and values computed once: attended as one shared copy (our CPU attention) or
    expanded into every row's cache (SDPA, as on CUDA); both equal the plain forward."""
    _, tok = tiny
    peft_tiny.get_base_model().set_attn_implementation(attention)
    renderer = ChatRenderer.for_tokenizer(tok, "You are a careful assistant. " * 20, 8192)
    queries = _queries()
    rollout = Rollout(torch.tensor([[40, 41, 42, EOS], [50, EOS, 0, 0], [60, 61, 62, 63]]),
                      torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))
    cached = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False, prefix_cache=True)
    plain = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False, prefix_cache=False)
    cached.prepare(queries, 16, "test")
    plain.prepare(queries, 16, "test")
    assert len(cached.prefix_ids) > 100 and plain.prefix_ids == []
    a = cached.logits(queries, rollout)
    b = plain.logits(queries, rollout)
    mask = rollout.response_mask_BT.bool()
    assert (a - b).abs()[mask].max() < 1e-4
    # The prefix stops before any query text and the adapter is off for the teacher.
    assert tok.decode(cached.prefix_ids).rstrip().endswith("user")
    with peft_tiny.disable_adapter(), torch.no_grad():
        ids = renderer.teacher_ids(queries[0].messages)
        ref = peft_tiny(input_ids=torch.tensor([ids + rollout.response_ids_BT[0].tolist()])).logits[0, len(ids) - 1: len(ids) + 3]
    torch.testing.assert_close(a[0], ref, atol=1e-4, rtol=1e-4)  # peft_tiny is built per test: nothing to reset


def test_rollout_engine_bf16_copy_matches_peft_model_under_autocast(peft_tiny):
    engine = HFRolloutEngine(peft_tiny, bf16=True)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = peft_tiny(input_ids=ids).logits.float()
        got = engine.model(input_ids=ids).logits.float()
        with peft_tiny.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref_base = peft_tiny(input_ids=ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got - ref_base).abs().max() > (got - ref).abs().max()  # the LoRA delta really is merged
    engine.sync(with_adapter=False)
    with torch.no_grad():
        base_got = engine.model(input_ids=ids).logits.float()
    assert (base_got - ref_base).abs().max() < 0.05 * ref_base.abs().max()


def test_rollout_engine_shares_the_students_bf16_output_layer(tiny_model_dir, monkeypatch):
    """With the student's output layer stored in bf16, the sampler reads that tensor instead of a copy of its own,
    and samples exactly what a sampler with its own copy samples, through weight updates."""
    import copy

    import promptbake.runtime
    from promptbake.models import load_model
    from promptbake.runtime import store_frozen_linears_in_bf16

    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    own_copy = get_peft_model(load_model(tiny_model_dir), lora)
    shared = copy.deepcopy(own_copy)
    store_frozen_linears_in_bf16(shared)
    monkeypatch.setattr(promptbake.runtime, "BF16_OUTPUT_LAYER", False)  # the same projections in bf16, output tied fp32
    store_frozen_linears_in_bf16(own_copy)
    assert own_copy.get_output_embeddings().weight.dtype == torch.float32
    engines = [HFRolloutEngine(own_copy, bf16=True), HFRolloutEngine(shared, bf16=True)]
    out = shared.get_output_embeddings().weight
    out_before = out.detach().clone()
    table = engines[1].model.get_input_embeddings().weight
    assert table.data_ptr() == out.data_ptr() and table is engines[1].model.get_output_embeddings().weight
    assert engines[0].model.get_input_embeddings().weight.data_ptr() != own_copy.get_input_embeddings().weight.data_ptr()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9, 8]]
    for update in range(2):
        if update:
            with torch.no_grad():
                for model in (own_copy, shared):
                    for name, p in model.named_parameters():
                        if "lora_B" in name:
                            p.add_(0.25)
            for engine in engines:
                engine.sync()
        drawn = []
        for engine in engines:
            torch.manual_seed(7)
            drawn.append(engine.sample(prompts, max_new_tokens=6, temperature=1.0, eos_ids=[], pad_id=0).response_ids_BT)
        assert torch.equal(drawn[0], drawn[1])
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        logits = [engine.model(input_ids=ids).logits for engine in engines]
    assert torch.equal(logits[0], logits[1])
    assert shared.get_output_embeddings().weight is out and torch.equal(out, out_before)  # syncs never wrote into it


def test_rollout_engine_follows_weight_updates(peft_tiny):
    engine = HFRolloutEngine(peft_tiny, bf16=True)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        before = engine.model(input_ids=ids).logits.float()
        for name, p in peft_tiny.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        stale = engine.model(input_ids=ids).logits.float()
        engine.sync()
        after = engine.model(input_ids=ids).logits.float()
    torch.testing.assert_close(before, stale)
    assert (after - before).abs().max() > 0.1


def test_generate_ids_batches_by_length_but_returns_prompt_order(peft_tiny, tiny):
    from promptbake.measure import generate_ids

    _, tok = tiny
    engine = HFRolloutEngine(peft_tiny, bf16=False)
    prompts = [list(range(100, 100 + n)) for n in (9, 3, 14, 5, 11)]
    one_by_one = generate_ids(engine, tok, prompts, adapter=True, max_new_tokens=6, batch_size=1)
    batched = generate_ids(engine, tok, prompts, adapter=True, max_new_tokens=6, batch_size=2)
    assert batched == one_by_one and len(batched) == 5
    assert one_by_one[0] == generate_ids(engine, tok, prompts[:1], adapter=True, max_new_tokens=6, batch_size=1)[0]


def test_frozen_linears_in_bf16_give_the_autocast_numbers(tiny_model_dir):
    """bf16 storage of the frozen projections: same logits and LoRA gradients as fp32 weights under autocast."""
    import copy

    from promptbake.runtime import store_frozen_linears_in_bf16
    from promptbake.models import load_model

    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    fp32 = get_peft_model(load_model(tiny_model_dir), lora)
    half = copy.deepcopy(fp32)
    cast = store_frozen_linears_in_bf16(half)
    layer = half.base_model.model.model.layers[0].self_attn.q_proj
    assert cast > 0 and layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    assert fp32.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    # the tied output layer gets its own bf16 weight; the lookup table stays fp32
    assert fp32.get_output_embeddings().weight is fp32.get_input_embeddings().weight
    assert half.get_output_embeddings().weight.dtype == torch.bfloat16 and not half.get_output_embeddings().weight.requires_grad
    assert half.get_input_embeddings().weight.dtype == torch.float32

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    grads = []
    for model in (fp32, half):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits.float()
        logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
        if model is fp32:
            reference = logits.detach()
    torch.testing.assert_close(logits.detach(), reference, atol=1e-5, rtol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


def test_kl_to_teacher_scored_in_sub_batches_equals_row_by_row(peft_tiny, tiny):
    """Scoring a sampled chunk a few rows at a time changes memory, not the numbers (reference: one row at a time)."""
    from promptbake.measure import kl_to_teacher

    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a careful assistant.", 8192)
    queries = _queries() * 3
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False)
    teacher.prepare(queries, 12, "test")
    engine = HFRolloutEngine(peft_tiny, bf16=False)
    kw = dict(adapter=True, max_new_tokens=12, temperature=1.0, seed=3, bf16=False, batch_size=9)
    grouped = kl_to_teacher(peft_tiny, engine, teacher, renderer, tok, queries, score_batch_size=4, **kw)
    single = kl_to_teacher(peft_tiny, engine, teacher, renderer, tok, queries, score_batch_size=1, **kw)
    assert grouped.tokens == single.tokens and len(grouped.per_query) == 9
    assert max(grouped.per_query) > 0
    assert grouped.per_query == pytest.approx(single.per_query, abs=1e-5)


def test_kl_to_teacher_shows_each_answer_with_its_kls_and_both_models_stop_probabilities(peft_tiny, tiny):
    """`on_answer` sees every sampled answer: its per-token KLs average to the answer's KL, and the stop probabilities
    are the summed end-of-turn probabilities of the policy and of the prompted teacher, read back one row at a time."""
    from promptbake.measure import kl_to_teacher
    from promptbake.rollout import adapter_enabled, eos_token_ids, response_logits

    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a careful assistant.", 8192)
    queries = _queries()
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False)
    teacher.prepare(queries, 12, "test")
    engine = HFRolloutEngine(peft_tiny, bf16=False)
    seen = []
    result = kl_to_teacher(peft_tiny, engine, teacher, renderer, tok, queries, adapter=True, max_new_tokens=12,
                           temperature=1.0, seed=3, bf16=False, on_answer=lambda *a: seen.append(a))
    assert [a[0] for a in seen] == queries
    eos = eos_token_ids(tok)
    for (query, ids, kls, stops), kl in zip(seen, result.per_query):
        assert len(ids) == len(kls) == len(stops) > 0
        assert sum(kls) / len(kls) == pytest.approx(kl, abs=1e-6)
        row = Rollout(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        with torch.no_grad(), adapter_enabled(peft_tiny, True):
            policy_TV = torch.softmax(response_logits(peft_tiny, [renderer.student_ids(query.messages)], row,
                                                      tok.pad_token_id)[0].float(), -1)
            teacher_TV = torch.softmax(teacher.logits([query], row)[0].float(), -1)
        want = list(zip(policy_TV[:, eos].sum(-1).tolist(), teacher_TV[:, eos].sum(-1).tolist()))
        # an untrained tiny model puts about 1/vocabulary on stopping: compare relative to that
        torch.testing.assert_close(torch.tensor(stops), torch.tensor(want), rtol=2e-5, atol=1e-10)


def test_teacher_sampled_logprobs_are_its_logits_at_the_sampled_tokens(peft_tiny, tiny):
    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are terse.", 8192)
    queries = _queries()
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False)
    teacher.prepare(queries, 16, "test")
    rollout = Rollout(torch.tensor([[40, 41, 42, EOS], [50, EOS, 0, 0], [60, 61, 62, 63]]),
                      torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))
    got_BT = teacher.sampled_logprobs(queries, rollout, temperature=0.8)
    logp_BTV = torch.log_softmax(teacher.logits(queries, rollout).float() / 0.8, -1)
    want_BT = logp_BTV.gather(-1, rollout.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    assert got_BT.shape == (3, 4)
    torch.testing.assert_close(got_BT, want_BT)


def test_prefill_groups_bound_the_padding_and_cover_every_row():
    from promptbake.rollout import prefill_groups

    lengths = [80, 1060, 75, 300, 86, 290, 81, 600, 79]
    groups = prefill_groups(lengths, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * real
    assert [sorted(lengths[i] for i in g) for g in groups][0] == [75, 79, 80, 81, 86]  # similar lengths stay together
    assert prefill_groups([50] * 8) == [list(range(8))]


@pytest.mark.parametrize("shared", [0, 20])
def test_grouped_prefill_gives_the_padded_batch_numbers(tiny_model_dir, shared, monkeypatch):
    """Prompts of very different lengths are prefilled in groups and merged into one left-padded cache: every
    row's tokens and the first step's logits match one padded pass (float64: no rounding differences)."""
    import promptbake.rollout as rollout_module
    from promptbake.fastdecode import use_fast_decode
    from promptbake.models import load_model

    model = load_model(tiny_model_dir).double()
    use_fast_decode(model)
    g = torch.Generator().manual_seed(1)
    prefix = list(range(300, 300 + shared))
    prompts = [prefix + torch.randint(2, 40000, (n,), generator=g).tolist() for n in (3, 40, 4, 90, 41, 5)]
    assert len(rollout_module.prefill_groups([len(p) - shared for p in prompts])) > 2
    outs = []
    for padding in (0.25, 1e9):  # grouped, then everything in one padded pass
        monkeypatch.setattr(rollout_module, "PREFILL_PADDING", padding)
        torch.manual_seed(5)
        outs.append(sample(model, prompts, max_new_tokens=12, temperature=1.0, eos_ids=[EOS], pad_id=0))
    assert torch.equal(outs[0].response_ids_BT, outs[1].response_ids_BT)


def test_auto_precision_wants_bf16_instructions_not_just_avx512(monkeypatch):
    """torch reports "AVX512" both for CPUs with bf16 instructions and for an Intel Xeon without them, where bf16
    training matmuls ran at 0.31x fp32; `auto` must follow the instructions, not the capability level."""
    from promptbake import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert runtime.use_bf16("auto", cpu) is expected, (avx512_bf16, amx)
        assert runtime.use_bf16("bf16", cpu) and not runtime.use_bf16("fp32", cpu)  # explicit settings win
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.use_bf16("auto", cpu)  # a torch without the checks: its capability level decides
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not runtime.use_bf16("auto", cpu)


def test_unknown_precision_is_an_error_not_a_silent_fp32():
    """A library caller's typo ('bf-16') used to fall through to fp32 and change what a run measured."""
    from promptbake.errors import PromptbakeError
    from promptbake.runtime import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    with pytest.raises(PromptbakeError, match="precision must be one of auto, bf16, fp32, got 'bf-16'"):
        use_bf16("bf-16", cpu)
