"""The training loop on the tiny model: micro-batching does not change the math; seeded runs repeat."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from conftest import write_prompt
from promptbake import compile_prompt
from promptbake.train import micro_batches, teacher_spans


def test_micro_batches_group_by_length_and_cover_all_rows():
    groups = micro_batches([50, 10, 40, 20, 30], 2)
    assert groups == [[1, 3], [4, 2], [0]]
    assert sorted(i for g in groups for i in g) == list(range(5))


def test_step_queries_train_every_query_once_per_epoch_and_depend_on_the_step_alone():
    from promptbake.train import step_queries

    queries = [f"q{i}" for i in range(10)]
    batches = [step_queries(queries, 3, seed=7, step=s) for s in range(1, 7)]  # three batches an epoch, one query left
    for epoch in (batches[:3], batches[3:]):
        seen = [q for batch in epoch for q in batch]
        assert len(seen) == 9 and len(set(seen)) == 9
    assert [q for b in batches[:3] for q in b] != [q for b in batches[3:] for q in b]  # a fresh order each epoch
    assert step_queries(queries, 3, seed=7, step=5) == batches[4]  # a resumed compile draws what the first one would
    assert step_queries(queries, 3, seed=8, step=1) != batches[0]
    counts = {q: 0 for q in queries}
    for s in range(1, 301):  # 100 epochs: each query is left out of some, but trained about as often as any other
        for q in step_queries(queries, 3, seed=7, step=s):
            counts[q] += 1
    assert sum(counts.values()) == 900 and max(counts.values()) <= 100 and min(counts.values()) >= 75


def test_micro_batches_stop_at_the_token_budget_and_keep_one_row_past_it():
    lengths = [60, 58, 140, 61, 139, 600, 59, 62]
    groups = micro_batches(lengths, 8, 256)
    assert groups == [[1, 6, 0, 3], [7], [4], [2], [5]]  # 4 x 61 fits 256; 5 x 62 does not; 600 alone
    assert all(len(g) * max(lengths[i] for i in g) <= 256 for g in groups if len(g) > 1)
    assert micro_batches(lengths, 2, 10_000) == micro_batches(lengths, 2)  # rows bind, not tokens
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_teacher_spans_group_consecutive_micro_batches_within_the_logits_budget(monkeypatch):
    import promptbake.train as train

    monkeypatch.setattr(train, "TEACHER_SCORING_BYTES", 4 * 10 * 100 * 2)  # four rows of width 10, vocabulary 100, bf16
    # Two rows each: a span takes the next micro-batch while rows x widest width x vocab x bytes stays within budget.
    assert teacher_spans([2, 2, 2, 2], [10, 10, 10, 10], 100, 2) == [[0, 1], [2, 3]]
    assert teacher_spans([2, 2, 2], [5, 10, 10], 100, 2) == [[0, 1], [2]]
    assert teacher_spans([2, 2, 2], [10, 10, 10], 100, 4) == [[0], [1], [2]]  # fp32 logits: twice the bytes
    assert teacher_spans([1, 1, 1, 1, 1], [10, 10, 10, 10, 20], 100, 2) == [[0, 1, 2, 3], [4]]
    assert teacher_spans([8], [50], 100, 2) == [[0]]  # over budget alone: still scored, by itself


def _two_compiles(monkeypatch, tmp_path, tiny_model_dir, prompt, constant: str, values, recorded: list, **overrides):
    """Two-step compiles of the tiny model with the layers' term, one per value of the module constant
    `promptbake.train.<constant>`; their logs, and what `recorded` held after each (cleared before each)."""
    import promptbake.train as train

    logs, seen = [], []
    for value in values:
        monkeypatch.setattr(train, constant, value)
        recorded.clear()
        result = compile_prompt(prompt, out=tmp_path / f"out-{constant}-{value}", model=str(tiny_model_dir),
                                overrides=dict(steps=2, batch_size=6, micro_batch_size=2, heldout=0, max_new_tokens=8,
                                               precision="fp32", hidden_match_weight=30.0, **overrides))
        logs.append(result.train.log)
        seen.append(list(recorded))
    return logs, seen


def _assert_same_training(logs_a, logs_b) -> None:
    """The same tokens, KL, layers' distance and gradient norm at every step."""
    assert len(logs_a) == len(logs_b)
    for a, b in zip(logs_a, logs_b):
        assert a.response_tokens == b.response_tokens
        assert a.kl == pytest.approx(b.kl, rel=1e-5)
        assert a.hidden_distance > 0 and a.hidden_distance == pytest.approx(b.hidden_distance, rel=1e-4)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


@pytest.mark.parametrize("query", [False, True])
def test_teacher_scoring_several_micro_batches_at_once_changes_nothing(tmp_path, tiny_model_dir, monkeypatch, query):
    """Micro-batches scored by the teacher in one call (the default's span) or one call each: the same KL, layers'
    distance and gradient over two steps, with the layers' term at the response and (`query`) at the user turn, on
    queries of different lengths. The number of teacher calls shows that both paths ran."""
    import promptbake.teacher as teacher_module

    prompt = write_prompt(tmp_path / "p")
    (tmp_path / "p" / "queries.txt").write_text("".join(f"Question {i}:{' why' * (i % 7)} is {i} odd?\n" for i in range(40)))
    calls = []
    original = teacher_module.PromptedTeacher.logits

    def counted(self, queries, rollout, left_padded=False):
        calls.append(len(queries))
        return original(self, queries, rollout, left_padded)

    monkeypatch.setattr(teacher_module.PromptedTeacher, "logits", counted)
    # Every micro-batch alone; all of a step's micro-batches in one call.
    logs, calls_per_run = _two_compiles(monkeypatch, tmp_path, tiny_model_dir, prompt, "TEACHER_SCORING_BYTES",
                                        (0, 2**30), calls, hidden_match_query=query)
    assert calls_per_run == [[2, 2, 2, 2, 2, 2], [6, 6]]
    _assert_same_training(*logs)


