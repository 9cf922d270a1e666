"""``matsciml-convert``: each toolkit devset to extended XYZ (read back by ASE) and to this package's LMDB."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from matsciml.datasets import StructureDataset
from matsciml.datasets.convert import main

UP = Path(__file__).resolve().parents[1] / "data" / "upstream"


@pytest.mark.parametrize("name", ["oqmd", "lips", "alexandria", "carolina_db"])
def test_devset_to_extxyz_matches_the_records(name, tmp_path, capsys):
    out = tmp_path / f"{name}.extxyz"
    assert main([str(UP / name), str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().err
    source = StructureDataset(UP / name)
    frames = ase.io.read(out, ":")  # the oracle reader: ASE, not ours
    assert len(frames) == len(source)
    for i in range(0, len(source), 3):
        sample, frame = source[i], frames[i]
        np.testing.assert_allclose(frame.get_positions(), sample["pos"].numpy(), atol=1e-6)
        np.testing.assert_allclose(frame.cell.array, sample["cell"][0].numpy(), atol=1e-6)
        np.testing.assert_array_equal(frame.numbers, sample["atomic_numbers"].numpy())
        assert frame.info["id"] == sample["id"] or str(frame.info["id"]) == sample["id"]
        for key, value in sample["targets"].items():
            if key == "forces":
                np.testing.assert_allclose(frame.get_forces(), value.numpy(), atol=1e-6)
            elif key == "energy" and "forces" in sample["targets"]:
                assert frame.get_potential_energy() == pytest.approx(float(value), abs=1e-5)
            elif value.ndim == 0:
                # ASE's reader moves an info 'energy' to its calculator
                stored = frame.info[key] if key in frame.info else frame.calc.results[key]
                np.testing.assert_allclose(float(stored), float(value), atol=1e-6, equal_nan=True)
            else:
                stored = frame.arrays[key] if key in frame.arrays else frame.calc.results[key]  # e.g. magmoms
                np.testing.assert_allclose(stored, value.numpy(), atol=1e-6)
    # and our own reader gives back the same samples
    again = StructureDataset(out)
    assert torch.allclose(again[len(source) - 1]["pos"], source[len(source) - 1]["pos"], atol=1e-6)


def test_devset_to_lmdb_is_bit_identical(tmp_path):
    out = tmp_path / "lips.lmdb"
    main([str(UP / "lips"), str(out), "--no-progress", "--dataset", "LiPSDataset"])
    ours, theirs = StructureDataset(out), StructureDataset(UP / "lips")
    assert len(ours) == len(theirs) == 200
    for i in (0, 57, 199):
        a, b = ours[i], theirs[i]
        assert torch.equal(a["pos"], b["pos"]) and torch.equal(a["cell"], b["cell"])
        assert torch.equal(a["targets"]["forces"], b["targets"]["forces"])
        assert torch.equal(a["targets"]["energy"], b["targets"]["energy"])


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    for argv in ([str(UP / "oqmd"), str(tmp_path / "x.csv")], [str(tmp_path / "missing"), str(tmp_path / "x.lmdb")],
                 [str(UP / "oqmd"), str(tmp_path / "x.lmdb"), "--dataset", "OQMDDatset"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--no-progress"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert "did you mean 'OQMDDataset'" in err
    assert not (tmp_path / "x.lmdb").exists()
