"""Symmetry, smoothness and gradient checks of the encoders (float64).

The oracles are exact symmetries (rotation, reflection, translation, permutation, choice of
periodic image and of supercell), finite differences of the energy (forces) and of the force
loss (double backward), and hand-written reductions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list
from e3nn import o3
from torch_geometric.data import Batch, Data

from matsciml.common import graph as G
from matsciml.common.config import check_init_args, instantiate
from matsciml.common.errors import ConfigError, DataError
from matsciml.models.egnn import PLEGNNBackbone
from matsciml.models.encoders import get_encoder_class
from matsciml.models.equivariant import E3NNEncoder, NequIPEncoder, plan_irreps
from matsciml.models.layers import (
    BesselBasis,
    PolynomialCutoff,
    build_mlp,
    get_activation,
    readout,
    scatter_max,
    scatter_mean,
    scatter_sum,
)
from matsciml.registry import names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUTOFF = 4.0
DTYPE = torch.float64

UPSTREAM_EGNN_KWARGS = {
    "embed_in_dim": 128,
    "embed_hidden_dim": 32,
    "embed_out_dim": 128,
    "embed_depth": 5,
    "embed_feat_dims": [128, 128, 128],
    "embed_message_dims": [128, 128, 128],
    "embed_position_dims": [64, 64],
    "embed_edge_attributes_dim": 0,
    "embed_activation": "relu",
    "embed_residual": True,
    "embed_normalize": True,
    "embed_tanh": True,
    "embed_activate_last": False,
    "embed_k_linears": 1,
    "embed_use_attention": False,
    "embed_attention_norm": "sigmoid",
    "readout": "sum",
    "node_projection_depth": 3,
    "node_projection_hidden_dim": 128,
    "node_projection_activation": "relu",
    "prediction_out_dim": 1,
    "prediction_depth": 3,
    "prediction_hidden_dim": 128,
    "prediction_activation": "relu",
    "encoder_only": True,
}


# ----------------------------------------------------------------------------- helpers


def small_egnn(**overrides) -> PLEGNNBackbone:
    kwargs = dict(UPSTREAM_EGNN_KWARGS)
    kwargs.update(
        embed_in_dim=8,
        embed_hidden_dim=8,
        embed_out_dim=8,
        embed_depth=3,
        embed_feat_dims=[16],
        embed_message_dims=[16, 16],
        embed_position_dims=[8],
        embed_activation="SiLU",
        node_projection_depth=1,
        node_projection_hidden_dim=6,
        node_projection_activation="silu",
        cutoff=CUTOFF,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = PLEGNNBackbone(**kwargs).to(DTYPE)
    # make the coordinate updates matter (they start near zero)
    with torch.no_grad():
        for layer in model.layers:
            if layer.position_mlp is not None:
                layer.position_mlp[-1].weight.normal_(0.0, 0.5)
    return model


def small_e3nn(**overrides) -> E3NNEncoder:
    kwargs = dict(
        num_layers=2,
        hidden_irreps="8x0e + 4x1o + 2x2e",
        max_ell=2,
        num_radial_basis=4,
        cutoff=CUTOFF,
        embedding_dim=6,
        radial_hidden=8,
        avg_num_neighbors=10.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return E3NNEncoder(**kwargs).to(DTYPE)


MODELS = {
    "egnn": small_egnn,
    "egnn-sigmoid-attention-k2": lambda: small_egnn(embed_use_attention=True, embed_k_linears=2, readout="mean"),
    "egnn-softmax-attention": lambda: small_egnn(
        embed_use_attention=True, embed_attention_norm="softmax", embed_normalize=False, readout="max"
    ),
    "e3nn": small_e3nn,
}


_PROTOTYPES: dict[str, torch.nn.Module] = {}


@pytest.fixture(params=list(MODELS))
def model(request):
    """A fresh copy of each model variant (built once: building e3nn tensor products takes a while)."""
    if request.param not in _PROTOTYPES:
        _PROTOTYPES[request.param] = MODELS[request.param]()
    return copy.deepcopy(_PROTOTYPES[request.param])


def random_crystal(seed: int, natoms: int | None = None) -> Atoms:
    """A random triclinic cell of 3-8 atoms with no two atoms closer than 1.2 Å."""
    rng = np.random.default_rng(seed)
    natoms = natoms or int(rng.integers(3, 9))
    while True:
        cell = np.diag(rng.uniform(3.0, 4.5, size=3)) + rng.normal(scale=0.5, size=(3, 3))
        atoms = Atoms(
            numbers=rng.integers(1, 30, size=natoms), scaled_positions=rng.random((natoms, 3)), cell=cell, pbc=True
        )
        dist = atoms.get_all_distances(mic=True) + 10 * np.eye(natoms)
        if dist.min() > 1.2 and abs(np.linalg.det(cell)) > 10.0:
            return atoms


def to_graph(atoms: Atoms, cutoff: float = CUTOFF) -> Data:
    i, j, shifts = neighbor_list("ijS", atoms, cutoff)
    return Data(
        pos=torch.tensor(atoms.positions, dtype=DTYPE),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        edge_index=torch.tensor(np.stack([i, j]), dtype=torch.long),
        cell_shifts=torch.tensor(shifts, dtype=DTYPE),
        cell=torch.tensor(np.array(atoms.cell), dtype=DTYPE)[None],
        natoms=len(atoms),
    )


def batch_of(*structures: Atoms, cutoff: float = CUTOFF) -> Batch:
    return Batch.from_data_list([to_graph(a, cutoff) for a in structures])


def random_orthogonal(seed: int, reflect: bool = False) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def transformed(atoms: Atoms, rot: np.ndarray, shift: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.set_cell(np.array(atoms.cell) @ rot.T, scale_atoms=False)
    out.positions = atoms.positions @ rot.T + shift
    return out


def readout_weights(dim: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.5, dim, dtype=DTYPE)


def energy_and_forces(model, graph, create_graph: bool = False):
    """Energy = per-atom embeddings dotted with fixed weights, summed; forces = -dE/dpos."""
    graph.pos.requires_grad_(True)
    emb = model(graph)
    energy = (emb.point_embedding @ readout_weights(model.embedding_dim)).sum()
    (grad,) = torch.autograd.grad(energy, graph.pos, create_graph=create_graph)
    return energy, -grad, emb


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    a, b = a.detach(), b.detach()
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))))


# ----------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("reflect", [False, True])
def test_invariance_and_force_equivariance(model, reflect):
    atoms = [random_crystal(1), random_crystal(2)]
    rot = random_orthogonal(3, reflect)
    moved = [transformed(a, rot, np.array([0.3, -1.7, 2.2])) for a in atoms]
    e0, f0, emb0 = energy_and_forces(model, batch_of(*atoms))
    e1, f1, emb1 = energy_and_forces(model, batch_of(*moved))
    assert emb0.point_embedding.abs().max() > 1e-3  # not trivially zero
    assert close(emb1.point_embedding, emb0.point_embedding)
    assert close(emb1.system_embedding, emb0.system_embedding)
    assert abs(float(e1.detach() - e0.detach())) < 1e-10 * max(1.0, abs(float(e0.detach())))
    assert f0.abs().max() > 1e-6
    assert close(f1, f0 @ torch.tensor(rot.T, dtype=DTYPE))


def test_forces_match_finite_differences(model):
    atoms = random_crystal(4, natoms=4)
    graph = to_graph(atoms)
    _, forces, _ = energy_and_forces(model, graph)
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        values = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * h
            with torch.no_grad():
                emb = model(to_graph(displaced))
            values.append(float((emb.point_embedding @ readout_weights(model.embedding_dim)).sum()))
        fd_force = -(values[0] - values[1]) / (2 * h)
        assert abs(fd_force - float(forces[atom, axis])) < 1e-6 * max(1.0, abs(fd_force))


def test_supercell_and_periodic_image(model):
    atoms = random_crystal(5)
    n = len(atoms)
    with torch.no_grad():
        prim = model(to_graph(atoms)).point_embedding
        sup = model(to_graph(atoms.repeat((2, 2, 1)))).point_embedding
        wrapped = atoms.copy()
        wrapped.positions[0] += np.array(atoms.cell).T @ np.array([1, -1, 2])
        wrapped.positions[n - 1] -= np.array(atoms.cell)[2]
        rewrapped = model(to_graph(wrapped)).point_embedding
    # ase's repeat orders the atoms image by image
    assert close(sup.reshape(4, n, -1), prim.expand(4, n, -1))
    assert close(rewrapped, prim)


def test_permutation(model):
    atoms = random_crystal(6, natoms=6)
    perm = np.array([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        ref = model(to_graph(atoms))
        out = model(to_graph(atoms[perm]))
    assert close(out.point_embedding, ref.point_embedding[perm])
    assert close(out.system_embedding, ref.system_embedding)


def test_batch_independence_and_dict_input(model):
    a, b = random_crystal(7), random_crystal(8)
    with torch.no_grad():
        alone = model(to_graph(b))
        both = model({"graph": batch_of(a, b)})
    assert both.system_embedding.shape == (2, model.embedding_dim)
    assert both.point_embedding.shape == (len(a) + len(b), model.embedding_dim)
    assert close(both.point_embedding[len(a) :], alone.point_embedding)
    assert close(both.system_embedding[1], alone.system_embedding[0])


def test_readout_matches_hand_reduction(model):
    structures = [random_crystal(9), random_crystal(10)]
    with torch.no_grad():
        emb = model(batch_of(*structures))
    n0 = len(structures[0])
    parts = [emb.point_embedding[:n0], emb.point_embedding[n0:]]
    mode = model.readout_mode
    hand = {
        "sum": lambda x: x.sum(0),
        "mean": lambda x: x.mean(0),
        "max": lambda x: x.max(0).values,
    }[mode]
    assert close(emb.system_embedding, torch.stack([hand(p) for p in parts]))


# ----------------------------------------------------------------------------- smoothness


@pytest.mark.parametrize("name", ["egnn", "e3nn"])
def test_energy_continuous_at_cutoff(name):
    """A neighbour just inside the cutoff contributes (almost) nothing: same as no edge."""
    model = MODELS[name]()

    def pair(distance: float) -> Data:
        atoms = Atoms("CuO", positions=[[1.0, 1.0, 1.0], [1.0 + distance, 1.0, 1.0]], cell=np.eye(3) * 20, pbc=True)
        return to_graph(atoms, cutoff=CUTOFF + 0.5)

    with torch.no_grad():
        inside = model(pair(CUTOFF - 1e-4)).point_embedding
        outside = model(pair(CUTOFF + 0.2)).point_embedding  # edge present in the graph, beyond the cutoff
        graph = pair(CUTOFF - 1e-4)
        graph.edge_index = graph.edge_index[:, :0]
        graph.cell_shifts = graph.cell_shifts[:0]
        no_edge = model(graph).point_embedding
        near = model(pair(CUTOFF - 0.5)).point_embedding
    assert close(outside, no_edge, 1e-12)
    assert close(inside, no_edge, 1e-8)
    assert not close(near, no_edge, 1e-4)  # the pair does interact well inside the cutoff


# ----------------------------------------------------------------------------- gradients


def _force_loss(model, graph, create_graph: bool = True):
    energy, forces, emb = energy_and_forces(model, graph, create_graph=create_graph)
    return energy + forces.pow(2).sum() + emb.system_embedding.pow(2).sum()


def test_every_parameter_gets_a_gradient(model):
    loss = _force_loss(model, batch_of(random_crystal(11), random_crystal(12)))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_pruned_irreps_leave_no_unused_parameter():
    # 1e is reachable (1o x 1o) but cannot reach the final scalars with l <= 1 harmonics; 3o is unreachable.
    hidden = "6x0e + 3x1o + 2x1e + 2x3o"
    model = small_e3nn(hidden_irreps=hidden, max_ell=1, num_layers=3)
    _, outs = plan_irreps(o3.Irreps(hidden).sort().irreps.simplify(), model.irreps_sh, num_layers=3)
    assert [str(o) for o in outs] == ["6x0e+3x1o", "6x0e+3x1o", "6x0e"]
    _force_loss(model, to_graph(random_crystal(13))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_double_backward_matches_finite_differences(model):
    """d(loss)/d(theta) through forces by autograd agrees with central differences."""
    graph = to_graph(random_crystal(14, natoms=3))
    model.zero_grad()
    _force_loss(model, graph.clone()).backward()
    params = list(model.named_parameters())
    h = 1e-6
    for name, param in [params[k] for k in np.linspace(0, len(params) - 1, 4).astype(int)]:
        idx = tuple(int(i) for i in torch.nonzero(param.grad.abs() > 1e-8)[0])
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                param[idx] += sign * h
            values.append(float(_force_loss(model, graph.clone(), create_graph=False).detach()))
            with torch.no_grad():
                param[idx] -= sign * h
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(fd - float(param.grad[idx])) < 1e-5 * max(1.0, abs(fd)), name


# ----------------------------------------------------------------------------- configuration


def test_upstream_egnn_yaml_kwargs():
    spec = {"class_path": "matsciml.models.egnn.PLEGNNBackbone", "init_args": UPSTREAM_EGNN_KWARGS}
    encoder = instantiate(spec).to(DTYPE)
    assert encoder.embedding_dim == 128
    assert encoder.prediction is None
    assert all(layer.position_mlp is not None for layer in encoder.layers[:-1])
    assert encoder.layers[-1].position_mlp is None
    with torch.no_grad():
        emb = encoder(batch_of(random_crystal(15), random_crystal(16)))
    assert emb.system_embedding.shape == (2, 128)
    assert torch.isfinite(emb.point_embedding).all()


def test_misspelt_or_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="embed_message_dims"):
        check_init_args(PLEGNNBackbone, {"embed_mesage_dims": [1]})
    with pytest.raises(ConfigError, match="embed_attention_norm.*softmax"):
        small_egnn(embed_attention_norm="softmx")
    with pytest.raises(ConfigError, match="readout"):
        small_egnn(readout="summ")
    with pytest.raises(ConfigError, match="embed_activation.*relu"):
        small_egnn(embed_activation="rellu")
    with pytest.raises(ConfigError, match="hidden_irreps"):
        small_e3nn(hidden_irreps="4x1o")
    with pytest.raises(ConfigError, match="hidden_irreps"):
        small_e3nn(hidden_irreps="four vectors")


def test_unknown_element_is_a_data_error():
    graph = to_graph(random_crystal(17))
    graph.atomic_numbers[0] = 100
    for factory in (small_egnn, small_e3nn):
        with pytest.raises(DataError, match="atomic number 100"):
            factory()(graph)


def test_prediction_head_when_not_encoder_only():
    model = small_egnn(encoder_only=False, prediction_out_dim=2, prediction_depth=2, readout="sum")
    assert model.embedding_dim == 2
    with torch.no_grad():
        emb = model(batch_of(random_crystal(18), random_crystal(19)))
    n0 = len(random_crystal(18))
    assert close(emb.system_embedding[0], emb.point_embedding[:n0].sum(0))


def test_weight_and_sum_readout():
    model = small_egnn(readout="weight_and_sum")
    with torch.no_grad():
        emb = model(to_graph(random_crystal(22)))
        gate = torch.sigmoid(emb.point_embedding @ model.readout_gate.weight.T + model.readout_gate.bias)
    assert close(emb.system_embedding[0], (gate * emb.point_embedding).sum(0))


def test_edge_attributes():
    graph = to_graph(random_crystal(20))
    model = small_egnn(embed_edge_attributes_dim=2)
    with pytest.raises(DataError, match="edge_attr"):
        model(graph)
    graph.edge_attr = torch.ones(graph.edge_index.shape[1], 2, dtype=DTYPE)
    assert model(graph).point_embedding.shape == (len(random_crystal(20)), model.embedding_dim)


def test_avg_num_neighbors_from_first_batch():
    model = small_e3nn(avg_num_neighbors=None)
    assert torch.isnan(model.avg_num_neighbors)
    atoms = random_crystal(21)
    graph = to_graph(atoms, cutoff=CUTOFF + 1.0)  # longer edges are ignored
    expected = len(neighbor_list("i", atoms, CUTOFF)) / len(atoms)
    with torch.no_grad():
        model(graph)
    assert float(model.avg_num_neighbors) == pytest.approx(expected)
    assert "avg_num_neighbors" in model.state_dict()


# ----------------------------------------------------------------------------- torch.export


class _Graph:
    """The six graph tensors, read through matsciml.common.graph like a PyG batch."""

    def __init__(self, pos, atomic_numbers, edge_index, cell_shifts, cell, batch) -> None:
        self.pos, self.atomic_numbers, self.edge_index = pos, atomic_numbers, edge_index
        self.cell_shifts, self.cell, self.batch = cell_shifts, cell, batch

    @property
    def num_graphs(self):
        return self.cell.shape[0]  # symbolic while exporting with a dynamic number of structures


class _TensorFront(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pos, atomic_numbers, edge_index, cell_shifts, cell, batch):
        emb = self.encoder(_Graph(pos, atomic_numbers, edge_index, cell_shifts, cell, batch))
        return emb.system_embedding, emb.point_embedding


def _tensors(graph: Batch) -> tuple[torch.Tensor, ...]:
    return (graph.pos, graph.atomic_numbers, graph.edge_index, graph.cell_shifts, graph.cell, graph.batch)


def test_torch_export_with_dynamic_sizes_matches_eager(model):
    """One exported program for batches of 2 and 3 structures; graphs longer than the cutoff."""
    from torch.export import Dim

    model.eval()
    # built with a radius past the cutoff: E3NNEncoder drops those edges in eager mode and keeps
    # them (with a zero envelope) in the exported program; the predictions must not differ
    example = batch_of(random_crystal(30), random_crystal(31), cutoff=CUTOFF + 1.0)
    other = batch_of(random_crystal(32), random_crystal(33), random_crystal(34), cutoff=CUTOFF + 1.0)
    assert bool((G.edge_vectors(example).norm(dim=-1) > CUTOFF).any())
    atoms, edges, graphs = Dim("atoms"), Dim("edges"), Dim("graphs")
    dynamic = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: graphs}, {0: atoms})
    front = _TensorFront(model)
    with torch.no_grad():
        program = torch.export.export(front, _tensors(example), dynamic_shapes=dynamic, strict=False)
        for graph in (example, other):
            expected = model(graph)
            system, point = program.module()(*_tensors(graph))
            assert system.shape == (graph.num_graphs, model.embedding_dim)
            assert close(system, expected.system_embedding) and close(point, expected.point_embedding)
    # the eager range check is still there
    bad = to_graph(random_crystal(35))
    bad.atomic_numbers[0] = 100
    with pytest.raises(DataError, match="atomic number 100"):
        model(bad)


def test_registry():
    assert get_encoder_class("PLEGNNBackbone") is PLEGNNBackbone
    assert get_encoder_class("E3NNEncoder") is E3NNEncoder is NequIPEncoder
    assert get_encoder_class("matsciml.models.egnn.PLEGNNBackbone") is PLEGNNBackbone
    assert set(names("encoder", aliases=True)) >= {"PLEGNNBackbone", "E3NNEncoder", "NequIPEncoder"}
    with pytest.raises(ConfigError, match="PLEGNNBackbone"):
        get_encoder_class("PLEGNNBackbon")


# ----------------------------------------------------------------------------- shared pieces


def test_polynomial_cutoff_and_bessel_basis():
    r = torch.linspace(0.1, 6.0, 60, dtype=DTYPE, requires_grad=True)
    env = PolynomialCutoff(5.0, exponent=6)(r)
    (slope,) = torch.autograd.grad(env.sum(), r)
    at = torch.tensor([0.0, 5.0 - 1e-9, 5.0, 5.5], dtype=DTYPE)
    assert torch.allclose(PolynomialCutoff(5.0)(at), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DTYPE), atol=1e-12)
    assert slope[r.detach() >= 5.0].abs().max() == 0 and slope.abs().max() > 0
    x = 4.9 / 5.0  # analytic value
    assert float(env[48]) == pytest.approx(1 - 28 * x**6 + 48 * x**7 - 21 * x**8, abs=1e-12)
    basis = BesselBasis(3, cutoff=5.0).to(DTYPE)(torch.tensor([1.0, 2.5], dtype=DTYPE))
    ref = [[np.sqrt(2 / 5) * np.sin(k * np.pi * d / 5) / d for k in (1, 2, 3)] for d in (1.0, 2.5)]
    assert np.allclose(basis.numpy(), ref, atol=1e-7)  # frequencies are stored in float32


def test_scatter_helpers_match_loops():
    src = torch.arange(12, dtype=DTYPE).reshape(6, 2) * torch.tensor([1.0, -1.0], dtype=DTYPE)
    index = torch.tensor([0, 2, 0, 2, 2, 0])
    for func, ref in ((scatter_sum, torch.sum), (scatter_mean, torch.mean)):
        out = func(src, index, 4)
        for seg in range(4):
            rows = src[index == seg]
            expected = ref(rows, 0) if len(rows) else torch.zeros(2, dtype=DTYPE)
            assert torch.allclose(out[seg], expected)
    out = scatter_max(src, index, 3)
    assert torch.equal(out[0], src[[0, 2, 5]].max(0).values) and torch.equal(out[1], torch.zeros(2, dtype=DTYPE))
    assert torch.equal(readout(src, index, 3, "avg"), scatter_mean(src, index, 3))
    with pytest.raises(ConfigError):
        readout(src, index, 3, "median")


def test_activations_and_mlp():
    assert isinstance(get_activation("SiLU"), torch.nn.SiLU)
    assert isinstance(get_activation("leaky_relu"), torch.nn.LeakyReLU)
    assert isinstance(get_activation("torch.nn.GELU"), torch.nn.GELU)
    mlp = build_mlp([3, 5, 2], "relu", bias_last=False)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"] and mlp[2].bias is None
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        get_activation("reLu_x")
