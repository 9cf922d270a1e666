"""``CodeCarbonCallback``: energy (kWh) and emissions (kg CO2-equivalent) of training, per epoch and in total."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.common.optional import require
from matsciml.lightning.callbacks._utils.names import (
    EMISSIONS_EPOCH_KG,
    EMISSIONS_TOTAL_KG,
    ENERGY_EPOCH_KWH,
    ENERGY_TOTAL_KWH,
)
from matsciml.lightning.callbacks._utils.reporting import log_scalars, run_folder

__all__ = [
    "CodeCarbonCallback",
    "EMISSIONS_EPOCH_KG",
    "EMISSIONS_TOTAL_KG",
    "ENERGY_EPOCH_KWH",
    "ENERGY_TOTAL_KWH",
    "carbon_intensity",
]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRACKING_MODES = ("machine", "process")


def carbon_intensity(country_iso_code: str) -> float:
    """Carbon intensity of the country's electricity in codecarbon's data, in g CO2-eq per kWh.

    Raises
    ------
    ConfigError
        codecarbon is not installed (naming the ``emissions`` extra), or it has no data for
        ``country_iso_code`` (naming the closest codes).
    """
    require("codecarbon", "CodeCarbonCallback")
    from codecarbon.input import DataSource

    mix = DataSource().get_global_energy_mix_data()
    if country_iso_code not in mix:
        raise ConfigError(
            f"CodeCarbonCallback: country_iso_code={country_iso_code!r} is not in codecarbon's energy-mix data "
            f"(3-letter ISO codes such as 'USA', 'FRA', 'DEU'); {closest(str(country_iso_code), mix)}"
        )
    return float(mix[country_iso_code]["carbon_intensity"])


def _recorder() -> Any:
    """A codecarbon output handler that keeps the last cumulative ``EmissionsData`` it was given."""
    from codecarbon.output_methods.base_output import BaseOutput

    class _Recorder(BaseOutput):
        def __init__(self) -> None:
            self.total: Any = None

        def out(self, total: Any, delta: Any) -> None:
            self.total = total

        def live_out(self, total: Any, delta: Any) -> None:
            pass

    return _Recorder()


class CodeCarbonCallback(Callback):
    """Measure the energy and CO2-equivalent emissions of training with codecarbon, offline.

    A codecarbon ``OfflineEmissionsTracker`` (no network: the carbon intensity comes from
    codecarbon's own energy-mix data for ``country_iso_code``) runs from the start of
    ``fit`` to its end. Energy is that of the CPU, RAM and GPUs codecarbon finds (RAPL or
    NVML counters where readable, else its power estimates); emissions are energy times
    the carbon intensity of the country (or of ``region`` where codecarbon has regional data).

    Logged to every logger of the trainer:

    * at the end of every training epoch (after its validation), ``emissions/epoch_kg`` and
      ``energy/epoch_kWh`` for that epoch (the first one includes the set-up and the sanity
      check since ``fit`` started), and the running ``emissions/total_kg`` and
      ``energy/total_kWh``;
    * when ``fit`` ends or fails, the final ``emissions/total_kg`` and ``energy/total_kWh``.

    The epochs' values add up to the total at the end of the last epoch; the final total adds
    the rest of ``fit`` after it (kept in :attr:`after_last_epoch`). codecarbon writes its CSV
    (``output_file`` in ``output_dir``, default ``<run folder>/emissions.csv``): one
    cumulative row per epoch end and a last row with the run's total.

    Only global rank 0 measures: in ``tracking_mode="machine"`` it counts the whole node
    (all its GPUs), so a multi-node run reports node 0 only.

    Hooks it acts in: ``on_fit_start`` (start), ``on_train_epoch_end`` (epoch values),
    ``on_fit_end`` and ``on_exception`` (stop, final totals), ``teardown`` (stops a tracker
    still running).

    Example::

        trainer:
          callbacks:
            - kind: CodeCarbonCallback      # or: kind: codecarbon
              country_iso_code: FRA
              measure_power_secs: 10

    Needs ``pip install 'matsciml[emissions]'`` (codecarbon).

    Parameters
    ----------
    country_iso_code
        3-letter ISO code of the country whose electricity mix applies, default ``"USA"``.
    region
        Region inside the country where codecarbon has data (US states, Canadian
        provinces, ...), default ``None`` (the country).
    output_dir
        Folder of codecarbon's CSV, default the run folder.
    output_file
        Name of the CSV, default ``"emissions.csv"``.
    measure_power_secs
        Seconds between two power readings of codecarbon's background thread, default 15
        (epoch ends and the end of ``fit`` read it too).
    tracking_mode
        ``"machine"`` (default: the whole machine) or ``"process"`` (this process's share
        of CPU and RAM).
    log_level
        codecarbon's log level, default ``"error"`` (quiet).
    project_name
        Project name in the CSV, default the run folder's name.
    tracker_kwargs
        Other arguments of ``codecarbon.OfflineEmissionsTracker`` (``pue``,
        ``force_cpu_power``, ``gpu_ids``, ...).

    Attributes
    ----------
    epochs
        ``[{"epoch", "emissions_kg", "energy_kWh"}, ...]``, one per training epoch.
    total
        ``{"emissions_kg", "energy_kWh", "duration_s", "country_iso_code"}`` once ``fit`` ended.
    after_last_epoch
        ``{"emissions_kg", "energy_kWh"}`` of ``fit`` after the end of the last epoch.
    csv_path
        codecarbon's CSV.

    Raises
    ------
    ConfigError
        codecarbon is missing (naming the ``emissions`` extra), or an argument is wrong
        (unknown country, tracking mode or log level; a non-positive period), at construction.
    """

    def __init__(
        self,
        country_iso_code: str = "USA",
        region: str | None = None,
        output_dir: str | os.PathLike | None = None,
        output_file: str = "emissions.csv",
        measure_power_secs: float = 15.0,
        tracking_mode: str = "machine",
        log_level: str = "error",
        project_name: str | None = None,
        tracker_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        carbon_intensity(country_iso_code)  # codecarbon installed, country known
        if tracking_mode not in _TRACKING_MODES:
            raise ConfigError(f"CodeCarbonCallback: tracking_mode={tracking_mode!r}; "
                              f"{closest(str(tracking_mode), _TRACKING_MODES)}")  # fmt: skip
        if str(log_level).lower() not in _LOG_LEVELS:
            raise ConfigError(f"CodeCarbonCallback: log_level={log_level!r}; {closest(str(log_level), _LOG_LEVELS)}")
        if not isinstance(measure_power_secs, (int, float)) or not measure_power_secs > 0:
            raise ConfigError(f"CodeCarbonCallback: measure_power_secs={measure_power_secs!r} must be a number > 0")
        if not isinstance(output_file, str) or Path(output_file).name != output_file:
            raise ConfigError(f"CodeCarbonCallback: output_file={output_file!r} must be a file name")
        self.country_iso_code = country_iso_code
        self.region = region
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.output_file = output_file
        self.measure_power_secs = float(measure_power_secs)
        self.tracking_mode = tracking_mode
        self.log_level = str(log_level).lower()
        self.project_name = project_name
        self.tracker_kwargs = dict(tracker_kwargs or {})
        self.tracker: Any = None
        self.epochs: list[dict[str, Any]] = []
        self.total: dict[str, Any] = {}
        self.after_last_epoch: dict[str, float] = {}
        self.csv_path: Path | None = None
        self._recorder: Any = None
        self._last = (0.0, 0.0)

    # ------------------------------------------------------------------ tracker
    def _start(self, trainer: pl.Trainer) -> None:
        from codecarbon import OfflineEmissionsTracker

        folder = self.output_dir if self.output_dir is not None else run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / self.output_file
        # quiet from the first message (the tracker sets its level only after its first log lines)
        logging.getLogger("codecarbon").setLevel(self.log_level.upper())
        self._recorder = _recorder()
        kwargs = {
            "country_iso_code": self.country_iso_code,
            "region": self.region,
            "output_dir": str(folder),
            "output_file": self.output_file,
            "measure_power_secs": self.measure_power_secs,
            "tracking_mode": self.tracking_mode,
            "log_level": self.log_level,
            "project_name": self.project_name or run_folder(trainer).name or "matsciml",
            "output_handlers": [self._recorder],
            "api_call_interval": -1,  # totals only when asked (epoch ends, stop)
            "allow_multiple_runs": True,  # no lock file, no SIGINT/SIGTERM handlers of codecarbon
            **self.tracker_kwargs,
        }
        if kwargs["region"] is None:
            del kwargs["region"]
        self.tracker = OfflineEmissionsTracker(**kwargs)
        self.tracker.start()
        self.epochs, self.total, self.after_last_epoch, self._last = [], {}, {}, (0.0, 0.0)

    def _totals(self) -> tuple[float, float] | None:
        data = None if self._recorder is None else self._recorder.total
        if data is None:
            return None
        return float(data.emissions), float(data.energy_consumed)

    def _stop(self, trainer: pl.Trainer) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        tracker.stop()
        data = getattr(tracker, "final_emissions_data", None)
        totals = self._totals()
        if data is None or totals is None:
            rank_zero_warn("CodeCarbonCallback: codecarbon reported no totals at the end (see its log); none logged")
            return
        kg, kwh = totals
        self.total = {"emissions_kg": kg, "energy_kWh": kwh, "duration_s": float(data.duration),
                      "country_iso_code": data.country_iso_code}  # fmt: skip
        self.after_last_epoch = {"emissions_kg": kg - self._last[0], "energy_kWh": kwh - self._last[1]}
        log_scalars(trainer, {EMISSIONS_TOTAL_KG: kg, ENERGY_TOTAL_KWH: kwh})

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.tracker is None:
            self._start(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker is None:
            return
        before = self._recorder.total
        self.tracker.flush()
        totals = self._totals()
        if totals is None or self._recorder.total is before:
            rank_zero_warn("CodeCarbonCallback: codecarbon reported nothing at this epoch end (see its log)")
            return
        kg, kwh = totals
        epoch = {"epoch": int(trainer.current_epoch), "emissions_kg": kg - self._last[0],
                 "energy_kWh": kwh - self._last[1]}  # fmt: skip
        self.epochs.append(epoch)
        self._last = (kg, kwh)
        log_scalars(trainer, {EMISSIONS_EPOCH_KG: epoch["emissions_kg"], ENERGY_EPOCH_KWH: epoch["energy_kWh"],
                              EMISSIONS_TOTAL_KG: kg, ENERGY_TOTAL_KWH: kwh})  # fmt: skip

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._stop(trainer)
        except Exception as err:  # noqa: BLE001 - never hide the training error
            rank_zero_warn(f"CodeCarbonCallback: could not stop the tracker after the failure: {err}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.stop()
