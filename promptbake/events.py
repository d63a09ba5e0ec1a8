"""Progress events of a compile: one small dataclass per kind, passed to the caller's `on_event` callback.

The CLI draws its progress bar from these and a notebook can log them; nobody has to parse messages. Every
event has a `message` for callers that only print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:  # no torch import just to describe progress
    from promptbake.train import StepLog


@dataclass(frozen=True)
class StageStarted:
    """A stage of the compile began: load, length_probe, teacher_samples, measure_before, lora_init, measure_after, write."""

    stage: str
    message: str


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a chat template without a system role, the cap set by its limit, ...)."""

    message: str
    warning: bool = False


@dataclass(frozen=True)
class TrainingStarted:
    first_step: int
    steps: int
    token_budget: int | None
    message: str


@dataclass(frozen=True)
class StepDone:
    entry: StepLog
    steps: int

    @property
    def message(self) -> str:
        e = self.entry
        label = "KL" if e.loss.startswith("reverse_kl") else e.loss
        skipped = "  gradient not finite: update skipped" if e.skipped else ""
        return f"step {e.step}/{self.steps}  {label} {e.kl:.4f}  {e.tokens_per_s:.0f} tok/s  {e.seconds:.2f} s/step{skipped}"


@dataclass(frozen=True)
class TrainingDone:
    steps_run: int
    seconds: float
    message: str


@dataclass(frozen=True)
class UpToDate:
    out_dir: str
    message: str


Event = Union[StageStarted, Notice, TrainingStarted, StepDone, TrainingDone, UpToDate]
OnEvent = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default callback."""
