"""The encoder as ONNX: two inference modules, their export, their contract, a parity check.

Two modules are cut from a :class:`~revisit.learner.heads.ContrastiveModel`:

- :class:`FeatureModel`: the **query** encoder, giving pooled features: by
  default of every depth (``features_pooling`` ``levels``: the stem and the four
  layers, 1024-d), or of layer4 alone (``last``: 512-d). In MoCo-style
  training the query encoder is the network that learns by gradient; it is the
  one to fine-tune or to compare features with (the dense pair change map
  slides it over two dates).
- :class:`EmbeddingModel`: the **key** (momentum) encoder and **key head 0**,
  L2-normalised (128-d by default). The learner measures the change ratio R on
  exactly these embeddings (DESIGN §4: "with the key encoder and L2-normalised
  128-d embeddings f"), so a consumer that computes R from this model computes
  the R the database holds, up to the BatchNorm mode (exported models run in
  eval mode: running statistics, not the statistics of one training batch).

- :class:`DenseModel`: the **key** encoder's intermediate feature maps, for
  per-pixel change maps (deep change vector analysis, Saha et al., TGRS 2019):
  four outputs, ``stem`` (the first convolution, BatchNorm and ReLU evaluated
  at *every* pixel: stride 1, 64 channels), ``layer1`` (64 channels, stride 4),
  ``layer2`` (128, stride 8) and ``layer3`` (256, stride 16) -- the maps the
  strided network computes, the stem's stride-2 map being the even pixels of
  the stride-1 one. The metadata's ``dense_outputs`` lists them as
  ``name:stride:channels``; ``dense_receptive_field`` is layer3's receptive
  field in pixels (the halo a tiled consumer needs).

All take float32 reflectance, shape (N, 12, H, W), bands in
:data:`~revisit.types.CANONICAL_BANDS` order, ``DN * 1e-4``: the consumer
scales; the graph standardises each band itself (the statistics frozen into the
model, recorded as ``band_mean`` and ``band_std``), so consumers never do. The
batch *and* the spatial sizes are dynamic (the encoder ends in a
global average pool and has no data-dependent control flow); 32 pixels is the
smallest side the network is meant for (total stride 32).

The contract travels inside the file as ONNX ``metadata_props``
(:data:`METADATA_KEYS`; all values are strings), read back by
:func:`read_metadata`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

import revisit
from revisit.errors import ExportError
from revisit.export import graphs
from revisit.export.finish import (
    INPUT_LAYOUT,
    INPUT_NAME,
    Output,
    compare_outputs,
    finish_model,
    run_model,
)
from revisit.learner.heads import ContrastiveModel, ProjectionHead, l2_normalize
from revisit.types import CANONICAL_BANDS, DN_SCALE

if TYPE_CHECKING:
    import onnx_ir

__all__ = [
    "DENSE_LAYERS",
    "INPUT_NAME",
    "METADATA_KEYS",
    "MIN_SIZE",
    "DenseModel",
    "EmbeddingModel",
    "FeatureModel",
    "FeaturePooling",
    "Output",
    "doc_string",
    "export_model",
    "model_metadata",
    "output_names",
    "parity_check",
    "read_metadata",
    "reference_outputs",
]

logger = logging.getLogger(__name__)

#: What a ``features`` model pools: every depth of the encoder (1024-d) or layer4 (512-d).
FeaturePooling = Literal["levels", "last"]

#: Smallest chip side the encoder is meant for (its total stride).
MIN_SIZE = 32
#: Upper bounds given to the exporter for the dynamic dimensions.
_MAX_BATCH = 1 << 16
_MAX_SIDE = 1 << 15

#: Every metadata property an exported model carries.
METADATA_KEYS: tuple[str, ...] = (
    "format",  # "revisit-onnx/1"
    "output",  # "features" or "embedding": also the name of the graph's output
    "output_dim",  # 1024 (or 512) for features, proj_dim for the embedding
    "features_pooling",  # "levels" or "last" for features; "" for the others
    "encoder",  # "query" or "key"
    "head",  # "0" for the embedding, "" for features
    "normalized",  # "l2" or "none"
    "input_name",  # "reflectance"
    "input_layout",  # "NCHW"
    "input_dtype",  # "float32"
    "dynamic_dims",  # "batch,height,width"
    "min_size",  # "32"
    "bands",  # "B01,B02,...,B12"
    "scale",  # "0.0001": input = DN * scale
    "band_mean",  # the standardisation inside the graph: 12 means of DN * scale, comma-separated
    "band_std",  # and 12 standard deviations ("0,...,0" and "1,...,1": none)
    "patch_size",  # the chip side the model was trained on
    "method",
    "step",
    "model_version",  # the model_version row id
    "version",  # the published version name, or "" when not published
    "checkpoint_sha256",
    "created_at",  # ISO 8601, UTC
    "revisit_version",
    "opset",
)
#: Extra metadata properties of a ``dense`` model.
DENSE_METADATA_KEYS: tuple[str, ...] = (
    "dense_outputs",  # "stem:1:64,layer1:4:64,layer2:8:128,layer3:16:256" (name:stride:channels)
    "dense_receptive_field",  # layer3's receptive field, pixels
)
#: The feature maps of a ``dense`` model: (output name, stride, channels).
DENSE_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("stem", 1, 64),
    ("layer1", 4, 64),
    ("layer2", 8, 128),
    ("layer3", 16, 256),
)
#: Receptive field (pixels) of a ResNet-18's layer3, each layer adding (kernel - 1) x the
#: stride of its input: the 7x7/2 stem (7), the 3x3/2 max-pool (+2 x 2), layer1's four
#: 3x3 convolutions (+4 x 2 x 4), layer2's strided one at stride 4 and three at 8
#: (+2 x 4 + 3 x 2 x 8), layer3's at 8 and three at 16 (+2 x 8 + 3 x 2 x 16): 211.
DENSE_RECEPTIVE_FIELD = 7 + 2 * 2 + 4 * 2 * 4 + (2 * 4 + 3 * 2 * 8) + (2 * 8 + 3 * 2 * 16)


class FeatureModel(nn.Module):
    """The query encoder of a contrastive model: reflectance to pooled features.

    The encoder is copied, so the model it came from keeps training (and its
    train/eval mode) untouched. The copy is in eval mode with gradients off.

    Args:
        model: The trained model.
        pooling: ``levels`` (the default): the globally pooled outputs of the stem
            and of the four layers, concatenated, 1024-d
            (:meth:`~revisit.learner.encoder.ResNet18Encoder.pooled_levels`);
            ``last``: layer4's alone, 512-d, the vector the projection heads see.

    Raises:
        ValueError: If ``pooling`` is neither.
    """

    output: Output = "features"

    def __init__(self, model: ContrastiveModel, *, pooling: FeaturePooling = "levels") -> None:
        super().__init__()
        if pooling not in ("levels", "last"):
            raise ValueError(f"features pooling must be 'levels' or 'last', got {pooling!r}")
        self.encoder = copy.deepcopy(model.encoder).cpu()
        self.pooling: FeaturePooling = pooling
        self.output_dim = int(
            self.encoder.levels_dim if pooling == "levels" else self.encoder.feature_dim
        )
        self.eval()
        self.requires_grad_(False)

    def forward(self, reflectance: Tensor) -> Tensor:
        """Encode chips.

        Args:
            reflectance: (N, 12, H, W) float32, DN * 1e-4.

        Returns:
            (N, :attr:`output_dim`) features.
        """
        if self.pooling == "levels":
            return self.encoder.pooled_levels(reflectance)
        out: Tensor = self.encoder(reflectance)
        return out


class EmbeddingModel(nn.Module):
    """Key encoder and key head 0, L2-normalised: the embedding the change ratio R is measured on.

    Args:
        model: The trained model; its key encoder and first key head are copied.
    """

    output: Output = "embedding"

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.key_encoder).cpu()
        head = model.key_heads[0]
        if not isinstance(head, ProjectionHead):  # nn.ModuleList is untyped
            raise TypeError(f"key head 0 is a {type(head).__name__}, not a ProjectionHead")
        self.head = copy.deepcopy(head).cpu()
        last = self.head.net[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError(f"key head 0 ends in a {type(last).__name__}, not a Linear")
        self.output_dim = int(last.out_features)
        self.eval()
        self.requires_grad_(False)

    def forward(self, reflectance: Tensor) -> Tensor:
        """Embed chips.

        Args:
            reflectance: (N, 12, H, W) float32, DN * 1e-4.

        Returns:
            (N, proj_dim) unit vectors.
        """
        return l2_normalize(self.head(self.encoder(reflectance)))


class DenseModel(nn.Module):
    """The key encoder's feature maps at four depths, for per-pixel change maps.

    The stem's convolution runs at stride 1 with the trained weights (same
    padding), so ``stem`` has a feature vector for every pixel; its even rows
    and columns are exactly the stride-2 map the network goes on with (max-pool,
    layer1, layer2, layer3). Spatial sizes: ``stem`` H x W; ``layerK`` ceil(H /
    stride) x ceil(W / stride).

    Args:
        model: The trained model; its key encoder is copied.
    """

    output: Output = "dense"

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.key_encoder).cpu()
        self.output_dim = int(self.encoder.conv1.out_channels)
        self.eval()
        self.requires_grad_(False)

    def forward(self, reflectance: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Feature maps of chips.

        Args:
            reflectance: (N, 12, H, W) float32, DN * 1e-4.

        Returns:
            ``stem`` (N, 64, H, W), ``layer1`` (N, 64, H/4, W/4), ``layer2``
            (N, 128, H/8, W/8), ``layer3`` (N, 256, H/16, W/16).
        """
        enc = self.encoder
        conv = enc.conv1
        x = enc.normalize(reflectance)
        stem = enc.relu(
            enc.bn1(nn.functional.conv2d(x, conv.weight, conv.bias, stride=1, padding=conv.padding))
        )
        x = enc.maxpool(stem[:, :, ::2, ::2])
        layer1 = enc.layer1(x)
        layer2 = enc.layer2(layer1)
        layer3 = enc.layer3(layer2)
        return stem, layer1, layer2, layer3


