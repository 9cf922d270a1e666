"""Atomic writes: the target is absent, old or complete; a failed write leaves no temporary file."""

from __future__ import annotations

import pytest

from matsciml.common.atomic import TEMPORARY_PREFIX, atomic_path, atomic_write_text


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "old")
    with atomic_path(target, suffix=".txt") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(TEMPORARY_PREFIX) and tmp.suffix == ".txt"
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_path(target, fsync=True) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("half-way")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
