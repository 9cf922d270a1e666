"""Atomic writes: the target is absent, old or complete; a failed write leaves no temporary file."""

from __future__ import annotations

import pytest

from matsciml.common.atomic import TEMPORARY_PREFIX, atomic_path, atomic_write_text, leftover_temporaries


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


def test_leftover_temporaries_are_those_of_the_target_and_suffix(tmp_path):
    target = tmp_path / "train.lmdb"
    suffix = ".train.lmdb.tmp"
    ours = [f"{TEMPORARY_PREFIX}{pid}-{digit * 32}{suffix}" for pid, digit in ((12, "a"), (7, "0"))]
    others = [
        f"{TEMPORARY_PREFIX}12-{'b' * 32}.val.lmdb.tmp",  # another target
        f"{TEMPORARY_PREFIX}12-{'c' * 31}{suffix}",  # not a name atomic_path makes
        f"{TEMPORARY_PREFIX}x-{'c' * 32}{suffix}",
        f"x{TEMPORARY_PREFIX}12-{'c' * 32}{suffix}",
        "train.lmdb",
    ]
    for name in ours + others:
        (tmp_path / name).write_text("")
    assert leftover_temporaries(target, suffix) == sorted(tmp_path / name for name in ours)
    with pytest.raises(RuntimeError):  # a write that fails removes its own temporary file
        with atomic_path(target, suffix=suffix) as tmp:
            tmp.write_text("partial")
            assert tmp in leftover_temporaries(target, suffix)
            raise RuntimeError
    assert len(leftover_temporaries(target, suffix)) == 2
