"""``MatSciMLCalculator``: an ASE calculator that evaluates a trained matsciml task.

Every call goes through the task's own ``forward`` (its normalisation included), so the
results are in data units: eV, eV/Å, eV/Å^3 for a task trained on those. An
:class:`ase.Atoms` becomes a sample with :func:`~matsciml.datasets.readers.common.make_sample`,
passes the data transforms the task was trained with (periodic neighbour list, graph),
and is collated as a batch of one, exactly as in training.

Example (molecular dynamics with a force model)::

    from ase import units
    from ase.md.verlet import VelocityVerlet
    from matsciml.interfaces.ase import MatSciMLCalculator

    atoms.calc = MatSciMLCalculator.from_checkpoint("runs/forces/checkpoints/last.ckpt", dtype="float64")
    VelocityVerlet(atoms, timestep=1.0 * units.fs).run(200)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from matsciml.common.errors import ConfigError, closest

__all__ = ["MatSciMLCalculator"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_FORCE_PROPERTIES = ("energy", "free_energy", "forces", "stress")


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ConfigError(f"MatSciMLCalculator: dtype {value} is not supported; use float32 or float64")
        return value
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"MatSciMLCalculator: dtype {value!r} is not valid; {closest(name, list(_DTYPES))}")
    return _DTYPES[name]


def _voigt(stress: np.ndarray) -> np.ndarray:
    """ASE's Voigt order ``xx, yy, zz, yz, xz, xy`` of a 3x3 stress."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])


