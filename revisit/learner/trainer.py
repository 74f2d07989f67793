"""One training step of each method, and the change measurement that rides on it.

:class:`Trainer` owns the model (query and key encoders, heads, queues), the
optimiser and the loss; :meth:`Trainer.train_step` takes a prepared
:class:`~revisit.learner.loader.TrainBatch` and returns the loss and, for every
row with a long-term image, the change ratio R (DESIGN §4):

    R = ‖f(q) - f(k_lt)‖ / (‖f(q) - f(k+)‖ + 1e-4)

with f the key encoder's L2-normalised head-0 embedding of the images *before*
augmentation, measured before the step's momentum update.

The methods (each a row of the comparison table):

- ``caco``: q = aug(x_t0), positive k+ = x_t1; negatives: the queue, the other
  rows' k+ and k_lt, and the row's own k_lt only when its location is changed.
- ``teco``: as ``caco`` with the own k_lt always a negative.
- ``tp`` (GASSL temporal positives): as ``caco`` with no long-term keys at all.
- ``geo-tp``: ``tp`` plus cross-entropy of the query projection's geo cluster (weight 1).
- ``moco``: two views of one image: q = aug(x_t0), positive k+ = x_t0.
- ``seco``: three heads (invariant, season-variant, augmentation-variant) on
  SeCo's views; R on the invariant head.

The key side sees un-augmented images (k+ of a location without a second date is
a second augmented view of q), resized to the training crop size; the query side
sees the augmented view, a random crop of that size.

The recipe for a CPU budget (DESIGN §4): crops smaller than the chip
(``learner.crop_size``, 32 px by default: a quarter of the 64 px chip's FLOPs per
view), channels-last convolutions, a linear learning-rate warm-up followed by a
cosine decay (:func:`learning_rate`, a pure function of the step, so a resumed
learner takes the rate the uninterrupted one would have). ``learner.device``
selects the CPU or a CUDA device; on CUDA the forward passes run under bf16
autocast and batches travel through pinned memory. ``learner.bn_splits`` is
MoCo's shuffle-BN on one process (:func:`key_groups`). Checkpoints hold CPU tensors
whatever the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from revisit.config import LearnerMethod, LearnerSettings
from revisit.learner.augment import Augment, policy_augment
from revisit.learner.change import (
    DEFAULT_DENSE_DEPTH,
    DEFAULT_EPS,
    change_ratio,
    dense_distance,
)
from revisit.learner.distributed import Distributed
from revisit.learner.encoder import batchnorm_segments
from revisit.learner.heads import ContrastiveModel, KeyQueue, l2_normalize, upgrade_model_state
from revisit.learner.loader import TrainBatch
from revisit.learner.losses import (
    CACoMode,
    SeCoViews,
    caco_loss,
    geo_classification_loss,
    seco_loss,
)

Method = LearnerMethod
METHODS: tuple[str, ...] = get_args(Method)

logger = logging.getLogger(__name__)

_CACO_MODE: dict[str, CACoMode] = {
    "caco": "caco",
    "teco": "teco",
    "tp": "tp",
    "geo-tp": "tp",
    "moco": "moco",
}


@dataclass(frozen=True)
class StepResult:
    """What one step produced.

    Attributes:
        loss: The step's loss.
        ratio: (B,) R per row; NaN where the row has no long-term image.
        long_dist: (B,) d(q, k_lt) (NaN without a long-term image), d as
            ``learner.change_distance`` says: :func:`~revisit.learner.change.dense_distance`
            of the standardised input and the key encoder's shallow maps, or ‖f(q) - f(k_lt)‖
            of the head-0 keys.
        short_dist: (B,) d(q, k+).
    """

    loss: float
    ratio: npt.NDArray[np.float64]
    long_dist: npt.NDArray[np.float64]
    short_dist: npt.NDArray[np.float64]


def effective_lr(settings: LearnerSettings, world_size: int = 1) -> float:
    """The base rate: ``lr`` is for a batch of 256, scaled linearly with the batch (Goyal et al.).

    The batch is the global one: ``batch_size`` rows on each of ``world_size``
    processes (:mod:`revisit.learner.distributed`).

    MoCo's 0.03 is a rate for 256 images; the same rate on the small batches of an
    online CPU learner makes the encoder collapse (every embedding alike, the
    loss stuck at log of the number of keys) within a few dozen steps.
    """
    return settings.lr * settings.batch_size * world_size / 256


def optimizer_hyperparameters(settings: LearnerSettings) -> dict[str, Any]:
    """The optimiser's settings other than its rate (which :func:`learning_rate` sets each step)."""
    if settings.optimizer == "adamw":
        return {"weight_decay": settings.weight_decay}
    return {"momentum": settings.sgd_momentum, "weight_decay": settings.weight_decay}


