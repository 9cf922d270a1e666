"""Atomic file writes: a file is at every moment absent, old or complete.

:func:`atomic_path` is the one pattern (temporary file beside the target, then
:func:`os.replace`) for every file the package writes; checkpoints add ``fsync``
(:func:`matsciml.lightning.checkpointing.atomic_torch_save`).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMPORARY_PREFIX", "atomic_path", "atomic_write_text", "fsync_folder", "leftover_temporaries"]

#: Prefix of the temporary files of :func:`atomic_path` (never taken for a finished file).
TEMPORARY_PREFIX = ".partial-"


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` when the ``with`` block succeeds.

    The one atomic-write pattern of the package: write the temporary file inside the block,
    and ``path`` is at every moment absent, old or complete. On an error the temporary file
    is removed and ``path`` is untouched.

    Parameters
    ----------
    path
        The final file (its folder is created).
    suffix
        Ending of the temporary name ``.partial-<pid>-<hex><suffix>``; default: the
        suffixes of ``path`` (so writers that infer the format from the name, such as
        ``savefig`` or ``ase.io.write``, still do). A suffix that names ``path`` lets
        :func:`leftover_temporaries` find what a killed write left.
    fsync
        Flush the file and the folder to disk (checkpoints; a crash right after the rename
        then still finds the complete file).

    Example::

        with atomic_path(folder / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    tmp = path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{suffix}"
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def leftover_temporaries(path: str | os.PathLike, suffix: str) -> list[Path]:
    """The temporary files of :func:`atomic_path` ``(path, suffix)`` beside ``path``.

    A write killed inside the block (``SIGKILL``, a node failure) leaves its temporary
    file behind; a writer that names ``path`` in ``suffix`` finds them here (of every
    process: call it while no other process writes ``path``) and removes them.

    Returns
    -------
    list of Path
        The files named ``.partial-<pid>-<32 hex digits><suffix>``, sorted.
    """
    path = Path(path)
    name = re.compile(re.escape(TEMPORARY_PREFIX) + r"\d+-[0-9a-f]{32}" + re.escape(suffix))
    return sorted(p for p in path.parent.glob(TEMPORARY_PREFIX + "*") if name.fullmatch(p.name))
