"""A test hook for fault injection: the kill-and-resume tests park a compile at a named point."""

from __future__ import annotations

import os
import time
from pathlib import Path


def fault_point(name: str) -> None:
    """When PROMPTBAKE_FAULT_AT names this point, write the marker file and wait to be killed."""
    if os.environ.get("PROMPTBAKE_FAULT_AT") != name:
        return
    marker = os.environ.get("PROMPTBAKE_FAULT_MARKER")
    if marker:
        Path(marker).write_text(name)
    time.sleep(float(os.environ.get("PROMPTBAKE_FAULT_SLEEP", "120")))