@pytest.mark.parametrize("updates", [1, 2])
def test_the_student_prefix_run_once_changes_nothing(tmp_path, tiny_model_dir, monkeypatch, updates):
    """The student's rows share the chat template's first tokens: run once per update (`SHARE_STUDENT_PREFIX`) or in
    every row, two steps give the same KL, layers' distance and gradient norm, with one update per step or two. The
    prefix ran in every update of the shared runs and in none of the others."""
    import promptbake.train as train

    prompt = write_prompt(tmp_path / "p")
    lengths = []
    original = train.trainable_prefix

    def counted(model, prompts):
        prefix = original(model, prompts)
        lengths.append(prefix.length if prefix is not None else 0)
        return prefix

    monkeypatch.setattr(train, "trainable_prefix", counted)
    logs, runs = _two_compiles(monkeypatch, tmp_path, tiny_model_dir, prompt, "SHARE_STUDENT_PREFIX", (True, False),
                               lengths, updates_per_batch=updates)
    assert len(runs[0]) == 2 * updates and min(runs[0]) >= 16 and runs[1] == []
    _assert_same_training(*logs)


@pytest.mark.parametrize("kl", ["full", "topk", "sampled"])
def test_micro_batch_size_does_not_change_loss_or_gradient(tmp_path, tiny_model_dir, kl):
    prompt = write_prompt(tmp_path / "p")
    logs = []
    for micro in (1, 8):
        result = compile_prompt(
            prompt, out=tmp_path / f"out{micro}", model=str(tiny_model_dir),
            overrides=dict(steps=1, batch_size=8, micro_batch_size=micro, heldout=0, max_new_tokens=10,
                           precision="fp32", kl=kl, topk=64),
        )
        logs.append(result.train.log[0])
    a, b = logs
    assert a.response_tokens == b.response_tokens
    assert a.kl == pytest.approx(b.kl, rel=1e-4)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-3)


@pytest.mark.parametrize("method, mode", [("offpolicy", "frozen"), ("sft", "frozen"), ("opcd", "live")])
def test_methods_and_teacher_modes_train(tmp_path, tiny_model_dir, method, mode, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    prompt = write_prompt(tmp_path / "p")
    overrides = dict(steps=2, batch_size=4, heldout=4, max_new_tokens=8, method=method, teacher_mode=mode, precision="fp32")
    result = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides=overrides)
    assert [e.step for e in result.train.log] == [1, 2]
    assert result.manifest.config["method"] == method and result.manifest.heldout_kl_after is not None
    if method != "opcd":
        cached = list((tmp_path / "home" / "teacher_samples").glob("*.json"))
        assert len(cached) == 1  # the teacher's responses are sampled once and reused
        again = compile_prompt(prompt, out=tmp_path / "out2", model=str(tiny_model_dir), overrides=overrides)
        assert again.train.log[0].kl == pytest.approx(result.train.log[0].kl)


def test_teacher_sample_steps_train_opcd_on_the_teachers_answers_first(tmp_path, tiny_model_dir, monkeypatch):
    """The first teacher_sample_steps train on the teacher's cached answers with opcd's own loss, then the student
    samples. A batch of every query makes a step's tokens those of all the teacher's answers, whatever the order."""
    from promptbake.config import BakeConfig

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    prompt = write_prompt(tmp_path / "p", queries=8)
    overrides = dict(steps=3, teacher_sample_steps=2, batch_size=8, heldout=0, max_new_tokens=8, precision="fp32")
    result = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides=overrides)
    (cached,) = (tmp_path / "home" / "teacher_samples").glob("*.json")
    answers = json.loads(cached.read_text())  # query id -> the teacher's answers (token ids)
    teacher_tokens = sum(len(r) for rs in answers.values() for r in rs)
    log = result.train.log
    assert [e.on_teacher_samples for e in log] == [True, True, False]
    assert log[0].response_tokens == log[1].response_tokens == teacher_tokens
    assert {e.loss for e in log} == {"mixed_kl_full_w0.5"}  # opcd's loss throughout, only the samples change
    summary = result.train.summary()
    assert summary["rollouts"] == 8  # the student's rollouts alone: the cap-hit fraction is about its answers
    plain = compile_prompt(prompt, out=tmp_path / "plain", model=str(tiny_model_dir),
                           overrides={**overrides, "teacher_sample_steps": 0})
    assert not any(e.on_teacher_samples for e in plain.train.log)
    assert plain.train.log[0].kl != pytest.approx(log[0].kl)
    for bad, message in [(dict(method="sft"), "needs method opcd"), (dict(teacher_mode="live"), "teacher_mode frozen"),
                         (dict(steps=2), "leaves no step of the 2")]:
        with pytest.raises(ValueError, match=message):
            BakeConfig(teacher_sample_steps=2, **bad)


