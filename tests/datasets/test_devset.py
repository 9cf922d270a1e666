"""The embedded EMT alloy devset: determinism, labels against ASE's EMT, caching, atomic writes.

Oracle: ASE's EMT calculator run directly on the structures read back, and pure-element
references found independently, where EMT's stress vanishes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from matsciml.datasets import devset
from matsciml.datasets.structure_dataset import EMTAlloyDataset, StructureDataset

LABELS = ["energy", "energy_per_atom", "forces", "stress", "mixing_energy_per_atom", "stable"]


@pytest.fixture(scope="module")
def small_devset(tmp_path_factory):
    return devset.generate_devset(tmp_path_factory.mktemp("devset") / "small.extxyz", n=24)


@pytest.fixture(scope="module")
def pure_references():
    """Per element: EMT lattice constant where the stress vanishes, and the energy per atom there.

    The lattice constant comes from a root search on EMT's analytic stress (an independent
    route from the energy minimisation in the devset code), the energy is recomputed.
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from scipy.optimize import brentq

    def pressure(element, a):
        atoms = bulk(element, "fcc", a=a)
        atoms.calc = EMT()
        return atoms.get_stress()[:3].mean()

    refs = {}
    for element, a_exp in devset.EXPERIMENTAL_LATTICE_CONSTANTS.items():
        a0 = brentq(lambda a, el=element: pressure(el, a), 0.9 * a_exp, 1.1 * a_exp, xtol=1e-10)
        atoms = bulk(element, "fcc", a=a0)
        atoms.calc = EMT()
        refs[element] = (a0, atoms.get_potential_energy())
    return refs


def test_two_generations_are_byte_identical_and_prefixes(tmp_path, small_devset):
    again = devset.generate_devset(tmp_path / "a" / "again.extxyz", n=24)
    assert again.read_bytes() == small_devset.read_bytes()
    shorter = devset.generate_devset(tmp_path / "b" / "short.extxyz", n=5)
    lines = small_devset.read_text().splitlines(keepends=True)
    short_text = shorter.read_text()
    assert "".join(lines[: len(short_text.splitlines())]) == short_text  # n=5 is the start of n=24


def test_labels_match_emt_recomputed(small_devset):
    import ase.io
    from ase.calculators.emt import EMT

    frames = ase.io.read(small_devset, ":")
    dataset = StructureDataset(small_devset, target_keys=LABELS)
    assert len(frames) == len(dataset) == 24
    for index in (0, 5, 11, 23):
        atoms = frames[index]
        stored_e = atoms.get_potential_energy()
        stored_f = atoms.get_forces()
        stored_s = atoms.get_stress(voigt=False)
        fresh = atoms.copy()
        fresh.calc = EMT()
        np.testing.assert_allclose(stored_e, fresh.get_potential_energy(), atol=1e-6)
        np.testing.assert_allclose(stored_f, fresh.get_forces(), atol=1e-6)
        np.testing.assert_allclose(stored_s, fresh.get_stress(voigt=False), atol=1e-8)
        sample = dataset[index]
        assert sample["id"] == f"emt-v1-{index:05d}"
        assert sample["targets"]["stress"].shape == (3, 3) and sample["targets"]["forces"].shape == (len(atoms), 3)
        np.testing.assert_allclose(sample["targets"]["energy"].item(), stored_e, rtol=1e-6)
        np.testing.assert_allclose(sample["targets"]["stress"].numpy(), stored_s, atol=1e-7)


def test_label_identities(small_devset, pure_references):
    import ase.io

    for atoms in ase.io.read(small_devset, ":"):
        n = len(atoms)
        energy = atoms.get_potential_energy()
        assert 1 <= n <= devset.MAX_ATOMS
        assert set(atoms.get_chemical_symbols()) <= set(devset.ELEMENTS)
        assert np.abs(atoms.get_forces().sum(axis=0)).max() < 1e-6
        assert atoms.info["energy_per_atom"] * n == pytest.approx(energy, rel=1e-12, abs=1e-12)
        symbols = atoms.get_chemical_symbols()
        e_ref = sum(symbols.count(el) / n * pure_references[el][1] for el in set(symbols))
        mixing = atoms.info["mixing_energy_per_atom"]
        assert mixing == pytest.approx(energy / n - e_ref, abs=1e-9)
        assert atoms.info["stable"] == (1.0 if mixing < 0 else 0.0)


def test_reference_energies_sit_at_zero_stress(pure_references):
    refs = devset.reference_energies()
    assert set(refs) == set(devset.ELEMENTS)
    for element, (a0, e0) in pure_references.items():
        assert refs[element][0] == pytest.approx(a0, abs=1e-5)
        assert refs[element][1] == pytest.approx(e0, abs=1e-9)


def test_cache_folder_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert devset.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MATSCIML_CACHE")
    assert devset.default_cache_dir() == tmp_path / "xdg" / "matsciml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert devset.default_cache_dir() == tmp_path / "home" / ".cache" / "matsciml"


def test_devset_path_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path))
    path = devset.devset_path(n=6)
    assert path == tmp_path / "emt_alloys_v1_n6.extxyz" and path.is_file()
    assert devset.devset_filename() == "emt_alloys_v1.extxyz"

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached devset was generated again")

    monkeypatch.setattr(devset, "generate_devset", must_not_run)
    assert devset.devset_path(n=6) == path
    assert devset.devset_path(tmp_path, n=6) == path


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    import ase.io

    real_structure = devset._structure

    def broken(index, seed):
        if index == 3:
            raise RuntimeError("EMT exploded")
        return real_structure(index, seed)

    monkeypatch.setattr(devset, "_structure", broken)
    with pytest.raises(RuntimeError, match="EMT exploded"):
        devset.devset_path(tmp_path / "one", n=5)
    assert not any((tmp_path / "one").iterdir())
    monkeypatch.setattr(devset, "_structure", real_structure)

    real_write = ase.io.write

    def write_half(filename, images, **kwargs):
        real_write(filename, images[:2], **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ase.io, "write", write_half)
    with pytest.raises(OSError, match="disk full"):
        devset.devset_path(tmp_path / "two", n=5)
    assert os.listdir(tmp_path / "two") == []


@pytest.mark.slow
def test_full_devset(tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path))
    dataset = EMTAlloyDataset(target_keys=LABELS)
    assert dataset.path == tmp_path / "emt_alloys_v1.extxyz"
    assert len(dataset) == devset.DEVSET_SIZE == 1200
    stable = torch.stack([dataset.raw(i)["targets"]["stable"] for i in range(len(dataset))])
    fraction = stable.mean().item()
    assert 0.1 < fraction < 0.5, fraction
    natoms = [dataset.raw(i)["natoms"] for i in range(len(dataset))]
    assert min(natoms) == 1 and max(natoms) == 32
    numbers = torch.cat([dataset.raw(i)["atomic_numbers"] for i in range(len(dataset))])
    assert sorted(set(numbers.tolist())) == [13, 28, 29, 46, 47, 78, 79]
    assert len(StructureDataset.from_devset()) == 1200
