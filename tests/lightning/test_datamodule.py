"""MatSciMLDataModule: dataset construction, seeded splits, named datasets, validation, real data, DDP evaluation.

Run as a script (``python test_datamodule.py --ddp-worker OUT_DIR``), this file is the
two-process worker of :func:`test_ddp_validation_matches_one_process`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from matsciml.common.errors import ConfigError
from matsciml.lightning import MatSciMLDataModule
from matsciml.lightning.datamodule import fractional_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also when run as the DDP worker script
from helpers import tiny_egnn_kwargs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


class ListDataset(Dataset):
    """Records 0..n-1 as dicts, with its own collate."""

    def __init__(self, n: int = 50) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"value": index}

    @staticmethod
    def collate_fn(samples: list[dict]) -> list[int]:
        return [s["value"] for s in samples]


class LinesDataset(Dataset):
    """One record per line of a text file; keeps what the data module passes it."""

    def __init__(self, path, transforms=None, on_invalid: str = "error") -> None:
        self.path = Path(path)
        self.values = [int(line) for line in self.path.read_text().split()]
        self.transforms = transforms
        self.on_invalid = on_invalid

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict:
        return {"value": self.values[index]}

    @staticmethod
    def collate_fn(samples: list[dict]) -> list[int]:
        return [s["value"] for s in samples]

    @classmethod
    def from_devset(cls, transforms=None, size: int = 6):
        raise NotImplementedError  # replaced in the test that uses it


def _write(path: Path, values) -> Path:
    path.write_text("\n".join(str(v) for v in values))
    return path


# --------------------------------------------------------------------------- splits
def test_fractional_split_is_a_seeded_partition():
    parts = fractional_split(50, 0.2, 0.1, seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [35, 10, 5]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(50))
    assert all(parts[k] == sorted(parts[k]) for k in parts)
    # oracle: the first 10 and next 5 entries of the seeded permutation
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert parts["val"] == sorted(perm[:10])
    assert parts["test"] == sorted(perm[10:15])
    assert fractional_split(50, 0.2, 0.1, seed=3) == parts
    assert fractional_split(50, 0.2, 0.1, seed=4)["val"] != parts["val"]
    # rounding to the nearest count (0.29 * 100 is 28.999... in floating point)
    assert len(fractional_split(100, 0.29, 0.0, seed=0)["val"]) == 29


def test_fractional_split_errors():
    with pytest.raises(ConfigError, match="leave no training record"):
        fractional_split(10, 0.5, 0.5, seed=0)
    with pytest.raises(ConfigError, match="val_split=0.01 of 20 records selects no record"):
        fractional_split(20, 0.01, 0.0, seed=0)


def test_data_module_splits_instance_by_seed():
    dm = MatSciMLDataModule(dataset=ListDataset(50), val_split=0.2, test_split=0.1, seed=7)
    dm.setup("fit")
    datasets = dm.datasets
    assert list(datasets) == ["train", "val", "test"]
    expected = fractional_split(50, 0.2, 0.1, seed=7)
    for name in ("train", "val", "test"):
        assert list(datasets[name].indices) == expected[name]
        assert datasets[name].dataset is dm.dataset
    assert dm.splits.keys() == {"train", "val", "test"}
    # seed None means 0, on every construction
    a = MatSciMLDataModule(dataset=ListDataset(50), val_split=0.2)
    b = MatSciMLDataModule(dataset=ListDataset(50), val_split=0.2, seed=0)
    a.setup()
    b.setup()
    assert list(a.datasets["val"].indices) == list(b.datasets["val"].indices) == fractional_split(50, 0.2, 0, 0)["val"]


def test_loaders_cover_splits():
    dm = MatSciMLDataModule(dataset=ListDataset(50), val_split=0.2, batch_size=8, seed=1)
    dm.setup()
    train = [v for batch in dm.train_dataloader() for v in batch]
    val = [v for batch in dm.val_dataloader() for v in batch]
    assert sorted(train) == fractional_split(50, 0.2, 0, 1)["train"]
    assert val == fractional_split(50, 0.2, 0, 1)["val"]  # file order
    assert dm.test_dataloader() == []  # no test set: Lightning skips testing


# --------------------------------------------------------------------------- datasets from paths
def test_paths_extras_and_predict(tmp_path):
    train = _write(tmp_path / "train.txt", range(10))
    val = _write(tmp_path / "val.txt", range(100, 104))
    extra = _write(tmp_path / "md.txt", range(200, 203))
    dm = MatSciMLDataModule(
        dataset=LinesDataset,
        train_path=train,
        val_split=str(val),
        test_split=0.3,
        batch_size=4,
        dset_kwargs={"transforms": [], "on_invalid": "drop"},
        extra_datasets={"md": extra},
        predict_split="md",
    )
    dm.setup()
    assert list(dm.datasets) == ["train", "test", "val", "md", "predict"]
    assert [len(dm.datasets[k]) for k in ("train", "test", "val", "md")] == [7, 3, 4, 3]
    assert dm.datasets["val"].values == [100, 101, 102, 103]
    assert dm.datasets["val"].on_invalid == "drop"
    assert dm.datasets["predict"] is dm.datasets["md"]
    assert [v for b in dm.eval_dataloader("md", batch_size=2) for v in b] == [200, 201, 202]
    assert [v for b in dm.predict_dataloader() for v in b] == [200, 201, 202]
    with pytest.raises(ConfigError, match="no 'nope' dataset"):
        dm.eval_dataloader("nope")
    # a path as predict_split, and the test set as the fallback
    dm2 = MatSciMLDataModule(dataset=LinesDataset, train_path=train, test_split=0.3, predict_split=str(extra))
    dm2.setup()
    assert dm2.datasets["predict"].values == [200, 201, 202]
    dm3 = MatSciMLDataModule(dataset=LinesDataset, train_path=train, test_split=0.3)
    dm3.setup()
    assert sorted(v for b in dm3.predict_dataloader() for v in b) == [
        dm3.datasets["train"].dataset.values[i] for i in fractional_split(10, 0, 0.3, 0)["test"]
    ]


def test_transform_specs_and_default_transforms(tmp_path):
    path = _write(tmp_path / "a.txt", range(5))
    dm = MatSciMLDataModule(
        dataset=LinesDataset, train_path=path, dset_kwargs={"transforms": [{"class_path": "torch.nn.Identity"}]}
    )
    dm.setup()
    (transform,) = dm.datasets["train"].transforms
    assert isinstance(transform, torch.nn.Identity)

    transforms = pytest.importorskip("matsciml.datasets.transforms")
    dm = MatSciMLDataModule(dataset=LinesDataset, train_path=path)
    dm.setup()
    periodic, graph = dm.datasets["train"].transforms
    assert isinstance(periodic, transforms.PeriodicPropertiesTransform)
    assert (periodic.cutoff_radius, periodic.adaptive_cutoff) == (6.0, True)
    assert isinstance(graph, transforms.PointCloudToGraphTransform)
    assert graph.backend == "pyg"


def test_hyperparameters_are_plain_data(tmp_path):
    import io

    dm = MatSciMLDataModule(
        dataset=LinesDataset,
        train_path=tmp_path / "x.txt",
        dset_kwargs={"transforms": [torch.nn.Identity(), {"class_path": "torch.nn.Identity"}]},
    )
    hparams = dict(dm.hparams)
    assert hparams["dataset"] == f"{LinesDataset.__module__}.LinesDataset"
    assert hparams["dset_kwargs"]["transforms"] == [
        "torch.nn.modules.linear.Identity",
        {"class_path": "torch.nn.Identity"},
    ]
    assert hparams["train_path"] == str(tmp_path / "x.txt")
    buffer = io.BytesIO()
    torch.save(hparams, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == hparams


def test_from_devset(monkeypatch):
    calls = []

    def fake_devset(cls, transforms=None, size: int = 6):
        calls.append((transforms, size))
        dataset = ListDataset(size)
        return dataset

    monkeypatch.setattr(LinesDataset, "from_devset", classmethod(fake_devset))
    dm = MatSciMLDataModule.from_devset(LinesDataset, dset_kwargs={"transforms": [], "size": 20}, val_split=0.25)
    assert (dm.batch_size, dm.num_workers, dm.persistent_workers) == (8, 0, False)
    dm.setup()
    assert calls == [([], 20)]
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (15, 5)
    with pytest.raises(ConfigError, match="from_devset reads the devset"):
        MatSciMLDataModule.from_devset(LinesDataset, train_path="x")


# --------------------------------------------------------------------------- errors
def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"val_split=1.5: a fraction must lie in \[0, 1\)"):
        MatSciMLDataModule(dataset=ListDataset(), val_split=1.5)
    with pytest.raises(ConfigError, match="batch_size=0"):
        MatSciMLDataModule(dataset=ListDataset(), batch_size=0)
    with pytest.raises(ConfigError, match="'val' is reserved"):
        MatSciMLDataModule(dataset=ListDataset(), extra_datasets={"val": "x"})
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigError, match=f"train_path='{missing}': no such file or folder"):
        MatSciMLDataModule(dataset=LinesDataset, train_path=missing).setup()
    with pytest.raises(ConfigError, match="no training set to split"):
        MatSciMLDataModule(dataset=LinesDataset, val_split=0.1).setup()
    with pytest.raises(RuntimeError, match="call dm.setup"):
        MatSciMLDataModule(dataset=ListDataset()).datasets  # noqa: B018
    with pytest.raises(ConfigError, match="is not a known dataset class"):
        MatSciMLDataModule(dataset="StructureDatset", train_path=_write(tmp_path / "t.txt", [1])).setup()
    # "" and 0 mean no split (as YAML configs write them)
    dm = MatSciMLDataModule(dataset=ListDataset(10), val_split="", test_split=0)
    dm.setup()
    assert list(dm.datasets) == ["train"]


# --------------------------------------------------------------------------- validation
def test_target_keys_run_validation(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("matsciml.datasets.validation")
    fake.validate_dataset = lambda dataset, keys: calls.append((dataset, keys))
    monkeypatch.setitem(sys.modules, "matsciml.datasets.validation", fake)
    train = _write(tmp_path / "train.txt", range(10))
    test = _write(tmp_path / "test.txt", range(3))
    dm = MatSciMLDataModule(
        dataset=LinesDataset,
        train_path=train,
        val_split=0.2,
        test_split=test,
        target_keys=["energy"],
        dset_kwargs={"transforms": []},
    )
    dm.setup()
    # each underlying dataset once (train and val share one file)
    assert [(d.path.name, k) for d, k in calls] == [("train.txt", ["energy"]), ("test.txt", ["energy"])]
    calls.clear()
    MatSciMLDataModule(dataset=LinesDataset, train_path=train, dset_kwargs={"transforms": []}).setup()
    assert calls == []  # no keys known: nothing to check


def _write_extxyz(path: Path, energies: list[float | None]) -> Path:
    ase = pytest.importorskip("ase")
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for k, energy in enumerate(energies):
        atoms = ase.Atoms("Cu2", positions=[[0, 0, 0], [1.8, 0, 0.1 * k]], cell=[3.6, 3.6, 3.6], pbc=True)
        if energy is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=energy)
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return path


def test_bad_record_fails_at_setup(tmp_path):
    pytest.importorskip("matsciml.datasets.structure_dataset")
    from matsciml.common.errors import DataError

    path = _write_extxyz(tmp_path / "bad.extxyz", [-1.0, None, -3.0])
    dm = MatSciMLDataModule(dataset="StructureDataset", train_path=path, target_keys=["energy"], batch_size=2)
    with pytest.raises(DataError, match=r"bad\.extxyz.*1"):
        dm.setup("fit")
    dropped = MatSciMLDataModule(
        dataset="StructureDataset",
        train_path=path,
        target_keys=["energy"],
        dset_kwargs={"on_invalid": "drop"},
    )
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        dropped.setup()
    assert [float(dropped.datasets["train"][i]["targets"]["energy"]) for i in range(2)] == [-1.0, -3.0]


# --------------------------------------------------------------------------- real data
def test_lips_devset_batches():
    path = DATA / "lips_devset.extxyz"
    if not path.is_file():
        pytest.skip(f"reference data not found at {path} (tests/data)")
    pytest.importorskip("matsciml.datasets.structure_dataset")
    transforms = pytest.importorskip("matsciml.datasets.transforms")
    dm = MatSciMLDataModule(
        dataset="StructureDataset",
        train_path=str(path),
        val_split=0.2,
        batch_size=8,
        dset_kwargs={
            "transforms": [transforms.PeriodicPropertiesTransform(5.0), transforms.PointCloudToGraphTransform("pyg")]
        },
    )
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (160, 40)
    batch = next(iter(dm.train_dataloader()))
    assert batch["graph"].num_nodes == 8 * 83
    assert batch["targets"]["energy"].shape == (8,)
    assert batch["targets"]["forces"].shape == (664, 3)
    # the batch holds the first 8 records of epoch 0's order, as read from the file (ASE is the oracle)
    from ase.io import read

    from matsciml.lightning.loaders import epoch_permutation

    train_indices = dm.datasets["train"].indices
    first = [train_indices[k] for k in epoch_permutation(160, 0, 0)[:8]]
    frames = [read(path, index=i) for i in first]
    expected = torch.tensor([f.get_potential_energy() for f in frames], dtype=batch["targets"]["energy"].dtype)
    torch.testing.assert_close(batch["targets"]["energy"], expected)
    forces = torch.tensor(frames[0].get_forces(), dtype=torch.float32)
    torch.testing.assert_close(batch["targets"]["forces"][:83].float(), forces, atol=1e-5, rtol=1e-5)


def test_structure_devset(monkeypatch, tmp_path):
    pytest.importorskip("matsciml.datasets.devset")
    from ase.io import read

    from matsciml.lightning.loaders import epoch_permutation

    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path))
    dm = MatSciMLDataModule.from_devset(dset_kwargs={"n": 20}, val_split=0.25, target_keys=["energy", "forces"])
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (15, 5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["graph"].num_graphs == 8
    (path,) = tmp_path.glob("*.extxyz")
    indices = [dm.datasets["train"].indices[k] for k in epoch_permutation(15, 0, 0)[:8]]
    expected = [read(path, index=i).get_potential_energy() for i in indices]
    torch.testing.assert_close(
        batch["targets"]["energy"].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )


# --------------------------------------------------------------------------- evaluation under several processes
def _attach(dm: MatSciMLDataModule, num_replicas: int, rank: int) -> None:
    """Attach a stand-in trainer that reports ``num_replicas`` processes (as a DDP strategy does)."""
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": num_replicas, "rank": rank})


def test_eval_loaders_are_unpadded_shards():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    dm = MatSciMLDataModule(dataset=ListDataset(50), val_split=0.22, test_split=0.1, batch_size=4, seed=3)
    dm.setup()
    val = fractional_split(50, 0.22, 0.1, 3)["val"]
    test = fractional_split(50, 0.22, 0.1, 3)["test"]
    assert len(val) == 11  # odd: a padded sampler would repeat val[0] on rank 2
    shares = {}
    for rank in range(3):
        _attach(dm, 3, rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        shares[rank] = [v for batch in loader for v in batch]
        # oracle: the strided share of the file order, no padding
        assert shares[rank] == val[rank::3]
        assert [v for b in dm.test_dataloader() for v in b] == test[rank::3]
        assert [v for b in dm.predict_dataloader() for v in b] == test[rank::3]
        assert [v for b in dm.eval_dataloader("val", shard=True) for v in b] == val[rank::3]
        # without shard=True the whole set, on every rank (a loop on rank 0, a template of options)
        assert [v for b in dm.eval_dataloader("val") for v in b] == val
    assert sorted(v for share in shares.values() for v in share) == val  # each structure on exactly one rank
    assert [len(share) for share in shares.values()] == [4, 4, 3]
    # one process, or no trainer: plain sequential loaders
    _attach(dm, 1, 0)
    assert [v for b in dm.val_dataloader() for v in b] == val
    dm.trainer = None
    assert [v for b in dm.val_dataloader() for v in b] == val


def test_eval_set_smaller_than_the_world_is_read_whole_by_every_rank():
    dm = MatSciMLDataModule(dataset=ListDataset(20), val_split=0.1, batch_size=4)
    dm.setup()
    val = fractional_split(20, 0.1, 0, 0)["val"]
    assert len(val) == 2
    for rank in range(3):
        _attach(dm, 3, rank)
        with pytest.warns(UserWarning, match="'val' set has 2 structures for 3 processes"):
            loader = dm.val_dataloader()
        # a DistributedSampler (Lightning keeps it) that gives every rank the whole set: no rank without a batch
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert [v for b in loader for v in b] == val


# A small regression task on 9 devset structures split 5 / 4 over two ranks: batches of 2 give the ranks 3 and 2
# batches (uneven inputs), and a padded sampler would count structure 0 twice.
DDP_DEVSET, DDP_VAL_SPLIT, DDP_BATCH, DDP_VAL = 30, 0.3, 2, 9
DDP_EGNN = tiny_egnn_kwargs(depth=1, cutoff=5.0)


def _ddp_datamodule() -> MatSciMLDataModule:
    return MatSciMLDataModule.from_devset(
        dset_kwargs={"n": DDP_DEVSET}, val_split=DDP_VAL_SPLIT, target_keys=["energy"], batch_size=DDP_BATCH
    )


def _ddp_task():
    from matsciml.models.tasks.scalar import ScalarRegressionTask

    torch.manual_seed(0)
    return ScalarRegressionTask(
        encoder_class="PLEGNNBackbone", encoder_kwargs=DDP_EGNN, task_keys=["energy"], output_kwargs={"hidden_dim": 8}
    )


def _ddp_worker(out: Path) -> None:
    """``trainer.validate`` on two gloo processes with the data module used directly (Lightning's defaults)."""
    import logging

    import lightning.pytorch as pl

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    task, dm = _ddp_task(), _ddp_datamodule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(task, datamodule=dm)
    sampler = trainer.val_dataloaders.sampler
    rank = trainer.global_rank
    record = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "sampler": type(sampler).__name__,
        "indices": [int(i) for i in sampler],
        "batches": [int(n) for n in trainer.num_val_batches],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(task.state_dict(), out / "weights.pt")


@pytest.mark.slow
def test_ddp_validation_matches_one_process(tmp_path, monkeypatch):
    """Validation MAE of 2 gloo processes = MAE of a plain loop in one process over the same 9 structures."""
    pytest.importorskip("matsciml.datasets.devset")
    pytest.importorskip("matsciml.models.tasks.scalar")
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path / "cache"))
    dm = _ddp_datamodule()
    dm.setup()  # writes the devset once, before the two processes read it
    assert len(dm.datasets["val"]) == DDP_VAL
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK"))}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Lightning kept the data module's sampler: unpadded shards of unequal length, each structure once
    assert [r["sampler"] for r in ranks] == ["UnrepeatedDistributedSampler"] * 2
    assert ranks[0]["indices"] == list(range(0, DDP_VAL, 2)) and ranks[1]["indices"] == list(range(1, DDP_VAL, 2))
    assert [r["batches"] for r in ranks] == [[3], [2]]

    # oracle: the same weights, a plain loop over the whole validation set in this process
    task = _ddp_task()
    task.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    task.eval()
    errors = []
    with torch.no_grad():
        for batch in dm.eval_dataloader("val"):
            pred = task(batch)["energy"].reshape(-1).double()
            errors += (pred - batch["targets"]["energy"].reshape(-1).double()).abs().tolist()
    assert len(errors) == DDP_VAL
    expected = sum(errors) / DDP_VAL
    padded = (sum(errors) + errors[0]) / (DDP_VAL + 1)  # DistributedSampler's padding: structure 0 twice
    for r in ranks:  # the epoch metric is reduced across ranks: both report the global value
        assert r["metrics"]["val_energy_mae"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert abs(padded - expected) > 1e-3 * expected


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(Path(sys.argv[2]))
