"""Error handling shared by the command lines: one line ``error: ...`` on stderr, status 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from matsciml.common.errors import ConfigError, DataError

__all__ = ["exit_on_error", "one_line"]


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
