"""Target statistics of a training set, for automatic normalisation.

One streaming pass over the training split (raw records, without transforms where the
dataset offers ``raw``) accumulates, per target key:

* ``mean``, ``std`` and ``count`` of every finite element;
* ``rms`` (root mean square of the elements; for forces, over every component);
* for *extensive* keys (the total energy), per-element reference energies ``E0[Z]`` by
  least squares on composition, ``E ~ sum_Z n_Z E0[Z]`` (the "E0s" of MACE and nequip),
  solved from the accumulated normal equations with the minimum-norm solution (so a
  data set whose structures all share one composition still gets a solution), and the
  residuals' scales: ``residual_std`` (RMS per structure) and ``residual_per_atom_std``
  (``sqrt(mean(r^2 / N))``, the scale of one atom's contribution when atoms add
  independent errors).

The result is plain data (``{key: {name: float | {Z: float}}}``, element keys are
strings), so it can be stored in a checkpoint's hyperparameters. Results are cached in
memory per dataset object, split indices and keys: a second task or a second ``fit`` on
the same data module does not read the data again.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from matsciml.common.errors import DataError

__all__ = ["fit_element_energies", "StatisticsAccumulator", "target_statistics", "MAX_Z"]

#: Atomic numbers ``0 .. MAX_Z - 1`` are accepted.
MAX_Z = 119

_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, dict[str, Any]]] = weakref.WeakKeyDictionary()


def fit_element_energies(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Least-squares per-element energies: ``argmin_c |counts @ c - energies|`` (minimum norm).

    Parameters
    ----------
    counts
        ``[num_structures, num_elements]`` number of atoms of each element.
    energies
        ``[num_structures]`` total energies.

    Returns
    -------
    numpy.ndarray
        ``[num_elements]`` reference energies (0 for elements that never occur).
    """
    counts = np.asarray(counts, dtype=np.float64)
    energies = np.asarray(energies, dtype=np.float64)
    return _solve_normal(counts.T @ counts, counts.T @ energies)


def _solve_normal(ata: np.ndarray, aty: np.ndarray) -> np.ndarray:
    """Minimum-norm solution of ``ata @ c = aty`` restricted to the elements present.

    ``pinv(A^T A) A^T = pinv(A)``, so this equals the minimum-norm least-squares solution of
    the original system ``A c = y``.
    """
    present = np.flatnonzero(np.diag(ata) > 0)
    out = np.zeros(ata.shape[0])
    if present.size == 0:
        return out
    sub = ata[np.ix_(present, present)]
    # relative cut-off on the singular values of A^T A (squares of those of A)
    out[present] = np.linalg.pinv(sub, rcond=1e-12, hermitian=True) @ aty[present]
    return out


