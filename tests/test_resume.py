"""Fault injection: a real compile is killed at several points, restarted, and must end where an
uninterrupted run ends, without ever damaging the good adapter already in the output folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_prompt
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
        assert not (out.parent / ".out.work").exists()
        shutil.rmtree(out)
        shutil.copytree(good_copy, out)  # the previous good adapter again, for the next kill point


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_then_resumes(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p", front="name: sig\nqueries: queries.txt\ntrain: {checkpoint_every: 100}\n")
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
