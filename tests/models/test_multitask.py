"""Tests of MultiTaskLitModule against independent oracles.

Oracles: losses written out by hand from single-structure forward passes (loss masking on
real OQMD + LiPS structures), a hand-written SAM step (the published algorithm, from
tests/lightning/callbacks/test_sam.py) with a hand-written loss, an uninterrupted run
(a resumed run must end bitwise equal), and the EMA weights read from the checkpoint.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "lightning" / "callbacks"))

import _multitask_helpers as helpers  # noqa: E402
from ema_ddp_script import FixedBatches  # noqa: E402
from helpers import make_trainer  # noqa: E402
from test_sam import max_abs_diff, reference_sam, windows_of  # noqa: E402

from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.datasets.multi_dataset import MultiDataset  # noqa: E402
from matsciml.lightning import MatSciMLDataModule, MultiDataModule  # noqa: E402
from matsciml.lightning.callbacks import SAM, ExponentialMovingAverageCallback  # noqa: E402
from matsciml.models.base import ForceRegressionTask, MultiTaskLitModule, ScalarRegressionTask  # noqa: E402
from matsciml.models.tasks.protocol import is_task  # noqa: E402
from matsciml.runner.weights import load_weights  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]
DATA = REPO / "tests" / "data"


def trainer(root, callbacks=(), **kwargs) -> pl.Trainer:
    """:func:`helpers.make_trainer` without its epoch limit (the tests give their own)."""
    return make_trainer(root, callbacks, **{"max_epochs": None, **kwargs})


# ----------------------------------------------------------------------------- structure
def test_protocol_members_and_one_copy_of_the_encoder():
    module = helpers.two_pair_module()
    assert is_task(module)
    assert module.task_keys == ["a_y", "b_u", "b_v"]
    assert module.task_loss_scaling == {"a_y": 1.0, "b_u": 1.0, "b_v": 0.5}
    assert list(module.output_heads) == ["a_y", "b_u", "b_v"]
    for _, task in module.iter_tasks():
        assert task.encoder is module.encoder
    keys = list(module.state_dict())
    assert sum(k.startswith("encoder.") for k in keys) == len(module.encoder.state_dict())
    assert not any(".encoder." in k for k in keys)  # the weights live once
    # a deep copy (as EMA/SAM tests make) keeps the sharing
    clone = copy.deepcopy(module)
    assert clone.task_map["b"]["ScalarRegressionTask"].encoder is clone.encoder
    optimizer = module.configure_optimizers()
    assert len(optimizer.param_groups) == 3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))


def test_argument_errors_name_the_fault():
    a = helpers.scalar_task(["y"], 0)
    with pytest.raises(ConfigError, match="task_scaling has 1 values for 2 pairs"):
        MultiTaskLitModule(("a", a), ("b", helpers.scalar_task(["u"], 1)), task_scaling=[1.0])
    with pytest.raises(ConfigError, match="two ScalarRegressionTasks"):
        MultiTaskLitModule(("a", helpers.scalar_task(["y"], 0)), ("a", helpers.scalar_task(["u"], 1)))
    with pytest.raises(ConfigError, match="'batch_size'"):
        MultiTaskLitModule(("batch_size", helpers.scalar_task(["y"], 0)))
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        MultiTaskLitModule(("a", helpers.scalar_task(["y"], 0)), lrr=0.1)
    module = helpers.two_pair_module()
    with pytest.raises(DataError, match="dataset 'c'.*'a', 'b'"):
        module.compute_losses({"c": {}, "batch_size": 1})


def test_checkpoint_round_trip_rebuilds_from_plain_hyperparameters(tmp_path):
    module = helpers.two_pair_module()
    fit = trainer(tmp_path, max_steps=1)
    batches = _feature_batches()
    fit.fit(module, FixedBatches(batches[:1]))
    path = tmp_path / "m.ckpt"
    fit.save_checkpoint(path)
    torch.load(path, weights_only=True)  # plain data only
    loaded = MultiTaskLitModule.load_from_checkpoint(path)
    assert loaded.task_scaling == [1.0, 0.3] and loaded.task_keys == module.task_keys
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


# ----------------------------------------------------------------------------- loss masking, real data
def _structures():
    from matsciml.datasets import StructureDataset
    from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

    def transforms():
        return [PeriodicPropertiesTransform(cutoff_radius=4.0, adaptive_cutoff=True), PointCloudToGraphTransform("pyg")]

    oqmd = StructureDataset(DATA / "oqmd_devset.extxyz", transforms=transforms())
    lips = StructureDataset(DATA / "lips_devset.extxyz", transforms=transforms())
    return oqmd, lips


def _small_encoder() -> dict:
    kwargs = yaml.safe_load((REPO / "experiments/configs/models/egnn_small.yaml").read_text())["encoder_kwargs"]
    kwargs.update(embed_in_dim=8, embed_hidden_dim=8, embed_out_dim=8, embed_feat_dims=[8], embed_message_dims=[8, 8])
    kwargs.update(node_projection_hidden_dim=8, prediction_hidden_dim=8, embed_depth=1)
    return kwargs


def test_each_pair_loss_uses_only_its_own_structures():
    """A batch mixing OQMD and LiPS: each pair's loss equals the loss of its structures alone (by hand)."""
    from matsciml.datasets.collate import collate_samples

    oqmd, lips = _structures()
    oqmd_ids = [0, 172, 5]  # 172 has a NaN band gap: it must add nothing (not a zero target)
    assert torch.isnan(torch.as_tensor(oqmd[172]["targets"]["band_gap"]))
    lips_ids = [3, 7]
    joined = MultiDataset({"oqmd": oqmd, "lips": lips})
    mixed = [joined[oqmd_ids[0]], joined[200 + lips_ids[0]], joined[oqmd_ids[1]], joined[200 + lips_ids[1]]]
    mixed.append(joined[oqmd_ids[2]])
    batch = joined.collate_fn(mixed)
    assert set(batch) == {"oqmd", "lips", "batch_size"} and batch["batch_size"] == 5
    assert batch["oqmd"]["batch_size"] == 3 and batch["lips"]["batch_size"] == 2

    torch.manual_seed(0)
    enc = _small_encoder()
    scalar = ScalarRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=enc,
        task_keys=["band_gap"],
        output_kwargs={"hidden_dim": 8},
        normalize_kwargs={"band_gap_mean": 0.3, "band_gap_std": 0.8},
    )
    forces = ForceRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=enc,
        output_kwargs={"hidden_dim": 8},
        normalize_kwargs={"energy_mean": -357.6, "energy_std": 0.6},
        task_loss_scaling={"energy": 1.0, "forces": 4.0},
    )
    module = MultiTaskLitModule(("oqmd", scalar), ("lips", forces), task_scaling=[2.0, 0.5])
    result = module.compute_losses(batch)

    # band gap: one structure at a time, the loss written out over the finite targets
    errors = []
    for i in oqmd_ids:
        one = collate_samples([oqmd[i]])
        target = float(one["targets"]["band_gap"][0])
        if target != target:  # NaN: no contribution
            continue
        prediction = scalar(one)["band_gap"].detach()[0]
        errors.append(((prediction - 0.3) / 0.8 - (target - 0.3) / 0.8) ** 2)
    band_gap = torch.stack(errors).mean()
    assert len(errors) == 2
    assert result["per_key"]["oqmd_band_gap"].item() == pytest.approx(band_gap.item(), rel=1e-5)
    assert result["counts"]["oqmd_band_gap"] == 2

    # energy and forces: each LiPS frame alone, L1 in normalised units (forces scaled by energy_std)
    e_err, f_err = [], []
    for i in lips_ids:
        one = collate_samples([lips[i]])
        pred = forces(one)
        e_err.append(((pred["energy"] - one["targets"]["energy"]) / 0.6).abs().reshape(-1))
        f_err.append(((pred["forces"] - one["targets"]["forces"]) / 0.6).abs().reshape(-1))
    energy, force = torch.cat(e_err).mean(), torch.cat(f_err).mean()
    assert result["per_key"]["lips_energy"].item() == pytest.approx(energy.item(), rel=1e-5)
    assert result["per_key"]["lips_forces"].item() == pytest.approx(force.item(), rel=1e-5)
    total = 2.0 * band_gap + 0.5 * (energy + 4.0 * force)
    assert result["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert result["batch_size"] == 5

    # a batch without LiPS structures: no LiPS loss at all (not a zero loss)
    only = joined.collate_fn([joined[0], joined[5]])
    alone = module.compute_losses(only)
    assert set(alone["per_key"]) == {"oqmd_band_gap"}


# ----------------------------------------------------------------------------- SAM oracle
def _feature_batches() -> list[dict]:
    a = helpers.samples(16, ("y",), seed=2)
    b = helpers.samples(12, ("u", "v"), seed=3)
    sizes = [(3, 2), (2, 4), (4, 0), (3, 3), (4, 3)]  # the third batch has no "b" structures
    return helpers.pair_batches(sizes, a, b)


def test_sam_matches_hand_written_algorithm_fp64(tmp_path):
    """Both SAM passes cover every pair present; a pair absent from a batch is neither perturbed nor stepped."""
    torch.manual_seed(0)
    start = helpers.two_pair_module().double()
    module = copy.deepcopy(start)
    batches = _feature_batches()
    fit = trainer(tmp_path, [SAM(rho=0.05)], max_steps=len(batches))
    fit.fit(module, FixedBatches(batches))

    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    reference, _, norms = reference_sam(
        copy.deepcopy(start), windows_of(batches), opt=adamw, lr=0.01, rho=0.05, loss_fn=helpers.hand_loss
    )
    assert max_abs_diff(module, reference) < 1e-10
    assert max_abs_diff(module, start) > 1e-3  # it trained
    assert fit.callback_metrics["sam_grad_norm"].item() == pytest.approx(norms[-1][0], rel=1e-6)
    # the hand loss is the module's loss
    for batch in batches:
        assert module.compute_losses(batch)["loss"].item() == pytest.approx(helpers.hand_loss(module, batch).item())
    # a plain step differs (the comparison can tell SAM from no SAM)
    plain, _, _ = reference_sam(
        copy.deepcopy(start),
        windows_of(batches),
        opt=adamw,
        lr=0.01,
        loss_fn=helpers.hand_loss,
        sam_on=lambda s, e: False,
    )
    assert max_abs_diff(module, plain) > 1e-6


# ----------------------------------------------------------------------------- data module, EMA resume, transfer
def _datamodule(seed: int = 5) -> MultiDataModule:
    a = MatSciMLDataModule(dataset=helpers.samples(30, ("y",), seed=2), val_split=0.25, collate_fn=helpers.stack)
    b = MatSciMLDataModule(dataset=helpers.samples(16, ("u", "v"), seed=3), val_split=0.25, collate_fn=helpers.stack)
    return MultiDataModule(datamodules={"a": a, "b": b}, batch_size=6, sampling="balanced", seed=seed)


def _run(root, ckpt_path=None):
    torch.manual_seed(0)
    module = helpers.two_pair_module().double()
    ema = ExponentialMovingAverageCallback(decay=0.8)
    steps = ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit = trainer(root, [SAM(rho=0.05), ema, steps], max_epochs=2, val_check_interval=4)
    fit.fit(module, datamodule=_datamodule(), ckpt_path=ckpt_path)
    return module, ema, fit


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask_ema")
    module, ema, fit = _run(root)
    return dict(root=root, ema=ema.ema_state_dict(), raw=ema.raw_state_dict(), steps=fit.global_step, fit=fit)


def test_balanced_training_epoch_holds_both_datasets_equally(uninterrupted):
    dm = _datamodule()
    dm.setup()
    train = dm.datasets["train"]
    assert len(train) == 2 * 22  # 30 * 0.75 = 22.5 -> 22 training samples of "a"; "b" (12) is repeated
    names = [train.locate(i)[0] for i in range(len(train))]
    assert names.count("a") == names.count("b") == 22
    counts = {}
    for i in range(len(train)):
        name, local = train.locate(i)
        counts[(name, local)] = counts.get((name, local), 0) + 1
    assert sorted({v for (n, _), v in counts.items() if n == "b"}) == [1, 2]  # floor/ceil of 22 / 12
    assert len(dm.datasets["val"]) == 8 + 4  # evaluation: every structure once
    assert uninterrupted["fit"].callback_metrics["val_b_v_mae"] > 0  # both pairs' validation metrics
    assert "val_a_y_mae" in uninterrupted["fit"].callback_metrics


@pytest.mark.parametrize("checkpoint", ["step=3.ckpt", "step=9.ckpt"])  # mid-epoch 0; mid-epoch 1
def test_ema_and_sam_resume_is_bitwise_equal(uninterrupted, tmp_path, checkpoint):
    module, ema, fit = _run(tmp_path, ckpt_path=uninterrupted["root"] / "steps" / checkpoint)
    assert fit.global_step == uninterrupted["steps"] == 16
    for name in ("ema", "raw"):
        ref = uninterrupted[name]
        got = ema.ema_state_dict() if name == "ema" else ema.raw_state_dict()
        assert set(got) == set(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), (name, key)


def test_multitask_encoder_fine_tunes_a_single_task_with_the_ema_weights(uninterrupted, tmp_path):
    path = uninterrupted["root"] / "steps" / "step=15.ckpt"
    ema_weights = torch.load(path, weights_only=True)["state_dict"]
    raw = torch.load(path, weights_only=True)["callbacks"]["ExponentialMovingAverageCallback"]["raw"]
    assert max((ema_weights[k] - raw[k]).abs().max().item() for k in raw if k.startswith("encoder.")) > 1e-6

    single = helpers.scalar_task(["y"], 7).double()
    heads = {k: v.clone() for k, v in single.output_heads.state_dict().items()}
    info = load_weights(single, {"method": "pretrained", "type": "local", "path": str(path)})
    assert info["num_tensors"] == len(single.encoder.state_dict())
    for key, value in single.encoder.state_dict().items():
        assert torch.equal(value, ema_weights[f"encoder.{key}"]), key
    for key, value in single.output_heads.state_dict().items():
        assert torch.equal(value, heads[key]), key

    dm = _datamodule().datamodules["a"]
    dm.setup()
    val = dm.eval_dataloader("val")
    before = trainer(tmp_path / "v0").validate(single, val, verbose=False)[0]["val_y_mae"]
    fit = trainer(tmp_path, max_epochs=4, limit_val_batches=0)
    fit.fit(single, dm.train_dataloader())
    after = trainer(tmp_path / "v1").validate(single, val, verbose=False)[0]["val_y_mae"]
    assert after < before


def test_single_task_encoder_into_multitask_and_whole_multitask_checkpoint(uninterrupted, tmp_path):
    single = helpers.scalar_task(["y"], 3).double()
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(single, FixedBatches([helpers.stack(helpers.samples(6, ("y",), seed=9))]))
    path = tmp_path / "single.ckpt"
    fit.save_checkpoint(path)
    multi = helpers.two_pair_module().double()
    load_weights(multi, {"method": "pretrained", "type": "local", "path": str(path)})
    for key, value in multi.encoder.state_dict().items():
        assert torch.equal(value, single.encoder.state_dict()[key])
    # method: checkpoint loads the whole multi-task module (the EMA weights of an EMA run)
    whole = helpers.two_pair_module().double()
    ckpt = uninterrupted["root"] / "steps" / "step=15.ckpt"
    load_weights(whole, {"method": "checkpoint", "type": "local", "path": str(ckpt)})
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, saved[key]), key
    with pytest.raises(ConfigError, match="does not match"):
        load_weights(
            helpers.scalar_task(["y"], 0).double(), {"method": "checkpoint", "type": "local", "path": str(ckpt)}
        )


@pytest.mark.slow
def test_ddp_two_processes_with_a_pair_absent_on_one_rank(tmp_path):
    """Every parameter takes part in every all-reduce; the result is SAM on the mean of the ranks' losses."""
    import os
    import subprocess

    worker = HERE / "_multitask_ddp_worker.py"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for kind in ("raw", "ema"):
        for key, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][key]), (kind, key)

    import importlib.util

    spec = importlib.util.spec_from_file_location("_multitask_ddp_worker", worker)
    ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp)
    shards = [ddp.rank_batches(0), ddp.rank_batches(1)]
    windows = [(0, [(shards[0][s], shards[1][s])]) for s in range(len(shards[0]))]

    def mean_loss(net, pair):
        return 0.5 * (helpers.hand_loss(net, pair[0]) + helpers.hand_loss(net, pair[1]))

    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    torch.manual_seed(0)
    start = helpers.two_pair_module().double()
    reference, _, _ = reference_sam(copy.deepcopy(start), windows, opt=adamw, lr=0.01, rho=ddp.RHO, loss_fn=mean_loss)
    for key, value in reference.state_dict().items():
        assert (ranks[0]["raw"][key] - value).abs().max().item() < 1e-10, key
