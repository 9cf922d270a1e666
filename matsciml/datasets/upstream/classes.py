"""The Open MatSciML Toolkit's dataset classes by name, reading its LMDB datasets.

Each class is a :class:`~matsciml.datasets.StructureDataset` fixed to one record layout
(see :mod:`matsciml.datasets.upstream.records` for what each maps, in which units), so its
data go through the same validation, splits, DDP sharding and resumable loading as every
other format. They are registered under the toolkit's names, so its dataset configs work::

    dataset: OQMDDataset
    experiment:
      train_path: /data/oqmd/train      # a folder of *.lmdb files
      val_split: 0.1
    target_keys: [band_gap, energy, stability]

Example::

    from matsciml.datasets import LiPSDataset

    dataset = LiPSDataset("lips/devset", target_keys=["energy", "force"])
    dataset[0]["targets"]["forces"]     # [83, 3] float32, eV/Å

The toolkit's devsets are not bundled: ``from_devset`` tells where to point ``train_path``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matsciml.common.errors import ConfigError
from matsciml.datasets.structure_dataset import StructureDataset, Transform
from matsciml.datasets.upstream.records import ALIASES, FORMATS
from matsciml.registry import register_dataset

__all__ = ["UpstreamDataset", *FORMATS]

#: Folders of the toolkit's repository holding each class's devset.
_DEVSET_FOLDERS = {
    "OQMDDataset": "oqmd/devset",
    "LiPSDataset": "lips/devset",
    "CMDataset": "carolina_db/devset",
    "AlexandriaDataset": "alexandria/devset",
    "MaterialsProjectDataset": "materials_project/devset",
    "NomadDataset": "nomad/devset",
    "ColabFitDataset": "colabfit/devset",
    "S2EFDataset": "dev-s2ef",
    "IS2REDataset": "dev-is2re",
}


class UpstreamDataset(StructureDataset):
    """Base of the toolkit's dataset classes: a :class:`StructureDataset` over one upstream layout.

    Parameters
    ----------
    lmdb_root_path
        A ``.lmdb`` file or a folder of them (the toolkit's argument name; ``path`` works too).
    transforms, target_keys, cache
        As for :class:`~matsciml.datasets.StructureDataset`. ``target_keys`` may use the
        toolkit's names (``force`` is ``forces``).
    on_invalid
        As for :class:`~matsciml.datasets.StructureDataset`, but ``"drop"`` by default: the
        toolkit's data hold missing labels (``None``; one OQMD devset band gap), which the
        toolkit silently read as 0.0. Here such records are left out with a warning naming
        them; ``"error"`` stops at the first one instead.
    full_pairwise
        Accepted for compatibility and ignored: graphs come from the transforms.

    Raises
    ------
    DataError
        Unreadable data, a record naming a global outside the allowlist (file, key and
        global named), or (with ``target_keys``) a record failing validation.
    """

    #: The toolkit's class name whose records this class reads.
    upstream_name: str = ""

    def __init__(
        self,
        lmdb_root_path: str | Path | None = None,
        transforms: Sequence[Transform] | None = None,
        target_keys: Sequence[str] | None = None,
        on_invalid: str = "drop",
        cache: bool = True,
        full_pairwise: bool = True,
        path: str | Path | None = None,
        format: str | None = None,
    ) -> None:
        name = type(self).__name__
        if lmdb_root_path is not None and path is not None:
            raise ConfigError(f"{name}: give lmdb_root_path or path, not both")
        root = lmdb_root_path if lmdb_root_path is not None else path
        if root is None:
            raise ConfigError(f"{name}: give lmdb_root_path (a .lmdb file or a folder of them)")
        if format is not None and format != f"upstream:{self.upstream_name}":
            raise ConfigError(f"{name}: reads only its own layout; drop format={format!r} or use StructureDataset")
        if not full_pairwise:
            warnings.warn(f"{name}: full_pairwise=False is ignored; graphs are built by the transforms", stacklevel=2)
        super().__init__(root, transforms, target_keys, on_invalid, cache, f"upstream:{self.upstream_name}")

    @classmethod
    def from_devset(cls, transforms: Sequence[Transform] | None = None, **kwargs: Any) -> StructureDataset:
        """Not bundled: raises with the path of the toolkit's devset to give as ``train_path``.

        Raises
        ------
        ConfigError
            Always.
        """
        folder = _DEVSET_FOLDERS.get(cls.upstream_name, "<dataset>/devset")
        raise ConfigError(
            f"{cls.__name__}: the Open MatSciML Toolkit's devsets are not bundled here; give train_path (its "
            f"devset is the folder matsciml/datasets/{folder} of the toolkit's repository), e.g. "
            f"-c dataset.debug.train_path=/path/to/{folder}"
        )


def _make(name: str) -> type[UpstreamDataset]:
    fmt = FORMATS[name]
    doc = (
        f"The Open MatSciML Toolkit's ``{name}``: reads its LMDB records safely as samples.\n\n"
        f"Targets: {', '.join(f'``{t}``' for t in fmt.targets)} (units and mapping in "
        ":mod:`matsciml.datasets.upstream.records`).\n\n"
        f"Example YAML::\n\n    dataset: {name}\n    experiment:\n      train_path: /data/{name.lower()}\n"
        f"    target_keys: [{fmt.targets[0]}]\n\n"
        "Parameters are those of :class:`UpstreamDataset`."
    )
    cls = type(name, (UpstreamDataset,), {"upstream_name": name, "__doc__": doc, "__module__": __name__})
    return register_dataset(cls, aliases=list(ALIASES.get(name, ())))


OQMDDataset = _make("OQMDDataset")
LiPSDataset = _make("LiPSDataset")
CMDataset = _make("CMDataset")
AlexandriaDataset = _make("AlexandriaDataset")
MaterialsProjectDataset = _make("MaterialsProjectDataset")
NomadDataset = _make("NomadDataset")
ColabFitDataset = _make("ColabFitDataset")
S2EFDataset = _make("S2EFDataset")
IS2REDataset = _make("IS2REDataset")
