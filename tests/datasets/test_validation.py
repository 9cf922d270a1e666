"""Bad inputs raise DataError naming the file, the record index (and id), the key, and a fix."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from matsciml.common.errors import DataError
from matsciml.datasets.readers import write_lmdb
from matsciml.datasets.readers.common import make_sample
from matsciml.datasets.structure_dataset import StructureDataset
from matsciml.datasets.validation import invalid_target_records, validate_dataset


def _write_extxyz(path, frames):
    import ase.io

    ase.io.write(path, frames, format="extxyz")
    return path


def _frames(n=3, **extra_info):
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.02, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * k, forces=np.zeros((4, 3)))
        atoms.info["band_gap"] = 0.1 * k
        for key, values in extra_info.items():
            atoms.info[key] = values[k]
        frames.append(atoms)
    return frames


def _sample(pos, numbers, cell=None, pbc=False, targets=None, index=0):
    return make_sample(pos, numbers, cell, pbc, targets or {}, f"s{index}", "made.lmdb", index)


# ----------------------------------------------------------------------------- files


def test_truncated_extxyz_names_file_and_record(tmp_path):
    path = _write_extxyz(tmp_path / "cut.extxyz", _frames(3))
    text = path.read_text()
    path.write_text(text[: text.rindex("Cu") - 1])  # the last frame loses its last atom line
    with pytest.raises(DataError) as err:
        StructureDataset(path)
    msg = str(err.value)
    assert str(path) in msg and "record 2" in msg and "truncated" in msg


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "junk.extxyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(DataError, match=r"junk\.extxyz: record 0: cannot parse"):
        StructureDataset(garbage)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.extxyz: holds no records"):
        StructureDataset(empty)


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.poscar"
    path.write_text("x")
    with pytest.raises(DataError) as err:
        StructureDataset(path)
    msg = str(err.value)
    assert "data.poscar" in msg and "'.poscar'" in msg
    for ext in (".extxyz", ".xyz", ".db", ".json", ".cif", ".lmdb"):
        assert ext in msg
    with pytest.raises(DataError, match="no such file"):
        StructureDataset(tmp_path / "missing.extxyz")


def test_truncated_json_names_file_and_position(tmp_path):
    from pymatgen.core import Lattice, Structure

    st = Structure(Lattice.cubic(3.0), ["Na"], [[0, 0, 0]])
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([st.as_dict()] * 2)[:-40])
    with pytest.raises(DataError, match=r"cut\.json: invalid JSON at line 1.*truncated"):
        StructureDataset(path)


def test_unknown_element_symbol(tmp_path):
    path = _write_extxyz(tmp_path / "el.extxyz", _frames(3))
    lines = path.read_text().splitlines(keepends=True)
    frame = 2
    lines[frame * 6 + 2 + 1] = lines[frame * 6 + 2 + 1].replace("Cu", "Xq", 1)
    path.write_text("".join(lines))
    with pytest.raises(DataError) as err:
        StructureDataset(path)
    msg = str(err.value)
    assert "el.extxyz" in msg and "record 2" in msg and "'species'" in msg and "'Xq'" in msg


def test_unknown_element_in_pymatgen_json(tmp_path):
    from pymatgen.core import Lattice, Structure

    dicts = [Structure(Lattice.cubic(3.0), ["Na"], [[0, 0, 0]]).as_dict() for _ in range(2)]
    dicts[1]["sites"][0]["species"][0]["element"] = "Zz"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dicts))
    with pytest.raises(DataError) as err:
        StructureDataset(path)
    msg = str(err.value)
    assert "bad.json" in msg and "record 1" in msg and "'species'" in msg and "Zz" in msg


def test_non_numeric_csv_target(tmp_path):
    import ase.io
    from ase.build import bulk

    folder = tmp_path / "cifs"
    folder.mkdir()
    ase.io.write(folder / "a.cif", bulk("Cu"))
    (folder / "targets.csv").write_text("id,band_gap\na,high\n")
    with pytest.raises(DataError, match=r"targets\.csv: row 1: key 'band_gap': 'high' is not a number"):
        StructureDataset(folder)
    (folder / "targets.csv").write_text("id,band_gap\nb,1.0\n")
    with pytest.raises(DataError, match=r"'b' has no file b\.cif"):
        StructureDataset(folder)


# ----------------------------------------------------------------------------- records


def test_atomic_number_outside_range(tmp_path):
    frames = _frames(3)
    frames[1].numbers[2] = 0  # ASE's dummy "X"
    path = _write_extxyz(tmp_path / "x.extxyz", frames)
    dataset = StructureDataset(path)  # reading is fine: no target_keys, no validation
    with pytest.raises(DataError) as err:
        validate_dataset(dataset)
    msg = str(err.value)
    assert "x.extxyz: record 1 (id 'x.extxyz:1')" in msg and "'atomic_numbers'" in msg and "atom 2" in msg
    with pytest.raises(DataError, match="atomic number 119"):
        validate_dataset([_sample(np.zeros((1, 3)), [119])])


def test_zero_atoms(tmp_path):
    from ase import Atoms

    frames = _frames(2)
    path = _write_extxyz(tmp_path / "z.extxyz", [frames[0], Atoms(cell=np.eye(3) * 3, pbc=True), frames[1]])
    with pytest.raises(DataError) as err:
        StructureDataset(path, target_keys=["energy"])
    msg = str(err.value)
    assert "z.extxyz: record 1" in msg and "'atomic_numbers'" in msg and "zero atoms" in msg


def test_close_atoms_through_periodic_boundary(tmp_path):
    from ase import Atoms

    cell = np.eye(3) * 4.0
    pos = [[0.02, 1.0, 1.0], [3.97, 1.0, 1.0], [2.0, 2.5, 2.5]]  # 0 and 1 are 0.05 Å apart across x
    periodic = Atoms("Cu3", positions=pos, cell=cell, pbc=True)
    open_box = Atoms("Cu3", positions=pos, cell=cell, pbc=False)
    path = _write_extxyz(tmp_path / "close.extxyz", [open_box, periodic])
    with pytest.raises(DataError) as err:
        validate_dataset(StructureDataset(path))
    msg = str(err.value)
    assert "close.extxyz: record 1" in msg and "'pos'" in msg and "atoms 0 and 1" in msg
    assert "0.0500 Å" in msg and "periodic image" in msg
    validate_dataset(StructureDataset(path, format="extxyz"), min_distance=0.01)  # 0.05 Å passes a 0.01 Å limit
    tiny = _sample([[0.0, 0.0, 0.0]], [1], cell=np.diag([0.05, 5.0, 5.0]), pbc=True)
    with pytest.raises(DataError, match="atom 0 and its own image"):
        validate_dataset([tiny])


def test_fractional_looking_coordinates_are_accepted(tmp_path):
    from ase import Atoms

    atoms = Atoms("NaCl", positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.eye(3) * 5.64, pbc=True)
    path = _write_extxyz(tmp_path / "frac.extxyz", [atoms])
    assert validate_dataset(StructureDataset(path)) == 1


def test_singular_cell_and_nonfinite_position():
    flat = _sample(np.zeros((2, 3)) + [[0, 0, 0], [1, 1, 1]], [1, 1], cell=np.diag([3.0, 3.0, 0.0]), pbc=True)
    with pytest.raises(DataError, match="made.lmdb: record 0 .*key 'cell'.*axis 2"):
        validate_dataset([flat])
    bad = _sample([[0.0, 0.0, np.nan]], [1])
    with pytest.raises(DataError, match="key 'pos': atom 0 has a non-finite position"):
        validate_dataset([bad])
    ok = _sample([[0.0, 0.0, 0.0]], [1])
    del bad["source"]  # without a source the dataset index is reported, also past the first chunk
    with pytest.raises(DataError, match=r"<dataset>: record 4 \(id 's0'\): key 'pos'"):
        validate_dataset([ok, ok, ok, ok, bad], chunk_size=2)


def test_missing_target_lists_what_the_record_has(tmp_path):
    frames = _frames(3)
    del frames[1].info["band_gap"]
    path = _write_extxyz(tmp_path / "m.extxyz", frames)
    with pytest.raises(DataError) as err:
        StructureDataset(path, target_keys=["energy", "band_gap"])
    msg = str(err.value)
    assert "m.extxyz: record 1" in msg and "'band_gap'" in msg and "missing" in msg
    assert "['energy', 'forces']" in msg and "on_invalid='drop'" in msg
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 records .*\[1\]"):
        dataset = StructureDataset(path, target_keys=["band_gap"], on_invalid="drop")
    assert len(dataset) == 2 and [dataset[i]["id"] for i in range(2)] == ["m.extxyz:0", "m.extxyz:2"]
    assert dataset[1]["source"]["index"] == 2


def test_target_key_in_no_record_suggests_the_closest(tmp_path):
    path = _write_extxyz(tmp_path / "t.extxyz", _frames(2))
    for policy in ("error", "drop"):
        with pytest.raises(DataError, match=r"t\.extxyz: key 'bandgap': no record has this target; did you mean"):
            StructureDataset(path, target_keys=["bandgap"], on_invalid=policy)


def test_nan_and_inf_targets(tmp_path):
    path = _write_extxyz(tmp_path / "n.extxyz", _frames(4, gap=[1.0, float("inf"), 2.0, float("nan")]))
    with pytest.raises(DataError) as err:
        StructureDataset(path, target_keys=["gap"])
    msg = str(err.value)
    assert "n.extxyz: record 1" in msg and "'gap'" in msg and "inf" in msg and "on_invalid='drop'" in msg
    with pytest.warns(UserWarning, match="dropped 2 of 4"):
        dataset = StructureDataset(path, target_keys=["gap"], on_invalid="drop")
    assert [dataset[i]["targets"]["gap"].item() for i in range(2)] == [1.0, 2.0]
    all_nan = _write_extxyz(tmp_path / "all.extxyz", _frames(1, gap=[float("nan")]))
    with pytest.raises(DataError, match="left no records"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructureDataset(all_nan, target_keys=["gap"], on_invalid="drop")


def test_wrong_forces_shape(tmp_path):
    good = _sample(np.eye(3) * 2, [1, 1, 1], targets={"forces": torch.zeros(3, 3)}, index=0)
    bad = _sample(np.eye(3) * 2, [1, 1, 1], targets={"forces": torch.zeros(2, 3)}, index=1)
    path = write_lmdb([good, bad], tmp_path / "f.lmdb")
    with pytest.raises(DataError) as err:
        StructureDataset(path, target_keys=["forces"])
    msg = str(err.value)
    assert "f.lmdb: record 1 (id 's1')" in msg and "'forces'" in msg and "[2, 3] for 3 atoms" in msg


def test_real_oqmd_nan_band_gap(shared_data):
    path = shared_data / "oqmd_devset.extxyz"
    with pytest.raises(DataError) as err:
        StructureDataset(path, target_keys=["band_gap"])
    msg = str(err.value)
    assert "oqmd_devset.extxyz: record 172" in msg and "'band_gap'" in msg and "on_invalid='drop'" in msg
    with pytest.warns(UserWarning, match=r"dropped 1 of 200 .*\[172\]"):
        dataset = StructureDataset(path, target_keys=["band_gap"], on_invalid="drop")
    assert len(dataset) == 199
    assert all(torch.isfinite(dataset[i]["targets"]["band_gap"]) for i in range(len(dataset)))
    assert invalid_target_records(StructureDataset(path), ["band_gap"]).keys() == {172}


@pytest.mark.parametrize("name, keys", [("lips", ["energy", "forces"]), ("alexandria", ["energy", "e_form"])])
def test_real_files_pass_validation(shared_data, name, keys):
    dataset = StructureDataset(shared_data / f"{name}_devset.extxyz", target_keys=keys)
    assert validate_dataset(dataset, keys) == len(dataset)


def test_validate_dataset_accepts_a_subset(tmp_path):
    frames = _frames(3)
    frames[2].info["band_gap"] = float("nan")
    dataset = StructureDataset(_write_extxyz(tmp_path / "s.extxyz", frames))
    assert validate_dataset(torch.utils.data.Subset(dataset, [0, 1]), ["band_gap"]) == 2
    with pytest.raises(DataError, match="s.extxyz: record 2"):
        validate_dataset(torch.utils.data.Subset(dataset, [2, 0]), ["band_gap"])
