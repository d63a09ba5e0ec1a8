"""hidden_match_weight: the layers' states are read at the right tokens, their distance is the one defined, and its
gradient pulls the student's states towards the teacher's."""

from __future__ import annotations

import contextlib

import pytest
import torch

from promptbake.chat import ChatRenderer
from promptbake.hidden import (common_suffix_length, dimension_scales, hidden_distance, layer_increments, query_states,
                               recorded_layer_outputs, response_states)
from promptbake.rollout import Rollout, response_logits
from promptbake.teacher import PromptedTeacher
from promptbake.train import repeated_blocks
from test_rollout_teacher import _queries, peft_tiny  # noqa: F401 (the fixture is used by name)

EOS = 2


def test_hidden_distance_is_the_mean_over_layers_of_one_minus_cosine():
    torch.manual_seed(0)
    student_LBTD = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    teacher_LBTD = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    got_BT = hidden_distance(student_LBTD, teacher_LBTD)
    want_BT = torch.zeros(2, 4, dtype=torch.float64)
    for layer in range(3):
        for b in range(2):
            for t in range(4):
                s, te = student_LBTD[layer, b, t].tolist(), teacher_LBTD[layer, b, t].tolist()
                dot = sum(x * y for x, y in zip(s, te))
                norms = sum(x * x for x in s) ** 0.5 * sum(y * y for y in te) ** 0.5
                want_BT[b, t] += (1 - dot / norms) / 3
    torch.testing.assert_close(got_BT.double(), want_BT, atol=1e-6, rtol=0)
    # scale-free, and zero for states that point the same way
    torch.testing.assert_close(hidden_distance(student_LBTD * 7.0, teacher_LBTD * 0.1), got_BT)
    assert hidden_distance(teacher_LBTD * 3.0, teacher_LBTD).abs().max() < 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_distance(student_LBTD[:2], teacher_LBTD)


def test_dimension_scaled_distance_is_the_cosine_of_states_divided_by_the_teachers_rms_per_row_and_dimension():
    """hidden_match_scale dims: per layer, row and dimension the teacher's root-mean-square over the row's valid
    positions divides both states before the cosine; padded positions never enter it; rows are independent (so the
    micro-batching cannot change it); and a change in a low-energy dimension counts as much as in a loud one."""
    torch.manual_seed(1)
    L, B, T, D = 2, 3, 4, 5
    teacher_LBTD = torch.randn(L, B, T, D, dtype=torch.float64)
    teacher_LBTD[..., 0] *= 50  # a dimension that holds most of the energy, as in a Llama residual stream
    student_LBTD = teacher_LBTD + 0.3 * torch.randn(L, B, T, D, dtype=torch.float64)
    mask_BT = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    scale_LBD = dimension_scales(teacher_LBTD, mask_BT)
    got_BT = hidden_distance(student_LBTD, teacher_LBTD, scale_LBD)
    want_BT = torch.zeros(B, T, dtype=torch.float64)
    for layer in range(L):
        for b in range(B):
            valid = [t for t in range(T) if mask_BT[b, t]]
            rms = [(sum(float(teacher_LBTD[layer, b, t, d]) ** 2 for t in valid) / len(valid)) ** 0.5 for d in range(D)]
            assert scale_LBD[layer, b].tolist() == pytest.approx(rms, rel=1e-6)
            for t in range(T):
                s = [float(student_LBTD[layer, b, t, d]) / rms[d] for d in range(D)]
                te = [float(teacher_LBTD[layer, b, t, d]) / rms[d] for d in range(D)]
                dot = sum(x * y for x, y in zip(s, te))
                norms = sum(x * x for x in s) ** 0.5 * sum(y * y for y in te) ** 0.5
                want_BT[b, t] += (1 - dot / norms) / L
    torch.testing.assert_close(got_BT.double(), want_BT, atol=1e-6, rtol=0)
    padded = teacher_LBTD.clone()
    padded[:, 1, 2:] = 1e3  # values at padded positions
    torch.testing.assert_close(dimension_scales(padded, mask_BT), scale_LBD)
    alone = hidden_distance(student_LBTD[:, 1:2], teacher_LBTD[:, 1:2], dimension_scales(teacher_LBTD[:, 1:2], mask_BT[1:2]))
    torch.testing.assert_close(alone, got_BT[1:2])
    quiet = teacher_LBTD.clone()
    quiet[..., 3] += 1.0  # the prompt's effect in a quiet dimension
    raw, scaled = hidden_distance(quiet, teacher_LBTD), hidden_distance(quiet, teacher_LBTD, scale_LBD)
    assert float(scaled.mean()) > 10 * float(raw.mean())


