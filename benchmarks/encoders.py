"""Forward + backward time of every encoder on devset batches, and the wrappers' overhead.

For each encoder, built from a model config in ``experiments/configs/models`` (upstream's
``m3gnet_dgl``, ``chgnet_dgl``, ``megnet_dgl``, ``tensornet_dgl``, ``mace_pyg`` unchanged, and this
toolkit's ``e3nn`` and ``egnn``), on batches of 16 devset structures with the config's own
transforms: median milliseconds of one forward + backward pass (loss = sum of both
embeddings), per batch, per structure and per atom. For the library wrappers, the same model
is also called directly on the library's input prepared beforehand (matgl's graph, MACE's data
dict); ``overhead`` is the wrapper's extra time relative to that, and ``convert`` the time of the
conversion of our batch alone (``library_graph``/``library_input``) relative to it: the first is
a difference of two noisy timings, the second a direct measurement of what the wrapper adds.
CPU always; a CUDA column when a GPU is present. Run::

    OMP_NUM_THREADS=1 python benchmarks/encoders.py                # a few minutes on 2 CPU threads
    python benchmarks/encoders.py --models m3gnet_dgl mace_pyg --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matsciml.common.config import instantiate  # noqa: E402
from matsciml.datasets.collate import collate_samples  # noqa: E402
from matsciml.datasets.structure_dataset import EMTAlloyDataset  # noqa: E402
from matsciml.models.encoders import get_encoder_class  # noqa: E402

MODELS = ["m3gnet_dgl", "chgnet_dgl", "megnet_dgl", "tensornet_dgl", "mace_pyg", "e3nn", "egnn"]
LIBRARY = {
    "m3gnet_dgl": "matgl",
    "chgnet_dgl": "matgl",
    "megnet_dgl": "matgl",
    "tensornet_dgl": "matgl",
    "mace_pyg": "mace",
}


def load_config(name: str) -> dict:
    return yaml.safe_load((REPO / "experiments" / "configs" / "models" / f"{name}.yaml").read_text())


def batches(config: dict, count: int, size: int) -> list[dict]:
    """``count`` batches of ``size`` devset structures through the config's transforms."""
    transforms = [instantiate(t) for t in config.get("transforms") or []]
    dataset = EMTAlloyDataset(transforms=transforms)
    return [collate_samples([dataset[k * size + i] for i in range(size)]) for k in range(count)]


def build(config: dict) -> torch.nn.Module:
    spec = config["encoder_class"]
    cls = get_encoder_class(spec["class_path"] if isinstance(spec, dict) else spec)
    return cls(**instantiate(config.get("encoder_kwargs") or {}))


def to_device(batch: dict, device: torch.device) -> dict:
    return dict(batch, graph=batch["graph"].to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median seconds of ``step()`` over ``repeats`` calls (after one warm-up call if ``warm_up``)."""
    if warm_up:
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wrapper_step(encoder, batch):
    def step():
        emb = encoder(batch)
        (emb.point_embedding.sum() + emb.system_embedding.sum()).backward()

    return step


def direct_step(encoder, batch):
    """The library model alone on its input prepared beforehand (``None`` for our own encoders)."""
    name = type(encoder).__name__
    if name in ("M3GNet", "CHGNet", "MEGNet", "TensorNet"):
        g = encoder.library_graph(batch)
        state = None
        if name == "MEGNet":
            from matsciml.datasets.transforms.upstream import graph_variables

            ei = g.edge_index
            length = (g.pos[ei[1]] + g.pbc_offshift - g.pos[ei[0]]).norm(dim=-1)
            state = graph_variables(g, ei, length).detach()

        def step():
            if name == "TensorNet":
                x = encoder.model.forward_features(g)["readout"]
                out = x.sum() + encoder.model.readout(x, g.batch).sum()
            else:
                out = encoder.model(g, state) if state is not None else encoder.model(g)
                features = encoder.model.feature_dict
                key = "atom_feat" if name == "CHGNet" else "node_feat"
                out = (
                    out.sum()
                    + features[f"gc_{len(encoder.model.blocks) if name == 'MEGNet' else encoder.model.n_blocks}"][
                        key
                    ].sum()
                )
            out.backward()
            encoder.model.feature_dict = {}

        return step
    if name == "MACEWrapper":
        data = encoder.library_input(batch)

        def step():
            out = encoder.model(dict(data), training=True, compute_force=False)
            feats = out["node_feats"].index_select(-1, encoder.scalar_index)
            (feats.sum() + feats.sum()).backward()

        return step
    return None


def conversion_step(encoder, batch):
    """Our batch -> the library's input, alone (``None`` for our own encoders)."""
    convert = getattr(encoder, "library_graph", None) or getattr(encoder, "library_input", None)
    if convert is None:
        return None

    def step():
        with torch.no_grad():
            convert(batch)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="model config names")
    parser.add_argument("--batches", type=int, default=3, help="batches timed per model (default 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch (default 3)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); batches of {args.batch_size} devset structures"
    )
    header = (
        f"{'model':<15}{'device':<7}{'params':>10}{'ms/batch':>10}{'ms/struct':>10}{'us/atom':>9}"
        f"{'direct ms':>10}{'overhead':>9}{'convert ms':>11}{'convert':>8}"
    )
    print(header)
    for name in args.models:
        library = LIBRARY.get(name)
        if library and importlib.util.find_spec(library) is None:
            print(f"{name:<15}skipped: the {library} extra is not installed")
            continue
        config = load_config(name)
        data = batches(config, args.batches, args.batch_size)
        atoms = sum(int(b["natoms"].sum()) for b in data) / len(data)
        torch.manual_seed(0)
        base = build(config)
        for device in devices:
            encoder = copy.deepcopy(base).to(device).train()
            moved = [to_device(b, device) for b in data]
            # wrapped and direct calls alternate, so that a change of machine load hits both alike
            wrapped_times, direct_times, convert_times = [], [], []
            for b in moved:
                wrapped_step, library_step = wrapper_step(encoder, b), direct_step(encoder, b)
                convert_step = conversion_step(encoder, b)
                for step in (wrapped_step, library_step, convert_step):
                    if step is not None:
                        step()  # warm-up
                for _ in range(args.repeats):
                    wrapped_times.append(timed(wrapped_step, 1, device, warm_up=False))
                    if library_step is not None:
                        direct_times.append(timed(library_step, 1, device, warm_up=False))
                        convert_times.append(timed(convert_step, 1, device, warm_up=False))
            wrapped = statistics.median(wrapped_times)
            direct = statistics.median(direct_times) if direct_times else None
            convert = statistics.median(convert_times) if convert_times else None
            params = sum(p.numel() for p in encoder.parameters())
            over = f"{100 * (wrapped - direct) / direct:+8.1f}%" if direct else f"{'-':>9}"
            conv = f"{1e3 * convert:>11.1f}{100 * convert / direct:>7.1f}%" if convert else f"{'-':>11}{'-':>8}"
            print(
                f"{name:<15}{device.type:<7}{params:>10,}{1e3 * wrapped:>10.1f}{1e3 * wrapped / args.batch_size:>10.2f}"
                f"{1e6 * wrapped / atoms:>9.0f}{(1e3 * direct if direct else float('nan')):>10.1f}{over}{conv}"
            )


if __name__ == "__main__":
    main()
