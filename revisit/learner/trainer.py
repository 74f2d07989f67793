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
a second augmented view of q); the query side sees the augmented view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from revisit.config import LearnerSettings
from revisit.learner.augment import Augment
from revisit.learner.change import change_ratio
from revisit.learner.heads import ContrastiveModel, KeyQueue, l2_normalize
from revisit.learner.loader import TrainBatch
from revisit.learner.losses import (
    CACoMode,
    SeCoViews,
    caco_loss,
    geo_classification_loss,
    seco_loss,
)

Method = Literal["moco", "tp", "geo-tp", "seco", "teco", "caco"]
METHODS: tuple[str, ...] = get_args(Method)

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
        long_dist: (B,) ‖f(q) - f(k_lt)‖ (NaN without a long-term image).
        short_dist: (B,) ‖f(q) - f(k+)‖.
    """

    loss: float
    ratio: npt.NDArray[np.float64]
    long_dist: npt.NDArray[np.float64]
    short_dist: npt.NDArray[np.float64]


def effective_lr(settings: LearnerSettings) -> float:
    """The SGD rate: ``lr`` is for a batch of 256 and scales linearly with the batch (Goyal et al.).

    MoCo's 0.03 is a rate for 256 images; the same rate on the small batches of an
    online CPU learner makes the encoder collapse (every embedding alike, the
    loss stuck at log of the number of keys) within a few dozen steps.
    """
    return settings.lr * settings.batch_size / 256


def default_augment() -> Augment:
    """The augmentation the learner trains with (valid for all 12 bands)."""
    return Augment(crop_scale=(0.4, 1.0))


class Trainer:
    """Model, optimiser and the step of one method.

    Args:
        settings: The learner settings (method, sizes, optimiser).
        seed: Seed of the initial weights.
    """

    def __init__(self, settings: LearnerSettings, *, seed: int | None = None) -> None:
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
        self.model.train()
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=effective_lr(settings),
            momentum=settings.sgd_momentum,
            weight_decay=settings.weight_decay,
        )

    def state_dict(self) -> dict[str, Any]:
        """Model (both encoders, heads, queues) and optimiser state."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

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
        # Key side on the un-augmented images: R's embeddings and the keys of the loss.
        keyed = torch.cat([batch.x_query, batch.x_positive, batch.x_longterm[valid]], dim=0)
        keys = model.key(keyed)
        f_query, f_positive = keys[0][:n], keys[0][n : 2 * n]
        f_longterm = torch.zeros_like(f_query)
        f_longterm[valid] = keys[0][2 * n :]

        if self.method == "seco":
            assert_views = batch.seco_views
            if assert_views is None:
                raise ValueError("a seco batch needs its SeCo views")
            k0, k1, k2 = assert_views
            seco_keys = model.key(torch.cat([k0, k1, k2], dim=0))
            queries = model.query(batch.query_view)
            views = [
                SeCoViews(
                    query=queries[h],
                    season_aug=seco_keys[h][:n],
                    season=seco_keys[h][n : 2 * n],
                    aug=seco_keys[h][2 * n :],
                    queue=self._queue_keys(h),
                )
                for h in range(3)
            ]
            loss = seco_loss(*views, temperature=self.settings.temperature)
            # Each head's queue holds its past positives: k0, k2, k1 (see seco_loss).
            enqueue = [seco_keys[0][:n], seco_keys[1][2 * n :], seco_keys[2][n : 2 * n]]
        else:
            query = model.query(batch.query_view)[0]
            positive = f_query if self.method == "moco" else f_positive
            loss = caco_loss(
                query,
                positive,
                f_longterm,
                self._queue_keys(0),
                changed=torch.from_numpy(np.asarray(changed, dtype=bool)),
                longterm_valid=valid,
                temperature=self.settings.temperature,
                mode=_CACO_MODE[self.method],
            )
            if self.method == "geo-tp":
                if batch.cluster_id is None:
                    raise ValueError("a geo-tp batch needs cluster ids")
                loss = loss + geo_classification_loss(
                    model.geo_logits(l2_normalize(query)), batch.cluster_id
                )
            enqueue = [positive]

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        model.momentum_update()
        for head, k in enumerate(enqueue):
            self._queue(head).enqueue(k)

        ratio = change_ratio(f_query.numpy(), f_positive.numpy(), f_longterm.numpy())
        valid_np = valid.numpy()
        nan = np.full(n, np.nan)
        return StepResult(
            loss=float(loss.detach()),
            ratio=np.where(valid_np, ratio.ratio, nan),
            long_dist=np.where(valid_np, ratio.long_dist, nan),
            short_dist=np.asarray(ratio.short_dist, dtype=np.float64),
        )
