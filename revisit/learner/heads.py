"""Projection heads, the momentum (key) encoder, and the key queues of MoCo v2 / CACo.

:class:`ContrastiveModel` bundles what one learner step needs: the query encoder
and its projection heads (trained by gradient), their momentum copies that compute
the keys (trained only by :func:`update_momentum`), one :class:`KeyQueue` per head,
and, for GASSL's ``geo-tp``, a geo-location classification head.

Everything here is pure PyTorch; the losses live in ``revisit.learner.losses``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from revisit.learner.encoder import ResNet18Encoder
from revisit.types import CANONICAL_BANDS

__all__ = [
    "ContrastiveModel",
    "KeyQueue",
    "ProjectionHead",
    "deactivate_requires_grad",
    "l2_normalize",
    "update_momentum",
    "upgrade_model_state",
]

logger = logging.getLogger(__name__)

#: The normalisation buffers a model state holds since the input standardisation.
_NORMALIZE_BUFFERS = (
    "encoder.normalize.mean",
    "encoder.normalize.std",
    "key_encoder.normalize.mean",
    "key_encoder.normalize.std",
)


def upgrade_model_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Migrate a :class:`ContrastiveModel` state saved before the input standardisation.

    Such a model was trained on raw reflectance; giving it identity statistics
    (mean 0, std 1) makes it compute exactly what it always did. A state that
    has the buffers comes back unchanged.

    Args:
        state: A model ``state_dict``.

    Returns:
        The state with every normalisation buffer present.
    """
    out = dict(state)
    missing = [name for name in _NORMALIZE_BUFFERS if name not in out]
    if not missing:
        return out
    weight = out.get("encoder.conv1.weight")
    channels = int(weight.shape[1]) if weight is not None else len(CANONICAL_BANDS)
    for name in missing:
        fill = torch.zeros if name.endswith("mean") else torch.ones
        out[name] = fill(channels)
    logger.warning(
        "migrated a model state from before the input standardisation: identity band"
        " statistics, so it computes what it did; a new model (--new-model) gets statistics"
        " of its training chips"
    )
    return out


def l2_normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """Scale vectors to unit L2 norm.

    Args:
        x: Any tensor.
        dim: The dimension holding the vectors; 1 by default, for (N, D) batches.
        eps: Lower bound on the norm, so a zero vector stays zero instead of NaN.

    Returns:
        ``x / max(||x||, eps)`` along ``dim``, same shape as ``x``.
    """
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


