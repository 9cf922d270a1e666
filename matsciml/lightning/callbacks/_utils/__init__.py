"""Helpers shared by the callbacks: the bottom layer of :mod:`matsciml.lightning.callbacks`.

* :mod:`.steps`: optimizer steps versus micro-batches, and the one logging cadence;
* :mod:`.names`: the names of the metrics the callbacks log;
* :mod:`.reporting`: scalars, images and histograms to the loggers (or to files), the run folder;
* :mod:`.metrics`: reading logged metrics, their mode, improvement;
* :mod:`.state_key`: a callback's checkpoint identity from a few of its settings;
* :mod:`.grads`: optimizer parameters, gradient norms, skipped steps, the grad scaler, batch ids;
* :mod:`.inference`: evaluation over a named dataset outside Lightning's loops;
* :mod:`.checkpoint_io`: where callbacks put checkpoints and how they write them;
* :mod:`.run_metadata`: what a run was, as plain data;
* :mod:`.trackers`: the MLflow and W&B loggers of a trainer, and files sent to them;
* :mod:`.ema_store`, :mod:`.ema_math`, :mod:`.sam_math`: the EMA weights and the EMA and SAM arithmetic.

Argument checks are :func:`matsciml.common.checks.check_int`; atomic writes
:func:`matsciml.common.atomic.atomic_path`. Nothing here imports a callback or a base class.
"""
