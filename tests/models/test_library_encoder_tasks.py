"""The library encoders inside tasks: forces and stresses by autograd against finite differences,
and training with the EMA callback (hand-written EMA recurrence, checkpoint loaded without it).

Needs the ``matgl`` and ``mace`` extras (installed by ``make test``); each encoder is skipped
with the reason when its library is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_mace_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_tasks import as_loader, emt_structures, fd_force, fd_stress, make_batch, quiet_trainer

from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.models.base import ForceRegressionTask, ScalarRegressionTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning" / "callbacks"))
from test_ema import Recorder, hand_ema, max_diff  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.slow,  # about a minute: ten small trainings and finite differences through five libraries
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
]

#: name -> (library, encoder_class, encoder_kwargs): small models, plain YAML-like data
ENCODERS = {
    "M3GNet": (
        "matgl",
        "matsciml.models.M3GNet",
        {"nblocks": 1, "dim_node_embedding": 8, "dim_edge_embedding": 8, "units": 8, "cutoff": 4.0},
    ),
    "CHGNet": (
        "matgl",
        "matsciml.models.CHGNet",
        {
            "num_blocks": 2,
            "dim_atom_embedding": 8,
            "dim_bond_embedding": 8,
            "dim_angle_embedding": 8,
            "atom_conv_hidden_dims": [8],
            "bond_conv_hidden_dims": [8],
            "final_hidden_dims": [8],
            "cutoff": 4.0,
        },
    ),
    "MEGNet": (
        "matgl",
        "matsciml.models.MEGNet",
        {
            "edge_feat_dim": 8,
            "node_feat_dim": 8,
            "graph_feat_dim": 9,
            "num_blocks": 1,
            "hiddens": [8],
            "conv_hiddens": [8],
            "s2s_num_layers": 1,
            "s2s_num_iters": 1,
            "cutoff": 4.0,
        },
    ),
    "TensorNet": ("matgl", "matsciml.models.TensorNet", {"units": 8, "nblocks": 1, "num_rbf": 8, "cutoff": 4.0}),
    "MACEWrapper": ("mace", "matsciml.models.pyg.mace.MACEWrapper", small_mace_kwargs()),
}


def _encoder(name: str):
    library, path, kwargs = ENCODERS[name]
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"the {library} extra is not installed")
    return path, kwargs


@pytest.mark.parametrize("name", list(ENCODERS))
def test_forces_and_stress_equal_finite_differences_float64(name):
    path, kwargs = _encoder(name)
    torch.manual_seed(0)
    task = ForceRegressionTask(
        encoder_class=path,
        encoder_kwargs=kwargs,
        task_keys=["energy", "forces", "stress"],
        output_kwargs={"hidden_dim": 8},
    ).double()
    batch = make_batch(emt_structures(2, seed=3), dtype=torch.float64)
    pred = task(batch)
    forces, stress = pred["forces"].detach(), pred["stress"].detach()
    assert forces.abs().max() > 1e-5 and stress.abs().max() > 1e-6
    for atom, axis in [(0, 0), (1, 1), (2, 2)]:
        fd = fd_force(task, batch, atom, axis)
        assert abs(float(fd - forces[atom, axis])) < 1e-6 * max(1.0, abs(float(fd))), (atom, axis)
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        torch.testing.assert_close(stress[:, i, j], fd_stress(task, batch, i, j), atol=1e-6, rtol=0)


class _Holding(Callback):
    """Records whether the EMA callback held the EMA weights during validation."""

    def __init__(self, ema: ExponentialMovingAverageCallback) -> None:
        self.ema, self.seen = ema, []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(self.ema.holding)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_ema_training_checkpoint_and_swap(name, tmp_path):
    path, kwargs = _encoder(name)
    torch.manual_seed(1)
    task = ScalarRegressionTask(
        encoder_class=path, encoder_kwargs=kwargs, task_keys=["energy"], output_kwargs={"hidden_dim": 8}, lr=1e-2
    )
    train = as_loader([make_batch(emt_structures(3, seed=s)) for s in range(3)])
    val = as_loader([make_batch(emt_structures(3, seed=10))])
    ema = ExponentialMovingAverageCallback(decay=0.5, keep_raw_weights_after_fit=True)
    recorder, holding = Recorder(), None
    holding = _Holding(ema)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor="val_loss")
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[ema, recorder, holding, checkpoint], enable_checkpointing=True, num_sanity_val_steps=0
    )
    trainer.fit(task, train, val)
    expected, updates = hand_ema(recorder.init, recorder.after, 0.5)
    assert updates == 3
    ema_state = ema.ema_state_dict()
    for key, value in expected.items():  # float32 EMA against the float64 recurrence
        if not value.numel() or not value.is_floating_point():
            continue
        assert max_diff({key: ema_state[key]}, {key: value}) <= 1e-6 * max(1.0, float(value.abs().max())), key
    assert holding.seen and set(holding.seen) == {"ema"}
    with_callback = trainer.validate(task, val, verbose=False)[0]
    loaded = ScalarRegressionTask.load_from_checkpoint(tmp_path / "last.ckpt")
    without_callback = quiet_trainer().validate(loaded, val, verbose=False)[0]
    assert with_callback["val_loss"] == pytest.approx(without_callback["val_loss"], rel=1e-5)


UPSTREAM_CONFIGS = {
    "m3gnet_dgl": "matgl",
    "chgnet_dgl": "matgl",
    "megnet_dgl": "matgl",
    "tensornet_dgl": "matgl",
    "mace_pyg": "mace",
}


@pytest.mark.parametrize("name", list(UPSTREAM_CONFIGS))
def test_upstream_model_config_builds_a_task_and_predicts(name):
    """Upstream's model YAML, unchanged: its transforms make the batch, its task arguments the task."""
    import yaml

    from matsciml.common.config import instantiate
    from matsciml.datasets.collate import collate_samples

    if importlib.util.find_spec(UPSTREAM_CONFIGS[name]) is None:
        pytest.skip(f"the {UPSTREAM_CONFIGS[name]} extra is not installed")
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / f"experiments/configs/models/{name}.yaml").read_text()
    )
    transforms = [instantiate(spec) for spec in config["transforms"]]
    samples = []
    for atoms in emt_structures(2, seed=5):
        sample = {
            "pos": torch.tensor(atoms.positions, dtype=torch.float32),
            "atomic_numbers": torch.tensor(atoms.numbers),
            "cell": torch.tensor(atoms.cell.array, dtype=torch.float32)[None],
            "pbc": torch.tensor([True] * 3),
            "natoms": len(atoms),
            "id": f"emt:{len(samples)}",
            "targets": {"energy": torch.tensor(atoms.info["energy"], dtype=torch.float32)},
        }
        for transform in transforms:
            sample = transform(sample)
        samples.append(sample)
    task = ScalarRegressionTask(**{k: v for k, v in config.items() if k != "transforms"}, task_keys=["energy"])
    with torch.no_grad():
        out = task(collate_samples(samples))
    assert out["energy"].shape == (2,) and bool(torch.isfinite(out["energy"]).all())
