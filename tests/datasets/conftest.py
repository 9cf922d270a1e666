"""Fixtures shared by the dataset tests: small labelled structures and the real data folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[1] / "data"


def _labelled(atoms, rng, **info):
    from ase.calculators.singlepoint import SinglePointCalculator

    n = len(atoms)
    forces = rng.normal(size=(n, 3))
    forces -= forces.mean(axis=0)
    stress = rng.normal(scale=0.01, size=(3, 3))
    stress = 0.5 * (stress + stress.T)
    atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal() - 3 * n), forces=forces, stress=stress)
    atoms.info.update(info)
    return atoms


@pytest.fixture
def labelled_atoms():
    """Three periodic structures with energy, forces, stress, numeric/bool/string info and a per-atom array."""
    from ase.build import bulk

    rng = np.random.default_rng(7)
    out = []
    for k, (symbol, a) in enumerate([("Cu", 3.61), ("Al", 4.05), ("Ni", 3.52)]):
        atoms = bulk(symbol, "fcc", a=a, cubic=k != 1).repeat((1, 1, k + 1))
        atoms.rattle(0.05, seed=k)
        atoms.arrays["charges_x"] = rng.normal(size=len(atoms))
        out.append(_labelled(atoms, rng, band_gap=0.5 * k, n_valence=11 + k, metallic=bool(k % 2), name=f"s{k}"))
    return out


@pytest.fixture
def shared_data() -> Path:
    """The real reference data copied into ``tests/data`` (OQMD, LiPS, Alexandria devsets)."""
    return REAL_DATA
