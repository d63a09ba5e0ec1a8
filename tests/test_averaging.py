"""The weight average (`ema_decay`): its arithmetic against a brute-force weighted mean, and a compile that keeps one
trains exactly as one without it, writes the average of its per-step weights, and resumes to the same adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_prompt
from promptbake import compile_prompt
from promptbake.averaging import WeightAverage
from promptbake.checkpoint import load_checkpoint
from promptbake.config import BakeConfig


def brute_force_average(iterates: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """sum_i w_i * x_i / sum_i w_i with w_i = decay**(t - i): the bias-corrected EMA written out."""
    t = len(iterates)
    weights = [decay ** (t - i) for i in range(1, t + 1)]
    return {name: sum(w * it[name].double() for w, it in zip(weights, iterates)) / sum(weights) for name in iterates[0]}


def test_weight_average_is_the_decay_weighted_mean_of_the_iterates():
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.zeros(3, 4)), "b": torch.nn.Parameter(torch.zeros(5))}
    average = WeightAverage(params, 0.8)
    assert torch.equal(average.average()["a"], params["a"].detach())  # before any update: the weights themselves
    iterates = []
    for _ in range(7):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p))
        iterates.append({n: p.detach().clone() for n, p in params.items()})
        average.update()
        want = brute_force_average(iterates, 0.8)
        got = average.average()
        assert all(torch.allclose(got[n].double(), want[n], atol=1e-6) for n in want)
    assert torch.allclose(average.average()["b"].double(), brute_force_average(iterates, 0.8)["b"], atol=1e-6)
    assert not torch.allclose(average.average()["a"], iterates[-1]["a"])  # it is not the last iterate

    # the running sums and the update count restore the same average; the weights become it on request
    again = WeightAverage(params, 0.8)
    again.load_state(average.state(), average.updates)
    assert all(torch.equal(again.average()[n], average.average()[n]) for n in params)
    again.copy_to_params()
    assert torch.equal(params["a"].detach(), average.average()["a"])
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        WeightAverage(params, 0.8).load_state({"a": torch.zeros(3, 4)}, 1)


def test_ema_decay_is_validated():
    assert BakeConfig().ema_decay == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            BakeConfig(ema_decay=bad)


SETTINGS = dict(steps=4, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32", checkpoint_every=2)


def test_a_compile_with_ema_trains_as_without_and_writes_the_average(tmp_path, tiny_model_dir, monkeypatch):
    prompt = write_prompt(tmp_path / "p")
    plain = compile_prompt(prompt, out=tmp_path / "plain", model=str(tiny_model_dir), overrides=SETTINGS)

    iterates: list[dict[str, torch.Tensor]] = []
    update = WeightAverage.update

    def recording_update(self):  # the weights the average sees after each step, copied before it folds them in
        iterates.append({name: p.detach().clone() for name, p in self.params.items()})
        update(self)

    monkeypatch.setattr(WeightAverage, "update", recording_update)
    averaged = compile_prompt(prompt, out=tmp_path / "ema", model=str(tiny_model_dir), overrides={**SETTINGS, "ema_decay": 0.5})
    assert len(iterates) == 4
    # The average is a shadow: every step's loss and gradient norm are those of the run without it.
    assert [(s.kl, s.grad_norm) for s in averaged.train.log] == [(s.kl, s.grad_norm) for s in plain.train.log]
    plain_weights = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "ema" / "adapter_model.safetensors"))
    want = brute_force_average(iterates, 0.5)
    assert written.keys() == plain_weights.keys() and len(want) == len(written)
    for name, value in want.items():  # trainable names carry PEFT's adapter name; the saved file drops it
        saved = name.replace(".default", "")
        assert torch.allclose(written[saved].double(), value, atol=1e-6), name
        assert torch.equal(plain_weights[saved], iterates[-1][name])  # without the average: the last step's weights
    assert any(not torch.equal(written[k], plain_weights[k]) for k in written if "lora_B" in k)
    assert averaged.manifest.config["ema_decay"] == 0.5
    assert averaged.manifest.build_key != plain.manifest.build_key
    # The kept checkpoint holds the last step's weights and the average's sums, so a longer compile continues both.
    kept = load_checkpoint(tmp_path / ".ema.work", averaged.manifest.build_key)
    assert kept is not None and kept.step == 4 and kept.average is not None
    assert all(torch.equal(kept.lora[n], iterates[-1][n]) for n in iterates[-1])


@pytest.mark.slow
def test_an_averaged_compile_resumed_or_continued_ends_on_the_straight_runs_adapter(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p")
    settings = {**SETTINGS, "ema_decay": 0.7, "checkpoint_every": 1}
    straight = compile_prompt(prompt, out=tmp_path / "straight", model=str(tiny_model_dir), overrides={**settings, "steps": 6})
    compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides={**settings, "steps": 3})
    longer = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides={**settings, "steps": 6})
    assert longer.manifest.resumed_from_step == 3
    want = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    kls = [json.loads(line)["kl"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert kls == [s.kl for s in straight.train.log]