def test_cross_size_teacher_sharing_the_tokenizer(tmp_path, tiny_model_dir):
    """A deeper model built from the same config and tokenizer teaches the tiny student."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher_dir = tmp_path / "teacher"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, teacher_dir / f.name)
    prompt = write_prompt(tmp_path / "p")
    result = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), teacher=str(teacher_dir),
                            overrides=dict(steps=2, batch_size=4, heldout=4, max_new_tokens=8))
    assert result.manifest.teacher_model == str(teacher_dir)
    assert result.manifest.heldout_kl_before > 0


@pytest.mark.parametrize("hidden_match_weight", [0.0, 30.0])
def test_torch_compile_gives_the_eager_loss_and_gradient(tmp_path, tiny_model_dir, hidden_match_weight):
    """Compiling the decoder layers changes speed, not the math: same per-step KL and gradient norm as eager, also
    when the layers' outputs are read by hooks inside the compiled code (hidden_match_weight).

    Both train their first two steps on the same fixed answers (the teacher's, `teacher_sample_steps`), which are
    compared; the third samples its own. Sampled answers would not compare,
    since a compiled sampler rounds differently and a draw that lands within rounding of a token boundary takes the
    neighbouring token (benchmarks/decode_agreement.py). The compiled sampler is checked on its own logits below."""
    prompt = write_prompt(tmp_path / "p")
    logs = []
    for compiled in (False, True):
        result = compile_prompt(
            prompt, out=tmp_path / f"out{compiled}", model=str(tiny_model_dir),
            overrides=dict(steps=3, batch_size=4, heldout=0, max_new_tokens=10, precision="fp32", torch_compile=compiled,
                           hidden_match_weight=hidden_match_weight, teacher_sample_steps=2),
        )
        logs.append(result.train.log)
    eager, compiled = logs
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager[:2], compiled[:2]):
        assert a.response_tokens == b.response_tokens
        # fused kernels reorder fp32 sums: KLs near 1e-3 agree to ~1e-6 absolute, not to 1e-4 relative
        assert a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-3)
        assert a.hidden_distance == (pytest.approx(b.hidden_distance, rel=1e-3) if hidden_match_weight else None)


def test_fp32_compile_samples_with_the_eager_steps_logits(tmp_path, tiny_model_dir, monkeypatch):
    """Inside an fp32 compiled training run (the policy's layers compiled for the training pass too), the decode step
    compiled through the policy gives the eager step's logits on the same inputs, at every sampling call, after
    optimizer steps as well; a stale or wrong graph would be far off. Each call's batch is drawn twice from one random
    state, eagerly and compiled, and compared while both were fed the same tokens."""
    import promptbake.rollout as rollout
    from benchmarks.decode_agreement import sampling_twice

    monkeypatch.setattr(rollout, "COMPILE_POLICY_DECODING", True)
    compared: list[dict] = []
    monkeypatch.setattr(rollout, "sample_static", sampling_twice(compared))
    result = compile_prompt(write_prompt(tmp_path / "p"), out=tmp_path / "out", model=str(tiny_model_dir),
                            overrides=dict(steps=3, batch_size=4, heldout=0, max_new_tokens=10, precision="fp32",
                                           torch_compile=True))
    assert len(result.train.log) == 3 and len(compared) == 3  # every step sampled through the compiled step
    for call in compared:
        assert call["decode_steps_agreed"] >= 1 and call["logit_scale"] > 0.1
        # rounding: 2.4e-7 to 2.7e-7 measured on AVX2 (logits up to 1.25)
        assert call["max_abs_logit_diff"] <= 1e-5 * max(1.0, call["logit_scale"])


def test_bf16_compile_samples_through_the_compiled_decode_step(tmp_path, tiny_model_dir, monkeypatch):
    """In bf16 on a CPU the sampler's merged copy decodes through a compiled static-cache step while training:
    the compile says so and trains on finite losses, and records that torch's cache now holds this model's graphs.
    No graph is traced twice: torch's default traces Python floats (LoRA scaling) as symbols and then restarts the
    whole trace to specialise them, which training avoids by specialising them from the start."""
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics
    from transformers import AutoConfig

    from promptbake.compile_cache import cache_is_warm, compile_key
    from promptbake.events import TrainingStarted

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    key = compile_key(AutoConfig.from_pretrained(tiny_model_dir), bf16=True)
    assert not cache_is_warm(key)
    prompt = write_prompt(tmp_path / "p")
    said = []
    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    clear_compilation_metrics()
    result = compile_prompt(
        prompt, out=tmp_path / "out", model=str(tiny_model_dir), on_event=said.append,
        overrides=dict(steps=2, batch_size=4, heldout=0, max_new_tokens=10, precision="bf16", torch_compile=True),
    )
    compiles = get_compilation_metrics()
    assert compiles
    assert not [r for c in compiles for r in (c.restart_reasons or ()) if "Tensorify" in r]
    started = [e.message for e in said if isinstance(e, TrainingStarted)]
    assert started and "decoder layers, decode step and loss compiled" in started[0]
    assert len(result.train.log) == 2
    for entry in result.train.log:
        assert 4 <= entry.response_tokens <= 40 and math.isfinite(entry.kl) and math.isfinite(entry.grad_norm)
    assert cache_is_warm(key)


def test_compiled_blocks_are_the_decoder_layers_and_eager_again_afterwards(tiny):
    from promptbake.train import compiled_blocks, repeated_blocks

    model, _ = tiny
    blocks = repeated_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    with compiled_blocks(model, True):
        assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in blocks)


def test_an_activation_budget_keeps_less_for_the_backward_and_the_same_gradients(tiny_model_dir):
    """Compiled layers at a low `activation_memory_budget` hold fewer bytes for their backward pass than at torch's
    default partition (they recompute the rest there), and the LoRA gradients come out the same: recomputing runs the
    same operations again. Weights the backward reads are not activations and are not counted."""
    import torch._functorch.config

    from promptbake.config import BakeConfig
    from promptbake.models import load_model
    from promptbake.runtime import make_student
    from promptbake.train import SPECIALIZE_FLOATS, compiled_blocks

    low = 0.1
    torch.manual_seed(0)
    policy = make_student(load_model(tiny_model_dir), BakeConfig())
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # zero at init: give the branches something to differentiate
            torch.nn.init.normal_(p, std=0.02)
    policy.train()
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    ids_BT = torch.randint(0, policy.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    saved_bytes, grads = {}, {}
    for budget in (1.0, low):
        torch._dynamo.reset()
        policy.zero_grad()
        held: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                held[storage.data_ptr()] = storage.nbytes()
            return t

        with torch._dynamo.config.patch(specialize_float=SPECIALIZE_FLOATS), \
                torch._functorch.config.patch(activation_memory_budget=budget), compiled_blocks(policy, True):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                hidden_BTD = policy(input_ids=ids_BT, use_cache=False, output_hidden_states=True).hidden_states[-1]
            (hidden_BTD.float() ** 2).mean().backward()
        saved_bytes[budget] = sum(held.values())
        grads[budget] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert saved_bytes[low] < 0.8 * saved_bytes[1.0]
    assert grads[1.0].keys() == grads[low].keys() and grads[1.0]
    for name, g in grads[1.0].items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads[low][name], g, rtol=1e-4, atol=1e-6)


def test_learning_rate_schedules():
    from promptbake.config import BakeConfig
    from promptbake.train import lr_factor

    constant = BakeConfig(steps=10, warmup_steps=2)
    assert [lr_factor(s, constant) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = BakeConfig(steps=10, lr_schedule="cosine")
    factors = [lr_factor(s, cosine) for s in range(10)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.5) and 0 < factors[-1] < 0.03
    assert all(a > b for a, b in zip(factors, factors[1:]))  # decays every step
    wsd = BakeConfig(steps=10, lr_schedule="wsd")
    factors = [lr_factor(s, wsd) for s in range(10)]
    assert factors[:8] == [1.0] * 8 and factors[8] == pytest.approx(2 / 3) and factors[9] == pytest.approx(1 / 3)
    assert [lr_factor(s, BakeConfig(steps=80, lr_schedule="wsd")) for s in range(80)].count(1.0) == 64
    with pytest.raises(ValueError):
        BakeConfig(lr_schedule="linear")


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_training(tmp_path, tiny_model_dir, monkeypatch):
    """Recomputing activations in the backward pass changes memory, not the math: same KL, gradient norm and
    adapter; and it does recompute (each decoder layer runs twice as often with gradients on)."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import promptbake.train as train

    calls = {"grad": 0}
    original = LlamaDecoderLayer.forward

    def counted(self, *args, **kwargs):
        calls["grad"] += torch.is_grad_enabled()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    # The shared student prefix runs without checkpointing only; off in both runs, the layers' calls compare.
    monkeypatch.setattr(train, "SHARE_STUDENT_PREFIX", False)
    prompt = write_prompt(tmp_path / "p")
    logs, adapters, grad_calls = [], [], []
    for recompute in (False, True):
        calls["grad"] = 0
        result = compile_prompt(
            prompt, out=tmp_path / f"out{recompute}", model=str(tiny_model_dir),
            overrides=dict(steps=2, batch_size=4, micro_batch_size=2, heldout=0, max_new_tokens=10, precision="fp32",
                           gradient_checkpointing=recompute),
        )
        logs.append(result.train.log)
        adapters.append(load_file(tmp_path / f"out{recompute}" / "adapter_model.safetensors"))
        grad_calls.append(calls["grad"])
    assert grad_calls[1] == 2 * grad_calls[0] > 0
    for a, b in zip(*logs):
        assert a.response_tokens == b.response_tokens
        assert a.kl == pytest.approx(b.kl, rel=1e-6)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], rtol=1e-5, atol=1e-7)


