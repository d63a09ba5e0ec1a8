"""Atomic writes: a file or a whole folder appears complete or not at all, and a crash keeps the previous one.

Everything promptbake writes (artifacts, checkpoints, converted models, merged exports, reports, results) goes
through these two helpers, so every output has the same guarantee: written to a temporary sibling, flushed to
disk (fsync of each file and of the folder), then renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Literal


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves (so the names are on disk too)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temporary sibling and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(out_dir: Path, *, if_exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yield an empty temporary sibling of `out_dir` to fill. When the block ends without an error, it is flushed
    and renamed into `out_dir`; the previous folder is moved aside first and removed only after the new one is in
    place. `if_exists="keep"` leaves an `out_dir` that appeared meanwhile (another process won the race). On an
    error the temporary folder is removed and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out_dir.exists() and if_exists == "keep":
            return
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_path(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
