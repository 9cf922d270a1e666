"""What the command lines share: their parser, their ``main`` and their error handling.

* :func:`command_parser`: the parser of a command, with its positional paths, and
  :func:`add_no_progress`, its flag that turns the progress bar off;
* :func:`run_command`: the body of ``main(argv=None)`` (``matsciml-train``, ``-predict``,
  ``-convert``): parse, run, report errors as one line ``error: ...`` on stderr with
  status 2 (:func:`exit_on_error`), and return the result to a Python caller or nothing
  to the console script.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from matsciml.common.errors import ConfigError, DataError

__all__ = ["command_parser", "add_no_progress", "run_command", "exit_on_error", "one_line"]

T = TypeVar("T")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its lines stripped and joined by spaces).

    Parameters
    ----------
    err
        Any exception.

    Returns
    -------
    str
        The message without line breaks.
    """
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


@contextlib.contextmanager
def exit_on_error(*errors: type[BaseException]) -> Iterator[None]:
    """End the program on the given errors with ``error: <one line>`` on stderr and status 2.

    Parameters
    ----------
    *errors
        Exception types to report; default :class:`~matsciml.common.errors.ConfigError`
        and :class:`~matsciml.common.errors.DataError`.

    Raises
    ------
    SystemExit
        Status 2, after one of ``errors`` was raised inside the ``with`` block.

    Example::

        with exit_on_error():
            result = run(args)
    """
    caught = errors or (ConfigError, DataError)
    try:
        yield
    except caught as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def command_parser(prog: str, description: str, paths: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of a command, with its positional paths.

    Parameters
    ----------
    prog
        The command's name (``matsciml-predict``).
    description
        What it does (one sentence).
    paths
        ``{name: help}`` of the positional arguments, in order; each is read as a
        :class:`~pathlib.Path`.

    Returns
    -------
    argparse.ArgumentParser
        The parser; the command adds its options to it.

    Example::

        parser = command_parser("matsciml-convert", "Convert a dataset.", {"src": "file to read"})
        parser.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
        add_no_progress(parser, "--no-progress")
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, text in (paths or {}).items():
        parser.add_argument(name, type=Path, help=text)
    return parser


def add_no_progress(parser: argparse.ArgumentParser, flag: str) -> None:
    """Add the flag ``flag`` (``"--no-progress"``) that turns the progress bar off; its value is ``args.no_progress``."""
    parser.add_argument(flag, dest="no_progress", action="store_true", help="no progress bar")


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], T],
    errors: Sequence[type[BaseException]] = (),
    status: Callable[[T], int | None] | None = None,
) -> T | None:
    """The ``main(argv=None)`` of a command: parse ``argv``, run, end on errors with one line.

    Parameters
    ----------
    parser
        The command's parser.
    argv
        Arguments without the program name; ``None`` reads ``sys.argv`` (the console script).
    run
        ``run(args) -> result``: the command's work.
    errors
        Exceptions that end the program with ``error: <one line>`` on stderr and status 2
        (default :class:`~matsciml.common.errors.ConfigError` and
        :class:`~matsciml.common.errors.DataError`; see :func:`exit_on_error`).
    status
        ``status(result)``: the console script's exit status (``None``: 0); not used
        with ``argv`` given.

    Returns
    -------
    result or None
        With ``argv`` given, the result of ``run``; as a console script ``None`` (exit
        status 0).

    Raises
    ------
    SystemExit
        Status 2 after one of ``errors`` (or a bad argument); as a console script, the
        status that ``status`` gives.
    """
    args = parser.parse_args(None if argv is None else list(argv))
    with exit_on_error(*errors):
        result = run(args)
    if argv is not None:
        return result
    code = status(result) if status is not None else None
    if code is not None:
        raise SystemExit(code)
    return None
