"""End to end on the real default model (SmolLM2-135M-Instruct): compile, load with PEFT, KL falls, chat works."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import pirate_with_short_heldout
from promptbake import compile_prompt, read_manifest
from promptbake.artifact import BakeManifest
from promptbake.cli import app


@pytest.mark.slow
def test_compile_default_model_reduces_heldout_kl(tmp_path, default_model_dir):
    out = tmp_path / "pirate"
    result = compile_prompt(
        pirate_with_short_heldout(tmp_path / "prompt", heldout=8),
        out=out,
        overrides=dict(steps=8, batch_size=8, max_new_tokens=32, eval_max_new_tokens=24, lr=1e-3, seed=0),
    )
    manifest = read_manifest(out)
    BakeManifest.model_validate(manifest.model_dump())
    assert manifest.base_model == "SmolLM2-135M-Instruct" and manifest.prompt_tokens > 20
    assert manifest.heldout_kl_after < manifest.heldout_kl_before, (manifest.heldout_kl_before, manifest.heldout_kl_after)
    assert len(result.train.log) == 8 and all(torch.isfinite(torch.tensor(e.kl)) for e in result.train.log)

    from peft import PeftModel

    from promptbake.models import load_model

    model = PeftModel.from_pretrained(load_model(default_model_dir), str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained, not the zero init

    chat = CliRunner().invoke(app, ["chat", str(out), "-m", "Where is the treasure?", "--max-new-tokens", "12"])
    assert chat.exit_code == 0 and chat.output.strip()
