"""Fault injection: a real compile is killed at several points, restarted, and must end where an
uninterrupted run ends, without ever damaging the good adapter already in the output folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import one_line_error, run_cli, write_prompt
from promptbake.artifact import read_manifest

EXE = str(Path(sys.executable).with_name("promptbake"))
ARGS = ["--steps", "5", "--batch-size", "4", "--heldout", "4", "--max-new-tokens", "8"]


def compile_cmd(prompt, model, out, *extra):
    return [EXE, "compile", str(prompt), "--model", str(model), "--out", str(out), *ARGS, *extra]


def run_ok(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def run_until_fault(cmd, point: str, tmp_path: Path, sig=signal.SIGKILL, sleep: str = "120") -> int:
    marker = tmp_path / f"marker-{point.replace(':', '-')}"
    env = {**os.environ, "PROMPTBAKE_FAULT_AT": point, "PROMPTBAKE_FAULT_MARKER": str(marker), "PROMPTBAKE_FAULT_SLEEP": sleep}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, f"compile ended before reaching {point}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {point}"
        time.sleep(0.2)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_compiles_resume_to_the_same_adapter(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p", front="name: resume\nqueries: queries.txt\ntrain: {checkpoint_every: 1}\n")
    reference = tmp_path / "reference"
    run_ok(compile_cmd(prompt, tiny_model_dir, reference))
    want = tensors(reference)

    out = tmp_path / "out"
    run_ok(compile_cmd(prompt, tiny_model_dir, out, "--seed", "7"))  # a previous good adapter
    previous = tensors(out)
    good_copy = tmp_path / "good-copy"
    shutil.copytree(out, good_copy)

    for point in ["sampling:3", "optimizer:4", "checkpoint", "write"]:
        code = run_until_fault(compile_cmd(prompt, tiny_model_dir, out), point, tmp_path)
        assert code == -signal.SIGKILL
        kept = read_manifest(out)  # verifies the weights' sha256 too
        assert kept.seed == 7 and all((tensors(out)[k] == v).all() for k, v in previous.items()), point
        run_ok(compile_cmd(prompt, tiny_model_dir, out))
        got = tensors(out)
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in want), f"resumed run after {point} differs"
        state = json.loads((out.parent / ".out.work" / "checkpoint" / "state.json").read_text())
        assert state["finished"] and state["step"] == 5  # kept for a longer compile to continue from
        shutil.rmtree(out)
        shutil.copytree(good_copy, out)  # the previous good adapter again, for the next kill point


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_then_resumes(tmp_path, tiny_model_dir):
    # With the sequence-level term on: its baseline (the last step's loss) must come back from the checkpoint.
    prompt = write_prompt(tmp_path / "p", front="name: sig\nqueries: queries.txt\ntrain: {checkpoint_every: 100, future_kl_weight: 1.0}\n")
    reference = tmp_path / "reference"
    run_ok(compile_cmd(prompt, tiny_model_dir, reference))
    out = tmp_path / "out"
    code = run_until_fault(compile_cmd(prompt, tiny_model_dir, out), "optimizer:2", tmp_path, sig=signal.SIGINT, sleep="3")
    assert code == 130
    assert (tmp_path / ".out.work" / "checkpoint" / "state.json").is_file() and not out.exists()
    resumed = run_ok(compile_cmd(prompt, tiny_model_dir, out))
    assert "resuming from step 2" in resumed.stderr
    assert "lr_scheduler.step()" not in resumed.stderr  # the schedule is wound forward without torch's warning
    got, want = tensors(out), tensors(reference)
    assert all((got[k] == want[k]).all() for k in want)
    restarted = run_ok(compile_cmd(prompt, tiny_model_dir, tmp_path / "fresh", "--restart"))
    assert "resuming" not in restarted.stderr


def test_continue_key_ignores_only_the_step_count(tmp_path, tiny_model_dir):
    """Two compiles that differ only in `steps` share a continue key at a constant learning rate; any other
    setting, or a schedule that decays over `steps`, gives none to share."""
    from promptbake.plan import plan_compile

    prompt = write_prompt(tmp_path / "p")

    def keys(**overrides):
        plan = plan_compile(prompt, model=str(tiny_model_dir), overrides=overrides)
        plan.resolve()
        return plan.build_key, plan.continue_key

    short, long, other_lr = keys(steps=3), keys(steps=6), keys(steps=6, lr=2e-3)
    assert short[0] != long[0] and short[1] == long[1] is not None
    assert other_lr[1] != long[1]
    assert keys(steps=3, checkpoint_every=1)[1] == short[1]  # how a bake runs is in neither key
    assert keys(steps=6, lr_schedule="cosine")[1] is None and keys(steps=6, lr_schedule="wsd")[1] is None


def test_which_checkpoint_a_compile_starts_from(tmp_path, tiny_model_dir):
    """Its own unfinished checkpoint resumes; its own finished one (--force, or the artifact deleted) starts over;
    a same-settings checkpoint continues only up to this run's steps and while its token budget is not spent."""
    import torch

    from promptbake.bake import resumable
    from promptbake.checkpoint import Checkpoint
    from promptbake.plan import plan_compile

    def plan(**overrides):
        made = plan_compile(write_prompt(tmp_path / "p"), model=str(tiny_model_dir), overrides=overrides)
        made.resolve()
        return made

    def checkpoint(of, step, finished=False, tokens=100):
        return Checkpoint(step=step, build_key=of.build_key, lora={}, optimizer={}, adam_steps=[], python_rng=None,
                          torch_rng=torch.get_rng_state(), log_lines=step, extra={"tokens_trained": tokens},
                          continue_key=of.continue_key, finished=finished)

    six, three, ten = plan(steps=6), plan(steps=3), plan(steps=10)
    own = checkpoint(six, 4)
    assert resumable(six, own) is own and resumable(six, checkpoint(six, 6, finished=True)) is None
    assert resumable(six, None) is None
    shorter = checkpoint(three, 3, finished=True)
    assert resumable(six, shorter) is shorter
    assert resumable(six, checkpoint(ten, 6)) is not None  # a longer compile's step 6 is this one's last
    assert resumable(six, checkpoint(ten, 10, finished=True)) is None  # past this run's steps
    budget = plan(steps=6, token_budget=500)
    assert resumable(budget, checkpoint(plan(steps=3, token_budget=500), 3, tokens=400)) is not None
    assert resumable(budget, checkpoint(plan(steps=3, token_budget=500), 3, tokens=500)) is None  # it stopped there


