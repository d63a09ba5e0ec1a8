"""lora_init steer: the reduced-rank fit against a direct computation, the LoRA it writes, and that the fitted
adapter moves the tiny student toward its prompted teacher."""

from __future__ import annotations

import pytest
import torch

from conftest import write_prompt
from promptbake import compile_prompt
from promptbake.config import BakeConfig
from promptbake.steer import fit_steering_lora, reduced_rank_fit, set_lora_delta


def _rank_r_reference(X: torch.Tensor, R: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-r W for |R - X W^T|^2 by whitening X (thin QR) and Eckart-Young on the whitened targets."""
    Q, Rx = torch.linalg.qr(X.double())
    U, S, Vh = torch.linalg.svd(Q.T @ R.double(), full_matrices=False)
    M_r = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    return torch.linalg.solve_triangular(Rx, M_r, upper=True).T


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_reduced_rank_fit_is_the_best_fit_of_its_rank(rank):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=g)
    R = X @ torch.randn(8, 6, generator=g) + 0.1 * torch.randn(200, 6, generator=g)
    W, explained = reduced_rank_fit(X, R, torch.ones(6), rank, ridge=0.0)
    reference = _rank_r_reference(X, R, rank)
    torch.testing.assert_close(W.double(), reference, atol=1e-4, rtol=1e-4)
    assert torch.linalg.matrix_rank(W.double(), atol=1e-6) == min(rank, 6)
    residual = ((R - X @ W.T) ** 2).sum() / (R ** 2).sum()
    assert explained == pytest.approx(1 - float(residual), abs=1e-5)


def test_reduced_rank_fit_weighs_each_output_by_its_scale():
    """Scaling an output dimension up makes the fit spend its one direction there."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 4, generator=g)
    R = torch.stack([X[:, 0], X[:, 1]], dim=1)  # two independent outputs, equally large
    W_first, _ = reduced_rank_fit(X, R, torch.tensor([0.1, 1.0]), 1, ridge=0.0)  # dim 0 counts 100x more
    W_second, _ = reduced_rank_fit(X, R, torch.tensor([1.0, 0.1]), 1, ridge=0.0)
    assert W_first[0, 0] == pytest.approx(1.0, abs=1e-3) and abs(W_first[1, 1]) < 1e-3
    assert W_second[1, 1] == pytest.approx(1.0, abs=1e-3) and abs(W_second[0, 0]) < 1e-3


def test_set_lora_delta_gives_the_lora_that_delta(tiny_model_dir):
    from promptbake.runtime import load_runtime

    rt = load_runtime(tiny_model_dir, train=BakeConfig(lora_r=8, lora_alpha=32), precision="fp32")
    proj = rt.model.base_model.model.model.layers[0].self_attn.o_proj
    out_dim, in_dim = proj.base_layer.weight.shape
    g = torch.Generator().manual_seed(2)
    W = torch.randn(out_dim, 5, generator=g) @ torch.randn(5, in_dim, generator=g)  # rank 5 <= r
    set_lora_delta(proj, W)
    torch.testing.assert_close(proj.get_delta_weight("default"), W, atol=1e-4, rtol=1e-4)
    x = torch.randn(3, in_dim, generator=g)
    torch.testing.assert_close(proj(x) - proj.base_layer(x), x @ W.T, atol=1e-4, rtol=1e-4)


def _teacher_forced_kl(model, student_seqs, teacher_seqs, student_lengths, teacher_lengths, response_lengths) -> float:
    """Mean KL(student || teacher) over response-predicting positions, brute force, one row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s, t, ps, pt, n in zip(student_seqs, teacher_seqs, student_lengths, teacher_lengths, response_lengths):
            logp_s = model(input_ids=torch.tensor([s])).logits[0, ps - 1:ps - 1 + n].double().log_softmax(-1)
            with model.disable_adapter():
                logp_t = model(input_ids=torch.tensor([t])).logits[0, pt - 1:pt - 1 + n].double().log_softmax(-1)
            total += float((logp_s.exp() * (logp_s - logp_t)).sum())
            count += n
    return total / count


@pytest.mark.parametrize("shrink", [0.5, 1.0])
def test_fitted_adapter_moves_the_student_toward_the_prompted_teacher(tiny_model_dir, shrink):
    from promptbake.runtime import load_runtime

    torch.manual_seed(0)
    rt = load_runtime(tiny_model_dir, train=BakeConfig(), precision="fp32")
    renderer = rt.renderer("You are a pirate. Answer every question in pirate speech and end with 'Arr!'.")
    questions = [f"Tell me about topic number {i}, please." for i in range(12)]
    answers = [f"Well, topic {i} is a fine thing to know about, and here is why it matters." for i in range(12)]
    student = [renderer.student_ids([{"role": "user", "content": q}]) for q in questions]
    teacher = [renderer.teacher_ids([{"role": "user", "content": q}]) for q in questions]
    responses = [rt.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    data = dict(student_seqs=[s + r for s, r in zip(student, responses)],
                teacher_seqs=[t + r for t, r in zip(teacher, responses)],
                student_prompt_lengths=[len(s) for s in student], teacher_prompt_lengths=[len(t) for t in teacher],
                response_lengths=[len(r) for r in responses])
    kl_args = [data[k] for k in ("student_seqs", "teacher_seqs", "student_prompt_lengths", "teacher_prompt_lengths",
                                 "response_lengths")]
    before = _teacher_forced_kl(rt.model, *kl_args)
    untouched = {n: p.detach().clone() for n, p in rt.model.named_parameters() if "lora_" in n
                 and not any(m in n for m in ("o_proj", "down_proj"))}
    stats = fit_steering_lora(rt.model, pad_id=rt.tokenizer.pad_token_id, bf16=False, shrink=shrink, **data)
    after = _teacher_forced_kl(rt.model, *kl_args)
    assert before > 0 and after < 0.7 * before
    assert len(stats) == rt.model.config.num_hidden_layers
    assert all(0 <= row[p]["explained"] <= 1 for row in stats for p in ("o_proj", "down_proj"))
    for name, param in rt.model.named_parameters():  # only o_proj and down_proj were fitted
        if name in untouched:
            assert torch.equal(param, untouched[name]), name
    for layer in rt.model.base_model.model.model.layers:
        assert layer.mlp.down_proj.get_delta_weight("default").abs().sum() > 0


def test_compile_with_steer_measures_the_base_before_and_records_the_init(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p")
    common = dict(steps=1, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32")
    zero = compile_prompt(prompt, out=tmp_path / "zero", model=str(tiny_model_dir), overrides=common)
    steer = compile_prompt(prompt, out=tmp_path / "steer", model=str(tiny_model_dir), overrides={**common, "lora_init": "steer"})
    assert steer.manifest.config["lora_init"] == "steer" and zero.manifest.config["lora_init"] == "zero"
    # "before" is the base model in both: the fit comes after that measurement.
    assert steer.manifest.heldout_kl_before == pytest.approx(zero.manifest.heldout_kl_before, rel=1e-6)
    assert steer.train.log[0].kl != pytest.approx(zero.train.log[0].kl, rel=1e-6)


@pytest.mark.parametrize("settings, fragment", [
    (dict(teacher="some/model"), "base model as a frozen teacher"),
    (dict(teacher_mode="live"), "base model as a frozen teacher"),
    (dict(lora_targets=["q_proj", "v_proj"]), "add ['o_proj', 'down_proj'] to lora_targets"),
])
def test_steer_refuses_settings_it_cannot_fit(settings, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        BakeConfig(lora_init="steer", **settings)


def test_lora_init_zero_leaves_earlier_bakes_build_keys_alone():
    from promptbake.plan import NOT_IN_KEY, key_config

    assert "lora_init" not in key_config(BakeConfig(), NOT_IN_KEY)  # bakes made before the setting keep their key
    assert key_config(BakeConfig(lora_init="steer"), NOT_IN_KEY)["lora_init"] == "steer"