class StatisticsAccumulator:
    """Streaming sums for :func:`target_statistics` (float64, one sample at a time).

    Parameters
    ----------
    keys
        Target keys to accumulate.
    extensive
        Keys among ``keys`` that are extensive energies (fit per-element references).
    """

    def __init__(self, keys: Sequence[str], extensive: Iterable[str] = ()) -> None:
        self.keys = list(keys)
        self.extensive = [k for k in extensive if k in self.keys]
        self._sums = {k: np.zeros(3) for k in self.keys}  # count, sum, sum of squares (shifted)
        self._shift: dict[str, float] = {}
        self._normal = {
            k: {
                "ata": np.zeros((MAX_Z, MAX_Z)),
                "aty": np.zeros(MAX_Z),
                "yty": 0.0,
                "atwa": np.zeros((MAX_Z, MAX_Z)),
                "atwy": np.zeros(MAX_Z),
                "ytwy": 0.0,
                "n": 0,
            }
            for k in self.extensive
        }

    def add(self, sample: Mapping[str, Any], where: str = "sample") -> None:
        """Add one sample (``targets`` mapping and, for extensive keys, ``atomic_numbers``).

        Raises
        ------
        DataError
            The sample lacks a target, or an extensive target has atomic numbers out of range.
        """
        targets = sample.get("targets")
        if not isinstance(targets, Mapping):
            raise DataError(f"{where}: has no 'targets' mapping; the statistics need the training targets")
        for key in self.keys:
            if key not in targets:
                raise DataError(
                    f"{where}: has no target {key!r} (present: {sorted(targets)}); check the dataset's target keys"
                )
            values = torch.as_tensor(targets[key], dtype=torch.float64).reshape(-1).numpy()
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            shift = self._shift.setdefault(key, float(values[0]))
            centred = values - shift
            self._sums[key] += (values.size, centred.sum(), np.square(centred).sum())
            if key in self._normal and values.size == 1:
                self._add_composition(key, _atomic_numbers(sample, where), float(values[0]), where)

    def _add_composition(self, key: str, numbers: np.ndarray, energy: float, where: str) -> None:
        if numbers.size == 0:
            return
        if numbers.min() < 0 or numbers.max() >= MAX_Z:
            raise DataError(f"{where}: atomic numbers must lie in 0..{MAX_Z - 1}, got {numbers.min()}..{numbers.max()}")
        row = np.bincount(numbers, minlength=MAX_Z).astype(np.float64)
        weight = 1.0 / numbers.size
        acc = self._normal[key]
        outer = np.outer(row, row)
        acc["ata"] += outer
        acc["aty"] += row * energy
        acc["yty"] += energy * energy
        acc["atwa"] += outer * weight
        acc["atwy"] += row * energy * weight
        acc["ytwy"] += energy * energy * weight
        acc["n"] += 1

    def result(self) -> dict[str, dict[str, Any]]:
        """``{key: {count, mean, std, rms[, element_energies, residual_std, residual_per_atom_std]}}``.

        Raises
        ------
        DataError
            A key had no finite value in the whole pass.
        """
        out: dict[str, dict[str, Any]] = {}
        for key in self.keys:
            count, total, squares = self._sums[key]
            if count == 0:
                raise DataError(f"target {key!r}: no finite value in the training split; cannot normalise it")
            shift = self._shift[key]
            mean_c = total / count
            var = max(squares / count - mean_c * mean_c, 0.0)
            mean = shift + mean_c
            rms = math.sqrt(max(squares / count + 2 * shift * mean_c + shift * shift, 0.0))
            out[key] = {"count": int(count), "mean": float(mean), "std": float(math.sqrt(var)), "rms": float(rms)}
            acc = self._normal.get(key)
            if acc is not None and acc["n"] > 0:
                c = _solve_normal(acc["ata"], acc["aty"])
                res = acc["yty"] - 2 * c @ acc["aty"] + c @ acc["ata"] @ c
                res_w = acc["ytwy"] - 2 * c @ acc["atwy"] + c @ acc["atwa"] @ c
                out[key]["element_energies"] = {str(z): float(c[z]) for z in np.flatnonzero(np.diag(acc["ata"]) > 0)}
                out[key]["residual_std"] = float(math.sqrt(max(res, 0.0) / acc["n"]))
                out[key]["residual_per_atom_std"] = float(math.sqrt(max(res_w, 0.0) / acc["n"]))
        return out


def _atomic_numbers(sample: Mapping[str, Any], where: str) -> np.ndarray:
    numbers = sample.get("atomic_numbers")
    if numbers is None and sample.get("graph") is not None:
        numbers = getattr(sample["graph"], "atomic_numbers", None)
    if numbers is None:
        raise DataError(f"{where}: has no 'atomic_numbers'; per-element reference energies need them")
    return torch.as_tensor(numbers).reshape(-1).long().numpy()


def _base_and_indices(dataset: Any) -> tuple[Any, list[int]]:
    """The innermost dataset under (nested) ``Subset`` s and the indices into it."""
    indices = list(range(len(dataset)))
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _samples(base: Any, indices: Sequence[int]) -> Iterator[Mapping[str, Any]]:
    reader = getattr(base, "raw", None)
    for index in indices:
        yield reader(index) if callable(reader) else base[index]


def target_statistics(
    dataset: Any,
    keys: Sequence[str],
    extensive: Iterable[str] = (),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Statistics of ``keys`` over ``dataset`` (the training split), cached per dataset.

    Parameters
    ----------
    dataset
        A map-style dataset or a ``torch.utils.data.Subset`` of one. Raw records are read
        (``dataset.raw(i)``, no transforms) when the dataset has ``raw``.
    keys
        Target keys.
    extensive
        Keys that are extensive energies (get per-element references).
    progress
        Show a progress bar on standard error.

    Returns
    -------
    dict
        See :meth:`StatisticsAccumulator.result` (plain data).

    Raises
    ------
    DataError
        A record lacks a key or its atomic numbers, or a key has no finite value.
    """
    keys = list(keys)
    extensive = [k for k in extensive if k in keys]
    base, indices = _base_and_indices(dataset)
    cache_key = (hash(tuple(indices)), len(indices), tuple(keys), tuple(extensive))
    try:
        cached = _CACHE.setdefault(base, {})
    except TypeError:  # not weak-referenceable
        cached = {}
    if cache_key in cached:
        return _copy(cached[cache_key])
    accumulator = StatisticsAccumulator(keys, extensive)
    samples: Iterable[Mapping[str, Any]] = _samples(base, indices)
    if progress:
        from tqdm.auto import tqdm

        samples = tqdm(samples, total=len(indices), desc="target statistics", file=sys.stderr, mininterval=1.0)
    name = getattr(base, "path", type(base).__name__)
    for position, sample in zip(indices, samples):
        accumulator.add(sample, where=f"{name}, record {position}")
    result = accumulator.result()
    cached[cache_key] = result
    return _copy(result)


def _copy(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_copy(v) if isinstance(v, Mapping) else v) for k, v in stats.items()}