Exportable = FeatureModel | EmbeddingModel | DenseModel


def output_names(module: Exportable) -> list[str]:
    """The names of a module's graph outputs: its ``output``, or the dense model's four maps."""
    if isinstance(module, DenseModel):
        return [name for name, _, _ in DENSE_LAYERS]
    return [module.output]


def doc_string(module: Exportable) -> str:
    """The documentation string an exported model of ``module`` carries: its input contract."""
    return (
        f"revisit {module.output} model: input {INPUT_NAME} float32 {INPUT_LAYOUT}"
        f" (N, {len(CANONICAL_BANDS)}, H, W) = DN * {DN_SCALE!r}"
    )


def model_metadata(
    module: Exportable,
    *,
    method: str,
    step: int,
    model_version: int | None,
    patch_size: int,
    opset: int,
    version: str = "",
    checkpoint_sha256: str = "",
    created_at: datetime | None = None,
) -> dict[str, str]:
    """The metadata properties of an exported module (every key of :data:`METADATA_KEYS`).

    Args:
        module: What is exported.
        method: The learning method that trained it.
        step: The learner step of its checkpoint.
        model_version: Its ``model_version`` row id, if it has one.
        patch_size: The chip side it was trained on.
        opset: The ONNX opset it is exported with.
        version: The published version name, if any.
        checkpoint_sha256: The hash of its checkpoint file, if known.
        created_at: When it was exported; now by default.

    Returns:
        Strings by key.
    """
    is_embedding = isinstance(module, EmbeddingModel)
    is_dense = isinstance(module, DenseModel)
    normalize = module.encoder.normalize
    stamp = (created_at or datetime.now(UTC)).astimezone(UTC)
    extra: dict[str, str] = {}
    if is_dense:
        extra = {
            "dense_outputs": ",".join(f"{n}:{s}:{c}" for n, s, c in DENSE_LAYERS),
            "dense_receptive_field": str(DENSE_RECEPTIVE_FIELD),
        }
    return {
        "format": "revisit-onnx/1",
        "output": module.output,
        "output_dim": str(module.output_dim),
        "features_pooling": module.pooling if isinstance(module, FeatureModel) else "",
        "encoder": "key" if is_embedding or is_dense else "query",
        "head": "0" if is_embedding else "",
        "normalized": "l2" if is_embedding else "none",
        "input_name": INPUT_NAME,
        "input_layout": INPUT_LAYOUT,
        "input_dtype": "float32",
        "dynamic_dims": "batch,height,width",
        "min_size": str(MIN_SIZE),
        "bands": ",".join(CANONICAL_BANDS),
        "scale": repr(DN_SCALE),
        "band_mean": ",".join(repr(float(v)) for v in normalize.mean.tolist()),
        "band_std": ",".join(repr(float(v)) for v in normalize.std.tolist()),
        "patch_size": str(int(patch_size)),
        "method": method,
        "step": str(int(step)),
        "model_version": "" if model_version is None else str(int(model_version)),
        "version": version,
        "checkpoint_sha256": checkpoint_sha256,
        "created_at": stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "revisit_version": revisit.__version__,
        "opset": str(int(opset)),
        **extra,
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hush what the exporter says on every call that is no news to an operator.

    It logs a warning per torchvision operator it cannot register (revisit does
    not use torchvision) and emits deprecation warnings of torch internals.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def export_model(
    module: Exportable,
    path: Path,
    *,
    metadata: Mapping[str, str],
    opset: int = 18,
    patch_size: int = 64,
    graph_cache: Path | None = None,
) -> None:
    """Export a module to ONNX with dynamic batch and spatial sizes, checked, with its metadata.

    The export traces with ``torch.onnx.export(..., dynamo=True)`` on a batch of 2
    (a batch of 1 would be specialised), unoptimised; with ``graph_cache`` it first
    looks there for the graph of this module's architecture, and takes it with the
    module's weights filled in instead of tracing (:mod:`revisit.export.graphs`),
    or keeps the traced graph there for next time. Then the exporter's own
    optimiser (onnxscript's ``optimize_ir``) folds the BatchNorms and constants,
    ``onnx.checker`` checks the model (full check, with shape inference), and it
    is written to a temporary name that is fsynced and renamed onto ``path``.

    Args:
        module: A :class:`FeatureModel`, :class:`EmbeddingModel` or :class:`DenseModel`
            (in eval mode).
        path: Where the ``.onnx`` file goes; its directory must exist.
        metadata: String properties to store (see :func:`model_metadata`).
        opset: The ONNX opset.
        patch_size: The spatial size of the example input.
        graph_cache: A directory of exported graphs (``export.graph_cache_dir``), or
            None to trace every time.

    Raises:
        ExportError: The exporter or the checker failed, or the file could not be
            written (no file is left under ``path`` then).
    """
    module.eval()
    names = output_names(module)
    started = time.perf_counter()
    try:
        model: onnx_ir.Model | None = None
        if graph_cache is not None:
            cache_key = graphs.graph_key(module, opset=opset, output_names=names)
            model = graphs.load_graph(graph_cache, cache_key, module, output_names=names)
        traced = model is None
        if model is None:
            model = _trace(module, opset=opset, patch_size=patch_size, output_names=names)
            if graph_cache is not None:
                graphs.store_graph(graph_cache, cache_key, model)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many kinds
        raise ExportError(f"could not export {module.output} model to {path.name}: {exc}") from exc
    finish_model(model, path, metadata=metadata, doc_string=doc_string(module))
    del model
    logger.info(
        "exported %s model %s (opset %d) in %.1f s%s",
        module.output,
        path.name,
        opset,
        time.perf_counter() - started,
        "" if traced else ", its graph from the cache",
    )


def _trace(
    module: Exportable, *, opset: int, patch_size: int, output_names: list[str]
) -> onnx_ir.Model:
    """``torch.onnx.export(..., dynamo=True)`` of ``module``, unoptimised (see :mod:`.graphs`)."""
    example = torch.rand(2, len(CANONICAL_BANDS), patch_size, patch_size) * 0.3
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIZE, max=_MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIZE, max=_MAX_SIDE)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            optimize=False,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_shapes={INPUT_NAME: {0: batch, 2: height, 3: width}},
            opset_version=opset,
            verbose=False,
        )
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for the {module.output} model")
    return program.model


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata properties of an ONNX file.

    Args:
        path: The ``.onnx`` file.

    Returns:
        Strings by key (empty for a model without metadata).

    Raises:
        ExportError: The file is missing or not an ONNX model.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, OSError
        raise ExportError(f"cannot read ONNX model {path}: {exc}") from exc
    return {entry.key: entry.value for entry in proto.metadata_props}