class ProjectionHead(nn.Module):
    """The MoCo v2 projection head: Linear, ReLU, Linear.

    MoCo v2 (Chen et al., 2020) uses a 2-layer MLP without BatchNorm; CACo and SeCo
    keep it, so this does too. BatchNorm in the head would add batch statistics to a
    momentum copy and to small online batches, for no gain in the reference results.
    The output is not normalised; the loss (or :func:`l2_normalize`) does that.

    Args:
        in_dim: Input features; 512 (ResNet-18) by default.
        hidden_dim: Width of the hidden layer; 512 by default.
        out_dim: Dimension of the projection; 128 by default.

    Raises:
        ValueError: If a dimension is not positive.
    """

    def __init__(self, *, in_dim: int = 512, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Project features.

        Args:
            x: (N, in_dim).

        Returns:
            (N, out_dim), not normalised.
        """
        out: Tensor = self.net(x)
        return out


def deactivate_requires_grad(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module`` (for a momentum copy).

    Args:
        module: The module, changed in place.
    """
    for param in module.parameters():
        param.requires_grad = False


def _check_same_structure(
    kind: str, source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> None:
    if source.keys() != target.keys():
        missing = sorted(source.keys() - target.keys())
        extra = sorted(target.keys() - source.keys())
        raise ValueError(
            f"model and model_ema have different {kind}: "
            f"missing from model_ema {missing}, not in model {extra}"
        )
    for name, tensor in source.items():
        if tensor.shape != target[name].shape:
            raise ValueError(
                f"{kind[:-1]} {name!r} has shape {tuple(tensor.shape)} in model "
                f"but {tuple(target[name].shape)} in model_ema"
            )


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """Move a momentum copy towards its model: ``ema = m * ema + (1 - m) * model``.

    Parameters are averaged; buffers (BatchNorm running statistics and counters) are
    copied from ``model``, as in MoCo, so the key encoder normalises like the query
    encoder does. Runs without gradient tracking.

    Args:
        model: The trained model (the query encoder or head).
        model_ema: Its momentum copy, changed in place.
        m: Momentum in [0, 1]; 0 copies ``model``, 1 leaves ``model_ema`` as it is.

    Raises:
        ValueError: If ``m`` is outside [0, 1], or the two modules' parameters or
            buffers differ in names or shapes. Nothing is changed then.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    params = dict(model.named_parameters())
    params_ema = dict(model_ema.named_parameters())
    buffers = dict(model.named_buffers())
    buffers_ema = dict(model_ema.named_buffers())
    _check_same_structure("parameters", params, params_ema)
    _check_same_structure("buffers", buffers, buffers_ema)
    for name, param_ema in params_ema.items():
        param_ema.mul_(m).add_(params[name].detach(), alpha=1.0 - m)
    for name, buffer_ema in buffers_ema.items():
        buffer_ema.copy_(buffers[name])


class KeyQueue(nn.Module):
    """A first-in first-out queue of L2-normalised keys, the negatives of MoCo.

    The keys and the write pointer are registered buffers, so they are saved in
    ``state_dict`` (and with it in checkpoints) and move with ``.to(device)``. The
    queue starts empty, not random: until it fills, only the filled part is
    returned by :attr:`keys`, so the first steps use in-batch negatives only.

    Args:
        size: Capacity K; 16384 by default.
        dim: Key dimension D; 128 by default.

    Raises:
        ValueError: If ``size`` or ``dim`` is not positive.
    """

    queue: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, *, size: int = 16384, dim: int = 128) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        if dim < 1:
            raise ValueError(f"key dim must be positive, got {dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("queue", torch.zeros(size, dim))
        #: Row the next key is written to.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        #: Rows that hold a key, at most ``size``.
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Append keys, overwriting the oldest once the queue is full.

        Keys are detached and L2-normalised (a no-op for keys from
        :meth:`ContrastiveModel.key`).

        Args:
            keys: (B, D) with B <= size.

        Raises:
            ValueError: If ``keys`` is not (B, D), or B > size.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of size {self.size}")
        if n == 0:
            return
        ptr = int(self.ptr)
        rows = (torch.arange(n, device=self.queue.device) + ptr) % self.size
        values = l2_normalize(keys.detach().to(device=self.queue.device, dtype=self.queue.dtype))
        self.queue.index_copy_(0, rows, values)
        self.ptr.fill_((ptr + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    @property
    def keys(self) -> Tensor:
        """The stored keys, oldest first: (n, D) with n = ``len(self)`` <= size.

        A view while the queue has not wrapped, otherwise a reordered copy. Either
        way it must not be modified; it carries no gradient.
        """
        n = int(self.count)
        if n < self.size:
            return self.queue[:n]
        return torch.roll(self.queue, shifts=-int(self.ptr), dims=0)

    def __len__(self) -> int:
        """Number of keys stored, at most ``size``."""
        return int(self.count)

    def extra_repr(self) -> str:
        """Size and dimension, for ``repr``."""
        return f"size={self.size}, dim={self.dim}"


class ContrastiveModel(nn.Module):
    """Query encoder and heads, their momentum copies, and one key queue per head.

    Heads: 1 for ``moco``, ``tp``, ``geo-tp``, ``teco`` and ``caco``; 3 for ``seco``
    (invariant, season-variant, augmentation-variant). **Head 0 is the one whose
    key embeddings define the change ratio R** (for ``seco`` that is the invariant
    head).

    The key encoder and key heads are deep copies made at construction, with
    ``requires_grad`` off; :meth:`momentum_update` moves them towards the query side.
    Their BatchNorm layers run in whatever mode the model is in (``train()`` uses
    batch statistics, as MoCo's key encoder does; ``learner.bn_splits`` groups them
    as MoCo's shuffle-BN does, see :func:`revisit.learner.trainer.key_groups`).

    Args:
        n_heads: Number of projection heads; 1 by default.
        queue_size: Keys per queue, K; 16384 by default.
        proj_dim: Projection dimension D; 128 by default.
        momentum: Momentum m of the key side; 0.999 by default.
        geo_classes: Number of geo-location clusters for GASSL's ``geo-tp``
            (a Linear ``proj_dim -> geo_classes`` on the head-0 query projection);
            None (no geo head) by default.
        in_channels: Input bands; 12 by default.

    Raises:
        ValueError: If ``n_heads`` or ``geo_classes`` is not positive, or
            ``momentum`` is outside [0, 1].
    """

    def __init__(
        self,
        *,
        n_heads: int = 1,
        queue_size: int = 16384,
        proj_dim: int = 128,
        momentum: float = 0.999,
        geo_classes: int | None = None,
        in_channels: int = len(CANONICAL_BANDS),
    ) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be positive, got {n_heads}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if geo_classes is not None and geo_classes < 1:
            raise ValueError(f"geo_classes must be positive or None, got {geo_classes}")
        self.n_heads = n_heads
        self.momentum = momentum
        self.encoder = ResNet18Encoder(in_channels=in_channels)
        feature_dim = self.encoder.feature_dim
        self.heads = nn.ModuleList(
            ProjectionHead(in_dim=feature_dim, hidden_dim=feature_dim, out_dim=proj_dim)
            for _ in range(n_heads)
        )
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_heads = copy.deepcopy(self.heads)
        deactivate_requires_grad(self.key_encoder)
        deactivate_requires_grad(self.key_heads)
        self.queues = nn.ModuleList(KeyQueue(size=queue_size, dim=proj_dim) for _ in range(n_heads))
        self.geo_head: nn.Linear | None = (
            nn.Linear(proj_dim, geo_classes) if geo_classes is not None else None
        )

    def features(self, x: Tensor) -> Tensor:
        """512-d features of the query encoder.

        Args:
            x: (N, C, H, W) reflectance.

        Returns:
            (N, 512).
        """
        out: Tensor = self.encoder(x)
        return out

    def query(self, x: Tensor) -> list[Tensor]:
        """Per-head projections of the query side, with gradient, not normalised.

        Args:
            x: (N, C, H, W) reflectance.

        Returns:
            ``n_heads`` tensors of shape (N, proj_dim); index 0 is head 0.
        """
        h = self.encoder(x)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def key(self, x: Tensor) -> list[Tensor]:
        """Per-head keys from the momentum side, without gradient, L2-normalised.

        Args:
            x: (N, C, H, W) reflectance.

        Returns:
            ``n_heads`` tensors of shape (N, proj_dim) with unit rows.
        """
        h = self.key_encoder(x)
        return [l2_normalize(head(h)) for head in self.key_heads]

    @torch.no_grad()
    def key_with_maps(self, x: Tensor, depth: int) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`key`, and the key encoder's input and shallowest feature maps from one pass.

        Args:
            x: (N, C, H, W) reflectance.
            depth: How many of the encoder's levels (see
                :meth:`ResNet18Encoder.level_maps`).

        Returns:
            The keys, as :meth:`key`, and ``depth + 1`` maps: the standardised input
            (the encoder's :class:`BandNormalize` of ``x``), then the ``depth``
            shallowest levels.
        """
        encoder = self.key_encoder
        maps = encoder.level_maps(x)
        h = maps[-1].mean(dim=(2, 3))
        return [l2_normalize(head(h)) for head in self.key_heads], [
            encoder.normalize(x),
            *maps[:depth],
        ]

    def geo_logits(self, projection: Tensor) -> Tensor:
        """Geo-cluster logits for ``geo-tp``, from a query projection of head 0.

        Args:
            projection: (N, proj_dim), e.g. ``self.query(x)[0]``.

        Returns:
            (N, geo_classes) logits for cross-entropy.

        Raises:
            ValueError: If the model has no geo head.
        """
        if self.geo_head is None:
            raise ValueError("this ContrastiveModel has no geo head (geo_classes=None)")
        out: Tensor = self.geo_head(projection)
        return out

    def set_band_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the input standardisation of the query and the key encoder alike.

        Args:
            mean: Per-band mean of reflectance (DN / 10000), canonical band order.
            std: Per-band standard deviation.

        Raises:
            ValueError: As :meth:`BandNormalize.set_statistics`.
        """
        self.encoder.normalize.set_statistics(mean, std)
        self.key_encoder.normalize.set_statistics(mean, std)

    def momentum_update(self, m: float | None = None) -> None:
        """Move the key encoder and key heads towards the query side.

        Args:
            m: Momentum for this update; None (the default) uses ``self.momentum``.

        Raises:
            ValueError: If ``m`` is outside [0, 1].
        """
        m = self.momentum if m is None else m
        update_momentum(self.encoder, self.key_encoder, m)
        for head, key_head in zip(self.heads, self.key_heads, strict=True):
            update_momentum(head, key_head, m)
