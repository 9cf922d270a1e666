"""Checks every encoder must pass, written once and run on the wrapped library encoders.

A test module runs them all by deriving a class from :class:`EncoderChecks` (with its
cutoff, tolerance and a ``model`` fixture); the ``check_*`` functions are the checks.

Oracles: exact symmetries (rotation, reflection, translation, permutation of atoms, a 2x1x1
supercell), central finite differences of the energy, and gradients reaching every parameter.
The energy is a fixed linear readout of the per-atom embeddings, summed (what
``ForceRegressionTask`` does with a linear head).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from test_encoders import batch_of, random_crystal, random_orthogonal, readout_weights, to_graph, transformed

DTYPE = torch.float64


def energy(model: torch.nn.Module, graph) -> tuple[torch.Tensor, object]:
    emb = model(graph)
    return (emb.point_embedding @ readout_weights(model.embedding_dim)).sum(), emb


def energy_and_forces(model: torch.nn.Module, graph) -> tuple[torch.Tensor, torch.Tensor, object]:
    graph.pos.requires_grad_(True)
    e, emb = energy(model, graph)
    (grad,) = torch.autograd.grad(e, graph.pos)
    return e.detach(), -grad, emb


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"{what}: max difference {err:.3g} > {tol:.1g} x {scale:.3g}"


def crystals(cutoff: float) -> list[Atoms]:
    """Two random triclinic cells, repeated until the cell is larger than the cutoff diameter."""
    out = []
    for seed in (1, 2):
        atoms = random_crystal(seed)
        reps = [max(1, int(np.ceil(cutoff / np.linalg.norm(v)))) for v in atoms.cell]
        out.append(atoms.repeat(reps) if max(reps) > 1 and len(atoms) * np.prod(reps) <= 40 else atoms)
    return out


def check_invariance_and_equivariance(model, cutoff: float, tol: float, reflect: bool) -> None:
    """Embeddings invariant, forces rotate with the structure (rotation or reflection + translation)."""
    atoms = [random_crystal(1), random_crystal(2)]
    rot = random_orthogonal(3, reflect)
    moved = [transformed(a, rot, np.array([0.3, -1.7, 2.2])) for a in atoms]
    e0, f0, emb0 = energy_and_forces(model, batch_of(*atoms, cutoff=cutoff))
    e1, f1, emb1 = energy_and_forces(model, batch_of(*moved, cutoff=cutoff))
    assert float(emb0.point_embedding.detach().abs().max()) > 1e-4, "embeddings are trivially zero"
    assert float(f0.abs().max()) > 1e-6, "forces are trivially zero"
    assert_close(emb1.point_embedding, emb0.point_embedding, tol, "point embedding")
    assert_close(emb1.system_embedding, emb0.system_embedding, tol, "system embedding")
    assert_close(e1, e0, tol, "energy")
    assert_close(f1, f0 @ torch.tensor(rot.T, dtype=DTYPE), tol, "forces")


def check_permutation(model, cutoff: float, tol: float) -> None:
    """Reordering the atoms reorders the point embeddings and leaves the system embedding."""
    atoms = random_crystal(7, natoms=6)
    perm = np.random.default_rng(0).permutation(len(atoms))
    with torch.no_grad():
        a = model(to_graph(atoms, cutoff))
        b = model(to_graph(atoms[perm], cutoff))
    assert_close(b.point_embedding, a.point_embedding[torch.as_tensor(perm)], tol, "permuted point embedding")
    assert_close(b.system_embedding, a.system_embedding, tol, "system embedding after permutation")


def check_supercell(model, cutoff: float, tol: float) -> None:
    """The energy of a 2x1x1 supercell is twice the cell's; atoms keep their embeddings."""
    atoms = random_crystal(5)
    with torch.no_grad():
        e1, emb1 = energy(model, to_graph(atoms, cutoff))
        e2, emb2 = energy(model, to_graph(atoms.repeat((2, 1, 1)), cutoff))
    n = len(atoms)
    assert_close(emb2.point_embedding[:n], emb1.point_embedding, tol, "supercell point embedding")
    assert_close(e2, 2 * e1, tol, "supercell energy")


def check_forces_finite_differences(model, cutoff: float, rel: float, h: float = 1e-5) -> None:
    """Forces by autograd equal central differences of the energy."""
    atoms = random_crystal(4, natoms=4)
    _, forces, _ = energy_and_forces(model, to_graph(atoms, cutoff))
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        values = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * h
            with torch.no_grad():
                values.append(float(energy(model, to_graph(displaced, cutoff))[0]))
        fd = -(values[0] - values[1]) / (2 * h)
        got = float(forces[atom, axis])
        assert abs(fd - got) <= rel * max(1.0, abs(fd)), f"atom {atom} axis {axis}: autograd {got}, FD {fd}"


def check_all_parameters_get_gradients(model, cutoff: float) -> None:
    """A loss of both embeddings gives every parameter a non-zero gradient."""
    graph = batch_of(random_crystal(1), random_crystal(2), cutoff=cutoff)
    emb = model(graph)
    w = readout_weights(model.embedding_dim)
    loss = (emb.point_embedding @ w).pow(2).sum() + (emb.system_embedding @ w).pow(2).sum()
    model.zero_grad()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"


class EncoderChecks:
    """The checks above as tests, run by a test class derived from this one.

    The test module provides a ``model`` fixture (a fresh float64 encoder); the derived
    class sets :attr:`GRAPH_CUTOFF` and :attr:`TOL` and implements :meth:`rebuild`.
    """

    #: Radius of the graphs (Å); wider than the encoder's cutoff, so that it must drop edges.
    GRAPH_CUTOFF: float
    #: Tolerance of the symmetry checks (relative to the largest value).
    TOL: float

    def rebuild(self, model: torch.nn.Module) -> torch.nn.Module:
        """A newly built float64 encoder of ``model``'s kind and sizes (other random weights)."""
        raise NotImplementedError

    @pytest.mark.parametrize("reflect", [False, True])
    def test_invariance_and_force_equivariance(self, model, reflect):
        check_invariance_and_equivariance(model, self.GRAPH_CUTOFF, self.TOL, reflect)

    def test_permutation_invariance(self, model):
        check_permutation(model, self.GRAPH_CUTOFF, self.TOL)

    def test_supercell_energy_is_twice_the_cell(self, model):
        check_supercell(model, self.GRAPH_CUTOFF, self.TOL)

    def test_forces_match_finite_differences(self, model):
        check_forces_finite_differences(model, self.GRAPH_CUTOFF, rel=1e-6)

    def test_every_parameter_gets_a_gradient(self, model):
        check_all_parameters_get_gradients(model, self.GRAPH_CUTOFF)

    def test_state_dict_round_trip_through_weights_only_load(self, model, tmp_path):
        path = tmp_path / "encoder.pt"
        torch.save(model.state_dict(), path)
        torch.manual_seed(123)  # a differently initialised copy
        fresh = self.rebuild(model)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        graph = to_graph(random_crystal(3), self.GRAPH_CUTOFF)
        with torch.no_grad():
            assert torch.equal(fresh(graph).point_embedding, model(graph).point_embedding)