def test_loraplus_moves_the_b_matrices_ratio_times_faster(tmp_path, tiny_model_dir):
    """LoRA B starts at zero, so step 1's AdamW update of every B entry is about +-lr (Adam normalises the
    gradient); with loraplus_lr_ratio the B matrices take `ratio` times that step, and A still has none."""
    from safetensors.torch import load_file

    prompt = write_prompt(tmp_path / "p")
    largest = {}
    for ratio in (None, 4.0):
        compile_prompt(prompt, out=tmp_path / f"out{ratio}", model=str(tiny_model_dir),
                       overrides=dict(steps=1, batch_size=4, heldout=0, max_new_tokens=8, precision="fp32", lr=1e-3,
                                      weight_decay=0.0, loraplus_lr_ratio=ratio))
        weights = load_file(tmp_path / f"out{ratio}" / "adapter_model.safetensors")
        largest[ratio] = max(float(w.abs().max()) for name, w in weights.items() if "lora_B" in name)
    assert largest[None] == pytest.approx(1e-3, rel=0.05)
    assert largest[4.0] == pytest.approx(4e-3, rel=0.05)


def test_forward_kl_weight_reaches_the_training_loss(tmp_path, tiny_model_dir):
    """Same seed, so the same step-1 samples: the logged loss is named for the mix, and with w=1 the gradient is the
    forward KL's. The tiny model's prompted and unprompted distributions are close, where forward and reverse KL
    agree to second order, so the two differ only in the last digits (the losses' math is tested in test_losses). The
    layers' term is off: on the tiny model its gradient dwarfs the KL's (norm 27), which hid that difference."""
    prompt = write_prompt(tmp_path / "p")
    logs = {}
    for w in (0.0, 1.0):
        result = compile_prompt(prompt, out=tmp_path / f"out{w}", model=str(tiny_model_dir),
                                overrides=dict(steps=1, batch_size=4, heldout=0, max_new_tokens=8, precision="fp32",
                                               forward_kl_weight=w, hidden_match_weight=0.0))
        logs[w] = result.train.log[0]
        assert result.manifest.config["forward_kl_weight"] == w
    assert logs[0.0].loss == "reverse_kl_full" and logs[1.0].loss == "mixed_kl_full_w1"
    assert logs[0.0].response_tokens == logs[1.0].response_tokens
    assert logs[0.0].kl > 0 and logs[1.0].kl == pytest.approx(logs[0.0].kl, rel=0.05)
    assert logs[1.0].grad_norm != logs[0.0].grad_norm