def _log_kls(folder: Path) -> list[float]:
    return [json.loads(line)["kl"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_longer_compile_continues_from_a_shorter_one(tmp_path, tiny_model_dir):
    """`--steps 6` after a finished 3-step compile trains steps 4-6 from its kept checkpoint and ends on the
    adapter, and the log, of a straight 6-step compile; a run whose settings differ in more than steps starts over."""
    prompt = write_prompt(tmp_path / "p", front="name: longer\nqueries: queries.txt\n")
    args = ["--batch-size", "4", "--heldout", "4", "--max-new-tokens", "8"]

    def compile_(out, *extra):
        return run_ok([EXE, "compile", str(prompt), "--model", str(tiny_model_dir), "--out", str(out), *args, *extra])

    reference = tmp_path / "reference"
    compile_(reference, "--steps", "6")
    out = tmp_path / "out"
    first = compile_(out, "--steps", "3")
    assert "continuing" not in first.stderr and "resuming" not in first.stderr
    kept = json.loads((tmp_path / ".out.work" / "checkpoint" / "state.json").read_text())
    assert kept["step"] == 3
    longer = compile_(out, "--steps", "6")
    assert "continuing from step 3" in longer.stderr
    got, want = tensors(out), tensors(reference)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    assert _log_kls(out) == _log_kls(reference) and len(_log_kls(out)) == 6
    manifest = read_manifest(out)
    assert manifest.resumed_from_step == 3 and manifest.loss_summary["steps"] == 6
    assert manifest.heldout_kl_before == read_manifest(reference).heldout_kl_before

    # Into another folder: --continue-from names the shorter bake, whose kept checkpoint stays as it was.
    short = tmp_path / "short"
    compile_(short, "--steps", "3")
    kept_before = (tmp_path / ".short.work" / "checkpoint" / "state.json").read_text()
    longer_elsewhere = compile_(tmp_path / "long", "--steps", "6", "--continue-from", str(short))
    assert "continuing from step 3" in longer_elsewhere.stderr
    got = tensors(tmp_path / "long")
    assert all((got[k] == want[k]).all() for k in want) and _log_kls(tmp_path / "long") == _log_kls(reference)
    assert (tmp_path / ".short.work" / "checkpoint" / "state.json").read_text() == kept_before

    def refused(fragment, *extra):  # in-process: the refusals come before any training
        result = run_cli("compile", prompt, "--model", tiny_model_dir, "--out", tmp_path / "bad", *args, *extra)
        one_line_error(result, fragment)
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.work").exists()

    refused("no checkpoint kept beside it", "--steps", "6", "--continue-from", str(tmp_path / "nowhere"))
    refused("only steps may differ", "--steps", "6", "--lr", "2e-3", "--continue-from", str(short))
    refused("past this compile's 2 steps", "--steps", "2", "--continue-from", str(short))
    refused("lr_schedule cosine", "--steps", "6", "--lr-schedule", "cosine", "--continue-from", str(short))

    other = compile_(out, "--steps", "8", "--lr", "2e-3")  # another learning rate: its step 6 is not this one's
    assert "continuing" not in other.stderr and read_manifest(out).resumed_from_step is None
    cosine = compile_(tmp_path / "cos", "--steps", "3", "--lr-schedule", "cosine")
    assert "continuing" not in cosine.stderr and not (tmp_path / ".cos.work").exists()  # nothing can continue from it
