"""The runner on a multi-task experiment in upstream's format: OQMD band gaps + LiPS energies and forces.

Oracles: the per-pair validation MAE the summary recomputes from the best (EMA) checkpoint
with each pair's own task must equal the MAE the multi-task module logged in metrics.csv
for the same weights; the mean predictor is recomputed from the raw extxyz files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from matsciml.common.errors import ConfigError
from matsciml.runner.cli import main
from matsciml.runner.configs import ConfigFile, parse_experiment
from matsciml.runner.experiment import prepare_experiment

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*dropped 1 of 200 records.*"),
]
REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments/configs/experiments/oqmd_lips_multitask.yaml"
TRAINER = """\
generic: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
debug: {accelerator: cpu, limit_train_batches: 3}
callbacks:
  - class_path: matsciml.lightning.callbacks.SAM
  - class_path: matsciml.lightning.callbacks.ExponentialMovingAverageCallback
    init_args: {decay: 0.5}
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {monitor: MONITOR, save_last: true}
loggers:
  - class_path: lightning.pytorch.loggers.CSVLogger
"""


def _trainer(tmp_path: Path, monitor: str) -> Path:
    path = tmp_path / f"trainer_{monitor}.yaml"
    path.write_text(TRAINER.replace("MONITOR", monitor))
    return path


def _args(tmp_path: Path, monitor: str, run: str) -> list[str]:
    return [
        "-e", str(EXPERIMENT), "-t", str(_trainer(tmp_path, monitor)), "-m", str(REPO / "experiments/configs/models"),
        "-d", str(REPO / "experiments/configs/datasets"), "--debug", "--run_dir", str(tmp_path / run),
    ]  # fmt: skip


@pytest.mark.slow
def test_multitask_experiment_trains_with_ema_and_sam(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the dataset configs name tests/data/... relative to the repository
    result = main(_args(tmp_path, "val_oqmd_devset_band_gap_mae", "run"))
    with open(result.metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    for name in ("val_oqmd_devset_band_gap_mae", "val_lips_devset_energy_mae", "val_lips_devset_forces_mae"):
        assert name in columns
    val = [r for r in rows if r.get("val_loss")][-1]
    summary = {t.key: t for t in result.targets}
    assert list(summary) == ["oqmd_devset_band_gap", "lips_devset_energy", "lips_devset_forces"]
    for key, t in summary.items():
        assert t.model_mae == pytest.approx(float(val[f"val_{key}_mae"]), rel=1e-5), key
    assert summary["oqmd_devset_band_gap"].count == 40  # 199 finite records, val_split 0.2
    assert summary["lips_devset_forces"].count == 40 * 83 * 3
    assert "oqmd_devset_band_gap" in result.summary_text and "ratio" in result.summary_text
    # the mean predictor from the raw file: LiPS forces have mean ~0 per component
    from ase.io import read

    frames = read(REPO / "tests/data/lips_devset.extxyz", index=":")
    dm = result.datamodule.datamodules["lips_devset"]
    train = np.concatenate([frames[i].get_forces().reshape(-1) for i in dm.datasets["train"].indices])
    val_f = np.concatenate([frames[i].get_forces().reshape(-1) for i in dm.datasets["val"].indices])
    assert summary["lips_devset_forces"].mean_mae == pytest.approx(np.abs(val_f - train.mean()).mean(), rel=1e-5)
    config = (result.run_dir / "config.yaml").read_text()
    assert "lips_devset" in config and "ForceRegressionTask" in config


def test_monitor_typo_and_multitask_spec_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="did you mean 'val_oqmd_devset_band_gap_mae'"):
        prepare_experiment(
            EXPERIMENT,
            trainer_config=_trainer(tmp_path, "val_oqmd_band_gap_mae"),
            model_config=REPO / "experiments/configs/models",
            dataset_config=REPO / "experiments/configs/datasets",
            debug=True,
            run_dir=tmp_path / "never",
        )

    def parse(data: dict) -> None:
        parse_experiment(ConfigFile("exp", Path("cfgs/exp.yaml"), data), None, None)

    two = [{"task": "ScalarRegressionTask", "targets": ["a"]}, {"task": "ScalarRegressionTask", "targets": ["b"]}]
    with pytest.raises(ConfigError, match=r"dataset.d\[1\].task: d has two ScalarRegressionTasks"):
        parse({"model": "m", "dataset": {"d": two}})
    one = [{"task": "ScalarRegressionTask", "targets": ["a"]}]
    with pytest.raises(ConfigError, match="did you mean 'balanced'"):
        parse({"model": "m", "dataset": {"d": one, "e": one}, "sampling": "balance"})
    spec = parse_experiment(
        ConfigFile("exp", Path("x.yaml"), {"model": "m", "dataset": {"d": one, "e": one}, "task_scaling": [1, 2]})
    )
    assert spec.is_multitask and list(spec.tasks) == ["d", "e"] and spec.task_scaling == [1, 2]