def term_off_and_on(tmp_path, model_dir, field: str, on, off=0.0, max_new_tokens=8, batch_size=4, **fixed):
    """Two steps of the tiny model from one seed with the setting `field` at `off` (8 rows per micro-batch), and at `on`
    with 1 and with 8 rows per micro-batch: the three runs' step logs (off, split, whole). Every extra loss term not
    named in `fixed` is off (the default layers' term would dominate the gradient)."""
    prompt = write_prompt(tmp_path / "p")
    logs = []
    for value, micro in ((off, 8), (on, 1), (on, 8)):
        settings = {"future_kl_weight": 0.0, "hidden_match_weight": 0.0, **fixed, field: value}
        result = compile_prompt(prompt, out=tmp_path / f"out{value}-{micro}", model=str(model_dir),
                                overrides=dict(steps=2, batch_size=batch_size, micro_batch_size=micro, heldout=0,
                                               max_new_tokens=max_new_tokens, precision="fp32", **settings))
        assert result.manifest.config[field] == value
        logs.append(result.train.log)
    return logs


def test_future_kl_term_changes_the_gradient_not_the_logged_loss_and_micro_batching_keeps_it(tmp_path, tiny_model_dir):
    """Same seed, so the same step-1 samples: the logged loss is the per-token loss either way, the sequence-level
    term moves the gradient, and splitting the batch into micro-batches does not change it (its baseline is the
    previous step's loss, not the micro-batch's)."""
    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_model_dir, "future_kl_weight", 1.0)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.kl == pytest.approx(whole.kl, rel=1e-4) and split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert split_log[1].grad_norm == pytest.approx(whole_log[1].grad_norm, rel=1e-3)  # step 2: baseline = step 1's loss


def test_answer_average_changes_the_gradient_not_the_logged_loss_and_micro_batching_keeps_it(tmp_path,
                                                                                            tiny_stopping_model_dir):
    """Same seed, so the same step-1 samples of unequal lengths: the logged loss is the mean over tokens either way,
    averaging each answer first moves the gradient, and one row per micro-batch gives what eight do."""
    tokens_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_stopping_model_dir, "loss_average", "answers", off="tokens",
                                                        max_new_tokens=48, batch_size=8)
    tokens, split, whole = tokens_log[0], split_log[0], whole_log[0]
    assert tokens.response_tokens < 0.8 * 8 * 48  # many answers ended early, so the two averages differ
    assert tokens.response_tokens == whole.response_tokens and tokens.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.grad_norm != pytest.approx(tokens.grad_norm, rel=1e-3)
    assert split.kl == pytest.approx(whole.kl, rel=1e-4) and split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert split_log[1].kl == pytest.approx(whole_log[1].kl, rel=1e-3)


def test_hidden_match_term_changes_the_gradient_not_the_logged_loss_and_micro_batching_keeps_it(tmp_path, tiny_model_dir):
    """Same seed, so the same step-1 samples: the logged loss is the per-token KL either way, the layers' distance is
    logged beside it and moves the gradient, and one row per micro-batch gives what eight do."""
    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_model_dir, "hidden_match_weight", 30.0)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.hidden_distance is None and whole.hidden_distance > 0
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.hidden_distance == pytest.approx(whole.hidden_distance, rel=1e-4)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert split_log[1].grad_norm == pytest.approx(whole_log[1].grad_norm, rel=1e-3)


