"""The CLI on a tiny real model: artifacts, --force, and every bad input as one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_prompt
from promptbake.artifact import read_manifest
from promptbake.cli import app

FAST = ["--steps", "2", "--batch-size", "4", "--heldout", "4", "--max-new-tokens", "8"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment: str):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], text
    assert text.splitlines()[-1] == errors[0]  # nothing after the error


@pytest.fixture
def prompt(tmp_path):
    return write_prompt(tmp_path / "p", front="name: tinybake\nqueries: queries.txt\nchecks:\n  - {name: short, max_words: 5}\n")


def test_compile_writes_a_loadable_adapter_and_respects_force(tmp_path, prompt, tiny_model_dir):
    out = tmp_path / "out"
    result = run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "baked tinybake" in result.output
    manifest = read_manifest(out)
    assert manifest.name == "tinybake" and manifest.config["steps"] == 2
    assert len(manifest.heldout_ids) == 4 and manifest.num_queries == 40
    assert set(manifest.check_rates) == {"base", "teacher", "baked"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]

    from peft import PeftModel

    from promptbake.models import load_model

    model = PeftModel.from_pretrained(load_model(tiny_model_dir), str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and not cfg.get("modules_to_save") and not cfg.get("use_dora")

    before = (out / "adapter_model.safetensors").read_bytes()
    again = run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST)
    assert again.exit_code == 0 and "up to date" in again.output
    assert (out / "adapter_model.safetensors").read_bytes() == before
    changed = run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST, "--seed", "5")
    assert changed.exit_code == 0 and "baked tinybake" in changed.output, changed.output
    assert read_manifest(out).seed == 5
    forced = run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST, "--seed", "5", "--force")
    assert forced.exit_code == 0 and "baked tinybake" in forced.output
    assert [p.name for p in out.parent.glob(".out.*")] == [".out.work"], "temporary folders left behind"
    assert sorted(p.name for p in (out.parent / ".out.work").iterdir()) == ["checkpoint", "train_log.jsonl"]
    kept = json.loads((out.parent / ".out.work" / "checkpoint" / "state.json").read_text())
    assert kept["finished"] and kept["step"] == 2  # only the last checkpoint, for a longer compile to continue from


def test_output_holding_something_else_is_kept_without_force(tmp_path, prompt, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST), "--force")
    assert (out / "notes.txt").read_text() == "mine"


def test_same_seed_gives_the_same_adapter(tmp_path, prompt, tiny_model_dir):
    for name in ("a", "b"):
        assert run("compile", prompt, "--model", tiny_model_dir, "--out", tmp_path / name, *FAST, "--precision", "fp32").exit_code == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


@pytest.fixture
def other_tokenizer_model(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tok"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<promptbake-extra-token>"])
    tok.save_pretrained(other)
    return other


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--steps", "-1"], "steps"),
        (["--batch-size", "0"], "batch_size"),
        (["--kl", "nope"], "kl"),
        (["--lora-r", "12"], "lora_r"),
        (["--batch-size", "64"], "a batch needs 64"),
        (["--queries", "missing.jsonl"], "not found"),
        (["--var", "oops"], "key=value"),
        (["--topk", "100000"], "larger than the vocabulary"),
        (["--model", "no/such-model-offline"], "hub download failed"),
        (["--model", "./no-such-folder"], "unknown model"),
    ],
)
def test_bad_flags(tmp_path, prompt, tiny_model_dir, extra, fragment):
    out = tmp_path / "out"
    args = ["compile", prompt, "--out", out, *FAST]
    if "--model" not in extra:
        args += ["--model", tiny_model_dir]
    result = run(*args, *extra)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_teacher_with_another_tokenizer_is_refused(tmp_path, prompt, tiny_model_dir, other_tokenizer_model):
    out = tmp_path / "out"
    result = run("compile", prompt, "--model", tiny_model_dir, "--teacher", other_tokenizer_model, "--out", out, *FAST)
    assert_one_line_error(result, "different tokenizer")
    assert not out.exists()


def test_prompt_too_long_for_context(tmp_path, tiny_model_dir):
    small_ctx = tmp_path / "small-ctx"
    shutil.copytree(tiny_model_dir, small_ctx)
    cfg = json.loads((small_ctx / "config.json").read_text())
    cfg["max_position_embeddings"] = 128
    (small_ctx / "config.json").write_text(json.dumps(cfg))
    prompt = write_prompt(tmp_path / "p", body="rule " * 200)
    result = run("compile", prompt, "--model", small_ctx, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(result, "over the model's context of 128")


def test_prompt_without_queries(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p", front="name: x\n")
    assert_one_line_error(run("compile", prompt, "--model", tiny_model_dir), "no queries")


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, pickled / f.name)
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    prompt = write_prompt(tmp_path / "p")
    assert_one_line_error(run("compile", prompt, "--model", pickled, "--out", tmp_path / "o", *FAST), "--trust-pickle")


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point itself: one line on stderr, exit 2, no traceback."""
    exe = Path(sys.executable).with_name("promptbake")
    proc = subprocess.run([str(exe), "compile", str(tmp_path / "missing.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "prompt file not found" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_up_to_date_path_never_imports_torch(tmp_path, prompt, tiny_model_dir):
    """The build-cache answer must stay cheap: no torch, transformers or peft import on that path."""
    out = tmp_path / "out"
    assert run("compile", prompt, "--model", tiny_model_dir, "--out", out, *FAST).exit_code == 0
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from promptbake.cli import app\n"
        f"r = CliRunner().invoke(app, ['compile', {str(prompt)!r}, '--model', {str(tiny_model_dir)!r}, '--out', {str(out)!r}, *{FAST!r}])\n"
        "assert r.exit_code == 0 and 'up to date' in r.output, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_compile_offers_every_config_field_as_an_option():
    from promptbake.config import BakeConfig

    result = CliRunner().invoke(app, ["compile", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    missing = [name for name in BakeConfig.model_fields if "--" + name.replace("_", "-") not in result.output]
    assert not missing, missing
    text = " ".join(result.output.replace("│", " ").split())
    assert "none | dims. With hidden_match_weight" in text  # a Literal's choices are listed


def test_generated_options_reach_the_config_typed_and_unset_ones_stay_unset():
    import typer

    from promptbake.cli import with_config_options
    from promptbake.config import BakeConfig

    seen: dict = {}
    probe = typer.Typer()

    @probe.command()
    @with_config_options
    def cmd(name: str, *, overrides: dict) -> None:
        seen.update(overrides, name=name)

    result = CliRunner().invoke(probe, ["x", "--lora-targets", "q_proj, v_proj", "--no-prefix-cache", "--torch-compile",
                                        "--max-new-tokens", "96", "--teacher-mode", "live", "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    assert seen["name"] == "x"
    config = BakeConfig.from_layers({k: v for k, v in seen.items() if k != "name"})
    assert config.lora_targets == ["q_proj", "v_proj"] and config.prefix_cache is False and config.torch_compile is True
    assert config.max_new_tokens == 96 and config.teacher_mode == "live" and config.lr == 0.002
    assert seen["steps"] is None and seen["preset"] is None  # not given: the prompt file and the preset decide


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--teacher-mode", "live", "--teacher", "some-other-model"], "teacher_mode live"),
        (["--method", "sft", "--teacher-mode", "live"], "no live teacher"),
        (["--max-new-tokens", "12x"], "max_new_tokens: must be a positive integer or 'auto'"),
        (["--teacher-url", "http://127.0.0.1:9", "--kl", "full"], "needs method opcd with kl sampled"),
        (["--teacher-url", "http://127.0.0.1:9", "--kl", "sampled", "--teacher-mode", "live"], "cannot be a server"),
        (["--teacher-url", "http://127.0.0.1:9", "--kl", "sampled", "--temperature", "0.7"], "scores at temperature 1"),
        (["--rollout-url", "http://127.0.0.1:9", "--rollout", "vllm"], "rollout_url on a server: give one"),
        (["--hidden-match-weight", "10", "--kl", "sampled"], "hidden_match_weight reads the teacher's layers"),
        (["--hidden-match-weight", "10", "--method", "sft"], "not method sft with kl full"),
    ],
)
def test_conflicting_settings_fail_before_any_model_loads(tmp_path, prompt, extra, fragment):
    out = tmp_path / "out"
    result = run("compile", prompt, "--out", out, "--model", tmp_path / "no-model-needed", *extra)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_unreachable_servers_are_one_line_before_training(tmp_path, prompt, tiny_model_dir):
    from promptbake.serve import free_port

    out = tmp_path / "out"
    url = f"http://127.0.0.1:{free_port()}"
    for flag in ("--teacher-url", "--rollout-url"):
        result = run("compile", prompt, "--out", out, "--model", tiny_model_dir, *FAST, "--kl", "sampled", flag, url)
        assert_one_line_error(result, f"{flag} {url}: no answer after")
        assert not out.exists() and not (tmp_path / ".out.work" / "train_log.jsonl").exists()
