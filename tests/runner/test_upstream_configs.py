"""The toolkit's dataset configs on its LMDB data through the runner; repeated and path-valued ``-c``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import write_dedented

from matsciml.runner.cli import build_parser, main
from matsciml.runner.experiment import prepare_experiment

REPO = Path(__file__).resolve().parents[2]
UP = REPO / "tests" / "data" / "upstream"
MODELS = REPO / "experiments" / "configs" / "models"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """Dataset configs exactly in the toolkit's layout (experiments/configs/datasets/{oqmd,lips}.yaml)."""
    root = tmp_path_factory.mktemp("upstream_configs")
    write_dedented(
        root / "datasets" / "oqmd.yaml",
        f"""\
        dataset: OQMDDataset
        debug:
          batch_size: 4
          num_workers: 0
        experiment:
          test_split: ''
          train_path: {UP / "oqmd"}
          val_split: 0.2
        target_keys:
        - band_gap
        - energy
        - stability
        """,
    )
    write_dedented(
        root / "datasets" / "lips.yaml",
        """\
        dataset: LiPSDataset
        debug:
          batch_size: 2
          num_workers: 0
        experiment:
          test_split: ''
          train_path: ''
          val_split: ''
        target_keys:
        - energy
        - force
        """,
    )
    write_dedented(
        root / "trainer.yaml",
        """\
        generic: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
        debug: {accelerator: cpu, limit_train_batches: 3, limit_val_batches: 2}
        experiment: {accelerator: cpu, limit_train_batches: 3, limit_val_batches: 2}
        loggers:
          - class_path: lightning.pytorch.loggers.CSVLogger
        """,
    )
    write_dedented(root / "band_gap.yaml", "model: egnn_dgl\ndataset:\n  oqmd:\n    - task: ScalarRegressionTask\n"
           "      targets: [band_gap]\nseed: 0\n")  # fmt: skip
    tiny = (MODELS / "egnn_dgl.yaml").read_text()
    for old, new in (
        ("embed_depth: 5", "embed_depth: 1"),
        ("[128, 128, 128]", "[8]"),
        ("[64, 64]", "[]"),
        ("128", "8"),
        ("32", "8"),
        ("cutoff_radius: 6.5", "cutoff_radius: 4.0"),
    ):
        tiny = tiny.replace(old, new)
    write_dedented(root / "models" / "tiny_dgl.yaml", tiny)  # the upstream model file, narrowed for speed
    write_dedented(root / "forces.yaml", "model: tiny_dgl\ndataset:\n  lips:\n    - task: ForceRegressionTask\n"
           "      targets: [energy, force]\nseed: 0\n")  # fmt: skip
    return root


def _argv(root: Path, exp: str, run_dir: Path, *more: str, models: Path = MODELS) -> list[str]:
    return ["-e", str(root / exp), "-t", str(root / "trainer.yaml"), "-m", str(models), "-d",
            str(root / "datasets"), "--run_dir", str(run_dir), *more]  # fmt: skip


def _logged(result, column: str) -> list[float]:
    with open(result.metrics_csv) as fh:
        return [float(r[column]) for r in csv.DictReader(fh) if r.get(column)]


@pytest.mark.slow
def test_oqmd_dataset_config_trains_band_gap_with_the_upstream_model(configs, tmp_path):
    with pytest.warns(UserWarning, match="dropped 1 of 200"):  # the one record whose band gap is None
        result = main(_argv(configs, "band_gap.yaml", tmp_path / "run"))
    assert result.task.task_keys == ["band_gap"]
    assert _logged(result, "val_band_gap_mae")
    (summary,) = result.targets
    assert summary.key == "band_gap" and summary.count == 40  # 0.2 of the 199 records with a band gap


def test_lips_force_task_with_the_toolkit_target_names(configs, tmp_path, capsys):
    result = main(
        _argv(
            configs,
            "forces.yaml",
            tmp_path / "run",
            "--debug",
            "-c",
            f"dataset.debug.train_path={UP / 'lips'}",
            models=configs / "models",
        )  # fmt: skip
    )
    assert result.task.task_keys == ["energy", "forces"]
    assert _logged(result, "val_forces_mae") and _logged(result, "val_energy_mae")
    dm = result.datamodule
    # --debug without a split validates on the training data, as the toolkit's devset mode
    assert len(dm.datasets["val"]) == len(dm.datasets["train"]) == 200


def test_repeated_c_flags_all_apply(configs, tmp_path):
    args = build_parser().parse_args(
        _argv(
            configs,
            "band_gap.yaml",
            tmp_path / "x",
            "-c",
            "dataset.experiment.batch_size.3",
            "-c",
            "model.lr.0.002",
            "trainer.generic.max_epochs.2",
        )  # fmt: skip
    )
    assert args.cli_args == ["dataset.experiment.batch_size.3", "model.lr.0.002", "trainer.generic.max_epochs.2"]
    prepared = prepare_experiment(
        experiment_config=args.experiment_config, trainer_config=args.trainer_config, model_config=args.model_config,
        dataset_config=args.dataset_config, overrides=args.cli_args, run_dir=tmp_path / "x",
    )  # fmt: skip
    assert prepared.datamodule.batch_size == 3
    assert prepared.task.lr == pytest.approx(0.002)
    assert prepared.trainer.max_epochs == 2


def test_path_override_on_an_absent_key_gives_one_line(configs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_argv(configs, "forces.yaml", tmp_path / "y", "--debug", "-c", "dataset.debug.train_path./data/x.lmdb",
                   models=configs / "models"))  # fmt: skip
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1]  # one line, the last (after the --debug info line)
    assert "train_path='/data/x.lmdb'" in errors[0] and "TypeError" not in "".join(lines)


def test_options_list_the_toolkit_dataset_targets():
    from matsciml.runner.cli import format_options

    text = format_options(MODELS, REPO / "experiments" / "configs" / "datasets")
    line = next(row for row in text.splitlines() if row.strip().startswith("OQMDDataset"))
    assert "band_gap" in line and "stability" in line and "energy" in line
    assert "force = forces" in text