def make_optimizer(
    params: list[nn.Parameter], settings: LearnerSettings, *, world_size: int = 1
) -> torch.optim.Optimizer:
    """``learner.optimizer``: SGD with momentum (MoCo v1/v2) or AdamW (MoCo v3).

    Both take ``lr`` for a batch of 256, scaled linearly (:func:`effective_lr`;
    MoCo v3 scales AdamW's rate the same way). SGD's step is proportional to the
    gradient, which is small in the deep layers of a freshly initialised
    ResNet behind batch norm: in a run of a thousand steps their weights move by
    3 to 11 % of their norm (median per stage) and the encoder stays close to its
    initialisation.
    AdamW's step is normalised per parameter, so every layer moves (37 to 86 % in
    the same budget; docs/probes.md).
    """
    lr = effective_lr(settings, world_size)
    hyper = optimizer_hyperparameters(settings)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, **hyper)
    return torch.optim.SGD(params, lr=lr, **hyper)


def optimizer_kind(state: dict[str, Any]) -> str:
    """Which optimiser an optimiser state dict is of: ``adamw`` (it has betas) or ``sgd``."""
    groups = state.get("param_groups") or [{}]
    return "adamw" if "betas" in groups[0] else "sgd"


def learning_rate(settings: LearnerSettings, step: int, world_size: int = 1) -> float:
    """The rate of a step: linear warm-up, then cosine decay to a floor (or constant).

    Step 1 .. ``lr_warmup_steps`` ramp linearly up to :func:`effective_lr`; with the
    ``cosine`` schedule the rate then falls along half a cosine to
    ``lr_min_ratio`` of it at step ``lr_horizon_steps`` and stays there (an online
    learner keeps going past any horizon).

    Args:
        settings: The learner settings.
        step: The model's step about to be taken (1-based: the learner's step less
            :attr:`Trainer.start_step`).
        world_size: Processes training the model (the global batch).

    Returns:
        The rate.
    """
    base = effective_lr(settings, world_size)
    warmup = settings.lr_warmup_steps
    if warmup > 0 and step <= warmup:
        return base * step / warmup
    if settings.lr_schedule == "constant":
        return base
    span = max(settings.lr_horizon_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = settings.lr_min_ratio
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def learner_augment(settings: LearnerSettings) -> Augment:
    """The augmentation the learner trains with: its policy at its crop size."""
    return policy_augment(
        settings.augment,
        size=settings.crop_size or None,
        crop_scale=settings.crop_scale,
    )


def resolve_device(setting: str) -> torch.device:
    """The torch device of ``learner.device``.

    Raises:
        ValueError: ``cuda`` is asked for but PyTorch sees no CUDA device.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("learner.device is cuda, but PyTorch sees no CUDA device")
    return torch.device(setting)


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def query_segments(n: int, splits: int) -> list[int]:
    """Row counts of the ``splits`` contiguous chunks (as :meth:`torch.Tensor.tensor_split`
    cuts them) in which the query side normalises a batch of ``n``."""
    return [len(c) for c in torch.arange(n).tensor_split(splits)]


def query_groups(n: int, splits: int) -> Tensor:
    """The batch-norm group of each of ``n`` query rows: its chunk of :func:`query_segments`."""
    return torch.repeat_interleave(torch.arange(splits), torch.tensor(query_segments(n, splits)))


def key_groups(n: int, splits: int, generator: torch.Generator) -> Tensor:
    """The batch-norm group of each location's key rows: always another than its query's.

    MoCo's shuffle-BN on one process (He et al., 2020, §3.3). Batch statistics shared
    by a query and its positive key let the pair find each other through them, and
    the loss then falls without the features learning anything (the "cheating" MoCo
    names). MoCo breaks the link by normalising the keys on other GPUs than their
    queries; here the query batch is normalised in ``splits`` chunks and the members
    of each chunk are dealt, in a random order, evenly over the *other* groups, so no
    key is normalised with its own query's group. A location's key rows (q, k+ and
    k_lt alike) share one group, so R's distances compare maps normalised alike.

    Args:
        n: Locations (query rows) in the batch.
        splits: Groups, at least 2 and at most ``n``.
        generator: Source of the random order.

    Returns:
        (n,) int64 group indices in ``[0, splits)``.
    """
    if not 2 <= splits <= n:
        raise ValueError(f"splits must be in [2, {n}], got {splits}")
    own = query_groups(n, splits)
    groups = torch.empty(n, dtype=torch.int64)
    for g in range(splits):
        members = torch.nonzero(own == g).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        offsets = torch.arange(len(members)) % (splits - 1) + 1
        groups[members] = (g + offsets) % splits
    return groups


def step_key_groups(settings: LearnerSettings, step: int, n: int) -> Tensor | None:
    """The key groups (:func:`key_groups`) of a step's ``n`` locations; None for one group.

    ``min(bn_splits, n)`` groups in an order drawn from the seed and the step, so a
    resumed learner draws what the uninterrupted one would have.
    """
    splits = min(settings.bn_splits, n)
    if splits < 2:
        return None
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    return key_groups(n, splits, generator)


def segmented_pass(
    fn: Callable[[Tensor], tuple[list[Tensor], list[Tensor]]],
    x: Tensor,
    row_groups: Tensor,
    module: nn.Module,
) -> tuple[list[Tensor], list[Tensor]]:
    """``fn`` on ``x`` with ``module``'s batch norms normalising each group on its own statistics.

    The rows are sorted by group (stably), so each group is a consecutive segment of
    one pass (:func:`~revisit.learner.encoder.batchnorm_segments`), and every output
    is put back in ``x``'s row order.

    Args:
        fn: A batch function returning two lists of (N, ...) tensors (keys, maps).
        x: (N, ...) input rows.
        row_groups: (N,) the group of each row (on the CPU).
        module: The network ``fn`` runs (its :class:`GroupedBatchNorm2d` layers).

    Returns:
        ``fn(x)``'s lists, each tensor's rows in ``x``'s order.
    """
    if x.shape[0] == 0:
        raise ValueError("segmented_pass needs at least one row")
    order = torch.argsort(row_groups, stable=True)
    counts = torch.bincount(row_groups)
    segments = counts[counts > 0].tolist()
    inverse = torch.argsort(order).to(x.device)
    sorted_x = x[order.to(x.device)].contiguous(memory_format=_memory_format(x))
    with batchnorm_segments(module, segments):
        keys, maps = fn(sorted_x)
    return [t[inverse] for t in keys], [t[inverse] for t in maps]


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _QuerySide(nn.Module):
    """The query encoder, its heads and the geo head: what DDP wraps and averages.

    The key side is no part of it: it has no gradient (a momentum copy), and its
    batch-norm statistics are averaged by :meth:`Distributed.average_batchnorm_`.
    """

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.heads = model.heads
        self.geo_head = model.geo_head

    def forward(self, x: Tensor, splits: int = 1) -> tuple[list[Tensor], Tensor | None]:
        with batchnorm_segments(self.encoder, query_segments(x.shape[0], splits)):
            h = self.encoder(x)
        out = [head(h) for head in self.heads]
        geo = None if self.geo_head is None else self.geo_head(l2_normalize(out[0]))
        return out, geo


class Trainer:
    """Model, optimiser and the step of one method.

    Args:
        settings: The learner settings (method, sizes, optimiser, device).
        seed: Seed of the initial weights.
        dist: This process's place among the learner's processes; one process
            when None. With more than one, the query side is wrapped in
            :class:`~torch.nn.parallel.DistributedDataParallel` on the rank's device
            (see :mod:`revisit.learner.distributed`).

    Raises:
        ValueError: For an unknown method, or a CUDA device PyTorch does not see.
    """

    def __init__(
        self,
        settings: LearnerSettings,
        *,
        seed: int | None = None,
        dist: Distributed | None = None,
    ) -> None:
        if settings.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {settings.method!r}")
        self.settings = settings
        self.method: str = settings.method
        with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
            torch.manual_seed(settings.seed if seed is None else seed)
            self.model = ContrastiveModel(
                n_heads=3 if self.method == "seco" else 1,
                queue_size=settings.queue_size,
                proj_dim=settings.proj_dim,
                momentum=settings.momentum,
                geo_classes=settings.geo_clusters if self.method == "geo-tp" else None,
            )
        self.dist = dist or Distributed.single(resolve_device(settings.device))
        self.device = self.dist.device
        self.memory_format = (
            torch.channels_last if settings.channels_last else torch.contiguous_format
        )
        self.model.to(self.device)
        self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.model.train()
        self._query_side: nn.Module = _QuerySide(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Built from rank 0's weights (DDP broadcasts them), so every rank starts
            # alike; buffers are not broadcast at each forward: their running
            # statistics are averaged after each step instead.
            self._query_side = DistributedDataParallel(
                self._query_side,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        #: The learner step before this model's first: its schedule counts from there
        #: (a ``--new-model`` goes on with the database's step counter).
        self.start_step = 0
        self.optimizer = make_optimizer(
            [p for p in self.model.parameters() if p.requires_grad],
            settings,
            world_size=self.dist.world_size,
        )

    def state_dict(self) -> dict[str, Any]:
        """Model (both encoders, heads, queues) and optimiser state, as CPU tensors."""
        state: dict[str, Any] = _to_cpu(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        )
        state["start_step"] = self.start_step
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave, onto this trainer's device.

        A model state from before the input standardisation is migrated with
        identity statistics (:func:`~revisit.learner.heads.upgrade_model_state`).
        """
        self.model.load_state_dict(upgrade_model_state(state["model"]))
        saved = optimizer_kind(state["optimizer"])
        if saved == self.settings.optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            # load_state_dict brings back the saved hyperparameters too: the settings win.
            for group in self.optimizer.param_groups:
                group.update(optimizer_hyperparameters(self.settings))
        else:
            logger.warning(
                "the checkpoint's optimiser is %s, the settings' %s: the weights are kept and"
                " the %s state starts afresh",
                saved,
                self.settings.optimizer,
                self.settings.optimizer,
            )
        self.start_step = int(state.get("start_step", 0))

    def set_band_statistics(self, mean: list[float], std: list[float]) -> None:
        """Freeze the input standardisation of both encoders (see :func:`band_statistics`)."""
        self.model.set_band_statistics(mean, std)

    def _to_device(self, x: Tensor) -> Tensor:
        if self.device.type != "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)

    def _key_view(self, x: Tensor) -> Tensor:
        """Un-augmented images at the training crop size (the whole chip, resized)."""
        size = self.settings.crop_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return self._to_device(x)

    def _key_pass(
        self,
        fn: Callable[[Tensor], tuple[list[Tensor], list[Tensor]]],
        x: Tensor,
        locations: Tensor,
        groups: Tensor | None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``fn`` on the key rows ``x``, whose ``locations`` index the batch's rows.

        With ``groups`` (each location's key group, :func:`key_groups`) the batch norms
        normalise each group on its own statistics (:func:`segmented_pass`); without,
        over all rows.
        """
        if groups is None:
            return fn(x)
        return segmented_pass(fn, x, groups[locations], self.model.key_encoder)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )

    def _queue(self, head: int) -> KeyQueue:
        queue = self.model.queues[head]
        if not isinstance(queue, KeyQueue):  # nn.ModuleList is untyped
            raise TypeError(f"queue {head} is a {type(queue).__name__}")
        return queue

    def _queue_keys(self, head: int) -> Tensor:
        return self._queue(head).keys

    def train_step(self, batch: TrainBatch, *, changed: npt.NDArray[np.bool_]) -> StepResult:
        """One optimiser step on a batch.

        Args:
            batch: The prepared batch.
            changed: (B,) whether each row's location is classified as changed
                (all False during warm-up). Only ``caco`` reads it.

        Returns:
            The loss and the rows' change measurements.
        """
        model = self.model
        n = batch.x_query.shape[0]
        valid = batch.longterm_valid
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(
                self.settings, batch.step - self.start_step, self.dist.world_size
            )
        # Batch-norm groups (shuffle-BN, key_groups): None is one group for each side.
        splits = min(self.settings.bn_splits, n)
        groups = step_key_groups(self.settings, batch.step, n)
        locations = torch.arange(n)
        # Key side on the un-augmented images: R's embeddings and the keys of the loss.
        keyed = self._key_view(
            torch.cat([batch.x_query, batch.x_positive, batch.x_longterm[valid]], dim=0)
        )
        dense = self.settings.change_distance == "dense"

        def keys_and_maps(x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
            if dense:
                return model.key_with_maps(x, DEFAULT_DENSE_DEPTH)
            return model.key(x), []

        with self._autocast():
            key_list, maps = self._key_pass(
                keys_and_maps,
                keyed,
                torch.cat([locations, locations, torch.nonzero(valid).flatten()]),
                groups,
            )
            keys = [k.float() for k in key_list]
        f_query, f_positive = keys[0][:n], keys[0][n : 2 * n]
        f_longterm = torch.zeros_like(f_query)
        f_longterm[valid.to(self.device)] = keys[0][2 * n :]

        if self.method == "seco":
            assert_views = batch.seco_views
            if assert_views is None:
                raise ValueError("a seco batch needs its SeCo views")
            k0, k1, k2 = assert_views
            with self._autocast():
                seco_key_list, _ = self._key_pass(
                    lambda x: (model.key(x), []),
                    self._key_view(torch.cat([k0, k1, k2], dim=0)),
                    locations.repeat(3),
                    groups,
                )
                seco_keys = [k.float() for k in seco_key_list]
                projected, _ = self._query_side(self._to_device(batch.query_view), splits)
                queries = [q.float() for q in projected]
            # Per head (k0, k1, k2) of every rank: the other ranks' rows are in-batch
            # negatives here as they would be in one process with the global batch.
            local = [[keys_h[:n], keys_h[n : 2 * n], keys_h[2 * n :]] for keys_h in seco_keys]
            ranks = self.dist.gather_blocks([block for head in local for block in head])
            remote = [blocks for r, blocks in enumerate(ranks) if r != self.dist.rank]
            # Negatives beyond the queue: none (invariant), k0 and k1 (season-variant),
            # k0 and k2 (augmentation-variant), of every row (seco_loss).
            extra_blocks = ((), (0, 1), (0, 2))
            views = [
                SeCoViews(
                    query=queries[h],
                    season_aug=local[h][0],
                    season=local[h][1],
                    aug=local[h][2],
                    queue=torch.cat(
                        [
                            self._queue_keys(h),
                            *(blocks[3 * h + b] for blocks in remote for b in extra_blocks[h]),
                        ],
                        dim=0,
                    ),
                )
                for h in range(3)
            ]
            loss = seco_loss(*views, temperature=self.settings.temperature)
            # Each head's queue holds its past positives: k0, k2, k1 (see seco_loss),
            # every rank's in rank order.
            enqueue = [
                torch.cat([blocks[3 * h + b] for blocks in ranks], dim=0)
                for h, b in ((0, 0), (1, 2), (2, 1))
            ]
        else:
            with self._autocast():
                projections, geo_logits = self._query_side(
                    self._to_device(batch.query_view), splits
                )
                query = projections[0].float()
            positive = f_query if self.method == "moco" else f_positive
            mode = _CACO_MODE[self.method]
            # The other ranks' k+ (and, where the mode uses them, their valid k_lt) are
            # negatives of every row here, as in one process with the global batch:
            # added to the queue's keys, which are negatives of every row.
            with_longterm = mode in ("caco", "teco")
            ranks = self.dist.gather_blocks(
                [positive, keys[0][2 * n :]] if with_longterm else [positive]
            )
            remote_keys = [
                block for r, blocks in enumerate(ranks) if r != self.dist.rank for block in blocks
            ]
            loss = caco_loss(
                query,
                positive,
                f_longterm,
                torch.cat([self._queue_keys(0), *remote_keys], dim=0),
                changed=torch.from_numpy(np.asarray(changed, dtype=bool)).to(self.device),
                longterm_valid=valid.to(self.device),
                temperature=self.settings.temperature,
                mode=mode,
            )
            if self.method == "geo-tp":
                if batch.cluster_id is None or geo_logits is None:
                    raise ValueError("a geo-tp batch needs cluster ids and a geo head")
                loss = loss + geo_classification_loss(
                    geo_logits.float(), batch.cluster_id.to(self.device)
                )
            enqueue = [torch.cat([blocks[0] for blocks in ranks], dim=0)]

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        model.momentum_update()
        self.dist.average_batchnorm_(model)
        for head, k in enumerate(enqueue):
            self._queue(head).enqueue(k)

        valid_np = valid.numpy()
        nan = np.full(n, np.nan)
        if dense:
            # R's distances from the key pass's input and shallow maps (change.dense_distance):
            # rows [0, n) are q, [n, 2n) k+, [2n, ...) the valid rows' k_lt.
            short = dense_distance([m[:n] for m in maps], [m[n : 2 * n] for m in maps])
            long = np.full(n, np.nan)
            if valid_np.any():
                long[valid_np] = dense_distance(
                    [m[:n][valid.to(m.device)] for m in maps], [m[2 * n :] for m in maps]
                )
            return StepResult(
                loss=float(loss.detach()),
                ratio=long / (short + DEFAULT_EPS),
                long_dist=long,
                short_dist=short,
            )
        ratio = change_ratio(
            f_query.cpu().numpy(), f_positive.cpu().numpy(), f_longterm.cpu().numpy()
        )
        return StepResult(
            loss=float(loss.detach()),
            ratio=np.where(valid_np, ratio.ratio, nan),
            long_dist=np.where(valid_np, ratio.long_dist, nan),
            short_dist=np.asarray(ratio.short_dist, dtype=np.float64),
        )
