"""Checkpoints of an unfinished compile, so a killed run resumes where it stopped.

A checkpoint holds everything the next step depends on: LoRA weights, AdamW moments and step counts,
the query sampler's and torch's RNG states, the step number, what was measured before training and, with
`ema_decay`, the running sums of the weight average. On CPU a resumed run then reproduces the
uninterrupted run bit for bit. Tensors are stored as safetensors (never pickle); the rest as JSON. Each
save goes to a temporary folder that is renamed over the last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from promptbake.atomic import atomic_folder, write_text_atomic
from promptbake.faults import fault_point

CHECKPOINT = "checkpoint"
AVERAGE_FILE = "average.safetensors"


@dataclass
class Checkpoint:
    step: int
    build_key: str
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    adam_steps: list[float]
    python_rng: Any
    torch_rng: torch.Tensor  # process 0's; each process restores its own from `torch_rngs`
    log_lines: int
    extra: dict[str, Any] = field(default_factory=dict)
    torch_rngs: list[torch.Tensor] = field(default_factory=list)  # one per process, by process index
    continue_key: str | None = None  # the compile's settings without its step count (promptbake.plan.HOW_FAR)
    finished: bool = False  # its compile wrote the artifact: kept for longer compiles to continue from, not to resume
    average: dict[str, torch.Tensor] | None = None  # the weight average's running sums (promptbake.averaging), if any

    def torch_rng_of(self, process_index: int) -> torch.Tensor:
        return self.torch_rngs[process_index] if process_index < len(self.torch_rngs) else self.torch_rng


@dataclass
class Checkpointing:
    """How the training loop saves and resumes: where, under which build key, how often."""

    work_dir: Path
    build_key: str
    every: int
    continue_key: str | None = None
    resume_from: Checkpoint | None = None
    log_lines_before: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    stop_requested: Callable[[], bool] = lambda: False


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work_dir: Path, *, step: int, build_key: str, model, optimizer, python_rng_state: Any,
                    log_lines: int, extra: dict[str, Any], torch_rngs: list[torch.Tensor] | None = None,
                    continue_key: str | None = None, average: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint atomically. `torch_rngs`: every process's torch RNG state (default: this one's);
    `average`: the weight average's running sums, when the compile keeps one."""
    with atomic_folder(work_dir / CHECKPOINT) as tmp:
        params = trainable(model)
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "lora.safetensors"))
        moments: dict[str, torch.Tensor] = {}
        adam_steps: list[float] = []
        for index, p in enumerate(params.values()):
            # Every per-parameter tensor of the optimizer (AdamW: exp_avg, exp_avg_sq; Muon: momentum_buffer);
            # AdamW's step count goes to state.json.
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if key != "step":
                    moments[f"{index}.{key}"] = value.detach().cpu().contiguous()
            adam_steps.append(float(state["step"]) if "step" in state else 0.0)
        save_file(moments or {"empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        if average is not None:
            save_file(average, str(tmp / AVERAGE_FILE))
        rngs = torch_rngs or [torch.get_rng_state()]
        save_file({"torch_rng": rngs[0].clone(), **{f"torch_rng.{i}": r.clone() for i, r in enumerate(rngs)}},
                  str(tmp / "rng.safetensors"))
        fault_point("checkpoint")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "build_key": build_key, "continue_key": continue_key, "adam_steps": adam_steps, "python_rng": python_rng_state,
            "log_lines": log_lines, "extra": extra,
        }))


def checkpoint_folder(work_dir: Path) -> Path:
    """The folder of the last complete checkpoint in `work_dir` (it may not exist)."""
    folder = work_dir / CHECKPOINT
    if not folder.is_dir():  # killed between the two renames of atomic_folder: the previous one was moved aside
        olds = sorted(work_dir.glob(f".{CHECKPOINT}.old-*"), key=lambda p: p.stat().st_mtime)
        folder = olds[-1] if olds else folder
    return folder


def load_checkpoint(work_dir: Path, build_key: str, continue_key: str | None = None) -> Checkpoint | None:
    """The last complete checkpoint of a compile with this build key, or with this continue key (the same
    settings but the step count: the caller decides whether its step and token count still lead to this run), or None."""
    folder = checkpoint_folder(work_dir)
    try:
        state = json.loads((folder / "state.json").read_text())
        if state["build_key"] != build_key and (continue_key is None or state.get("continue_key") != continue_key):
            return None
        rng = load_file(str(folder / "rng.safetensors"))
        return Checkpoint(
            step=int(state["step"]),
            build_key=state["build_key"],
            lora=load_file(str(folder / "lora.safetensors")),
            optimizer=load_file(str(folder / "optimizer.safetensors")),
            adam_steps=state["adam_steps"],
            python_rng=state["python_rng"],
            torch_rng=rng["torch_rng"],
            log_lines=int(state["log_lines"]),
            extra=state.get("extra", {}),
            torch_rngs=[rng[f"torch_rng.{i}"] for i in range(len(rng)) if f"torch_rng.{i}" in rng],
            continue_key=state.get("continue_key"),
            finished=bool(state.get("finished", False)),
            average=load_file(str(folder / AVERAGE_FILE)) if (folder / AVERAGE_FILE).is_file() else None,
        )
    except (OSError, ValueError, KeyError):
        return None


def mark_finished(work_dir: Path, build_key: str) -> None:
    """Flag the last checkpoint as that of the artifact just written (the next checkpoint saved drops the flag). A
    checkpoint of another compile (a longer one this compile continued from, at its own last step) stays as it is."""
    path = work_dir / CHECKPOINT / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):  # no checkpoint to keep: a longer compile will start from step 1
        return
    if state.get("build_key") != build_key:
        return
    write_text_atomic(path, json.dumps({**state, "finished": True}))


def restore(checkpoint: Checkpoint, model, optimizer) -> None:
    """Put LoRA weights and the optimizer's state (AdamW or Muon) back exactly as they were saved."""
    params = trainable(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(checkpoint.lora[name])
    for index, p in enumerate(params.values()):
        prefix = f"{index}."
        state = {key.removeprefix(prefix): value.to(p.device).clone()
                 for key, value in checkpoint.optimizer.items() if key.startswith(prefix)}
        if checkpoint.adam_steps[index] > 0:
            state["step"] = torch.tensor(checkpoint.adam_steps[index])
        if state:
            optimizer.state[p] = state


def python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
