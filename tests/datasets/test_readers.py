"""Readers of every format, the LMDB writer, StructureDataset and the dataset registry.

Oracle: the ASE ``Atoms`` (or pymatgen ``Structure``) the files were written from, and
ASE's own readers.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets.readers import LMDBReader, detect_format, write_lmdb
from matsciml.datasets.readers.lmdb_format import METADATA_KEY
from matsciml.datasets.registry import available_datasets, get_dataset_class, register_dataset
from matsciml.datasets.structure_dataset import EMTAlloyDataset, StructureDataset
from matsciml.registry import registry

SCHEMA_KEYS = {"pos", "atomic_numbers", "cell", "pbc", "natoms", "id", "source", "targets"}


def expected_targets(atoms) -> dict[str, np.ndarray]:
    """The labels a reader must find in ``atoms`` (written by hand from the fixture's content)."""
    return {
        "energy": np.array(atoms.calc.results["energy"]),
        "forces": atoms.calc.results["forces"],
        "stress": atoms.get_stress(voigt=False),
        "band_gap": np.array(atoms.info["band_gap"]),
        "n_valence": np.array(float(atoms.info["n_valence"])),
        "metallic": np.array(1.0 if atoms.info["metallic"] else 0.0),
        "charges_x": atoms.arrays["charges_x"],
    }


def check_layout(sample: dict) -> None:
    assert set(sample) == SCHEMA_KEYS
    n = sample["natoms"]
    assert sample["pos"].dtype == torch.float32 and sample["pos"].shape == (n, 3)
    assert sample["atomic_numbers"].dtype == torch.int64 and sample["atomic_numbers"].shape == (n,)
    assert sample["cell"].dtype == torch.float32 and sample["cell"].shape == (1, 3, 3)
    assert sample["pbc"].dtype == torch.bool and sample["pbc"].shape == (3,)
    assert isinstance(sample["id"], str) and set(sample["source"]) == {"file", "index"}
    for value in sample["targets"].values():
        assert value.dtype == torch.float32


def check_against_atoms(sample: dict, atoms, atol: float = 1e-6, targets: bool = True) -> None:
    check_layout(sample)
    np.testing.assert_allclose(sample["pos"].numpy(), atoms.positions, atol=atol)
    assert sample["atomic_numbers"].tolist() == atoms.numbers.tolist()
    np.testing.assert_allclose(sample["cell"][0].numpy(), atoms.cell.array, atol=atol)
    assert sample["pbc"].tolist() == atoms.pbc.tolist()
    if targets:
        want = expected_targets(atoms)
        assert set(sample["targets"]) == set(want)
        for key, value in want.items():
            np.testing.assert_allclose(sample["targets"][key].numpy(), value, rtol=1e-6, atol=1e-6, err_msg=key)


def assert_identical(a: dict, b: dict, check_id: bool = True) -> None:
    """Bitwise equality of two samples, except ``source`` (which names the file read)."""
    for key in ("pos", "atomic_numbers", "cell", "pbc"):
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert a["natoms"] == b["natoms"]
    assert a["id"] == b["id"] or not check_id
    assert a["targets"].keys() == b["targets"].keys()
    for key in a["targets"]:
        x, y = a["targets"][key], b["targets"][key]
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key


def round_trip(samples: list[dict], tmp_path, name: str = "rt.lmdb") -> list[dict]:
    path = write_lmdb(samples, tmp_path / name)
    reader = LMDBReader(path)
    assert len(reader) == len(samples)
    out = [reader[i] for i in range(len(reader))]
    for a, b in zip(samples, out):
        assert_identical(a, b)
        check_layout(b)
    return out


# ----------------------------------------------------------------------------- formats


def test_extxyz_matches_atoms_and_round_trips(labelled_atoms, tmp_path):
    import ase.io

    path = tmp_path / "set.extxyz"
    ase.io.write(path, labelled_atoms, format="extxyz")
    dataset = StructureDataset(path)
    assert len(dataset) == 3
    for i, atoms in enumerate(labelled_atoms):
        sample = dataset[i]
        check_against_atoms(sample, atoms)
        assert sample["id"] == f"set.extxyz:{i}"
        assert sample["source"] == {"file": str(path), "index": i}
        assert sample["targets"]["stress"].shape == (3, 3)
    assert dataset.available_targets == sorted(expected_targets(labelled_atoms[0]))
    round_trip([dataset.raw(i) for i in range(len(dataset))], tmp_path)


def test_plain_xyz_has_no_bogus_targets(tmp_path):
    path = tmp_path / "water.xyz"
    path.write_text("3\nwater molecule from somewhere\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n")
    (sample,) = [StructureDataset(path)[0]]
    check_layout(sample)
    assert sample["targets"] == {}
    assert sample["atomic_numbers"].tolist() == [8, 1, 1]
    assert not sample["pbc"].any() and not sample["cell"].any()
    np.testing.assert_allclose(sample["pos"][1].numpy(), [0, 0.7572, -0.4692], atol=1e-6)


def test_xyz_extension_with_extended_header_reads_labels(labelled_atoms, tmp_path):
    import ase.io

    path = tmp_path / "set.xyz"
    ase.io.write(path, labelled_atoms, format="extxyz")
    dataset = StructureDataset(path)
    for i, atoms in enumerate(labelled_atoms):
        check_against_atoms(dataset[i], atoms)


def test_traj_reads_calculator_results(labelled_atoms, tmp_path):
    import ase.io

    path = tmp_path / "set.traj"
    ase.io.write(path, labelled_atoms)
    samples = [StructureDataset(path).raw(i) for i in range(3)]
    for sample, atoms in zip(samples, labelled_atoms):
        check_layout(sample)
        assert {"energy", "forces", "stress"} <= set(sample["targets"])
        np.testing.assert_allclose(sample["targets"]["forces"].numpy(), atoms.calc.results["forces"], atol=1e-6)
    round_trip(samples, tmp_path)


def test_ase_db_reads_key_value_pairs_and_data(labelled_atoms, tmp_path):
    import ase.db

    path = tmp_path / "set.db"
    with ase.db.connect(path) as db:
        for atoms in labelled_atoms:
            kvp = {k: v for k, v in atoms.info.items() if k != "name"}
            db.write(atoms, key_value_pairs=kvp, data={"charges_x": atoms.arrays["charges_x"]}, name=atoms.info["name"])
    dataset = StructureDataset(path)
    assert detect_format(path) == "db"
    for i, atoms in enumerate(labelled_atoms):
        check_against_atoms(dataset[i], atoms)
        assert dataset[i]["id"] == f"set.db:{i}"
    round_trip([dataset.raw(i) for i in range(3)], tmp_path)


def test_pymatgen_json_layouts(labelled_atoms, tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    structures = []
    for atoms in labelled_atoms:
        st = AseAtomsAdaptor.get_structure(atoms)
        if "magmom" in st.site_properties:  # the adaptor copies initial_magmoms (an input) here
            st.remove_site_property("magmom")
        st.add_site_property("forces", atoms.calc.results["forces"].tolist())
        st.add_site_property("charges_x", atoms.arrays["charges_x"].tolist())
        st.properties = {
            "energy": atoms.calc.results["energy"],
            "stress": atoms.get_stress(voigt=False).tolist(),
            "band_gap": atoms.info["band_gap"],
            "n_valence": atoms.info["n_valence"],
            "metallic": atoms.info["metallic"],
            "name": atoms.info["name"],
        }
        structures.append(st)
    dicts = [st.as_dict() for st in structures]
    layouts = {
        "list.json": dicts,
        "wrapped.json": {"structures": dicts},
        "entries.json": [
            {"structure": {**d, "properties": {}}, "properties": st.properties, "id": f"mp-{k}"}
            for k, (d, st) in enumerate(zip(dicts, structures))
        ],
        "aligned.json": {
            "structures": [{**d, "properties": {}} for d in dicts],
            "properties": [st.properties for st in structures],
        },
    }
    reference = None
    for name, obj in layouts.items():
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        dataset = StructureDataset(path)
        assert len(dataset) == 3, name
        for i, atoms in enumerate(labelled_atoms):
            check_against_atoms(dataset[i], atoms, atol=1e-5)
        if name == "entries.json":
            assert [dataset[i]["id"] for i in range(3)] == ["mp-0", "mp-1", "mp-2"]
        samples = [dataset.raw(i) for i in range(3)]
        if reference is not None and name != "entries.json":
            for a, b in zip(reference, samples):
                assert_identical(a, b, check_id=False)
        reference = reference or samples
    round_trip(reference, tmp_path)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(dicts[1]))
    check_against_atoms(StructureDataset(single)[0], labelled_atoms[1], atol=1e-5)


def test_ase_json_database_is_recognised(labelled_atoms, tmp_path):
    import ase.db

    path = tmp_path / "asedb.json"
    with ase.db.connect(path, type="json") as db:
        db.write(labelled_atoms[0], band_gap=0.0)
    sample = StructureDataset(path)[0]
    np.testing.assert_allclose(sample["targets"]["energy"].item(), labelled_atoms[0].calc.results["energy"], rtol=1e-6)
    assert sample["targets"]["band_gap"].item() == 0.0


def _write_cifs(labelled_atoms, folder):
    import ase.io

    folder.mkdir()
    for k, atoms in enumerate(labelled_atoms):
        ase.io.write(folder / f"mp-{k}.cif", atoms)


def test_cif_folder_with_targets_csv(labelled_atoms, tmp_path):
    import ase.io

    folder = tmp_path / "cifs"
    _write_cifs(labelled_atoms, folder)
    (folder / "targets.csv").write_text("id,band_gap,energy\nmp-0,0.5,-1.25\nmp-2,,-3.5\nmp-1,1.5,-2.0\n")
    dataset = StructureDataset(folder)
    assert detect_format(folder) == "cif_folder"
    assert [dataset[i]["id"] for i in range(3)] == ["mp-0", "mp-1", "mp-2"]
    assert dataset[0]["targets"] == {"band_gap": torch.tensor(0.5), "energy": torch.tensor(-1.25)}
    assert dataset[2]["targets"] == {"energy": torch.tensor(-3.5)}
    for i in range(3):
        oracle = ase.io.read(folder / f"mp-{i}.cif")
        check_against_atoms(dataset[i], oracle, targets=False)
        assert dataset[i]["source"] == {"file": str(folder / f"mp-{i}.cif"), "index": i}
    round_trip([dataset.raw(i) for i in range(3)], tmp_path)


def test_cif_folder_with_id_prop_csv(labelled_atoms, tmp_path):
    folder = tmp_path / "cgcnn"
    _write_cifs(labelled_atoms, folder)
    (folder / "id_prop.csv").write_text("mp-0,1.0\nmp-1,2.0\nmp-2,3.0\n")
    dataset = StructureDataset(folder, target_keys=["target"])
    assert [dataset[i]["targets"]["target"].item() for i in range(3)] == [1.0, 2.0, 3.0]


def test_single_cif_file(labelled_atoms, tmp_path):
    import ase.io

    path = tmp_path / "x.cif"
    ase.io.write(path, labelled_atoms[0])
    sample = StructureDataset(path)[0]
    check_against_atoms(sample, ase.io.read(path), targets=False)


# ----------------------------------------------------------------------------- LMDB


def test_lmdb_writer_from_atoms_matches_extxyz_reader(labelled_atoms, tmp_path):
    import ase.io

    lmdb_path = write_lmdb(labelled_atoms, tmp_path / "direct.lmdb")
    direct = StructureDataset(lmdb_path)
    for i, atoms in enumerate(labelled_atoms):
        check_against_atoms(direct[i], atoms)
    xyz = tmp_path / "set.extxyz"
    ase.io.write(xyz, labelled_atoms, format="extxyz")
    converted = write_lmdb(StructureDataset(xyz), tmp_path / "converted.lmdb")
    a, b = StructureDataset(xyz), StructureDataset(converted)
    assert len(a) == len(b) == 3 and a.available_targets == b.available_targets
    for i in range(3):
        assert_identical(a[i], b[i])
        assert b[i]["source"] == {"file": str(converted), "index": i}


def test_lmdb_metadata_and_layout(labelled_atoms, tmp_path):
    import lmdb

    path = write_lmdb(labelled_atoms, tmp_path / "m.lmdb")
    assert path.is_file() and sorted(os.listdir(tmp_path)) == ["m.lmdb"]
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        meta = json.loads(txn.get(METADATA_KEY))
        assert txn.stat()["entries"] == 4
    env.close()
    assert meta == {
        "format": "matsciml-lmdb",
        "version": 1,
        "length": 3,
        "target_keys": sorted(expected_targets(labelled_atoms[0])),
    }


def test_lmdb_write_is_atomic_and_refuses_to_overwrite(labelled_atoms, tmp_path):
    path = tmp_path / "a.lmdb"

    def failing():
        yield labelled_atoms[0]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_lmdb(failing(), path)
    assert os.listdir(tmp_path) == []
    write_lmdb(labelled_atoms[:1], path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_lmdb(labelled_atoms, path)
    write_lmdb(labelled_atoms, path, overwrite=True)
    assert len(LMDBReader(path)) == 3
    with pytest.raises(ConfigError, match=r"\.lmdb"):
        write_lmdb(labelled_atoms, tmp_path / "b.mdb")


def test_lmdb_grows_map_and_reads_shards(labelled_atoms, tmp_path):
    shards = tmp_path / "shards.lmdb"
    shards.mkdir()
    write_lmdb(labelled_atoms[:2], shards / "part0.lmdb", map_size=4096 * 4, commit_every=1)
    write_lmdb(labelled_atoms[2:], shards / "part1.lmdb")
    dataset = StructureDataset(shards)
    assert len(dataset) == 3
    for i, atoms in enumerate(labelled_atoms):
        check_against_atoms(dataset[i], atoms)
    assert dataset[2]["source"] == {"file": str(shards / "part1.lmdb"), "index": 0}


def test_lmdb_dataset_pickles_and_works_in_loader_workers(labelled_atoms, tmp_path):
    path = write_lmdb(labelled_atoms * 4, tmp_path / "w.lmdb")
    dataset = StructureDataset(path, cache=False)
    first = dataset[0]  # opens the environment in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert_identical(first, clone[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, shuffle=False)
    ids = [sample["id"] for sample in loader]
    assert ids == [f"w.lmdb:{i}" for i in range(12)]


def test_same_lmdb_in_two_datasets_and_replaced_file(labelled_atoms, tmp_path):
    path = write_lmdb(labelled_atoms, tmp_path / "s.lmdb")
    first, second = StructureDataset(path), StructureDataset(path)
    assert_identical(first[1], second[1])
    write_lmdb(labelled_atoms[:2], path, overwrite=True)
    assert len(StructureDataset(path)) == 2
    with pytest.raises(DataError, match="replaced after the dataset was opened"):
        first[0]


def test_lmdb_cache_returns_independent_copies(labelled_atoms, tmp_path):
    dataset = StructureDataset(write_lmdb(labelled_atoms, tmp_path / "c.lmdb"), cache=True)
    sample = dataset[1]
    sample["pos"] += 100.0
    sample["targets"]["energy"] += 1.0
    np.testing.assert_allclose(dataset[1]["pos"].numpy(), labelled_atoms[1].positions, atol=1e-6)
    np.testing.assert_allclose(dataset[1]["targets"]["energy"].item(), labelled_atoms[1].calc.results["energy"])


def test_foreign_lmdb_is_refused(tmp_path):
    import lmdb

    path = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps({"pos": [0.0]}))
    env.close()
    with pytest.raises(DataError, match="__metadata__") as err:
        StructureDataset(path)
    assert "foreign.lmdb" in str(err.value) and "write_lmdb" in str(err.value)


# ----------------------------------------------------------------------------- dataset


def test_transforms_apply_in_order_and_raw_skips_them(labelled_atoms, tmp_path):
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, labelled_atoms, format="extxyz")

    def shift(sample):
        sample["pos"] = sample["pos"] + 1.0
        return sample

    def double(sample):
        sample["pos"] = sample["pos"] * 2.0
        return sample

    dataset = StructureDataset(path, transforms=[shift, double])
    expected = (torch.tensor(labelled_atoms[0].positions, dtype=torch.float32) + 1.0) * 2.0
    assert torch.allclose(dataset[0]["pos"], expected)
    assert torch.allclose(dataset.raw(0)["pos"], torch.tensor(labelled_atoms[0].positions, dtype=torch.float32))
    with pytest.raises(IndexError):
        dataset[3]
    assert dataset[-1]["id"] == "t.extxyz:2"


