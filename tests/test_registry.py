"""The name registry end to end: short names through the runner, a new encoder in a module of its
own trained from YAML, and third-party plugins found through the ``matsciml.plugins`` entry points."""

from __future__ import annotations

import csv
import importlib.metadata
import math
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_dedented

from matsciml.common.errors import ConfigError
from matsciml.registry import Registry, lookup, register_dataset, register_encoder, register_task, registry
from matsciml.runner.cli import main

PLUGIN_SOURCE = '''
"""A third-party encoder: one decorated class in one module, nothing else."""
from __future__ import annotations

import torch
from torch import nn

from matsciml.common import graph as G
from matsciml.models.embeddings import Embeddings
from matsciml.registry import register_encoder


@register_encoder(aliases=["tiny_radial"])
class TinyRadialEncoder(nn.Module):
    """Per-atom species embedding plus a sum of Gaussians of neighbour distances."""

    def __init__(self, embedding_dim: int = 8, cutoff: float = 4.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.cutoff = cutoff
        self.species = nn.Embedding(100, embedding_dim)
        self.radial = nn.Linear(4, embedding_dim)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, 4))

    def forward(self, batch) -> Embeddings:
        graph = G.get_graph(batch)
        h = self.species(G.atomic_numbers(graph).long())
        dist = G.edge_vectors(graph).norm(dim=-1, keepdim=True)
        rbf = torch.exp(-((dist - self.centres) ** 2))
        src = G.edge_index(graph)[0]
        h = h + torch.zeros_like(h).index_add_(0, src, self.radial(rbf))
        index = G.graph_index(graph)
        system = torch.zeros(G.num_graphs(graph), self.embedding_dim, dtype=h.dtype, device=h.device)
        system = system.index_add_(0, index, h)
        return Embeddings(system_embedding=system, point_embedding=h)
'''


def _config_tree(root: Path, model_yaml: str) -> Path:
    write_dedented(root / "models" / "model.yaml", model_yaml)
    write_dedented(
        root / "datasets" / "small.yaml",
        """\
        dataset: EMTAlloyDataset
        debug:
          batch_size: 8
          val_split: 0.25
          dset_kwargs: {n: 24}
        target_keys: [energy_per_atom]
        task_args:
          normalize_kwargs: {energy_per_atom_mean: 0.03, energy_per_atom_std: 0.05}
        """,
    )
    write_dedented(
        root / "trainer.yaml",
        """\
        generic: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
        debug: {accelerator: cpu, limit_train_batches: 2, limit_val_batches: 1}
        loggers:
          - class_path: lightning.pytorch.loggers.CSVLogger
        """,
    )
    return write_dedented(
        root / "experiments" / "run.yaml",
        "model: model\ndataset:\n  small:\n    - task: ScalarRegressionTask\n      targets: [energy_per_atom]\nseed: 0\n",
    )


def _run(root: Path, exp: Path, run_dir: Path):
    args = ["-e", str(exp), "-t", str(root / "trainer.yaml"), "-m", str(root / "models")]
    return main([*args, "-d", str(root / "datasets"), "--debug", "--run_dir", str(run_dir)])


def _assert_trained(result, encoder_cls, initial_encoder) -> None:
    """The run used ``encoder_cls`` and trained it: the validation MAE (same validation batch both epochs)
    changed between the two epochs, which only an optimizer step can do."""
    assert type(result.task.encoder) is encoder_cls
    final = result.task.encoder.state_dict()
    moved = [k for k, v in initial_encoder.state_dict().items() if v.is_floating_point() and not (final[k] == v).all()]
    assert moved, "no encoder weight changed: the encoder was not trained"
    with open(result.metrics_csv) as fh:
        maes = [float(r["val_energy_per_atom_mae"]) for r in csv.DictReader(fh) if r.get("val_energy_per_atom_mae")]
    assert len(maes) == 2 and all(math.isfinite(m) for m in maes)
    assert maes[0] != maes[1]


def test_public_decorators_import():
    assert callable(register_encoder) and callable(register_task) and callable(register_dataset)