def parity_check(
    onnx_path: Path,
    module: nn.Module,
    chips_dn: npt.NDArray[np.uint16],
    *,
    tolerance: float = 1e-4,
) -> float:
    """Compare an exported model under onnxruntime with its PyTorch module.

    Both see the same chips scaled to reflectance (``DN * 1e-4``, float32), as
    one batch; onnxruntime runs on the CPU execution provider.

    Args:
        onnx_path: The exported model.
        module: The module it was exported from (put in eval mode).
        chips_dn: (N, 12, H, W) uint16 digital numbers, N ≥ 1.
        tolerance: Largest max-abs difference allowed.

    Returns:
        The largest absolute difference between the two outputs (for outputs
        larger than 1 in magnitude, relative to the largest magnitude); for a
        model with several outputs, the largest over them.

    Raises:
        ParityError: The difference exceeds ``tolerance`` (or is not finite);
            the message names the model and gives the figure.
        ExportError: The model cannot be loaded or run.
        ValueError: ``chips_dn`` is not a 4-d uint16 array.
    """
    if chips_dn.dtype != np.uint16 or chips_dn.ndim != 4:
        raise ValueError(
            f"chips_dn must be (N, bands, H, W) uint16, got {chips_dn.dtype} {chips_dn.shape}"
        )
    reflectance = chips_dn.astype(np.float32) * np.float32(DN_SCALE)
    got_all = run_model(onnx_path, reflectance)
    return compare_outputs(
        onnx_path.name,
        got_all,
        reference_outputs(module, reflectance),
        n_chips=int(chips_dn.shape[0]),
        tolerance=tolerance,
    )


def reference_outputs(
    module: nn.Module, reflectance: npt.NDArray[np.float32]
) -> list[npt.NDArray[np.float32]]:
    """What an exported model of ``module`` must give on ``reflectance``: PyTorch's outputs.

    Args:
        module: The module (put in eval mode), on the CPU.
        reflectance: (N, 12, H, W) float32 input.

    Returns:
        Its outputs, in order.
    """
    module.eval()
    with torch.inference_mode():
        out = module(torch.from_numpy(reflectance))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
