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

from matsciml.common.cli import exit_on_error

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``matsciml-predict``."""
    parser = argparse.ArgumentParser(
        prog="matsciml-predict",
        description="Predict every structure of a file with a trained checkpoint; write CSV, extxyz, metrics and "
        "parity plots.",
    )
    parser.add_argument("checkpoint", type=Path, help="task checkpoint (.ckpt) written by a matsciml run")
    parser.add_argument("data", type=Path, help="structures: extxyz/xyz, ASE db or traj, pymatgen JSON, CIF, LMDB")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="output folder (default: <data stem>_predictions)"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="structures per batch (default 16)")
    parser.add_argument("--accelerator", default="auto", help="auto (default), cpu or gpu")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--task_class", default=None, help="task class, when the checkpoint does not record it")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
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
    """Run ``matsciml-predict``.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    PredictResult or None
        With ``argv`` given, the :class:`~matsciml.inference.predict.PredictResult`;
        as a console script ``None`` (exit status 0).

    Raises
    ------
    SystemExit
        Status 2 after ``error: <one line>`` on stderr for a bad checkpoint, data or argument.
    """
    args = build_parser().parse_args(None if argv is None else list(argv))
    from matsciml.inference.predict import predict

    with exit_on_error():
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
    return result if argv is not None else None


if __name__ == "__main__":  # pragma: no cover
    main()
