"""benchmarks/seed_soup.py: the mean of several bakes' weight changes, written as one LoRA adapter of rank N·r."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from benchmarks.seed_soup import mean_adapter
from promptbake.models import load_model


def _merged_weights(model_dir, adapter=None) -> dict[str, torch.Tensor]:
    model = load_model(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_the_mean_adapter_changes_every_weight_by_the_mean_of_the_bakes_changes(tmp_path, tiny_model_dir):
    adapters = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(load_model(tiny_model_dir), lora)
        with torch.no_grad():  # B drawn small, so each bake's change is a small and different one, as after training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        model.save_pretrained(str(tmp_path / f"bake{seed}"))
        adapters.append(tmp_path / f"bake{seed}")
    out = mean_adapter(adapters, tmp_path / "mean")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 24  # alpha / r unchanged

    base = _merged_weights(tiny_model_dir)
    changes = [{k: w - base[k] for k, w in _merged_weights(tiny_model_dir, a).items()} for a in adapters]
    mean = _merged_weights(tiny_model_dir, out)
    changed = [k for k in base if changes[0][k].abs().max() > 0]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    for k in base:
        want = sum(c[k] for c in changes) / 3
        torch.testing.assert_close(mean[k] - base[k], want, atol=1e-6, rtol=1e-4)


def test_bakes_of_other_ranks_are_refused(tmp_path, tiny_model_dir):
    for r, name in ((4, "a"), (8, "b")):
        get_peft_model(load_model(tiny_model_dir), LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(
            str(tmp_path / name))
    with pytest.raises(SystemExit, match="r 8 differs"):
        mean_adapter([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")


def test_a_bake_without_a_saved_run_stops_before_the_mean_is_written(tmp_path, tiny_model_dir):
    """The table compares each bake's saved measurement with the mean's: a missing one is named in one line up front,
    not a traceback after the mean has been built and measured."""
    from benchmarks.seed_soup import main

    build, out = tmp_path / "build", tmp_path / "results"
    for name in ("a", "b"):
        get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(
            str(build / "pirate" / name))
    (out / "runs" / "pirate").mkdir(parents=True)
    (out / "runs" / "pirate" / "a.json").write_text(json.dumps({"reverse_gap": 0.5}))
    with pytest.raises(SystemExit, match=r"b\.json: no saved run of that name"):
        main(["--prompt", "pirate", "--runs", "a,b", "--name", "mean", "--out", str(out), "--build", str(build)])
    assert not (build / "pirate" / "mean").exists()
