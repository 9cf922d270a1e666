"""Open MatSciML Toolkit LMDB datasets: every record of the real devsets, against independent oracles."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from matsciml.common.errors import DataError
from matsciml.datasets import (
    AlexandriaDataset,
    CMDataset,
    ColabFitDataset,
    LiPSDataset,
    MaterialsProjectDataset,
    NomadDataset,
    OQMDDataset,
    StructureDataset,
)
from matsciml.datasets.readers.formats import detect_format
from matsciml.datasets.upstream.records import EV_PER_JOULE, carolina_cell, oqmd_positions, symmetric_from_upper

REAL_DATA = Path(__file__).resolve().parents[1] / "data"

UP = REAL_DATA / "upstream"
DEVSETS = {
    "oqmd": (OQMDDataset, 200),
    "lips": (LiPSDataset, 200),
    "alexandria": (AlexandriaDataset, 98),
    "carolina_db": (CMDataset, 100),
    "materials_project": (MaterialsProjectDataset, 10),
    "nomad": (NomadDataset, 8),
    "colabfit": (ColabFitDataset, 10),
}


@pytest.fixture(scope="module")
def datasets():
    return {name: cls(UP / name) for name, (cls, _) in DEVSETS.items()}


@pytest.mark.parametrize("name", list(DEVSETS))
def test_every_record_reads_and_the_layout_is_detected(name, datasets):
    cls, count = DEVSETS[name]
    dataset = datasets[name]
    assert len(dataset) == count
    for i in range(count):
        sample = dataset[i]
        n = sample["natoms"]
        assert sample["pos"].shape == (n, 3) and sample["atomic_numbers"].shape == (n,)
        assert torch.isfinite(sample["pos"]).all()
        assert (sample["atomic_numbers"] >= 1).all()
    assert detect_format(UP / name) == "upstream"
    generic = StructureDataset(UP / name)  # layout detection picks the same mapping
    assert generic._records.format.name == cls.upstream_name
    assert torch.equal(generic[count - 1]["pos"], dataset[count - 1]["pos"])


def test_alexandria_keys_are_not_contiguous_and_all_records_are_read(datasets):
    from matsciml.datasets.readers.lmdb_format import shared_env

    with shared_env(UP / "alexandria" / "data_000.lmdb", False).begin() as txn:
        keys = sorted(int(k) for k in txn.cursor().iternext(values=False) if k.isdigit())
    assert 2 not in keys and 4 not in keys and len(keys) == 98
    assert [datasets["alexandria"][i]["source"]["index"] for i in range(4)] == keys[:4]


def test_oqmd_positions_are_fractional_times_cell_as_in_the_cartesian_extxyz(datasets):
    frames = {int(a.info["oqmd_entry_id"]): a for a in ase.io.read(REAL_DATA / "oqmd_devset.extxyz", ":")}
    reader = datasets["oqmd"]._records
    worst = 0.0
    for i in range(len(reader)):
        record = reader.record(i)
        pos, _ = oqmd_positions(record)
        frame = frames[int(record["entry_id"])]
        worst = max(worst, float(np.abs(pos - frame.get_positions()).max()))
        sample = datasets["oqmd"][i]
        np.testing.assert_allclose(sample["pos"].numpy(), frame.get_positions(), atol=2e-6)
        np.testing.assert_allclose(sample["cell"][0].numpy(), frame.cell.array, atol=2e-6)
        assert float(sample["targets"]["energy"]) == pytest.approx(frame.info["formation_energy_per_atom"], abs=1e-6)
    assert worst < 1e-6
    # the stored numbers really are fractional: read as Cartesian they would all lie in [0, 1]
    assert all(0 <= c <= 1 for i in range(5) for xyz in reader.record(i)["cart_coords"] for c in xyz)


def test_lips_forces_and_energies_equal_the_extxyz(datasets):
    frames = ase.io.read(REAL_DATA / "lips_devset.extxyz", ":")
    energies = np.array([a.get_potential_energy() for a in frames])
    dataset = datasets["lips"]
    for i in range(len(dataset)):
        sample = dataset[i]
        gaps = np.abs(energies - float(dataset._records.record(i)["energy"]))
        assert gaps.min() < 1e-6
        frame = frames[int(gaps.argmin())]
        np.testing.assert_allclose(sample["targets"]["forces"].numpy(), frame.get_forces(), atol=1e-6)
        np.testing.assert_allclose(sample["pos"].numpy(), frame.get_positions(), atol=1e-5)


def test_alexandria_matches_its_extxyz(datasets):
    frames = {a.info["alexandria_id"]: a for a in ase.io.read(REAL_DATA / "alexandria_devset.extxyz", ":")}
    dataset = datasets["alexandria"]
    for i in range(len(dataset)):
        sample = dataset[i]
        frame = frames[sample["id"]]
        np.testing.assert_allclose(sample["pos"].numpy(), frame.get_positions(), atol=1e-5)
        np.testing.assert_allclose(sample["targets"]["forces"].numpy(), frame.get_forces(), atol=1e-6)
        assert float(sample["targets"]["energy"]) == pytest.approx(frame.get_potential_energy(), rel=1e-6)
        assert float(sample["targets"]["e_form"]) == pytest.approx(frame.info["e_form"], abs=1e-6)


def test_carolina_cell_and_positions_agree_with_pymatgen(datasets):
    from pymatgen.core import Lattice, Structure

    reader = datasets["carolina_db"]._records
    for i in range(0, len(reader), 7):
        record = reader.record(i)
        abc = [float(record[f"_cell_length_{n}"]) for n in "abc"]
        angles = [float(record[f"_cell_angle_{n}"]) for n in ("alpha", "beta", "gamma")]
        lattice = Lattice.from_parameters(*abc, *angles)  # pymatgen's own convention (c along z)
        oracle = Structure(lattice, record["atomic_numbers"], record["cart_coords"])
        cell = carolina_cell(record)
        np.testing.assert_allclose(np.linalg.norm(cell, axis=1), abc, rtol=1e-10)
        sample = datasets["carolina_db"][i]
        ours = Structure(Lattice(sample["cell"][0].double().numpy()), record["atomic_numbers"],
                         sample["pos"].double().numpy(), coords_are_cartesian=True)  # fmt: skip
        np.testing.assert_allclose(ours.distance_matrix, oracle.distance_matrix, atol=1e-4)
        assert ours.volume == pytest.approx(oracle.volume, rel=1e-6)


def test_materials_project_records(datasets):
    reader = datasets["materials_project"]._records
    for i in range(len(reader)):
        record = reader.record(i)
        sample = datasets["materials_project"][i]
        np.testing.assert_allclose(sample["pos"].numpy(), record["structure"].cart_coords, atol=1e-5)
        np.testing.assert_allclose(sample["cell"][0].numpy(), record["structure"].lattice.matrix, atol=1e-5)
        assert float(sample["targets"]["band_gap"]) == pytest.approx(record["band_gap"], abs=1e-6)
        assert float(sample["targets"]["is_stable"]) == float(record["is_stable"])
        assert record["symmetry"].number == int(record["symmetry"].number) > 0  # emmet stand-in
        assert "symmetry" not in sample["targets"] and "formula_pretty" not in sample["targets"]


def test_nomad_si_units_become_angstrom_and_ev(datasets):
    reader = datasets["nomad"]._records
    for i in range(len(reader)):
        record = reader.record(i)
        structure = record["properties"]["structures"]["structure_original"]
        sample = datasets["nomad"][i]
        np.testing.assert_allclose(
            sample["pos"].double().numpy(), np.array(structure["cartesian_site_positions"]) * 1e10, atol=1e-5
        )
        np.testing.assert_allclose(sample["cell"][0].double().numpy(), np.array(structure["lattice_vectors"]) * 1e10,
                                   atol=1e-5)  # fmt: skip
        total_ev = record["energies"]["total"]["value"] / 1.602176634e-19
        assert float(sample["targets"]["energy_total"]) == pytest.approx(total_ev, rel=1e-6)
        # the stored relative energy is total - reference, both in eV (as the toolkit converted them, with a
        # slightly different J -> eV factor): a unit check independent of ours
        scale = abs(record["reference_energy"]) + abs(total_ev)
        assert record["relative_energy"] == pytest.approx(total_ev - record["reference_energy"], abs=1e-6 * scale)
    assert EV_PER_JOULE == pytest.approx(6.241509074e18)


def test_colabfit_stress_stored_upper_triangular_is_symmetrised(datasets):
    upper = np.array([[1.0, 2.0, 3.0], [0.0, 4.0, 5.0], [0.0, 0.0, 6.0]])
    np.testing.assert_array_equal(symmetric_from_upper(upper), [[1, 2, 3], [2, 4, 5], [3, 5, 6]])
    reader = datasets["colabfit"]._records
    for i in range(len(reader)):
        stored = torch.as_tensor(reader.record(i)["stress"]).double()
        assert float(stored.tril(-1).abs().sum()) == 0.0
        stress = datasets["colabfit"][i]["targets"]["stress"].double()
        torch.testing.assert_close(stress, stress.T)
        torch.testing.assert_close(stress.triu(), stored.triu().float().double())


def test_missing_label_is_nan_and_follows_on_invalid():
    reader = OQMDDataset(UP / "oqmd")._records
    missing = [i for i in range(len(reader)) if reader.record(i)["band_gap"] is None]
    assert len(missing) == 1
    assert math.isnan(float(reader[missing[0]]["targets"]["band_gap"]))  # not 0.0
    with pytest.raises(DataError, match="band_gap"):
        OQMDDataset(UP / "oqmd", target_keys=["band_gap"], on_invalid="error")
    with pytest.warns(UserWarning, match="dropped 1 of 200"):
        kept = OQMDDataset(UP / "oqmd", target_keys=["band_gap", "energy", "stability"])  # drop: the default here
    assert len(kept) == 199


def test_toolkit_target_names():
    lips = LiPSDataset(UP / "lips", target_keys=["energy", "force"])
    assert lips.target_keys == ["energy", "forces"]
    from matsciml.models.base import ForceRegressionTask

    with pytest.warns(UserWarning, match="encoder instance"):
        task = ForceRegressionTask(encoder=torch.nn.Identity(), task_keys=["energy", "force"],
                                   output_kwargs={"input_dim": 4})  # fmt: skip
    assert task.task_keys == ["energy", "forces"]


def test_toolkit_import_paths():
    from matsciml.datasets import LiPSDataset as Lips
    from matsciml.datasets import OQMDDataset as Oqmd
    from matsciml.lightning import MatSciMLDataModule as Ours
    from matsciml.lightning.data_utils import MatSciMLDataModule
    from matsciml.registry import lookup

    assert MatSciMLDataModule is Ours
    assert lookup("dataset", "OQMDDataset") is Oqmd and lookup("dataset", "LiPSDataset") is Lips
    assert lookup("dataset", "CarolinaDataset") is CMDataset
    from matsciml.lightning.data_utils import MultiDataModule
    from matsciml.lightning.multi_datamodule import MultiDataModule as OurMulti

    assert MultiDataModule is OurMulti
    with pytest.raises(ImportError, match="PLEGNNBackbone"):
        from matsciml.models.pyg import EGNN  # noqa: F401


def test_devset_is_not_bundled_and_says_where_it_is():
    from matsciml.common.errors import ConfigError

    with pytest.raises(ConfigError, match="oqmd/devset"):
        OQMDDataset.from_devset()


def test_wrong_class_for_the_data_names_the_key():
    with pytest.raises(DataError, match=r"key '0'.*OQMDDataset record lacks"):
        OQMDDataset(UP / "lips")


def test_pickled_dict_records_of_a_pymatgen_structure(tmp_path):
    from pymatgen.core import Lattice, Structure

    structure = Structure(Lattice.cubic(3.6), ["Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    record = {"structure": structure, "fields_not_requested": ["volume"], "band_gap": None, "is_metal": True,
              "volume": 1.0, "formula_pretty": "Cu"}  # fmt: skip
    path = _write_lmdb(tmp_path / "mp.lmdb", {5: record})
    sample = MaterialsProjectDataset(path)[0]
    np.testing.assert_allclose(sample["pos"].numpy(), structure.cart_coords, atol=1e-6)
    assert math.isnan(float(sample["targets"]["band_gap"])) and float(sample["targets"]["is_metal"]) == 1.0
    assert "volume" not in sample["targets"]


def _write_lmdb(path, records: dict[int, object]):
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for key, record in records.items():
            txn.put(str(key).encode(), pickle.dumps(record, protocol=5))
    env.close()
    return path


def test_dataset_pickles_for_spawned_loader_workers():
    dataset = LiPSDataset(UP / "lips", target_keys=["energy", "force"])
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[7]["targets"]["forces"], dataset[7]["targets"]["forces"])


def test_ocp_records_stored_as_pyg_data(tmp_path):
    from torch_geometric.data import Data

    from matsciml.datasets import IS2REDataset, S2EFDataset

    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.2, 0.0]])
    common = {"pos": pos, "atomic_numbers": torch.tensor([8.0, 1.0, 1.0]), "cell": 6.0 * torch.eye(3)[None],
              "natoms": 3}  # fmt: skip
    s2ef = Data(**common, y=torch.tensor(-3.25), force=torch.arange(9.0).reshape(3, 3), sid=torch.tensor([11]))
    is2re = Data(**common, y_init=torch.tensor(1.5), y_relaxed=torch.tensor(0.5), sid=torch.tensor([12]))
    (tmp_path / "s2ef").mkdir()
    (tmp_path / "is2re").mkdir()
    _write_lmdb(tmp_path / "s2ef" / "data.0000.lmdb", {0: s2ef})
    _write_lmdb(tmp_path / "is2re" / "data.0000.lmdb", {0: is2re})
    sample = S2EFDataset(tmp_path / "s2ef")[0]
    assert sample["id"] == "11" and float(sample["targets"]["energy"]) == -3.25
    assert torch.equal(sample["targets"]["forces"], s2ef.force) and torch.equal(sample["pos"], pos)
    assert sample["atomic_numbers"].tolist() == [8, 1, 1] and sample["pbc"].all()
    sample = StructureDataset(tmp_path / "is2re")[0]  # detected from the layout
    assert float(sample["targets"]["energy_relaxed"]) == 0.5 and float(sample["targets"]["energy_init"]) == 1.5
    assert IS2REDataset(tmp_path / "is2re")[0]["id"] == "12"