def test_prompt_lm_term_logs_the_students_cross_entropy_on_the_prompt_and_moves_the_gradient(tmp_path, tiny_model_dir):
    """Step 1's logged cross-entropy is the untrained student's on the prompt's text (the LoRA starts as a no-op),
    computed here token by token; the term moves the gradient, not the logged KL, and micro-batching keeps it."""
    from promptbake.models import load_model, load_tokenizer

    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_model_dir, "prompt_lm_weight", 1.0)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.prompt_ce is None
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3) and split.prompt_ce == pytest.approx(whole.prompt_ce)
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    ids = tokenizer("You are a pirate. Say ahoy.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    nats = [torch.logsumexp(logits[t], -1) - logits[t, ids[t + 1]] for t in range(len(ids) - 1)]
    assert whole.prompt_ce == pytest.approx(float(sum(nats) / len(nats)), rel=1e-4)
    assert whole_log[1].prompt_ce < whole.prompt_ce  # trained on it, the student predicts the prompt better


@pytest.fixture(scope="module")
def tiny_stopping_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with random end-of-turn rows of a larger scale (the embeddings are tied, so the output logits
    too). The tiny model's end-of-turn id is its padding id, whose row starts at zero: it stops with probability
    ~1/vocabulary everywhere; this one with a probability that depends on the context, so the prompt moves it."""
    from transformers import AutoModelForCausalLM

    from promptbake.models import load_tokenizer
    from promptbake.rollout import eos_token_ids

    out = tmp_path_factory.mktemp("tiny-stopping")
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight
        rows[eos_token_ids(tokenizer)] = torch.randn(len(eos_token_ids(tokenizer)), rows.shape[1],
                                                     generator=torch.Generator().manual_seed(0)) * 0.5
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_stop_term_logs_its_part_of_the_kl_and_moves_the_gradient(tmp_path, tiny_stopping_model_dir):
    """The stop-or-go KL is logged beside the per-token loss and is a part of it (so no larger, on the same step-1
    samples); it moves the gradient, not the logged loss, and one row per micro-batch gives what eight do."""
    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_stopping_model_dir, "stop_kl_weight", 30.0)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.stop_kl is None and 0 < whole.stop_kl < whole.kl
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.stop_kl == pytest.approx(whole.stop_kl, rel=1e-4)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)


def test_prompt_text_loss_in_chunks_gives_the_whole_prompts_value_and_gradient(tiny_model_dir):
    """A long prompt's cross-entropy runs in chunks (fp32 copies recomputed in the backward); value and LoRA gradient
    are those of one pass over the whole prompt, including a last chunk shorter than the others."""
    from peft import LoraConfig, get_peft_model

    from promptbake.models import load_model, load_tokenizer
    from promptbake.train import prompt_text_loss

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.tensor([tokenizer("You are a pirate. Say ahoy, and end every answer with a sea shanty line.",
                                  add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 8
    results = []
    for chunk in (10_000, 4):
        model.zero_grad()
        loss = prompt_text_loss(model, ids, bf16=False, chunk_tokens=chunk)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole, grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(whole, rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("field, on, off, fixed", [
    # dims: the scales are per row, so one row per micro-batch gives what eight do
    ("hidden_match_scale", "dims", "none", {}),
    # increments: what each layer adds, at the answer's and the user turn's tokens
    ("hidden_match_target", "increments", "states", {"hidden_match_query": True}),
])
def test_another_form_of_the_layers_term_moves_the_gradient_and_micro_batching_keeps_it(tmp_path, tiny_model_dir, field,
                                                                                       on, off, fixed):
    """hidden_match_scale dims and hidden_match_target increments: the same samples and KL as the plain layers' term,
    another distance and gradient; one row per micro-batch gives what eight do."""
    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_model_dir, field, on, off,
                                                      hidden_match_weight=30.0, **fixed)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert whole.hidden_distance > 0 and whole.hidden_distance != pytest.approx(plain.hidden_distance, rel=1e-3)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.hidden_distance == pytest.approx(whole.hidden_distance, rel=1e-4)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert split_log[1].grad_norm == pytest.approx(whole_log[1].grad_norm, rel=1e-3)


def test_hidden_match_query_adds_the_user_turn_to_the_gradient_and_micro_batching_keeps_it(tmp_path, tiny_model_dir):
    """hidden_match_query: the same samples, KL and logged (response tokens') distance as the layers' term alone, another
    gradient; one row per micro-batch gives what four do (its tokens are scaled by the part's response tokens)."""
    plain_log, split_log, whole_log = term_off_and_on(tmp_path, tiny_model_dir, "hidden_match_query", True, False,
                                                      hidden_match_weight=30.0)
    plain, split, whole = plain_log[0], split_log[0], whole_log[0]
    assert plain.response_tokens == whole.response_tokens and plain.kl == pytest.approx(whole.kl, rel=1e-6)
    assert plain.hidden_distance == pytest.approx(whole.hidden_distance, rel=1e-6)
    assert whole.grad_norm != pytest.approx(plain.grad_norm, rel=1e-3)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-3)
    assert split_log[1].grad_norm == pytest.approx(whole_log[1].grad_norm, rel=1e-3)
    from promptbake.config import BakeConfig

    with pytest.raises(ValueError, match="hidden_match_query"):
        BakeConfig(hidden_match_weight=0, hidden_match_query=True)


@pytest.mark.parametrize("query", [False, True])
def test_hidden_match_term_does_not_depend_on_the_students_layout(tmp_path, tiny_model_dir, monkeypatch, query):
    """On accelerators the student's training pass runs packed (each row from column 0), on CPUs left-padded; the
    layers are read at each layout's own response (and, with hidden_match_query, user-turn) positions, so the step's
    KL, distance and gradient agree."""
    import promptbake.rollout as rollout_module

    prompt = write_prompt(tmp_path / "p")
    (tmp_path / "p" / "queries.txt").write_text("".join(f"Question {i}:{' why' * (i % 5)} is {i} odd?\n" for i in range(40)))
    firsts = []
    for packed in (False, True):
        monkeypatch.setattr(rollout_module, "PACKED_LAYOUT", packed)
        result = compile_prompt(prompt, out=tmp_path / f"out-{packed}", model=str(tiny_model_dir),
                                overrides=dict(steps=1, batch_size=4, micro_batch_size=4, heldout=0, max_new_tokens=8,
                                               precision="fp32", hidden_match_weight=30.0, hidden_match_query=query))
        firsts.append(result.train.log[0])
    left, packed = firsts
    assert left.response_tokens == packed.response_tokens and left.kl == pytest.approx(packed.kl, rel=1e-5)
    assert left.hidden_distance > 0 and left.hidden_distance == pytest.approx(packed.hidden_distance, rel=1e-4)
    assert left.grad_norm == pytest.approx(packed.grad_norm, rel=1e-4)


def test_hidden_match_refuses_a_teacher_of_another_shape(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from promptbake.errors import PromptbakeError

    teacher_dir = tmp_path / "teacher"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, teacher_dir / f.name)
    prompt = write_prompt(tmp_path / "p")
    with pytest.raises(PromptbakeError, match="student's 2 layers of width 64 with the teacher's, which has 3"):
        compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), teacher=str(teacher_dir),
                       overrides=dict(steps=1, batch_size=4, heldout=0, max_new_tokens=8, hidden_match_weight=1.0))


