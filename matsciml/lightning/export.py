"""Inference artefacts of a task: its forward pass (encoder and heads) as TorchScript or ``torch.export``.

:func:`export_model` writes one file holding the task's prediction ``task(batch) ->
{key: Tensor}`` behind a module that takes plain tensors (so it runs without matsciml,
PyG or e3nn installed, and from C++)::

    (pos [N, 3], atomic_numbers [N], edge_index [2, E], cell_shifts [E, 3], cell [B, 3, 3], batch [N])
        -> (prediction of key 0, prediction of key 1, ...)

in the layout of :mod:`matsciml.common.graph` (``batch`` is the structure index of each
atom), with predictions in data units, in the order of the file's metadata ``outputs``.
:func:`load_exported` reads it back as an :class:`ExportedModel`, which takes a matsciml
batch (or a graph, or the six tensors) and returns ``{key: Tensor}``.

Two methods, and what each gives with this package's encoders:

``"torchscript"``
    The module is traced with ``torch.jit.trace`` on **one structure** (with
    ``script=True``, ``torch.jit.script`` is tried first; it compiles the Python source
    and fails on the encoders' PyG and e3nn code and on the tasks' Lightning attributes). The trace follows the number
    of atoms and of edges, but the encoders turn the number of structures into a Python
    integer, which a trace records as a constant: the traced file therefore takes one
    structure per call (``structures_per_call: 1`` in its metadata), and
    :class:`ExportedModel` calls it once per structure of a batch. Python-side input
    checks of the encoders (atomic numbers inside the embedding table) are not part of
    the trace. Works with :class:`~matsciml.models.PLEGNNBackbone` and
    :class:`~matsciml.models.E3NNEncoder`.
``"export"``
    ``torch.export.export`` (non-strict) of the same module with dynamic numbers of
    atoms, edges and structures: one call per batch, a graph of ATen operations that
    :func:`torch.export.load` reads back (and AOTInductor can compile). It needs the
    forward pass to be free of Python decisions on tensor *values*. Both
    :class:`~matsciml.models.PLEGNNBackbone` and :class:`~matsciml.models.E3NNEncoder`
    skip theirs while exporting (the atomic-number range check; the e3nn encoder's
    masking of edges past its cutoff, whose messages its envelope already sets to zero),
    so both export; a module with other such decisions raises :class:`ExportError`
    naming the line.

Both methods check the artefact before writing it: its predictions on the example batch
must match the task's to ``atol=rtol=1e-5``.

**Forces.** Keys that a task obtains by automatic differentiation (``forces`` and
``stress`` of :class:`~matsciml.models.tasks.forces.ForceRegressionTask`) are left out,
and only the energy is exported: ``torch.jit.trace`` refuses the ``torch.autograd.grad``
call ("Cannot insert a Tensor that requires grad as a constant"), ``torch.export``
cannot lift the tensors of the backward pass (torch 2.13), and ``torch.func.grad`` does
not reach the positions through the task, which detaches them before differentiating.
Compute forces with the task itself (``task(batch)["forces"]``).

Example::

    from matsciml.lightning.export import export_model, load_exported

    export_model(task, batch, "model.pt", method="torchscript")
    model = load_exported("model.pt")
    energies = model(batch)["energy"]            # [num_structures]

Files are written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError, MatSciMLError, closest
from matsciml.lightning._compat import detach_from_trainer
from matsciml.lightning.checkpointing import atomic_path

__all__ = [
    "INPUT_NAMES",
    "AUTOGRAD_KEYS",
    "METHODS",
    "ExportError",
    "GraphTensors",
    "InferenceModule",
    "ExportedModel",
    "graph_inputs",
    "split_structures",
    "export_model",
    "load_exported",
]

#: Prediction keys obtained by automatic differentiation; left out of exports.
AUTOGRAD_KEYS = ("forces", "stress")
#: Export methods.
METHODS = ("torchscript", "export")
#: Name of the JSON metadata stored inside the exported file.
METADATA_NAME = "matsciml_export.json"
#: Version of the metadata layout.
FORMAT_VERSION = 1
_TOLERANCE = 1e-5


class ExportError(MatSciMLError, RuntimeError):
    """The model could not be exported (or the export does not reproduce the model)."""


@dataclass(eq=False)
class GraphTensors:
    """A graph made of the six input tensors (:data:`INPUT_NAMES`), readable by :mod:`matsciml.common.graph`.

    Encoders read it like a PyG ``Batch``: ``pos`` ``[N, 3]``, ``atomic_numbers`` ``[N]``,
    ``edge_index`` ``[2, E]``, ``cell_shifts`` ``[E, 3]``, ``cell`` ``[B, 3, 3]``,
    ``batch`` ``[N]``; ``num_graphs`` is ``cell.shape[0]``. ``to_dict`` and ``apply`` are
    the two ``Data`` methods the force task uses.
    """

    pos: Tensor
    atomic_numbers: Tensor
    edge_index: Tensor
    cell_shifts: Tensor
    cell: Tensor
    batch: Tensor

    @property
    def num_graphs(self) -> Any:
        """Number of structures (``cell.shape[0]``)."""
        return self.cell.shape[0]

    @property
    def num_nodes(self) -> Any:
        """Number of atoms."""
        return self.pos.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        """``{name: tensor}`` of the six inputs."""
        return {name: getattr(self, name) for name in INPUT_NAMES}

    def apply(self, func: Any) -> GraphTensors:
        """Replace every tensor ``t`` by ``func(t)`` (in place, like PyG's ``Data.apply``); returns ``self``."""
        for name, value in self.to_dict().items():
            setattr(self, name, func(value))
        return self


#: Names (and order) of the exported module's inputs: the fields of :class:`GraphTensors`.
INPUT_NAMES = tuple(field.name for field in fields(GraphTensors))


def graph_inputs(batch: Any) -> tuple[Tensor, ...]:
    """The six input tensors of a batch dict, a PyG graph, or a :class:`GraphTensors`.

    Returns
    -------
    tuple
        ``(pos [N, 3], atomic_numbers [N] int64, edge_index [2, E] int64, cell_shifts [E, 3],
        cell [B, 3, 3], batch [N] int64)``, read through :mod:`matsciml.common.graph`.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == len(INPUT_NAMES):
        return tuple(batch)
    graph = G.get_graph(batch)
    pos = G.positions(graph)
    cell = G.cells(graph).to(pos.dtype)
    return (
        pos,
        G.atomic_numbers(graph),
        G.edge_index(graph).long(),
        G.cell_shifts(graph).to(pos.dtype),
        cell,
        G.graph_index(graph).long(),
    )


def split_structures(inputs: Sequence[Tensor]) -> list[tuple[Tensor, ...]]:
    """Split the six input tensors of a batch into one tuple per structure.

    Atoms and edges of structure ``b`` are taken in their order; ``edge_index`` is
    renumbered from 0 and ``batch`` is all zeros. Edges are assigned to the structure of
    their centre atom ``edge_index[0]``.
    """
    pos, numbers, edge_index, shifts, cell, batch = inputs
    out = []
    for b in range(cell.shape[0]):
        nodes = torch.nonzero(batch == b).flatten()
        edges = torch.nonzero(batch[edge_index[0]] == b).flatten()
        renumber = torch.full((pos.shape[0],), -1, dtype=torch.long, device=pos.device)
        renumber[nodes] = torch.arange(nodes.numel(), device=pos.device)
        out.append(
            (
                pos[nodes],
                numbers[nodes],
                renumber[edge_index[:, edges]],
                shifts[edges],
                cell[b : b + 1],
                torch.zeros(nodes.numel(), dtype=torch.long, device=pos.device),
            )
        )
    return out


def _concat(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


class InferenceModule(nn.Module):
    """Plain-tensor front of a task: ``forward(pos, atomic_numbers, edge_index, cell_shifts, cell, batch)``.

    Builds a :class:`GraphTensors` from the inputs, calls ``task(graph)`` and returns the
    predictions of ``keys`` as a tuple (in data units).

    Parameters
    ----------
    task
        The task (any module whose ``forward(graph)`` returns ``{key: Tensor}``); used
        as is (:func:`export_model` passes a copy).
    keys
        Keys to return, in this order.
    """

    def __init__(self, task: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.task = task
        self.keys = tuple(keys)

    def forward(
        self,
        pos: Tensor,
        atomic_numbers: Tensor,
        edge_index: Tensor,
        cell_shifts: Tensor,
        cell: Tensor,
        batch: Tensor,
    ) -> tuple[Tensor, ...]:
        """Predictions of :attr:`keys` for the structures of the inputs."""
        predictions = self.task(GraphTensors(pos, atomic_numbers, edge_index, cell_shifts, cell, batch))
        return tuple(predictions[key] for key in self.keys)


# ----------------------------------------------------------------------------- export
def _export_keys(task: nn.Module, keys: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(keys to export, keys dropped because they need autograd)."""
    available = list(getattr(task, "task_keys", None) or [])
    name = type(task).__name__
    if keys is None:
        if not available:
            raise ConfigError(f"{name} has no task_keys; pass keys=[...] (the prediction keys to export)")
        keys = available
    keys = [str(k) for k in keys]
    if available:
        for key in keys:
            if key not in available:
                raise ConfigError(f"export key {key!r} is not a task key of {name}; {closest(key, available)}")
    dropped = [k for k in keys if k in AUTOGRAD_KEYS]
    kept = [k for k in keys if k not in AUTOGRAD_KEYS]
    if not kept:
        raise ConfigError(
            f"nothing to export: {dropped} are computed by autograd, which cannot be exported; export the energy"
        )
    return kept, dropped


def _inference_copy(task: nn.Module, keys: list[str]) -> nn.Module:
    """A CPU copy of ``task`` in eval mode, without gradients, predicting ``keys`` only."""
    module = copy.deepcopy(task).cpu().eval()  # LightningModule pickling drops the trainer reference
    module.requires_grad_(False)
    if hasattr(module, "task_keys"):
        module.task_keys = list(keys)
    detach_from_trainer(module)  # LightningModule properties (trainer, ...) raise when not attached
    return module


def _first_user_frame(message: str) -> str:
    """``File "...", line n`` of the user code quoted in a torch.export error, if any."""
    match = re.search(r'The following call raised this error:\s*\n\s*(File "[^"]+", line \d+[^\n]*)', message)
    if match:
        return match.group(1).strip()
    frames = re.findall(r'File "([^"]*matsciml[^"]*)", line (\d+)', message)
    return f'File "{frames[-1][0]}", line {frames[-1][1]}' if frames else ""


def _check_close(expected: tuple[Tensor, ...], got: tuple[Tensor, ...], keys: list[str], what: str) -> None:
    for key, e, g in zip(keys, expected, got):
        if e.shape != g.shape or not torch.allclose(e, g, atol=_TOLERANCE, rtol=_TOLERANCE):
            diff = (e - g).abs().max().item() if e.shape == g.shape else f"shape {tuple(g.shape)} != {tuple(e.shape)}"
            raise ExportError(
                f"the {what} does not reproduce the task's {key!r} predictions on the example batch "
                f"(max difference {diff}); the model's forward pass has input-dependent Python logic that "
                "the export fixed to the example's values"
            )


def _torchscript(
    wrapper: InferenceModule, inputs: tuple[Tensor, ...], keys: list[str], script: bool
) -> tuple[Any, dict]:
    expected = wrapper(*inputs)
    script_error = None
    if script:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(wrapper)
            _check_close(expected, tuple(scripted(*inputs)), keys, "scripted module")
            return scripted, {"mode": "script", "structures_per_call": None}
        except Exception as err:  # noqa: BLE001 - scripting fails on most PyG/e3nn code; tracing is the fallback
            text = str(err).strip()
            script_error = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    structures = split_structures(inputs)
    if not structures:
        raise ExportError("the example batch holds no structure")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(wrapper, structures[0], check_trace=False, strict=False)
    except Exception as err:  # noqa: BLE001 - report why tracing failed, with the user line
        also = f" (torch.jit.script failed first: {script_error})" if script_error else ""
        raise ExportError(
            f"torch.jit.trace failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}{also}"
        ) from err
    tracer_warnings = sorted({str(w.message).splitlines()[0] for w in caught if "Tracer" in type(w.message).__name__})
    for index, structure in enumerate(structures[:8]):
        _check_close(wrapper(*structure), tuple(traced(*structure)), keys, f"trace (structure {index})")
    _check_close(expected, _concat([tuple(traced(*s)) for s in structures]), keys, "trace")
    info = {
        "mode": "trace",
        "structures_per_call": 1,
        "script_error": script_error,
        "tracer_warnings": tracer_warnings[:20],
    }
    return traced, info


def _torch_export(wrapper: InferenceModule, inputs: tuple[Tensor, ...], keys: list[str]) -> tuple[Any, dict]:
    from torch.export import Dim

    num_structures = int(inputs[4].shape[0])
    if num_structures < 2 or int(inputs[0].shape[0]) < 2 or int(inputs[2].shape[1]) < 2:
        raise ExportError(
            "method='export' needs an example batch of at least 2 structures, 2 atoms and 2 edges (torch.export "
            f"fixes sizes 0 and 1); this one has {num_structures} structures"
        )
    atoms, edges, graphs = Dim("num_atoms"), Dim("num_edges"), Dim("num_structures")
    dynamic = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: graphs}, {0: atoms})
    expected = wrapper(*inputs)
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as err:  # noqa: BLE001 - torch.export raises many types; report them as one
        text = str(err)
        where = _first_user_frame(text)
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise ExportError(
            f"torch.export failed: {type(err).__name__}: {first}"
            + (f" at {where}" if where else "")
            + ". The forward pass takes a Python decision on a tensor value or turns a size into a Python int "
            "there; use method='torchscript', or make that code export-friendly "
            "(skip the check when torch.compiler.is_exporting())"
        ) from None
    _check_close(expected, tuple(program.module()(*inputs)), keys, "exported program")
    return program, {"mode": "export", "structures_per_call": None}


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's loggers and stderr while exporting (a failing export prints the whole traced graph)."""
    loggers = [
        logging.getLogger(name) for name in ("torch", *logging.root.manager.loggerDict) if name.startswith("torch")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(
    task: nn.Module,
    example_batch: Any,
    path: str | os.PathLike,
    method: str = "torchscript",
    keys: Sequence[str] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    script: bool = False,
) -> Path:
    """Write an inference artefact of ``task``'s forward pass to ``path``.

    The task is not modified: a CPU copy in eval mode is exported.

    Parameters
    ----------
    task
        A task (or any module whose ``forward(graph)`` returns ``{key: Tensor}`` and
        reads the graph through :mod:`matsciml.common.graph`).
    example_batch
        A batch dict with ``graph`` (as the data module gives), a PyG graph, or the six
        input tensors; its predictions are used to check the artefact. For
        ``method="export"`` it must hold at least 2 structures.
    path
        File to write (folders are created). Conventional suffixes: ``.pt`` for
        TorchScript, ``.pt2`` for ``torch.export``.
    method
        ``"torchscript"`` (default) or ``"export"`` (see the module docstring).
    keys
        Prediction keys to export (default: the task's ``task_keys``, without the ones
        computed by autograd: ``forces``, ``stress``).
    extra_metadata
        More JSON-serialisable data stored in the file's metadata (e.g. the checkpoint
        the weights came from).
    script
        With ``method="torchscript"``, try ``torch.jit.script`` before tracing (default
        ``False``: scripting fails on this package's encoders and tasks, after about 2 s
        spent compiling).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ConfigError
        Unknown ``method`` or key, or nothing left to export.
    ExportError
        The method cannot export this model, or its artefact does not reproduce the
        task's predictions on ``example_batch``.
    """
    if method not in METHODS:
        raise ConfigError(f"export method {method!r} is not supported; {closest(str(method), METHODS)}")
    kept, dropped = _export_keys(task, keys)
    module = _inference_copy(task, kept)
    wrapper = InferenceModule(module, kept).eval()
    inputs = tuple(t.detach().cpu() for t in graph_inputs(example_batch))
    with torch.no_grad():
        if method == "torchscript":
            artefact, info = _torchscript(wrapper, inputs, kept, script)
        else:
            artefact, info = _torch_export(wrapper, inputs, kept)
    metadata = {
        "format_version": FORMAT_VERSION,
        "method": method,
        **info,
        "inputs": list(INPUT_NAMES),
        "input_dtypes": [str(t.dtype).replace("torch.", "") for t in inputs],
        "outputs": kept,
        "dropped_keys": dropped,
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
        "torch_version": torch.__version__,
        **dict(extra_metadata or {}),
    }
    target = Path(path)
    payload = json.dumps(metadata, default=str)
    with atomic_path(target, suffix=target.suffix) as tmp:
        if method == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(artefact, str(tmp), _extra_files={METADATA_NAME: payload})
        else:
            torch.export.save(artefact, str(tmp), extra_files={METADATA_NAME: payload})
    return target


# ----------------------------------------------------------------------------- load
class ExportedModel:
    """An artefact written by :func:`export_model`, loaded back.

    Call it with a batch dict, a graph or the six input tensors; it returns
    ``{key: Tensor}`` (predictions in data units, ``[num_structures]`` for per-structure
    keys). A traced TorchScript file (``structures_per_call == 1``) is called once per
    structure and the results concatenated.

    Attributes
    ----------
    module
        The callable that was loaded (a ``torch.jit.ScriptModule``, or the
        ``ExportedProgram``'s ``module()``).
    program
        The ``torch.export.ExportedProgram`` (``None`` for TorchScript).
    metadata
        The JSON metadata stored in the file (``method``, ``mode``, ``inputs``,
        ``outputs``, ``structures_per_call``, ...).
    keys
        The output keys, in the order of the module's outputs.
    """

    def __init__(self, module: Any, metadata: dict[str, Any], program: Any = None) -> None:
        self.module = module
        self.program = program
        self.metadata = metadata
        self.keys: list[str] = list(metadata.get("outputs", []))
        self._dtypes = [getattr(torch, name) for name in metadata.get("input_dtypes", [])]

    @property
    def method(self) -> str:
        """``"torchscript"`` or ``"export"``."""
        return str(self.metadata.get("method"))

    def _cast(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(self._dtypes) != len(inputs):
            return tuple(inputs)
        return tuple(t.detach().cpu().to(dtype) for t, dtype in zip(inputs, self._dtypes))

    def predict_tensors(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Predictions for the six input tensors (see :data:`INPUT_NAMES`)."""
        inputs = self._cast(inputs)
        if self.metadata.get("structures_per_call") == 1 and inputs[4].shape[0] != 1:
            outputs = _concat([tuple(self.module(*s)) for s in split_structures(inputs)])
        else:
            outputs = tuple(self.module(*inputs))
        return dict(zip(self.keys, outputs))

    def __call__(self, batch: Any) -> dict[str, Tensor]:
        """Predictions for a batch dict, a graph, or the tuple of the six input tensors."""
        with torch.no_grad():
            return self.predict_tensors(*graph_inputs(batch))

    def __repr__(self) -> str:
        return f"ExportedModel(method={self.method!r}, mode={self.metadata.get('mode')!r}, outputs={self.keys})"


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load a file written by :func:`export_model` (TorchScript or ``torch.export``), on the CPU.

    Raises
    ------
    FileNotFoundError
        No such file.
    ExportError
        The file is neither a TorchScript archive nor an exported program written by
        :func:`export_model`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported model file")
    loaders = [_load_torchscript, _load_program]
    if path.suffix == ".pt2":
        loaders.reverse()
    errors = []
    for loader in loaders:
        try:
            return loader(path)
        except Exception as err:  # noqa: BLE001 - try the other format, report both
            errors.append(f"{loader.__name__[6:]}: {type(err).__name__}: {str(err).strip()[:200]}")
    raise ExportError(f"{path}: not an exported matsciml model ({'; '.join(errors)})")


def _load_torchscript(path: Path) -> ExportedModel:
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return ExportedModel(module, _metadata(extra[METADATA_NAME], path))


def _load_program(path: Path) -> ExportedModel:
    extra = {METADATA_NAME: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return ExportedModel(program.module(), _metadata(extra[METADATA_NAME], path), program)


def _metadata(text: Any, path: Path) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text:
        raise ExportError(f"{path} has no {METADATA_NAME}: it was not written by matsciml's export_model")
    return json.loads(text)
