"""Exported ONNX graphs kept without their weights: a new checkpoint's export swaps its own in.

``torch.onnx.export(..., dynamo=True)`` traces the module afresh on every call:
``torch.export``, decompositions and translation cost 6-10 s of CPU and a few
hundred megabytes for each of the three models, every time the daemon
publishes. Yet the graph of one architecture is the same for every checkpoint;
only the weights differ. So the first export of a graph keeps it *unoptimised*
(where every initializer is named after the state-dict entry it holds: the
exporter's optimiser folds BatchNorms into convolutions and reshapes buffers,
after which they no longer are) with its weights left out, under a key of
everything that shapes the graph (:func:`graph_key`). A later export with the
same key fills in the module's current weights and runs the optimiser the
exporter runs itself (onnxscript's ``optimize_ir``), which gives the graph the
exporter gives. The parity check that follows every export (:func:`~revisit.
export.onnx.parity_check`) is the guard: a graph that computed anything else
would fail it and publish nothing.

Neither torch.onnx nor onnxscript keeps such a cache, hence this module. A
cache file that is unreadable or does not fit the module is ignored (and
replaced by the next trace); the cache is an optimisation only, never needed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from revisit.fsutil import write_bytes_atomic

if TYPE_CHECKING:
    import onnx_ir as ir
    from torch import nn

__all__ = ["fill_graph", "graph_key", "graph_path", "load_graph", "store_graph"]

logger = logging.getLogger(__name__)

#: Bumped when what a cache file holds changes.
_FORMAT = 1


def _source_digest(module: nn.Module) -> str:
    """sha256 of the source files of every class in the module tree: a code change is a new key."""
    files: set[str] = set()
    for sub in module.modules():
        try:
            files.add(inspect.getfile(type(sub)))
        except (TypeError, OSError):  # a built-in class: its version is torch's
            continue
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        try:
            digest.update(Path(name).read_bytes())
        except OSError:
            digest.update(b"?")
    return digest.hexdigest()


def graph_key(module: nn.Module, *, opset: int, output_names: list[str]) -> str:
    """The key of a module's graph: what, if it changed, would change the exported graph.

    The module's class and output names, ``pooling`` where it has one, the opset,
    the versions of torch, onnxscript and onnx, the source files of the classes it
    is built from, and the name, shape and dtype of every state-dict entry.

    Args:
        module: The module to export (its weights do not enter the key).
        opset: The ONNX opset.
        output_names: The graph's output names.

    Returns:
        A hex sha256.
    """
    import torch

    state = [[k, list(v.shape), str(v.dtype)] for k, v in module.state_dict().items()]
    described = {
        "format": _FORMAT,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "pooling": str(getattr(module, "pooling", "")),
        "outputs": output_names,
        "opset": int(opset),
        "torch": torch.__version__,
        # Read from the installed distributions: importing onnx and onnxscript here would put
        # them in the memory of a daemon that only asks for a key (the export child runs them).
        "onnxscript": importlib.metadata.version("onnxscript"),
        "onnx": importlib.metadata.version("onnx"),
        "source": _source_digest(module),
        "state": state,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def store_graph(cache_dir: Path, key: str, model: ir.Model) -> None:
    """Keep an unoptimised exported graph, its initializers without data, under ``key``.

    Failing to write is logged and otherwise ignored: the cache only saves time.

    Args:
        cache_dir: The cache's directory (made if missing).
        key: :func:`graph_key` of the module.
        model: The exporter's unoptimised model (not changed).
    """
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    for initializer in proto.graph.initializer:
        data_type, dims, name = initializer.data_type, list(initializer.dims), initializer.name
        initializer.Clear()
        initializer.name, initializer.data_type = name, data_type
        initializer.dims.extend(dims)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(graph_path(cache_dir, key), proto.SerializeToString())
    except OSError as exc:
        logger.warning("could not keep the exported graph in %s: %s", cache_dir, exc)


def graph_path(cache_dir: Path, key: str) -> Path:
    """The file a graph is kept in (it may not exist)."""
    return cache_dir / f"{key}.onnx"


def load_graph(
    cache_dir: Path, key: str, module: nn.Module, *, output_names: list[str]
) -> ir.Model | None:
    """The graph kept under ``key`` with ``module``'s weights in it, unoptimised; None on a miss.

    See :func:`fill_graph`.

    Args:
        cache_dir: The cache's directory.
        key: :func:`graph_key` of the module.
        module: The module whose weights go in.
        output_names: The outputs the graph must have.

    Returns:
        The model, ready for the optimiser, or None.
    """
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return fill_graph(cache_dir, key, state, output_names=output_names)


def fill_graph(
    cache_dir: Path,
    key: str,
    state: Mapping[str, npt.NDArray[np.generic]],
    *,
    output_names: list[str],
) -> ir.Model | None:
    """The graph kept under ``key`` with the weights ``state`` in it, unoptimised; None on a miss.

    The graph's outputs must be ``output_names`` and every initializer must name an
    entry of ``state`` of the same shape and dtype; otherwise the file does not fit
    (it is logged, and None is returned, so the caller traces afresh). Needs no
    PyTorch: ``state`` may be an ``.npz`` file opened with ``numpy.load``, whose
    arrays are read one at a time.

    Args:
        cache_dir: The cache's directory.
        key: :func:`graph_key` of the module the weights are of.
        state: The module's state dict as arrays, by name.
        output_names: The outputs the graph must have.

    Returns:
        The model, ready for the optimiser, or None.
    """
    import onnx
    import onnx_ir as ir

    path = graph_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several kinds on a damaged file
        logger.warning("ignoring the cached graph %s: %s", path.name, exc)
        return None
    outputs = [o.name for o in proto.graph.output]
    if outputs != output_names:
        logger.warning(
            "ignoring the cached graph %s: its outputs %s do not fit the module's %s",
            path.name,
            outputs,
            output_names,
        )
        return None
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for initializer in proto.graph.initializer:
        name = initializer.name
        expected = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
        value = np.ascontiguousarray(state[name]) if name in state else None
        if (
            value is None
            or list(value.shape) != list(initializer.dims)
            or value.dtype != np.dtype(expected)
        ):
            logger.warning(
                "ignoring the cached graph %s: its initializer %s does not fit the module",
                path.name,
                name,
            )
            return None
        arrays[name] = value
    model = ir.serde.deserialize_model(proto)
    del proto
    # Each array goes into the graph as it is (no protobuf copy of it is made here).
    for name, initializer_value in model.graph.initializers.items():
        initializer_value.const_value = ir.Tensor(arrays.pop(name), name=name)
    return model