@pytest.mark.parametrize("field, default, other, unknown", [
    ("hidden_match_scale", "none", "dims", "layers"),
    ("hidden_match_target", "states", "increments", "outputs"),
])
def test_a_form_of_the_layers_term_needs_the_term_and_leaves_earlier_build_keys_alone(field, default, other, unknown):
    """hidden_match_scale and hidden_match_target: the default unless asked for; an error without the layers' term; at
    the default not in the build key (bakes made before the setting existed keep their keys), otherwise in it."""
    from promptbake.config import BakeConfig
    from promptbake.plan import NOT_IN_KEY, key_config

    assert BakeConfig().hidden_match_weight > 0 and getattr(BakeConfig(), field) == default
    with pytest.raises(ValueError, match=f"{field} {other}"):
        BakeConfig(hidden_match_weight=0, **{field: other})
    with pytest.raises(ValueError):
        BakeConfig(**{field: unknown})
    assert field not in key_config(BakeConfig(), NOT_IN_KEY)
    assert key_config(BakeConfig(**{field: other}), NOT_IN_KEY)[field] == other
    assert "steps" in key_config(BakeConfig(), NOT_IN_KEY) and "threads" not in key_config(BakeConfig(), NOT_IN_KEY)
    # a config written to a manifest reads back as itself
    assert BakeConfig(**BakeConfig(**{field: other}).model_dump()) == BakeConfig(**{field: other})


def test_layer_increments_are_what_each_layer_adds_to_its_own_input(peft_tiny):
    """hidden_match_target increments: from the recorded outputs alone, layer 0's output, then each layer's output less
    its input, as read by a hook on each layer's input in the same forward."""
    blocks = repeated_blocks(peft_tiny)
    inputs: list[torch.Tensor] = []
    handles = [block.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True) for block in blocks]
    try:
        with recorded_layer_outputs(blocks) as outputs, torch.no_grad():
            peft_tiny(input_ids=torch.tensor([[5, 6, 7, 8, 9]]))
    finally:
        for handle in handles:
            handle.remove()
    states_LBTD = torch.stack(outputs)
    increments_LBTD = layer_increments(states_LBTD)
    assert increments_LBTD.shape == states_LBTD.shape and increments_LBTD.dtype == torch.float32
    torch.testing.assert_close(increments_LBTD[0], states_LBTD[0])
    for layer in range(1, len(blocks)):
        torch.testing.assert_close(increments_LBTD[layer], outputs[layer] - inputs[layer], atol=1e-5, rtol=1e-5)
    # the increments sum back to the last layer's output
    torch.testing.assert_close(increments_LBTD.sum(0), states_LBTD[-1], atol=1e-5, rtol=1e-5)


def test_only_the_student_gets_a_gradient():
    student_LBTD = torch.randn(2, 1, 3, 4, requires_grad=True)
    teacher_LBTD = torch.randn(2, 1, 3, 4, requires_grad=True)
    hidden_distance(student_LBTD, teacher_LBTD).sum().backward()
    assert student_LBTD.grad is not None and student_LBTD.grad.abs().sum() > 0
    assert teacher_LBTD.grad is None




