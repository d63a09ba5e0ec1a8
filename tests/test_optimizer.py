"""optimizer: muon. The compile steps with torch's Muon at AdamW's update size (each LoRA matrix's first update is
orthogonal, at the scale Moonshot's rule gives), its momentum is checkpointed, and a continued compile ends on
the straight run's adapter; AdamW stays out of the build key."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_prompt
from promptbake import compile_prompt
from promptbake.checkpoint import load_checkpoint
from promptbake.config import BakeConfig

SETTINGS = dict(batch_size=4, heldout=4, max_new_tokens=8, precision="fp32", checkpoint_every=1)


def lora_B(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_first_update_of_each_B_is_orthogonal_under_muon_only(tmp_path, tiny_model_dir, optimizer):
    """B starts at zero and weight decay scales B, so after one step B = -lr * 0.2 * sqrt(max(m, n)) * O under Muon,
    O the Newton-Schulz orthogonalisation of the Nesterov momentum (1.95 g): its singular values are near 1 (torch's
    quintic iteration pulls them towards 1). AdamW's first step is about lr * sign(g) per entry instead."""
    lr = 1e-3
    compile_prompt(write_prompt(tmp_path / "p"), out=tmp_path / "out", model=str(tiny_model_dir),
                   overrides={**SETTINGS, "steps": 1, "lr": lr, "optimizer": optimizer})
    for name, B in lora_B(tmp_path / "out").items():
        scale = lr * 0.2 * math.sqrt(max(B.shape))
        s = torch.linalg.svdvals(B.double()) / scale
        if optimizer == "muon":
            # Five iterations pull the leading directions to about 1 and the smallest only part of the way
            # (on the tiny model the top four sit within 0.7-1.2 of each other, the last near 0.1).
            assert 0.6 < s[0] < 1.3 and s[3] > 0.5 * s[0], (name, s)
        else:
            assert B.abs().max() == pytest.approx(lr, rel=0.05) and s.max() > 1.5, (name, s)


def test_a_muon_compile_checkpoints_its_momentum_and_continues_to_the_straight_adapter(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p")
    settings = {**SETTINGS, "optimizer": "muon"}
    straight = compile_prompt(prompt, out=tmp_path / "straight", model=str(tiny_model_dir), overrides={**settings, "steps": 4})
    short = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides={**settings, "steps": 2})
    kept = load_checkpoint(tmp_path / ".out.work", short.manifest.build_key)
    assert kept is not None and kept.step == 2
    buffers = [k for k in kept.optimizer if k.endswith(".momentum_buffer")]
    assert buffers and len(buffers) == len(kept.lora) and all(s == 0 for s in kept.adam_steps)
    assert not any(k.endswith("exp_avg") for k in kept.optimizer)
    longer = compile_prompt(prompt, out=tmp_path / "out", model=str(tiny_model_dir), overrides={**settings, "steps": 4})
    assert longer.manifest.resumed_from_step == 2 and longer.manifest.config["optimizer"] == "muon"
    want = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [s.kl for s in longer.train.log][-2:] == [s.kl for s in straight.train.log][-2:]


def test_muon_refuses_loraplus_and_adamw_stays_out_of_the_build_key():
    from promptbake.plan import NOT_IN_KEY, key_config

    with pytest.raises(ValueError, match="loraplus_lr_ratio sets AdamW's learning rates per matrix"):
        BakeConfig(optimizer="muon", loraplus_lr_ratio=4)
    assert "optimizer" not in key_config(BakeConfig(), NOT_IN_KEY)  # bakes made before the setting keep their key
    assert key_config(BakeConfig(optimizer="muon"), NOT_IN_KEY)["optimizer"] == "muon"


@pytest.mark.parametrize("optimizer,kind,refused", [("muon", "FSDP", True), ("muon", "MULTI_CPU", False),
                                                    ("muon", "NO", False), ("adamw", "FSDP", False)])
def test_muon_is_refused_where_fsdp_shards_its_matrices(optimizer, kind, refused):
    from accelerate.utils import DistributedType

    from promptbake.errors import PromptbakeError
    from promptbake.train import refuse_sharded_muon

    config = BakeConfig(optimizer=optimizer)
    if refused:
        with pytest.raises(PromptbakeError, match="train.optimizer: muon needs each LoRA matrix whole"):
            refuse_sharded_muon(config, DistributedType[kind])
    else:
        refuse_sharded_muon(config, DistributedType[kind])
