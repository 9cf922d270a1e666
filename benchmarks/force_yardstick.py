"""Yardstick for force training: a maintained potential (MACE, mace-torch) on the LiPS split.

Trains a small ``ScaleShiftMACE`` with a plain torch loop on the same training/validation
split the ``lips_forces`` experiment uses (200 frames of tests/data/lips_devset.extxyz,
``val_split: 0.2``, seed 0, batch size 4) for the same number of epochs, with MACE's own
defaults for everything the comparison does not fix (per-element reference energies by
least squares, scale = force RMS, energy weight 1 and force weight 100 on the per-atom
energy and force MSE, Adam with AMSGrad, lr 0.01). Prints, per epoch, the validation
energy and force MAE and their ratios to the mean-energy / zero-force predictors, and
writes them to a CSV.

mace-torch is not a dependency of this project: run it from its own environment, e.g.::

    python3 -m venv /tmp/venv-mace
    /tmp/venv-mace/bin/pip install torch mace-torch==0.3.16 ase
    /tmp/venv-mace/bin/python benchmarks/force_yardstick.py --epochs 20 --csv mace_lips.csv

The split is recomputed as :func:`matsciml.lightning.datamodule.fractional_split` draws it
(a test checks that the two agree).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np


def lips_split(n: int, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """The data module's ``fractional_split`` (no test set), recomputed without importing matsciml.

    The same permutation: ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``,
    its first ``floor(val_fraction * n + 0.5)`` entries are the validation set.
    """
    import torch

    n_val = int(math.floor(val_fraction * n + 0.5))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def main() -> None:
    """Train MACE on the LiPS split and report validation errors per epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lips_devset.extxyz")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--r-max", type=float, default=4.5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--csv", default="")
    args = parser.parse_args()

    import ase.io
    import torch

    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace import data, modules, tools
    from mace.tools import torch_geometric

    torch.manual_seed(args.seed)
    torch.set_default_dtype(getattr(torch, args.dtype))
    frames = ase.io.read(args.data, index=":")
    split = lips_split(len(frames), 0.2, args.seed)
    keys = data.KeySpecification(info_keys={"energy": "energy"}, arrays_keys={"forces": "forces"})
    for atoms in frames:  # ASE's calculator results -> info/arrays
        atoms.info["energy"] = atoms.get_potential_energy()
        atoms.arrays["forces"] = atoms.get_forces()
    configs = [data.config_from_atoms(a, key_specification=keys) for a in frames]
    train_cfg = [configs[i] for i in split["train"]]
    val_cfg = [configs[i] for i in split["val"]]
    elements = sorted({int(z) for c in train_cfg for z in c.atomic_numbers})
    z_table = tools.AtomicNumberTable(elements)

    counts = np.array([[np.sum(c.atomic_numbers == z) for z in elements] for c in train_cfg], dtype=float)
    energies = np.array([c.properties["energy"] for c in train_cfg])
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]
    forces_rms = float(np.sqrt(np.mean(np.concatenate([c.properties["forces"].ravel() for c in train_cfg]) ** 2)))

    def loader(cfgs: list, shuffle: bool) -> torch_geometric.dataloader.DataLoader:
        items = [data.AtomicData.from_config(c, z_table=z_table, cutoff=args.r_max) for c in cfgs]
        return torch_geometric.dataloader.DataLoader(items, batch_size=args.batch_size, shuffle=shuffle)

    train_loader, val_loader = loader(train_cfg, True), loader(val_cfg, False)
    avg_nb = modules.compute_avg_num_neighbors(train_loader)
    model = modules.ScaleShiftMACE(
        r_max=args.r_max,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2,
        num_elements=len(elements),
        hidden_irreps=o3.Irreps("16x0e + 16x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=e0,
        avg_num_neighbors=avg_nb,
        atomic_numbers=elements,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[32, 32, 32],
        atomic_inter_scale=forces_rms,
        atomic_inter_shift=0.0,
    )
    loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, amsgrad=True)
    val_e = np.array([c.properties["energy"] for c in val_cfg])
    mean_e_mae = float(np.mean(np.abs(val_e - energies.mean())))
    zero_f_mae = float(np.mean(np.abs(np.concatenate([c.properties["forces"].ravel() for c in val_cfg]))))
    rows = []
    start = time.perf_counter()
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            out = model(batch.to_dict(), training=True, compute_force=True)
            loss = loss_fn(pred=out, ref=batch)
            loss.backward()
            optimizer.step()
            step += 1
            if step == 1 or step % 10 == 0:
                print(f"step {step} loss {float(loss):.4g} {time.perf_counter() - start:.1f}s", flush=True)
        model.eval()
        e_err, f_err = [], []
        for batch in val_loader:
            out = model(batch.to_dict(), training=False, compute_force=True)
            e_err.append((out["energy"] - batch.energy).abs().detach().numpy())
            f_err.append((out["forces"] - batch.forces).abs().detach().numpy().ravel())
        e_mae, f_mae = float(np.concatenate(e_err).mean()), float(np.concatenate(f_err).mean())
        row = {
            "epoch": epoch,
            "step": step,
            "seconds": round(time.perf_counter() - start, 1),
            "val_energy_mae": e_mae,
            "val_forces_mae": f_mae,
            "energy_ratio": mean_e_mae / e_mae,
            "forces_ratio": zero_f_mae / f_mae,
        }
        rows.append(row)
        print(
            f"epoch {epoch:3d} step {step:5d} {row['seconds']:7.1f}s  val energy MAE {e_mae:.4f} eV "
            f"({row['energy_ratio']:.2f}x better than the mean {mean_e_mae:.4f})  forces MAE {f_mae:.4f} eV/A "
            f"({row['forces_ratio']:.2f}x better than zero {zero_f_mae:.4f})",
            flush=True,
        )
    if args.csv:
        path = Path(args.csv)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