class AddToPositions:
    """A transform configured from YAML in the test below."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, sample):
        sample["pos"] = sample["pos"] + self.amount
        return sample


def test_transform_specs_are_instantiated(labelled_atoms, tmp_path, monkeypatch):
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, labelled_atoms, format="extxyz")
    module = types.ModuleType("fake_transforms")
    module.AddToPositions = AddToPositions
    monkeypatch.setitem(sys.modules, "fake_transforms", module)
    spec = {"class_path": "fake_transforms.AddToPositions", "init_args": {"amount": 2.0}}
    dataset = StructureDataset(path, transforms=[spec])
    assert torch.allclose(dataset[0]["pos"], dataset.raw(0)["pos"] + 2.0)
    with pytest.raises(ConfigError, match="on_invalid"):
        StructureDataset(path, on_invalid="skip")
    with pytest.raises(ConfigError, match="not callable"):
        StructureDataset(path, transforms=[42])


def test_from_devset_and_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path))
    dataset = StructureDataset.from_devset(n=12, target_keys=["energy", "forces", "stable"])
    assert len(dataset) == 12 and dataset.path == tmp_path / "emt_alloys_v1_n12.extxyz"
    assert dataset[0]["id"] == "emt-v1-00000"
    assert get_dataset_class("StructureDataset") is StructureDataset
    assert get_dataset_class("EMTAlloyDataset") is EMTAlloyDataset
    assert issubclass(EMTAlloyDataset, StructureDataset)
    assert set(available_datasets()) >= {"StructureDataset", "EMTAlloyDataset"}
    small = EMTAlloyDataset(dataset.path)
    assert len(small) == 12
    with pytest.raises(ConfigError, match="StructureDataset: no path given"):
        StructureDataset(target_keys=["energy"])

    class Devset12(StructureDataset):  # the hook EMTAlloyDataset fills with the full devset
        @classmethod
        def default_path(cls):
            return dataset.path

    assert [s["id"] for s in Devset12()] == [dataset.raw(i)["id"] for i in range(12)]
    with pytest.raises(ConfigError, match="did you mean 'StructureDataset'"):
        get_dataset_class("StructureDatset")

    class Mine(StructureDataset):
        pass

    try:
        register_dataset(Mine)
        assert get_dataset_class("Mine") is Mine
    finally:
        registry.remove("dataset", "Mine")


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name, count, keys",
    [
        ("oqmd", 200, {"band_gap", "formation_energy_per_atom", "energy_above_hull"}),
        ("lips", 200, {"energy", "forces"}),
        ("alexandria", 98, {"energy", "forces", "e_form", "e_above_hull", "band_gap_ind", "dos_ef", "total_mag"}),
    ],
)
def test_real_data_files(shared_data, name, count, keys):
    import ase.io

    path = shared_data / f"{name}_devset.extxyz"
    dataset = StructureDataset(path)
    assert len(dataset) == count
    assert set(dataset.available_targets) == keys
    oracle = ase.io.read(path, index="0")
    sample = dataset[0]
    check_layout(sample)
    np.testing.assert_allclose(sample["pos"].numpy(), oracle.positions, atol=1e-5)
    assert sample["atomic_numbers"].tolist() == oracle.numbers.tolist()
    if name == "lips":
        assert sample["targets"]["forces"].shape == (83, 3)
        np.testing.assert_allclose(sample["targets"]["forces"].numpy(), oracle.get_forces(), atol=1e-6)
        assert sample["id"] == "lips_devset.extxyz:0"
    if name == "oqmd":
        assert sample["id"] == str(oracle.info["oqmd_entry_id"])
        assert "name" not in sample["targets"] and "oqmd_entry_id" not in sample["targets"]
    if name == "alexandria":
        assert sample["id"] == oracle.info["alexandria_id"]