def test_a_step_with_a_non_finite_gradient_is_skipped_and_three_in_a_row_stop(tmp_path, tiny_model_dir, monkeypatch):
    """Seen on an H200: a finite loss whose backward returned NaN. That step must leave the adapter (and Adam) as
    they were: two steps with the second skipped end where one step ends. Three in a row stop the compile."""
    from safetensors.torch import load_file

    prompt = write_prompt(tmp_path / "p")
    settings = dict(batch_size=4, heldout=0, max_new_tokens=8, precision="fp32")
    one = compile_prompt(prompt, out=tmp_path / "one", model=str(tiny_model_dir), overrides=dict(steps=1, **settings))
    monkeypatch.setenv("PROMPTBAKE_FAULT_AT", "nan_grad:2")
    two = compile_prompt(prompt, out=tmp_path / "two", model=str(tiny_model_dir), overrides=dict(steps=2, **settings))
    assert [e.skipped for e in two.train.log] == [False, True]
    assert two.train.log[1].grad_norm is None and math.isfinite(two.train.log[1].kl)  # read back from the log: null
    assert two.manifest.loss_summary["skipped_steps"] == [2]
    assert json.loads((tmp_path / "two" / "train_log.jsonl").read_text().splitlines()[1])["grad_norm"] is None
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # step 1 did train

    monkeypatch.setenv("PROMPTBAKE_FAULT_AT", "nan_grad:2,nan_grad:3,nan_grad:4")
    with pytest.raises(FloatingPointError, match="not finite at steps 2-4"):
        compile_prompt(prompt, out=tmp_path / "three", model=str(tiny_model_dir), overrides=dict(steps=5, **settings))
    assert not (tmp_path / "three").exists()


def test_updates_per_batch_makes_that_many_optimizer_updates_from_one_batch(tmp_path, tiny_model_dir):
    """Two updates from one round of sampling. Adam's first update moves every weight with a gradient by about lr
    (m/sqrt(v) = +-1), its second by about lr again where the two gradients agree in sign: LoRA's B matrices start
    at zero, so one update leaves them within lr of zero and two reach past 1.5 lr. At an lr too small to move the
    student, the step's logged loss is the same token mean as with one update: the parts are weighted by tokens."""
    from safetensors.torch import load_file

    from promptbake.config import BakeConfig
    from promptbake.train import update_parts

    assert update_parts(5, 2) == [[0, 1], [2, 3, 4]] and update_parts(4, 4) == [[0], [1], [2], [3]]
    prompt = write_prompt(tmp_path / "p")
    settings = dict(steps=1, batch_size=4, micro_batch_size=1, heldout=0, max_new_tokens=8, precision="fp32")
    logs, largest_b = {}, {}
    for lr in (1e-3, 1e-9):
        for k in (1, 2):
            out = tmp_path / f"k{k}-lr{lr}"
            result = compile_prompt(prompt, out=out, model=str(tiny_model_dir),
                                    overrides=dict(lr=lr, updates_per_batch=k, **settings))
            logs[k, lr] = result.train.log[0]
            weights = load_file(out / "adapter_model.safetensors")
            largest_b[k, lr] = max(float(v.abs().max()) for name, v in weights.items() if "lora_B" in name)
    assert logs[1, 1e-3].updates == 1 and logs[2, 1e-3].updates == 2
    assert 0.99e-3 < largest_b[1, 1e-3] <= 1.01e-3
    assert 1.5e-3 < largest_b[2, 1e-3] <= 2.02e-3
    assert logs[2, 1e-9].response_tokens == logs[1, 1e-9].response_tokens
    assert logs[2, 1e-9].kl == pytest.approx(logs[1, 1e-9].kl, rel=1e-4)
    with pytest.raises(ValueError, match="updates_per_batch=5 is more than the 4 rollouts"):
        BakeConfig(batch_size=4, updates_per_batch=5)


def test_student_rows_unset_follow_the_precision_and_a_set_value_wins(tmp_path, tiny_model_dir, monkeypatch):
    """micro_batch_size unset: 8 rows with bf16, 2 in fp32 (six fp32 rows ran a step no faster than two, for 0.57 GiB
    more). The spy sees the rows the compile's micro-batches were grouped by."""
    import promptbake.train as train

    sizes: list[int] = []
    grouping = train.micro_batches

    def spy(lengths, size, max_tokens=None):
        sizes.append(size)
        return grouping(lengths, size, max_tokens)

    monkeypatch.setattr(train, "micro_batches", spy)
    prompt = write_prompt(tmp_path / "p")
    for precision, rows, expected in [("fp32", None, 2), ("bf16", None, 8), ("fp32", 3, 3)]:
        sizes.clear()
        overrides = dict(steps=1, batch_size=4, heldout=0, max_new_tokens=8, precision=precision, micro_batch_size=rows)
        result = compile_prompt(prompt, out=tmp_path / f"{precision}-{rows}", model=str(tiny_model_dir),
                                overrides=overrides)
        assert result.manifest.precision == precision
        assert sizes and set(sizes) == {expected}, (precision, rows, sizes)


