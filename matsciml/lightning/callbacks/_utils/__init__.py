"""Helpers shared by the callbacks: the bottom layer of :mod:`matsciml.lightning.callbacks`.

Argument checks (:mod:`.checks`), optimizer-step counting and logging cadence (:mod:`.steps`),
plain-data conversion (:mod:`.plain`), atomic writes (:mod:`.atomic`) and checkpoint files
(:mod:`.checkpoint_io`), reporting to loggers (:mod:`.reporting`), gradient and grad-scaler
access (:mod:`.grads`), logged metrics (:mod:`.metrics`), the names of the metrics the
callbacks log (:mod:`.names`), and the EMA and SAM arithmetic (:mod:`.ema_math`,
:mod:`.sam_math`). Nothing here imports a callback or a base class.
"""
