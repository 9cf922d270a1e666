"""Using trained checkpoints: rebuild a task, predict files, write predictions, metrics and parity plots.

* :func:`load_task`: task (EMA weights) and data transforms from a checkpoint file;
* :func:`predict`: every structure of a file through a checkpoint (``matsciml-predict``);
* :mod:`matsciml.inference.outputs`: CSV, extended XYZ, metrics and parity plots.

The ASE calculator is :class:`matsciml.interfaces.ase.MatSciMLCalculator`; the prediction
writers for ``trainer.predict`` are in :mod:`matsciml.lightning.writers`.
"""

from __future__ import annotations

from matsciml.inference.checkpoint import LoadedTask, build_transforms, load_task, run_config
from matsciml.inference.predict import PredictResult, predict

__all__ = ["LoadedTask", "PredictResult", "build_transforms", "load_task", "predict", "run_config"]
