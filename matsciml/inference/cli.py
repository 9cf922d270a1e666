"""Command line of :func:`~matsciml.inference.predict`: ``matsciml-predict CHECKPOINT DATA [-o OUT]``.

Usage::

    matsciml-predict runs/oqmd/checkpoints/last.ckpt tests/data/oqmd_devset.extxyz -o oqmd_predictions \\
        [--batch_size 16] [--accelerator auto|cpu|gpu] [--num_workers 0] [--task_class NAME] [--no_progress]

A missing, truncated or unsafe checkpoint, or unreadable data, ends the program with one
line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from matsciml.common.cli import add_no_progress, command_parser, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``matsciml-predict``."""
    parser = command_parser(
        "matsciml-predict",
        "Predict every structure of a file with a trained checkpoint; write CSV, extxyz, metrics and parity plots.",
        {
            "checkpoint": "task checkpoint (.ckpt) written by a matsciml run",
            "data": "structures: extxyz/xyz, ASE db or traj, pymatgen JSON, CIF, LMDB",
        },
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="output folder (default: <data stem>_predictions)"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="structures per batch (default 16)")
    parser.add_argument("--accelerator", default="auto", help="auto (default), cpu or gpu")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--task_class", default=None, help="task class, when the checkpoint does not record it")
    add_no_progress(parser, "--no_progress")
    parser.add_argument("--no_plots", action="store_true", help="no parity plots")
    return parser


def _summary(result) -> str:
    lines = [f"Wrote {result.csv}, {result.extxyz}, {result.metrics_json}"]
    for key, m in result.metrics.items():
        skipped = f", {m['skipped']} without target" if m["skipped"] else ""
        lines.append(
            f"  {key:<24s} MAE {m['mae']:.4g}  RMSE {m['rmse']:.4g}  R2 {m['r2']:.3f}  "
            f"mean predictor {m['mean_predictor_mae']:.4g}  ({m['count']} values{skipped})"
        )
    lines += [f"  parity plot: {path}" for path in result.plots.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None):
    """Run ``matsciml-predict`` (``argv`` and the result as for :func:`~matsciml.common.cli.run_command`).

    Returns
    -------
    PredictResult or None
        The :class:`~matsciml.inference.predict.PredictResult` (``None`` as a console script).

    Raises
    ------
    SystemExit
        Status 2 after ``error: <one line>`` on stderr for a bad checkpoint, data or argument.
    """
    return run_command(build_parser(), argv, _predict)


def _predict(args: argparse.Namespace):
    from matsciml.inference.predict import predict

    result = predict(
        args.checkpoint,
        args.data,
        output_dir=args.output,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        num_workers=args.num_workers,
        task_class=args.task_class,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    print(_summary(result), flush=True)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
