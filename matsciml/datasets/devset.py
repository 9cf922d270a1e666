"""The embedded development set: random fcc alloys labelled with ASE's EMT calculator.

Nothing is shipped as a data file: the set is generated from a fixed seed the first time
it is asked for (a few seconds on one core) and cached as extended XYZ, so that
:class:`~matsciml.datasets.StructureDataset` reads it like any user file.

.. rubric:: Content (format version 1, 1200 structures)

Each structure is a random supercell (1 to 32 atoms) of the primitive (1 atom) or
conventional (4 atoms) fcc cell, decorated with 1 to 4 of Al, Cu, Ag, Au, Ni, Pd, Pt in
random proportions, with the lattice constant from Vegard's law over the EMT equilibrium
lattice constants of the pure elements, a random symmetric strain (each component up to
±1 %) and a Gaussian rattle of the positions (0.02 Å). Labels, all from EMT:

* ``energy`` (eV), ``forces`` (eV/Å, ``[N, 3]``), ``stress`` (eV/Å\\ :sup:`3`,
  ``[3, 3]``), as calculator results;
* ``energy_per_atom`` (eV/atom);
* ``mixing_energy_per_atom`` (eV/atom): the energy per atom minus the composition-weighted
  EMT energies per atom of the pure elements in their relaxed fcc crystals;
* ``stable``: ``1.0`` when the mixing energy is negative, else ``0.0`` (229 of the 1200
  structures, 19 %, are stable: mostly binaries of pairs that mix favourably under EMT,
  such as Cu-Pt, Ni-Pt, Al-Ag);
* ``structure_id`` (``"emt-v1-00042"``), which becomes the sample id.

Each structure ``i`` draws from its own generator ``numpy.random.default_rng([seed, i])``,
so a smaller set (``n=50``) holds exactly the first structures of the full one.

.. rubric:: Cache

The file lives in the first of ``$MATSCIML_CACHE``, ``$XDG_CACHE_HOME/matsciml`` and
``~/.cache/matsciml``, as ``emt_alloys_v1.extxyz`` (``emt_alloys_v1_n<n>.extxyz`` for
another size). It is written to a temporary file in the same folder and moved into
place with :func:`os.replace`, so a crash never leaves a half-written devset. Delete the
file to regenerate it, or call :func:`generate_devset` with a path of your own.

Example::

    from matsciml.datasets import StructureDataset

    dataset = StructureDataset.from_devset(target_keys=["energy", "forces"])
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from matsciml.common.atomic import atomic_path

__all__ = [
    "DEVSET_VERSION",
    "DEVSET_SIZE",
    "DEVSET_SEED",
    "ELEMENTS",
    "EXPERIMENTAL_LATTICE_CONSTANTS",
    "default_cache_dir",
    "devset_filename",
    "devset_path",
    "generate_devset",
    "generate_structures",
    "reference_energies",
]

#: Version of the devset content; part of the file name, bumped whenever the content changes.
DEVSET_VERSION = 1
#: Number of structures of the full devset.
DEVSET_SIZE = 1200
#: Seed of the generator.
DEVSET_SEED = 1729
#: Elements EMT is parameterised for (all fcc metals).
ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
#: Room-temperature experimental fcc lattice constants (Å), the starting points of the EMT relaxation.
EXPERIMENTAL_LATTICE_CONSTANTS = {"Al": 4.05, "Cu": 3.61, "Ag": 4.09, "Au": 4.08, "Ni": 3.52, "Pd": 3.89, "Pt": 3.92}
MAX_ATOMS = 32
MAX_STRAIN = 0.01
RATTLE_STD = 0.02
_SPECIES_COUNTS = (1, 2, 3, 4)
_SPECIES_PROBS = (0.05, 0.65, 0.25, 0.05)


def default_cache_dir() -> Path:
    """``$MATSCIML_CACHE``, else ``$XDG_CACHE_HOME/matsciml``, else ``~/.cache/matsciml``."""
    if os.environ.get("MATSCIML_CACHE"):
        return Path(os.environ["MATSCIML_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "matsciml"
    return Path.home() / ".cache" / "matsciml"


def devset_filename(n: int = DEVSET_SIZE) -> str:
    """File name of the devset with ``n`` structures (holds the format version)."""
    suffix = "" if n == DEVSET_SIZE else f"_n{n}"
    return f"emt_alloys_v{DEVSET_VERSION}{suffix}.extxyz"


def reference_energies() -> dict[str, tuple[float, float]]:
    """EMT equilibrium lattice constant (Å) and energy per atom (eV) of each pure fcc element.

    Found by minimising the EMT energy of the one-atom primitive fcc cell over the lattice
    constant (bounded Brent search within ±10 % of the experimental value). Computed once
    per process.
    """
    return dict(_reference_energies())


@functools.cache
def _reference_energies() -> dict[str, tuple[float, float]]:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from scipy.optimize import minimize_scalar

    out = {}
    for element in ELEMENTS:
        a_exp = EXPERIMENTAL_LATTICE_CONSTANTS[element]

        def energy(a: float, element: str = element) -> float:
            atoms = bulk(element, "fcc", a=a)
            atoms.calc = EMT()
            return float(atoms.get_potential_energy())

        res = minimize_scalar(energy, bounds=(0.9 * a_exp, 1.1 * a_exp), method="bounded", options={"xatol": 1e-7})
        out[element] = (float(res.x), float(res.fun))
    return out


def _repeats(natoms_cells: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random ordered triple of positive integers whose product is ``natoms_cells``."""
    triples = [
        (a, b, natoms_cells // (a * b))
        for a in range(1, natoms_cells + 1)
        for b in range(1, natoms_cells // a + 1)
        if natoms_cells % (a * b) == 0
    ]
    return triples[int(rng.integers(len(triples)))]


def _structure(index: int, seed: int) -> Any:
    """Generate and label structure ``index`` (an ``ase.Atoms`` with a SinglePointCalculator)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    refs = _reference_energies()
    rng = np.random.default_rng([seed, index])
    cubic = bool(rng.random() < 0.5)
    per_cell = 4 if cubic else 1
    cells = int(rng.integers(1, MAX_ATOMS // per_cell + 1))
    reps = _repeats(cells, rng)
    natoms = per_cell * cells
    k = min(int(rng.choice(_SPECIES_COUNTS, p=_SPECIES_PROBS)), natoms)
    elements = [ELEMENTS[i] for i in sorted(rng.choice(len(ELEMENTS), size=k, replace=False))]
    fractions = rng.dirichlet(np.ones(k))
    symbols = [elements[i] for i in rng.choice(k, size=natoms, p=fractions)]
    counts = {el: symbols.count(el) / natoms for el in elements if el in symbols}
    a = sum(x * refs[el][0] for el, x in counts.items())

    atoms = bulk("Cu", "fcc", a=a, cubic=cubic).repeat(reps)
    atoms.set_chemical_symbols(symbols)
    strain = rng.uniform(-MAX_STRAIN, MAX_STRAIN, size=(3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.positions = atoms.positions + rng.normal(0.0, RATTLE_STD, size=(natoms, 3))
    atoms.wrap()

    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    e_ref = sum(x * refs[el][1] for el, x in counts.items())
    mixing = energy / natoms - e_ref
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    atoms.info["structure_id"] = f"emt-v{DEVSET_VERSION}-{index:05d}"
    atoms.info["energy_per_atom"] = energy / natoms
    atoms.info["mixing_energy_per_atom"] = mixing
    atoms.info["stable"] = 1.0 if mixing < 0 else 0.0
    return atoms


def generate_structures(n: int = DEVSET_SIZE, seed: int = DEVSET_SEED) -> list[Any]:
    """Generate and label the first ``n`` devset structures (``ase.Atoms``) in memory."""
    if n < 1:
        raise ValueError(f"generate_structures: n={n}; need at least one structure")
    return [_structure(i, seed) for i in range(n)]


def generate_devset(path: str | Path, n: int = DEVSET_SIZE, seed: int = DEVSET_SEED) -> Path:
    """Generate the devset and write it to ``path`` as extended XYZ, atomically.

    Parameters
    ----------
    path
        Output file (``.extxyz``); its folder is created if needed.
    n
        Number of structures (default 1200).
    seed
        Seed of the generator (default :data:`DEVSET_SEED`); the same ``n`` and ``seed``
        always give the same bytes on the same platform and library versions.

    Returns
    -------
    Path
        ``path``.
    """
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    structures = generate_structures(n, seed)
    with atomic_path(path) as tmp:
        ase.io.write(str(tmp), structures, format="extxyz")
    return path


def devset_path(cache_dir: str | Path | None = None, *, n: int = DEVSET_SIZE) -> Path:
    """Path of the cached devset, generated there on first use.

    Parameters
    ----------
    cache_dir
        Folder to use (default ``None``: :func:`default_cache_dir`).
    n
        Number of structures (default 1200; other sizes are cached under their own name).

    Returns
    -------
    Path
        The extended XYZ file.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / devset_filename(n)
    if not path.is_file():
        generate_devset(path, n=n)
    return path