class MatSciMLCalculator(Calculator):
    """ASE calculator on a trained task: energy, forces, stress and the task's scalar properties.

    With a :class:`~matsciml.models.tasks.forces.ForceRegressionTask` it gives
    ``energy`` (and ``free_energy``, the same), ``forces`` (``-dE/dx`` by autograd) and,
    for a periodic cell, ``stress`` (Voigt, eV/Å^3, ASE's sign) whether or not the task
    was trained on stresses. With a scalar task each target becomes a property of that
    name (``calc.results["band_gap"]``; ``energy`` when a target is called so).

    Use :meth:`from_checkpoint` (task class and transforms from the checkpoint) or
    :meth:`from_pretrained_force_regression`. A checkpoint written with the EMA callback
    gives the EMA weights (they are its ``state_dict``).

    Parameters
    ----------
    task_module
        The trained task (a matsciml task; its ``forward(batch)`` returns
        ``{key: Tensor}`` in data units).
    transforms
        Data transforms turning a sample into a graph sample (the ones used in training);
        instances or ``class_path`` specs. Default: the task's recorded
        ``data_transforms``; without any, a :class:`ConfigError`.
    dtype
        ``"float32"`` (default) or ``"float64"``: the precision of the task and of the
        positions and cell it gets (float64 for finite-difference checks and long MD).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``... Default: where the task is.
    **kwargs
        Arguments of :class:`ase.calculators.calculator.Calculator` (``label``,
        ``atoms``, ``directory``).

    Raises
    ------
    ConfigError
        No transforms, an unknown dtype, or a task without ``task_keys``.
    """

    implemented_properties: list[str] = list(_FORCE_PROPERTIES)

    def __init__(
        self,
        task_module: Any,
        transforms: Sequence[Any] | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        from matsciml.inference.checkpoint import build_transforms

        super().__init__(**kwargs)
        keys = list(getattr(task_module, "task_keys", []) or [])
        if not keys:
            raise ConfigError(
                f"MatSciMLCalculator: {type(task_module).__name__} has no task_keys; give a matsciml task"
            )
        if transforms is None:
            transforms = getattr(task_module, "data_transforms", None)
        if not transforms:
            raise ConfigError(
                "MatSciMLCalculator: no data transforms; pass transforms=[PeriodicPropertiesTransform(...), "
                "PointCloudToGraphTransform('pyg')] as used in training, or load with from_checkpoint"
            )
        self.transforms = build_transforms(transforms, "MatSciMLCalculator: transforms")
        self.dtype = _dtype(dtype)
        self.device = torch.device(device) if device is not None else next(task_module.parameters()).device
        self.task_module = task_module.to(device=self.device, dtype=self.dtype).eval()
        self.is_force_model = self._has_forces()
        scalar = [k for k in keys if k not in _FORCE_PROPERTIES]
        self.implemented_properties = (list(_FORCE_PROPERTIES) if self.is_force_model else []) + scalar
        if not self.is_force_model and "energy" in keys:
            self.implemented_properties += ["energy", "free_energy"]

    def _has_forces(self) -> bool:
        from matsciml.models.tasks.forces import ForceRegressionTask

        return isinstance(self.task_module, ForceRegressionTask)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        transforms: Sequence[Any] | None = None,
        task_class: str | type | None = None,
        **kwargs: Any,
    ) -> MatSciMLCalculator:
        """A calculator on the task of a checkpoint (see :func:`matsciml.inference.load_task`).

        Parameters
        ----------
        path
            The checkpoint (read with ``weights_only=True``).
        transforms
            Instead of the recorded transforms (the checkpoint's, else its run's ``config.yaml``).
        task_class
            Instead of the recorded task class.
        **kwargs
            ``dtype``, ``device`` and the ASE ``Calculator`` arguments.

        Raises
        ------
        ConfigError
            A missing or unreadable checkpoint (one line naming it), or no transforms.
        """
        from matsciml.inference.checkpoint import load_task

        loaded = load_task(path, task_class=task_class, transforms=transforms, where="MatSciMLCalculator checkpoint")
        if not loaded.transforms:
            raise ConfigError(
                f"MatSciMLCalculator: {path} records no data transforms and no config.yaml is beside it; pass "
                "transforms=[...] as used in training"
            )
        return cls(loaded.task, transforms=loaded.transforms, **kwargs)

    @classmethod
    def from_pretrained_force_regression(
        cls, checkpoint: str | Path, transforms: Sequence[Any] | None = None, **kwargs: Any
    ) -> MatSciMLCalculator:
        """A calculator on the :class:`~matsciml.models.tasks.forces.ForceRegressionTask` of a checkpoint.

        The name and arguments of the upstream toolkit's constructor; see :meth:`from_checkpoint`.
        """
        return cls.from_checkpoint(checkpoint, transforms=transforms, task_class="ForceRegressionTask", **kwargs)

    # ------------------------------------------------------------------ evaluation
    def batch_for(self, atoms: Any) -> dict[str, Any]:
        """The batch of one structure the task sees for ``atoms`` (in the calculator's dtype and device)."""
        from matsciml.datasets.collate import collate_samples
        from matsciml.datasets.readers.common import make_sample

        sample = make_sample(
            atoms.get_positions(), atoms.get_atomic_numbers(), atoms.cell.array, atoms.pbc, {}, "ase", "ase", 0
        )
        for transform in self.transforms:
            sample = transform(sample)
        batch = collate_samples([sample])
        graph = batch["graph"]
        for key, value in graph.to_dict().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                graph[key] = value.to(self.dtype)
        # exact positions and cell (the sample holds float32 copies)
        graph.pos = torch.as_tensor(atoms.get_positions(), dtype=self.dtype)
        graph.cell = torch.as_tensor(np.asarray(atoms.cell.array), dtype=self.dtype).reshape(1, 3, 3)
        batch["graph"] = graph.to(self.device)
        batch["natoms"] = batch["natoms"].to(self.device)
        return batch

    def _predict(self, batch: dict[str, Any], stress: bool) -> dict[str, torch.Tensor]:
        task = self.task_module
        keys = list(task.task_keys)
        wanted = keys + [k for k in ("forces", "stress") if self.is_force_model and k not in keys]
        if not stress and "stress" in wanted and "stress" not in keys:
            wanted.remove("stress")
        task.task_keys = wanted
        try:
            with torch.no_grad():
                return task(batch)
        finally:
            task.task_keys = keys

    def calculate(
        self,
        atoms: Any = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """Evaluate the task on ``atoms`` and fill :attr:`results` with every property it gives."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 1e-8
        out = self._predict(self.batch_for(atoms), stress=periodic)
        results: dict[str, Any] = {}
        for key, value in out.items():
            array = value.detach().to("cpu", torch.float64).numpy()
            if key == "forces":
                results["forces"] = array.reshape(-1, 3)
            elif key == "stress":
                results["stress"] = _voigt(array.reshape(3, 3))
            elif key == "energy":
                results["energy"] = results["free_energy"] = float(array.reshape(-1)[0])
            else:
                results[key] = float(array.reshape(-1)[0]) if array.size == 1 else array.reshape(array.shape[1:])
        self.results = results
