"""Test hooks for fault injection: the kill-and-resume tests park a compile at a named point; the training
tests make one step's gradient non-finite."""

from __future__ import annotations

import os
import time
from pathlib import Path


def fault_point(name: str, step: int | None = None) -> None:
    """When PROMPTBAKE_FAULT_AT is `name` or `name:step`, write the marker file and wait to be killed."""
    if not fault_requested(name, step):
        return
    marker = os.environ.get("PROMPTBAKE_FAULT_MARKER")
    if marker:
        Path(marker).write_text(name)
    time.sleep(float(os.environ.get("PROMPTBAKE_FAULT_SLEEP", "120")))


def fault_requested(name: str, step: int | None = None) -> bool:
    """True when PROMPTBAKE_FAULT_AT is `name` or `name:step` (several comma-separated): the caller injects the
    fault itself, no waiting."""
    wanted = os.environ.get("PROMPTBAKE_FAULT_AT")
    return wanted is not None and bool({name, f"{name}:{step}"} & set(wanted.split(",")))