def test_e3nn_encoder_by_short_name_trains_through_the_runner(tmp_path):
    import torch

    from matsciml.models.equivariant import E3NNEncoder

    kwargs = {"num_layers": 1, "hidden_irreps": "4x0e + 2x1o", "embedding_dim": 8, "radial_hidden": 8}
    kwargs |= {"cutoff": 4.0, "avg_num_neighbors": 10.0}
    model = {
        "encoder_class": {"class_path": "E3NNEncoder"},
        "encoder_kwargs": kwargs,
        "output_kwargs": {"hidden_dim": 8, "num_hidden": 1},
        "lr": 0.01,
        "transforms": [
            {"class_path": "PeriodicPropertiesTransform", "init_args": {"cutoff_radius": 4.0, "adaptive_cutoff": True}},
            {"class_path": "PointCloudToGraphTransform", "init_args": {"backend": "pyg"}},
        ],
    }
    exp = _config_tree(tmp_path / "configs", yaml.safe_dump(model))
    torch.manual_seed(0)
    untrained = E3NNEncoder(**kwargs)
    result = _run(tmp_path / "configs", exp, tmp_path / "run")
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["model"]["encoder_class"] == {"class_path": "E3NNEncoder"}
    _assert_trained(result, E3NNEncoder, untrained)


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """A module with a new encoder, installed as a distribution whose entry point is in ``matsciml.plugins``."""
    site = tmp_path / "site"
    write_dedented(site / "tiny_radial_plugin.py", PLUGIN_SOURCE)
    write_dedented(
        site / "tiny_radial_plugin-0.1.dist-info" / "METADATA",
        "Metadata-Version: 2.1\nName: tiny-radial-plugin\nVersion: 0.1\n",
    )
    write_dedented(
        site / "tiny_radial_plugin-0.1.dist-info" / "entry_points.txt",
        "[matsciml.plugins]\ntiny_radial = tiny_radial_plugin\n",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield site
    registry.remove("encoder", "TinyRadialEncoder")
    sys.modules.pop("tiny_radial_plugin", None)


def test_plugin_entry_point_is_discovered(plugin_distribution):
    found = [ep for ep in importlib.metadata.entry_points(group="matsciml.plugins") if ep.name == "tiny_radial"]
    assert [ep.value for ep in found] == ["tiny_radial_plugin"]
    assert "tiny_radial_plugin" not in sys.modules
    cls = lookup("encoder", "tiny_radial")  # the first lookup loads the plugins
    assert cls.__module__ == "tiny_radial_plugin" and cls.__name__ == "TinyRadialEncoder"
    assert lookup("encoder", "TinyRadialEncoder") is cls


def test_new_encoder_module_trains_from_yaml_by_short_name(plugin_distribution, tmp_path):
    import torch

    model = """\
    encoder_class: {class_path: TinyRadialEncoder}
    encoder_kwargs: {embedding_dim: 8, cutoff: 4.0}
    output_kwargs: {hidden_dim: 8, num_hidden: 1}
    lr: 0.01
    transforms:
      - class_path: PeriodicPropertiesTransform
        init_args: {cutoff_radius: 4.0, adaptive_cutoff: true}
      - class_path: PointCloudToGraphTransform
        init_args: {backend: pyg}
    """
    exp = _config_tree(tmp_path / "configs", model)
    result = _run(tmp_path / "configs", exp, tmp_path / "run")
    cls = sys.modules["tiny_radial_plugin"].TinyRadialEncoder
    torch.manual_seed(0)
    _assert_trained(result, cls, cls(embedding_dim=8, cutoff=4.0))


def test_broken_plugin_names_itself(monkeypatch):
    class Broken:
        name, value = "broken", "no_such_module_xyz"

        def load(self):
            raise ModuleNotFoundError("No module named 'no_such_module_xyz'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()] if group == "g" else [])
    fresh = Registry({"encoder": ()}, plugin_group="g")
    with pytest.raises(ConfigError, match=r"plugin 'broken' \(no_such_module_xyz\) failed to load"):
        fresh.names("encoder")


def test_aliases_and_did_you_mean():
    fresh = Registry({"encoder": ()}, plugin_group=None)

    @fresh.decorator("encoder", aliases=["mine"])
    class MyEncoder:
        pass

    assert fresh.get("encoder", "mine") is MyEncoder and fresh.get("encoder", "my_encoder") is MyEncoder
    with pytest.raises(ConfigError, match="did you mean 'MyEncoder'"):
        fresh.get("encoder", "MyEncodr")
    with pytest.raises(ConfigError, match="already registered"):
        fresh.add("encoder", type("Other", (), {}), name="MyEncoder")


def test_builtin_packages_are_walked(tmp_path, monkeypatch):
    """A new module anywhere inside a listed package is imported at the first lookup: no other edit needed."""
    pkg = tmp_path / "walked_pkg"
    write_dedented(pkg / "__init__.py", "")
    write_dedented(pkg / "deep" / "__init__.py", "")
    write_dedented(pkg / "deep" / "new_encoder.py", "LOADED = True\n")
    write_dedented(pkg / "_private.py", "raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = Registry({"encoder": ("walked_pkg",)}, plugin_group=None)
    try:
        assert "walked_pkg.deep.new_encoder" not in sys.modules
        fresh.names("encoder")
        assert sys.modules["walked_pkg.deep.new_encoder"].LOADED
    finally:
        for name in [n for n in sys.modules if n.startswith("walked_pkg")]:
            sys.modules.pop(name)
