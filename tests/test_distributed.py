"""`accelerate launch` with 2 CPU processes (gloo) on the tiny model: one artifact, the same training as one
process with the same global batch, Ctrl-C stops both processes, and the interrupted run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_prompt
from promptbake.serve import free_port

# sft trains on the prompted teacher's samples, drawn once and cached: the data of every step is then fixed,
# and one process and two must train the same adapter up to the order of floating-point sums. Two updates per
# step: each process splits its share of the batch in two, and the processes' first halves together must be the
# single process's first half (its token count agreed across processes), or the adapters part (see
# promptbake.train.update_parts).
SETTINGS = ["--method", "sft", "--steps", "8", "--batch-size", "4", "--micro-batch-size", "2", "--heldout", "4",
            "--max-new-tokens", "8", "--precision", "fp32", "--lr", "0.01", "--checkpoint-every", "100",
            "--updates-per-batch", "2"]
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # gloo's all-reduce and the split of the batch reorder fp32 sums
# Adam divides by the root of the squared gradient, so where an element's gradient is near zero it turns that
# reordering noise into part of an update; 16 updates at lr 0.01 left one weight of 2,048 9e-6 apart.
ADAPTER_TOLERANCE = dict(rtol=1e-3, atol=2e-5)


def compile_command(prompt: Path, out: Path, model: Path, processes: int) -> list[str]:
    cli = ["-m", "promptbake.cli", "compile", str(prompt), "--model", str(model), "--out", str(out), *SETTINGS]
    if processes == 1:
        return [sys.executable, *cli]
    # accelerate's torchrun launcher (--multi_gpu); on a machine without GPUs the processes talk over gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *cli]


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def step_losses(out: Path) -> list[float]:
    return [json.loads(line)["kl"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PROMPTBAKE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def test_two_processes_train_like_one_and_resume_after_ctrl_c(tmp_path, tiny_model_dir, env):
    prompt = write_prompt(tmp_path / "p")
    one, two, stopped = tmp_path / "one", tmp_path / "two", tmp_path / "stopped"

    single = run(compile_command(prompt, one, tiny_model_dir, 1), env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(compile_command(prompt, two, tiny_model_dir, 2), env)
    assert double.returncode == 0, double.stderr[-3000:]

    # One artifact, reported once, beside its finished last checkpoint (a longer compile continues from it); the
    # manifest says two processes trained it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("p", "home")) == [".one.work", ".two.work", "one", "two"]
    for work in (".one.work", ".two.work"):
        kept = json.loads((tmp_path / work / "checkpoint" / "state.json").read_text())
        assert kept["finished"] and kept["step"] == 8, work
    assert double.stdout.count("baked prompt ->") == 1
    manifest = json.loads((two / "bake.json").read_text())
    assert manifest["loss_summary"]["processes"] == 2 and manifest["loss_summary"]["rollouts"] == 8 * 4
    # The same global batch each step: the same losses and the same adapter as one process (the check that both
    # processes hold the same adapter runs inside training and would have failed the run).
    torch.testing.assert_close(torch.tensor(step_losses(two)), torch.tensor(step_losses(one)), **TOLERANCE)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **ADAPTER_TOLERANCE)
    assert any(a[n].abs().max() > 0 for n in a if "lora_B" in n)  # it did train

    # Ctrl-C in the terminal reaches the whole process group: both processes stop after the same step and save.
    # Both processes pause for a few seconds before step 3's update (a fault point), so the signal lands mid-run.
    marker = tmp_path / "paused"
    paused = {**env, "PROMPTBAKE_FAULT_AT": "optimizer:3", "PROMPTBAKE_FAULT_MARKER": str(marker),
              "PROMPTBAKE_FAULT_SLEEP": "3"}
    proc = subprocess.Popen(compile_command(prompt, stopped, tiny_model_dir, 2), env=paused, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    with pytest.raises(ProcessLookupError):  # nobody left running in the group
        os.killpg(proc.pid, 0)
    state = json.loads((tmp_path / ".stopped.work" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and not stopped.exists()

    resumed = run(compile_command(prompt, stopped, tiny_model_dir, 2), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {state['step']}" in resumed.stderr
    torch.testing.assert_close(torch.tensor(step_losses(stopped)), torch.tensor(step_losses(two)), **TOLERANCE)
    c = load_file(str(stopped / "adapter_model.safetensors"))
    for name in b:
        torch.testing.assert_close(c[name], b[name], **TOLERANCE)
