"""``ScalarRegressionTask``: one number per structure (band gap, formation energy, ...)."""

from __future__ import annotations

from torch import nn

from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.metrics import REGRESSION
from matsciml.registry import register_task

__all__ = ["ScalarRegressionTask"]


@register_task(aliases=["scalar_regression"])
class ScalarRegressionTask(BaseTaskModule):
    """Regress scalar targets from the encoder's system embedding.

    One :class:`~matsciml.models.heads.OutputHead` per task key maps the system embedding
    ``[B, D]`` to ``[B]``. Targets are ``batch["targets"][key]`` of shape ``[B]`` (or
    ``[B, 1]``); NaN targets (missing labels) are left out of the loss and the metrics.
    The default loss is the mean squared error on normalised targets.

    Logged (see :mod:`matsciml.models.tasks.metrics`): ``<split>_loss``,
    ``<split>_total``, ``<split>_<key>`` (the loss) and ``<split>_<key>_mae`` (data
    units), for ``split`` in ``train``, ``val``, ``test``.

    Parameters are those of :class:`~matsciml.models.tasks.base.BaseTaskModule`;
    ``task_keys`` is required.

    Example YAML (experiment config)::

        model: egnn
        dataset:
          oqmd:
            - task: ScalarRegressionTask
              targets: [band_gap]

    Example::

        task = ScalarRegressionTask(
            encoder_class="matsciml.models.PLEGNNBackbone",
            encoder_kwargs={"embed_out_dim": 64},
            task_keys=["band_gap"],
            normalize_kwargs={"band_gap_mean": 1.2, "band_gap_std": 1.5},
        )

    Raises
    ------
    ConfigError
        See the base class.
    DataError
        A batch lacks a task key, or its target has more than one number per structure.
    """

    default_loss = nn.MSELoss
    metric_kind = REGRESSION
