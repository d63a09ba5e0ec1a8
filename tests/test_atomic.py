"""The one atomic-write helper: a folder or file appears whole or not at all, and a failure keeps the old one."""

from __future__ import annotations

import pytest

from promptbake.atomic import atomic_folder, write_text_atomic


def test_a_failed_write_keeps_the_previous_folder_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "artifact"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "weights").write_text("half of v2")
            raise RuntimeError("crash while writing")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_a_finished_write_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "artifact"
    with atomic_folder(out) as tmp:
        (tmp / "old-only").write_text("x")
    with atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_text("v2")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["sub", "sub/new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_keep_leaves_a_folder_another_process_wrote_first(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out, if_exists="keep") as tmp:
        (tmp / "config.json").write_text("mine")
        out.mkdir()
        (out / "config.json").write_text("theirs")  # the other process finished first
    assert (out / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_text_files_are_replaced_whole(tmp_path):
    path = tmp_path / "deep" / "result.json"
    write_text_atomic(path, "1")
    write_text_atomic(path, "2")
    assert path.read_text() == "2" and [p.name for p in path.parent.iterdir()] == ["result.json"]
