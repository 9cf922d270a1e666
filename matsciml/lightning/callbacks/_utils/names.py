"""Names of the metrics the callbacks log: one constant per name, used by the callback that logs it
and by whoever reads it (:class:`~matsciml.lightning.callbacks.report.TrainingDynamicsReport`).

A callback never spells another callback's metric names; both import them from here.
"""

from __future__ import annotations

__all__ = [
    "GRAD_NORM_PREFIX",
    "GRAD_NORM_TOTAL",
    "GRAD_NORM_BEFORE_CLIP",
    "EMA_GAIN_PREFIX",
    "VAL_RAW_PREFIX",
    "THROUGHPUT_PREFIX",
    "THROUGHPUT_GRAPHS",
    "THROUGHPUT_ATOMS",
    "MEMORY_RSS",
    "MEMORY_RSS_PEAK",
    "MEMORY_CUDA_PEAK",
    "EMISSIONS_EPOCH_KG",
    "EMISSIONS_TOTAL_KG",
    "ENERGY_EPOCH_KWH",
    "ENERGY_TOTAL_KWH",
]

# MonitorGradients, ManualGradientClip (gradients.py)
GRAD_NORM_PREFIX = "grad_norm/"
GRAD_NORM_TOTAL = GRAD_NORM_PREFIX + "total"
GRAD_NORM_BEFORE_CLIP = GRAD_NORM_PREFIX + "before_clip"

# ExponentialMovingAverageCallback with evaluate_raw=True (ema.py): <prefix><task key or "total">
EMA_GAIN_PREFIX = "ema_gain_"
VAL_RAW_PREFIX = "val_raw_"

# ThroughputCallback (throughput.py): <prefix><graphs|atoms|edges>_per_s
THROUGHPUT_PREFIX = "throughput/"
THROUGHPUT_GRAPHS = THROUGHPUT_PREFIX + "graphs_per_s"
THROUGHPUT_ATOMS = THROUGHPUT_PREFIX + "atoms_per_s"

# PeakMemoryCallback (memory.py), in MiB
MEMORY_RSS = "memory/rss_mb"
MEMORY_RSS_PEAK = "memory/rss_peak_mb"
MEMORY_CUDA_PEAK = "memory/cuda_peak_mb"

# CodeCarbonCallback (emissions.py): kg CO2-equivalent and kWh, per training epoch and since fit start
EMISSIONS_EPOCH_KG = "emissions/epoch_kg"
EMISSIONS_TOTAL_KG = "emissions/total_kg"
ENERGY_EPOCH_KWH = "energy/epoch_kWh"
ENERGY_TOTAL_KWH = "energy/total_kWh"
