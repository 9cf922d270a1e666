"""Tests of the shared command-line pieces (:mod:`matsciml.common.cli`).

Oracles: the parsed values of known argument lists; the exit status and stderr line of
a failing command; what a Python caller and a console script get back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from matsciml.common.cli import add_no_progress, command_parser, run_command
from matsciml.common.errors import ConfigError


def _parser():
    parser = command_parser("demo", "A demonstration.", {"src": "input", "dst": "output"})
    parser.add_argument("--code", type=int, default=None)
    add_no_progress(parser, "--no-progress")
    return parser


def test_parser_reads_paths_in_order_and_the_progress_flag():
    args = _parser().parse_args(["a.extxyz", "b.lmdb", "--no-progress"])
    assert (args.src, args.dst, args.no_progress) == (Path("a.extxyz"), Path("b.lmdb"), True)
    assert _parser().parse_args(["a", "b"]).no_progress is False


def test_python_callers_get_the_result_console_scripts_the_status(monkeypatch):
    def run(args):
        return {"code": args.code}

    status = lambda result: result["code"]  # noqa: E731
    assert run_command(_parser(), ["a", "b", "--code", "3"], run, status=status) == {"code": 3}
    monkeypatch.setattr(sys, "argv", ["demo", "a", "b"])
    assert run_command(_parser(), None, run, status=status) is None  # status None: exit status 0
    monkeypatch.setattr(sys, "argv", ["demo", "a", "b", "--code", "143"])
    with pytest.raises(SystemExit) as stop:
        run_command(_parser(), None, run, status=status)
    assert stop.value.code == 143


def test_errors_end_with_one_line_and_status_2(capsys):
    def run(args):
        raise ConfigError("first line\n  second line")

    with pytest.raises(SystemExit) as stop:
        run_command(_parser(), ["a", "b"], run)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_other_errors_are_raised_as_they_are():
    def run(args):
        raise FileExistsError("b exists")

    with pytest.raises(FileExistsError, match="b exists"):
        run_command(_parser(), ["a", "b"], run, errors=[KeyError])