def test_torch_compile_unset_turns_on_only_where_it_was_measured_to_pay(monkeypatch):
    """Unset: a CPU (bf16 or fp32) with a C++ compiler and a long run; an explicit value always wins."""
    from promptbake.config import BakeConfig
    from promptbake.train import AUTO_COMPILE_MIN_STEPS, use_torch_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    long_run, short_run = BakeConfig(steps=AUTO_COMPILE_MIN_STEPS), BakeConfig(steps=AUTO_COMPILE_MIN_STEPS - 1)
    assert long_run.torch_compile is None
    monkeypatch.setenv("CXX", "sh")  # any program on PATH stands for a compiler here
    assert use_torch_compile(long_run, bf16=True, device=cpu)
    assert use_torch_compile(long_run, bf16=False, device=cpu)  # fp32 on AVX2: 1.3-1.4x tokens/s
    assert not use_torch_compile(short_run, bf16=True, device=cpu)
    assert not use_torch_compile(long_run, bf16=True, device=gpu)  # not measured there
    assert use_torch_compile(short_run.model_copy(update={"torch_compile": True}), bf16=False, device=gpu)
    assert not use_torch_compile(long_run.model_copy(update={"torch_compile": False}), bf16=True, device=cpu)
    monkeypatch.setenv("CXX", "no-such-compiler-anywhere")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not use_torch_compile(long_run, bf16=True, device=cpu)


def test_torch_compile_unset_turns_on_for_a_short_run_once_the_cache_holds_the_models_graphs(monkeypatch, tmp_path,
                                                                                             tiny_model_dir):
    """Short runs (8 steps) compile only when an earlier run recorded this model's graphs (same architecture and precision,
    in fp32 the same response cap) into an inductor cache that is still there; anything else stays as before."""
    from transformers import AutoConfig

    from promptbake.compile_cache import inductor_cache_dir, remember_compiled
    from promptbake.config import BakeConfig
    from promptbake.train import AUTO_COMPILE_MIN_STEPS, WARM_COMPILE_MIN_STEPS, run_compile_key, use_torch_compile

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("CXX", "sh")  # any program on PATH stands for a compiler here
    cpu = torch.device("cpu")
    model = types.SimpleNamespace(config=AutoConfig.from_pretrained(tiny_model_dir))
    short = BakeConfig(steps=WARM_COMPILE_MIN_STEPS)
    assert WARM_COMPILE_MIN_STEPS < AUTO_COMPILE_MIN_STEPS
    assert not use_torch_compile(short, bf16=True, device=cpu, model=model)  # nothing recorded yet
    remember_compiled(run_compile_key(model, True, short))
    assert not use_torch_compile(short, bf16=True, device=cpu, model=model)  # recorded, but the cache folder is empty
    (tmp_path / "inductor" / "fxgraph").mkdir(parents=True)
    assert use_torch_compile(short, bf16=True, device=cpu, model=model)
    lean = short.model_copy(update={"activation_memory_budget": 0.1})  # other backward graphs for the layers
    assert not use_torch_compile(lean, bf16=True, device=cpu, model=model)
    remember_compiled(run_compile_key(model, True, lean))
    assert use_torch_compile(lean, bf16=True, device=cpu, model=model)
    assert not use_torch_compile(short, bf16=True, device=cpu)  # no model to key on
    assert not use_torch_compile(BakeConfig(steps=WARM_COMPILE_MIN_STEPS - 1), bf16=True, device=cpu, model=model)
    assert not use_torch_compile(short, bf16=False, device=cpu, model=model)
    at_96, at_64 = (short.model_copy(update={"max_new_tokens": cap}) for cap in (96, 64))
    import promptbake.rollout

    monkeypatch.setattr(promptbake.rollout, "COMPILE_POLICY_DECODING", True)
    remember_compiled(run_compile_key(model, False, at_96))  # fp32 decode step in the policy: the cap is in the key
    assert use_torch_compile(at_96, bf16=False, device=cpu, model=model)
    assert not use_torch_compile(at_64, bf16=False, device=cpu, model=model)  # a new cap recompiles the decode step
    assert use_torch_compile(at_64, bf16=True, device=cpu, model=model)  # bf16: cheap to recompile, any cap counts
    import promptbake.fastdecode

    monkeypatch.setattr(promptbake.fastdecode, "WEIGHT_FIRST_LINEARS", False)  # the decode step's linears: another graph
    assert not use_torch_compile(at_96, bf16=False, device=cpu, model=model)
    monkeypatch.setattr(promptbake.fastdecode, "WEIGHT_FIRST_LINEARS", True)
    monkeypatch.setattr(promptbake.rollout, "COMPILE_POLICY_DECODING", False)  # switched off: fp32 decoding stays eager
    assert run_compile_key(model, False, at_96) == run_compile_key(model, False, at_64)
    assert not use_torch_compile(at_64, bf16=False, device=cpu, model=model)  # only the cap-keyed record so far
    remember_compiled(run_compile_key(model, False, at_96))
    assert use_torch_compile(at_64, bf16=False, device=cpu, model=model)  # no decode step compiled: any cap counts
    assert not use_torch_compile(short.model_copy(update={"torch_compile": False}), bf16=True, device=cpu, model=model)
    model.config.use_cache = not model.config.use_cache  # what a run flips is not the architecture
    model.config.dtype = torch.bfloat16
    assert use_torch_compile(short, bf16=True, device=cpu, model=model)
    wider = types.SimpleNamespace(config=AutoConfig.from_pretrained(tiny_model_dir, num_hidden_layers=3))
    assert not use_torch_compile(short, bf16=True, device=cpu, model=wider)  # another architecture, other graphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "moved"))
    (tmp_path / "moved" / "fxgraph").mkdir(parents=True)
    assert not use_torch_compile(short, bf16=True, device=cpu, model=model)  # the record names another cache
    (tmp_path / "home" / "compiled.json").write_text("not json")
    assert not use_torch_compile(short, bf16=True, device=cpu, model=model)  # a damaged record is no record
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setitem(sys.modules, "torch._inductor.runtime.cache_dir_utils", None)
    assert inductor_cache_dir() is None  # a torch that keeps its default cache folder elsewhere: nothing is warm
    remember_compiled(run_compile_key(model, True, short))
    assert not use_torch_compile(short, bf16=True, device=cpu, model=model)