ROLLOUT = Rollout(torch.tensor([[40, 41, 42, EOS], [50, EOS, 0, 0], [60, 61, 62, 63]]),
                  torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))


def _reference_states(model, prompt_ids: list[int], response: list[int]) -> torch.Tensor:
    """Each layer's output at the positions predicting `response`, from one plain forward of prompt + response
    (transformers' own hidden states: entry i + 1 is layer i's output, for every layer but the last, which it
    returns after the final norm)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids + response]), output_hidden_states=True)
    P, T = len(prompt_ids), len(response)
    return torch.stack([h[0, P - 1:P - 1 + T] for h in out.hidden_states[1:-1]])  # layers 0 .. L-2: (L-1, T, D)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_teacher_states_are_each_layers_output_at_the_response_tokens(peft_tiny, tiny, prefix_cache):
    """Read while the teacher scores (prompt prefix cached or not, rows of different lengths left-padded), the states
    are those of a plain forward of each row's own prompt + response, at the positions that predict the response;
    the prefix's own forward (run on first use) is left out."""
    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a careful assistant. " * 20, 8192)
    queries = _queries()
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False, prefix_cache=prefix_cache)
    teacher.prepare(queries, 16, "test")
    blocks = repeated_blocks(peft_tiny)
    with recorded_layer_outputs(blocks) as outputs:
        teacher.logits(queries, ROLLOUT, left_padded=True)
    assert len(outputs) == len(blocks) * (2 if prefix_cache else 1)  # the prefix's forward, then the scoring one
    T = ROLLOUT.response_ids_BT.shape[1]
    states_LBTD = response_states(outputs, len(blocks), T)
    assert states_LBTD.shape == (len(blocks), 3, T, peft_tiny.config.hidden_size)
    with peft_tiny.disable_adapter():
        for row, query in enumerate(queries):
            n = int(ROLLOUT.response_mask_BT[row].sum())
            want = _reference_states(peft_tiny, renderer.teacher_ids(query.messages),
                                     ROLLOUT.response_ids_BT[row, :n].tolist())
            torch.testing.assert_close(states_LBTD[:-1, row, :n], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_student_states_are_read_in_either_layout(peft_tiny, tiny, monkeypatch, packed):
    """The student's training pass runs left-padded on CPUs and packed (each row from column 0) on accelerators:
    either way, over prompts of different lengths, the states read at its response tokens are those of a plain
    forward of each row's own prompt + response."""
    import promptbake.rollout as rollout_module
    from promptbake.rollout import packs_rows

    monkeypatch.setattr(rollout_module, "PACKED_LAYOUT", packed)
    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a pirate.", 8192)
    prompts = [renderer.student_ids(q.messages) for q in _queries()]
    assert len({len(p) for p in prompts}) == 3
    device = next(peft_tiny.parameters()).device
    assert packs_rows(device, prompts) == packed
    blocks = repeated_blocks(peft_tiny)
    T = ROLLOUT.response_ids_BT.shape[1]
    with recorded_layer_outputs(blocks) as outputs, torch.no_grad():
        response_logits(peft_tiny, prompts, ROLLOUT, tok.pad_token_id)
    lengths = [len(p) for p in prompts] if packed else None
    states_LBTD = response_states(outputs, len(blocks), T, lengths)
    assert states_LBTD.shape == (len(blocks), 3, T, peft_tiny.config.hidden_size)
    for row, prompt in enumerate(prompts):
        n = int(ROLLOUT.response_mask_BT[row].sum())
        want = _reference_states(peft_tiny, prompt, ROLLOUT.response_ids_BT[row, :n].tolist())
        torch.testing.assert_close(states_LBTD[:-1, row, :n], want, atol=1e-4, rtol=1e-4)


def _reference_prompt_states(model, prompt_ids: list[int], start: int, end: int) -> torch.Tensor:
    """Each layer but the last's output at prompt positions start .. end - 1, from one plain forward of the prompt."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), output_hidden_states=True)
    return torch.stack([h[0, start:end] for h in out.hidden_states[1:-1]])


def test_common_suffix_length():
    assert common_suffix_length([1, 2, 3, 4], [9, 3, 4]) == 2
    assert common_suffix_length([1, 2], [3]) == 0
    assert common_suffix_length([5, 6], [5, 6]) == 2 and common_suffix_length([], [1]) == 0


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_query_states_are_each_layers_output_at_the_user_turn_on_both_sides(peft_tiny, tiny, monkeypatch, prefix_cache,
                                                                          packed):
    """hidden_match_query: the teacher (prompt prefix cached or not) and the student (either layout) are read at the
    tokens their prompts end with, all but the last; each equals a plain forward of that side's own prompt, and the
    two sides are read at the same tokens."""
    import promptbake.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "PACKED_LAYOUT", packed)
    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a careful assistant. " * 20, 8192)
    queries = _queries()
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False, prefix_cache=prefix_cache)
    teacher.prepare(queries, 16, "test")
    blocks, T = repeated_blocks(peft_tiny), ROLLOUT.response_ids_BT.shape[1]
    student_prompts = [renderer.student_ids(q.messages) for q in queries]
    teacher_prompts = [teacher.prompt_ids(q) for q in queries]
    seen = teacher.scored_prompt_lengths(queries)
    assert seen == [len(p) - (len(teacher.prefix_ids) if prefix_cache else 0) for p in teacher_prompts]
    suffix = [min(common_suffix_length(s, t), n) for s, t, n in zip(student_prompts, teacher_prompts, seen)]
    assert len(set(suffix)) == 3 and min(suffix) > 3  # three lengths, so the rows' positions are right-aligned

    with recorded_layer_outputs(blocks) as outputs:
        teacher.logits(queries, ROLLOUT, left_padded=True)
    teacher_LBQD, mask_BQ = query_states(outputs, len(blocks), T, suffix)
    with recorded_layer_outputs(blocks) as outputs, torch.no_grad():
        response_logits(peft_tiny, student_prompts, ROLLOUT, tok.pad_token_id)
    student_LBQD, student_mask_BQ = query_states(outputs, len(blocks), T, suffix,
                                                 [len(p) for p in student_prompts] if packed else None)
    Q = max(suffix) - 1
    assert teacher_LBQD.shape == student_LBQD.shape == (len(blocks), 3, Q, peft_tiny.config.hidden_size)
    assert torch.equal(mask_BQ, student_mask_BQ) and mask_BQ.sum(-1).tolist() == [n - 1 for n in suffix]
    for row in range(3):
        n = suffix[row] - 1
        assert mask_BQ[row, Q - n:].all() and not mask_BQ[row, :Q - n].any()
        for prompt, got_LBQD, adapter in ((teacher_prompts[row], teacher_LBQD, False),
                                         (student_prompts[row], student_LBQD, True)):
            L = len(prompt)
            with contextlib.nullcontext() if adapter else peft_tiny.disable_adapter():
                want = _reference_prompt_states(peft_tiny, prompt, L - n - 1, L - 1)
            torch.testing.assert_close(got_LBQD[:-1, row, Q - n:], want, atol=1e-4, rtol=1e-4)
    assert student_prompts[0][-suffix[0]:] == teacher_prompts[0][-suffix[0]:]


def test_recording_is_off_unless_asked_and_hooks_go_away(peft_tiny):
    blocks = repeated_blocks(peft_tiny)
    ids = torch.tensor([[1, 5, 6, 7]])
    with recorded_layer_outputs([]) as outputs, torch.no_grad():
        peft_tiny(input_ids=ids)
    assert outputs == []
    with recorded_layer_outputs(blocks) as outputs, torch.no_grad():
        peft_tiny(input_ids=ids)
    assert len(outputs) == len(blocks)
    with torch.no_grad():
        peft_tiny(input_ids=ids)
    assert len(outputs) == len(blocks)  # nothing recorded after the window closed
    with pytest.raises(RuntimeError, match="fewer than"):
        response_states(outputs, len(blocks) + 1, 2)


def test_a_step_down_the_distance_gradient_brings_the_students_states_towards_the_teachers(peft_tiny, tiny):
    """The student (adapter on, no prompt) and the teacher (adapter off, prompt) on the same response tokens: a small
    gradient step on the LoRA weights lowers the distance, so the term pulls the right way."""
    _, tok = tiny
    renderer = ChatRenderer.for_tokenizer(tok, "You are a pirate. Say ahoy in every answer.", 8192)
    queries = _queries()
    teacher = PromptedTeacher(peft_tiny, renderer, tok.pad_token_id, is_student=True, bf16=False)
    teacher.prepare(queries, 16, "test")
    blocks = repeated_blocks(peft_tiny)
    T = ROLLOUT.response_ids_BT.shape[1]
    with recorded_layer_outputs(blocks) as outputs:
        teacher.logits(queries, ROLLOUT, left_padded=True)
    teacher_LBTD = response_states(outputs, len(blocks), T)
    prompts = [renderer.student_ids(q.messages) for q in queries]
    mask_BT = ROLLOUT.response_mask_BT.float()
    params = [p for p in peft_tiny.parameters() if p.requires_grad]

    def distance() -> torch.Tensor:
        with recorded_layer_outputs(blocks) as student_outputs:
            response_logits(peft_tiny, prompts, ROLLOUT, tok.pad_token_id, left_padded=True)
        distance_BT = hidden_distance(response_states(student_outputs, len(blocks), T), teacher_LBTD)
        return (distance_BT * mask_BT).sum() / mask_BT.sum()

    before = distance()
    assert before > 0
    grads = torch.autograd.grad(before, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-2 * g / max(float(torch.cat([x.flatten() for x in grads]).norm()), 1e-12))
        after = distance()
    assert after < before


def test_hidden_weight_default_applies_only_where_the_teachers_layers_are_the_students():
    """Unset, the weight is the default where the teacher is the base model itself and returns logits to an on-policy
    loss, and 0 elsewhere, so a prompt that names another teacher or a served one is not refused for a weight it never
    set; set, it is the user's and is checked."""
    from promptbake.config import DEFAULT_HIDDEN_MATCH_WEIGHT, BakeConfig

    assert DEFAULT_HIDDEN_MATCH_WEIGHT > 0
    assert BakeConfig().hidden_match_weight == DEFAULT_HIDDEN_MATCH_WEIGHT
    assert BakeConfig.from_layers({"preset": "quick"}, {"kl": "topk"}).hidden_match_weight == DEFAULT_HIDDEN_MATCH_WEIGHT
    assert BakeConfig(teacher_mode="live").hidden_match_weight == DEFAULT_HIDDEN_MATCH_WEIGHT
    for other in ({"kl": "sampled"}, {"method": "offpolicy"}, {"method": "sft"}, {"teacher": "bigger-model"},
                  {"teacher_url": "http://localhost:8000", "kl": "sampled"}):
        assert BakeConfig.from_layers(other).hidden_match_weight == 0.0, other
    assert BakeConfig(hidden_match_weight=0).hidden_match_weight == 0.0
    assert BakeConfig(teacher="bigger-model", hidden_match_weight=5).hidden_match_weight == 5.0  # checked at training
    config = BakeConfig()
    config.kl = "sampled"  # derived again on assignment, not carried over
    assert config.hidden_match_weight == 0.0
    config.kl = "full"
    assert config.hidden_match_weight == DEFAULT_HIDDEN_MATCH_WEIGHT
    with pytest.raises(ValueError, match="hidden_match_weight"):
        BakeConfig(hidden_match_weight=10).kl = "sampled"
    assert BakeConfig.model_validate_json(BakeConfig().model_dump_json()) == BakeConfig()
