"""The half of an ONNX export that needs no PyTorch: optimise, check, save; measure parity.

An export has two halves. The first needs PyTorch: the module is built from its
checkpoint, traced (or its graph taken from the cache, :mod:`.graphs`), and
run on the parity chips for the outputs the exported model must reproduce.
The second needs only ``onnx``, onnxscript's optimiser and onnxruntime: the
graph, its weights in, is optimised as the exporter optimises, checked
(``onnx.checker``, full check with shape inference) and written atomically,
and onnxruntime's outputs on the same chips are compared with PyTorch's.

:func:`revisit.export.onnx.export_model` and :func:`~revisit.export.onnx.
parity_check` do both halves in one process. The service's export child does
only the second (:mod:`revisit.export.child`): it never imports PyTorch, whose
libraries alone are about 200 MB of a process's resident memory; the daemon,
which holds PyTorch for its learner anyway, does the first
(:func:`revisit.export.publish.prepare_export`). Both halves end here, so a
model is written and checked one way.

This module imports ``onnx``, onnxscript and onnxruntime only inside its
functions: the daemon imports it for its constants without paying for them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from revisit.errors import ExportError, ParityError
from revisit.fsutil import write_bytes_atomic

if TYPE_CHECKING:
    import onnx_ir

__all__ = ["INPUT_LAYOUT", "INPUT_NAME", "Output", "compare_outputs", "finish_model", "run_model"]

logger = logging.getLogger(__name__)

#: The models of a version.
Output = Literal["features", "embedding", "dense"]
#: Name of the one input of every exported model.
INPUT_NAME = "reflectance"
#: Layout of the input.
INPUT_LAYOUT = "NCHW"


def finish_model(
    model: onnx_ir.Model, path: Path, *, metadata: Mapping[str, str], doc_string: str
) -> None:
    """Optimise an unoptimised exported graph, give it its metadata, check it, write it.

    The optimiser is the one ``torch.onnx.export`` runs itself (onnxscript's
    ``optimize_ir``: BatchNorms folded into convolutions, constants folded).
    The model is *consumed*: its weights are dropped once serialised, so that
    no more than two copies of them (the message and its bytes) are held at
    once. The file is written to a temporary name, fsynced and renamed onto
    ``path``.

    Args:
        model: The graph with its weights in (from the tracer or the cache).
        path: Where the ``.onnx`` file goes; its directory must exist.
        metadata: String properties to store (replacing any the graph has).
        doc_string: The model's documentation string.

    Raises:
        ExportError: The optimiser or the checker failed, or the file could not
            be written (no file is left under ``path`` then).
    """
    import onnx
    import onnx_ir
    from onnxscript.optimizer import optimize_ir

    try:
        optimize_ir(model)
        proto = onnx_ir.serde.serialize_model(model)
        for value in model.graph.initializers.values():
            value.const_value = None  # the message holds its own copy now
        del proto.metadata_props[:]
        for key, text in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = key
            entry.value = str(text)
        proto.doc_string = doc_string
        data = proto.SerializeToString()
        del proto
        onnx.checker.check_model(data, full_check=True)
    except Exception as exc:  # the optimiser and the checker raise many kinds
        raise ExportError(f"could not export the model to {path.name}: {exc}") from exc
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc}") from exc


def run_model(path: Path, reflectance: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """Every output of an ONNX model on one batch, under onnxruntime's CPU provider.

    Args:
        path: The ``.onnx`` file.
        reflectance: Its one input, (N, 12, H, W) float32.

    Returns:
        The outputs, in the graph's order.

    Raises:
        ExportError: The model cannot be loaded or run.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: reflectance})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot run {path.name}: {exc}") from exc
    return [np.asarray(out) for out in outputs]


def compare_outputs(
    name: str,
    got_all: Sequence[npt.NDArray[np.floating]],
    expected_all: Sequence[npt.NDArray[np.floating]],
    *,
    n_chips: int,
    tolerance: float,
) -> float:
    """The parity figure of an exported model: onnxruntime's outputs against PyTorch's.

    Args:
        name: The model's file name, for messages.
        got_all: onnxruntime's outputs.
        expected_all: PyTorch's outputs on the same input, in the same order.
        n_chips: How many chips the input held, for messages.
        tolerance: Largest difference allowed.

    Returns:
        The largest absolute difference between the two (for outputs larger than
        1 in magnitude, relative to the largest magnitude); for a model with
        several outputs, the largest over them.

    Raises:
        ParityError: The outputs differ in number or shape, or the difference
            exceeds ``tolerance`` (or is not finite).
    """
    if len(got_all) != len(expected_all):
        raise ParityError(
            f"{name}: onnxruntime gives {len(got_all)} outputs, PyTorch {len(expected_all)}"
        )
    diff = 0.0
    for got, expected in zip(got_all, expected_all, strict=True):
        if got.shape != expected.shape:
            raise ParityError(
                f"{name}: onnxruntime gives shape {got.shape}, PyTorch {expected.shape}"
            )
        # Relative to the output's largest magnitude where that exceeds 1: feature maps are
        # unnormalised (values in the tens), where float32 rounding alone exceeds 1e-4.
        scale = max(1.0, float(np.max(np.abs(expected))))
        error = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        diff = max(diff, error / scale) if not np.isnan(error) else float("nan")
        if np.isnan(diff):
            break
    if not diff <= tolerance:  # NaN fails too
        raise ParityError(
            f"{name} differs from PyTorch by {diff:.3g} (max abs) on {n_chips} chips;"
            f" tolerance {tolerance:g}"
        )
    logger.info(
        "parity of %s: max abs difference %.3g on %d chips (tolerance %g)",
        name,
        diff,
        n_chips,
        tolerance,
    )
    return diff
