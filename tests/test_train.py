"""The training loop on the tiny model: micro-batching does not change the math; seeded runs repeat."""

from __future__ import annotations

import pytest

from conftest import write_prompt
from promptbake import compile_prompt
from promptbake.train import micro_batches


def test_micro_batches_group_by_length_and_cover_all_rows():
    groups = micro_batches([50, 10, 40, 20, 30], 2)
    assert groups == [[1, 3], [4, 2], [0]]
    assert sorted(i for g in groups for i in g) == list(range(5))


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
