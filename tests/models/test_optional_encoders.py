"""Optional-library encoders without their libraries, upstream names, and the upstream transforms.

These tests need neither matgl nor mace-torch: missing libraries are simulated.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list

from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets.transforms import (
    COMShift,
    DistancesTransform,
    GraphVariablesTransform,
    MGLDataTransform,
    PeriodicPropertiesTransform,
    PointCloudToGraphTransform,
)
from matsciml.datasets.utils import element_types
from matsciml.registry import lookup


def sample_of(atoms) -> dict:
    sample = {
        "pos": torch.tensor(atoms.positions, dtype=torch.float32),
        "atomic_numbers": torch.tensor(atoms.numbers),
        "cell": torch.tensor(np.asarray(atoms.cell), dtype=torch.float32)[None],
        "pbc": torch.tensor([True, True, True]),
        "natoms": len(atoms),
        "id": "test:0",
    }
    sample = PeriodicPropertiesTransform(cutoff_radius=4.0)(sample)
    return PointCloudToGraphTransform()(sample)


def alloy():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[1, 2]] = [79, 28]
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def test_missing_library_error_names_the_extra(monkeypatch):
    from matsciml.models import M3GNet, MACEWrapper

    monkeypatch.setitem(sys.modules, "matgl", None)
    monkeypatch.setitem(sys.modules, "matgl.models", None)
    with pytest.raises(ConfigError, match=r"M3GNet needs the 'matgl' package.*pip install 'matsciml\[matgl\]'"):
        M3GNet()
    monkeypatch.setitem(sys.modules, "mace", None)
    monkeypatch.setitem(sys.modules, "mace.modules", None)
    with pytest.raises(ConfigError, match=r"MACEWrapper needs the 'mace-torch' package.*--no-deps mace-torch"):
        MACEWrapper(atom_embedding_dim=8)


@pytest.mark.slow  # a fresh interpreter importing torch and lightning
def test_importing_models_loads_no_optional_library():
    code = (
        "import sys, matsciml.models as m; m.M3GNet; m.MACEWrapper; print(sorted({'matgl', 'mace'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_upstream_class_paths_resolve():
    for path in (
        "matsciml.models.M3GNet",
        "matsciml.models.CHGNet",
        "matsciml.models.MEGNet",
        "matsciml.models.TensorNet",
        "matsciml.models.pyg.mace.MACEWrapper",
    ):
        assert lookup("encoder", path).__name__ == path.rsplit(".", 1)[1]
    for name in ("MGLDataTransform", "DistancesTransform", "GraphVariablesTransform", "COMShift", "FrameAveraging"):
        assert lookup("transform", f"matsciml.datasets.transforms.{name}").__name__ == name


def test_unavailable_models_say_what_to_use():
    from matsciml.models import FAENet, GalaPotential

    with pytest.raises(ConfigError, match="FAENet is not available.*torch_scatter.*MACEWrapper"):
        FAENet(hidden_dim=128)
    with pytest.raises(ConfigError, match="GalaPotential is not available.*E3NNEncoder"):
        GalaPotential(D_in=100)
    with pytest.raises(ConfigError, match="FrameAveraging prepares inputs for FAENet"):
        instantiate(
            {"class_path": "matsciml.datasets.transforms.FrameAveraging", "init_args": {"frame_averaging": "3D"}}
        )


def test_element_types_are_ordered_by_atomic_number():
    types = instantiate({"class_path": "matsciml.datasets.utils.element_types"})
    assert len(types) == 118 and types[0] == "H" and types[28] == "Cu" and types[117] == "Og"
    assert element_types() == types


def test_distances_transform_matches_ase():
    atoms = alloy()
    sample = DistancesTransform()(sample_of(atoms))
    i, j, d = neighbor_list("ijd", atoms, 4.0)
    graph = sample["graph"]
    ours = sorted(zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), graph.r[:, 0].tolist()))
    ref = sorted(zip(i.tolist(), j.tolist(), d.tolist()))
    assert len(ours) == len(ref)
    assert max(abs(a[2] - b[2]) for a, b in zip(ours, ref)) < 1e-5
    za, zb = atoms.numbers[graph.edge_index[0].numpy()], atoms.numbers[graph.edge_index[1].numpy()]
    np.testing.assert_allclose(graph.mu[:, 0].numpy(), za * zb / (za + zb), rtol=1e-6)


def test_graph_variables_equal_numpy_values():
    atoms = alloy()
    sample = GraphVariablesTransform()(sample_of(atoms))
    i, j, d = neighbor_list("ijd", atoms, 4.0)
    z = atoms.numbers.astype(float)
    mu = z[i] * z[j] / (z[i] + z[j])
    expected = [z.mean(), z.std(), 0.0, 0.0, d.mean(), d.std(), mu.mean(), mu.std(), 0.0]
    np.testing.assert_allclose(sample["graph_variables"].numpy(), expected, rtol=1e-5)


def test_com_shift_centres_positions_of_sample_and_graph():
    atoms = alloy()
    sample = COMShift()(sample_of(atoms))
    z = atoms.numbers.astype(float)
    com = (z[:, None] * atoms.positions).sum(0) / z.sum()
    np.testing.assert_allclose(sample["pos"].numpy(), atoms.positions - com, atol=1e-5)
    np.testing.assert_allclose(sample["graph"].pos.numpy(), atoms.positions - com, atol=1e-5)


def test_transforms_need_the_graph():
    for transform in (MGLDataTransform(), DistancesTransform(), GraphVariablesTransform()):
        with pytest.raises(DataError, match="PointCloudToGraphTransform"):
            transform({"pos": torch.zeros(1, 3), "atomic_numbers": torch.ones(1, dtype=torch.long), "id": "x:0"})
