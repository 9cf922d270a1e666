"""The EMA/SAM ablation script: its plan, resuming (finished runs skipped), paired statistics and report."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ablation  # noqa: E402
import ablation_report  # noqa: E402


def _args(*argv: str) -> argparse.Namespace:
    """The parsed options plan() reads; ``key=<json value>`` items override the defaults."""
    ns = argparse.Namespace(
        quick=False, datasets=["devset", "oqmd_band_gap"], seeds=[0, 1, 2], epochs=4, limit_batches=None,
        no_sweep=False, no_regimes=False,
    )  # fmt: skip
    for item in argv:
        key, value = item.split("=")
        setattr(ns, key, json.loads(value))
    return ns


def test_plan_pairs_every_variant_on_the_same_seeds():
    runs = ablation.plan(_args())
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    main = [r for r in runs if r.group == "main"]
    assert len(main) == 2 * 3 * 4  # datasets x seeds x variants
    for dataset in ("devset", "oqmd_band_gap"):
        for variant in ablation.VARIANTS:
            assert sorted(r.seed for r in main if r.dataset == dataset and r.variant == variant) == [0, 1, 2]
    # the small set trains epoch_factor times longer; the main runs all anneal the learning rate
    assert {r.epochs for r in main if r.dataset == "oqmd_band_gap"} == {
        4 * ablation.DATASETS["oqmd_band_gap"].epoch_factor
    }
    assert {r.lr_policy for r in main} == {"cosine"}
    regimes = {(r.lr_policy, r.epochs) for r in runs if r.group == "regime"}
    assert regimes == {("constant", 4), ("cosine", 8), ("constant", 8)}
    sweep = [r for r in runs if r.group == "sweep"]
    assert {r.decay for r in sweep if r.variant == "ema"} == set(ablation.SWEEP_DECAYS)
    assert {r.rho for r in sweep if r.variant == "sam"} == set(ablation.SWEEP_RHOS)
    # the documented defaults of the callbacks in the main runs
    assert {(r.decay, r.rho) for r in main} == {(0.99, 0.05)}


def test_paired_interval_matches_the_t_formula():
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 dof) = 4.302653
    mean, low, high = ablation_report.paired_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (low, high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    assert math.isnan(ablation_report.paired_interval([1.0])[1])


def _record(run, test_mae: float) -> dict:
    n = run.epochs
    return {
        "run": {
            "group": run.group, "dataset": run.dataset, "variant": run.variant, "seed": run.seed,
            "lr_policy": run.lr_policy, "epochs": run.epochs, "decay": run.decay, "rho": run.rho,
            "limit_batches": run.limit_batches,
        },
        "run_id": run.run_id,
        "targets": {
            "energy_per_atom": {
                "unit": "meV/atom", "best_epoch": n - 1, "val_mae_best": test_mae, "val_mae_final": test_mae,
                "test_mae": test_mae, "mean_predictor_test_mae": 36.0, "curve_val_mae": [test_mae] * n,
                "curve_val_loss": [0.1] * n, "curve_val_raw_loss": [0.12] * n,
            }
        },
        "train_wall_s": 1.0, "train_cpu_s": 1.0, "steps": 10, "n_train": 720, "n_val": 240, "n_test": 240,
    }  # fmt: skip


def test_finished_runs_are_skipped_and_the_report_says_what_is_noise(tmp_path, monkeypatch):
    """With every run of --quick finished, main() trains nothing and writes CSV, markdown, tables and chart.

    EMA is consistently 1 meV/atom worse than plain (an interval excluding zero); SAM differs by
    +3, -3, ... (an interval containing zero: "within noise")."""
    quick = _args("quick=true", 'datasets=["devset"]', "seeds=[0, 1]", "epochs=3", "limit_batches=20")
    shift = {"plain": lambda s: 0.0, "ema": lambda s: 1.0, "sam": lambda s: 3.0 if s == 0 else -3.0}
    shift["ema+sam"] = lambda s: 1.0 + (0.5 if s == 0 else 0.3)
    for run in ablation.plan(quick):
        folder = tmp_path / "out" / "runs" / run.run_id
        folder.mkdir(parents=True)
        record = _record(run, 10.0 + run.seed + shift[run.variant](run.seed))
        (folder / "result.json").write_text(json.dumps(record))
    monkeypatch.setattr(ablation, "execute", lambda *a: pytest.fail("a finished run was trained again"))
    ablation.main(["--quick", "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "ablation.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["variant"] for r in rows} == set(ablation.VARIANTS)
    assert all(math.isfinite(float(r["test_mae"])) for r in rows)
    md = (tmp_path / "out" / "ablation.md").read_text()
    ema_line = next(line for line in md.splitlines() if line.startswith("| EMA | +1"))
    assert "higher (worse)" in ema_line and "within noise" not in ema_line
    sam_line = next(line for line in md.splitlines() if line.startswith("| SAM | +0"))
    assert sam_line.count("within noise") == 2
    assert (tmp_path / "out" / "charts" / "ablation_devset_energy_per_atom.png").stat().st_size > 10_000
    assert "list-table" in (tmp_path / "out" / "charts" / "ablation_tables.inc").read_text()
