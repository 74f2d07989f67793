"""From mined tuples to training tensors, read on a thread ahead of the step.

:func:`read_batch` reads a tuple batch's chips from the chip store (each
checked against its hash, and kept in a :class:`ChipCache`);
:func:`assemble_batch` scales them and builds the views the method needs.
:class:`BatchLoader` runs mining and reading for the coming steps on a
background thread, ``prefetch`` batches ahead, so database and file reads
overlap the forward and backward passes instead of adding to them. The tensor
work (scaling, augmentation) runs in the training thread when it takes the
batch: torch operations on a second thread would share, and oversubscribe,
the intra-op thread pool the step itself runs on.

Every step's randomness comes from ``(seed, step)`` alone, not from a stream
shared across steps, so a batch prepared ahead and thrown away at shutdown
costs nothing and a resumed learner draws what the uninterrupted one would
have drawn (given the same observations).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from revisit.db.learning import ObservationTable
from revisit.errors import ChipStoreError, LearnerError
from revisit.ingest.chips import ChipStore
from revisit.learner.augment import Augment, Rows
from revisit.learner.encoder import scale_dn
from revisit.learner.mining import MiningPolicy, ObservationIndex, TupleBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainBatch:
    """Everything one training step needs, as tensors (reflectance = DN / 10000).

    Attributes:
        step: The step this batch is for.
        tuples: The observation ids behind the rows.
        x_query: (B, C, H, W) q at t0, not augmented (R is measured on it).
        x_positive: (B, C, H, W) k+ at t1, not augmented; where the location had
            no k+ candidate, a second augmented view of q.
        x_longterm: (B, C, H, W) k_lt, not augmented; zeros where ``longterm_valid`` is False.
        longterm_valid: (B,) bool.
        query_view: (B, C, H, W) the augmented q the query encoder sees.
        seco_views: For ``seco`` only: (k0, k1, k2) = (aug'(x_t1), aug_q(x_t2), aug''(x_t0)),
            with x_t2 the long-term image where there is one, else x_t1, and aug_q
            the query's own augmentation.
        cluster_id: (B,) geo cluster of each location, for ``geo-tp``; None otherwise.
    """

    step: int
    tuples: TupleBatch
    x_query: Tensor
    x_positive: Tensor
    x_longterm: Tensor
    longterm_valid: Tensor
    query_view: Tensor
    seco_views: tuple[Tensor, Tensor, Tensor] | None
    cluster_id: Tensor | None


@dataclass(frozen=True)
class RawBatch:
    """A batch's chips as read, before any tensor work: (B, C, H, W) uint16 DN each.

    Attributes:
        rows: Position of each row in the step's global batch (the batch mined for
            every rank), and its size; None: the batch is the global batch.
    """

    step: int
    tuples: TupleBatch
    query: np.ndarray
    positive: np.ndarray
    longterm: np.ndarray
    rows: Rows | None = None


def step_seeds(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one step, functions of (seed, step) only.

    Every rank of a distributed learner has the same: each mines the one global
    batch with the numpy generator and augments its share of it with the torch
    generator as rows of the global batch (:class:`~revisit.learner.augment.Rows`).
    """
    sequence = np.random.SeedSequence([seed, step])
    rng = np.random.default_rng(sequence)
    gen = torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))
    return rng, gen


class ChipCache:
    """Chips already read and checked, kept in memory up to a byte budget (least recently used out).

    Replay draws the same locations again and again; reading a chip file,
    hashing it and parsing it costs about as much per chip as a tenth of a
    training step's share, on the same cores the step runs on.

    Args:
        max_bytes: The budget; 0 disables the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._chips: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, store: ChipStore, key: str, sha256: str) -> np.ndarray:
        """The chip of ``key``, read (and checked against ``sha256``) only on a miss.

        Raises:
            ChipStoreError: As :meth:`ChipStore.get`.
        """
        chip = self._chips.get(sha256)
        if chip is not None:
            self._chips.move_to_end(sha256)
            self.hits += 1
            return chip
        self.misses += 1
        chip = store.get(key, sha256)
        if self.max_bytes > 0 and chip.nbytes <= self.max_bytes:
            chip.setflags(write=False)
            self._chips[sha256] = chip
            self.bytes += chip.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._chips.popitem(last=False)
                self.bytes -= dropped.nbytes
        return chip


def _read(
    store: ChipStore, index: ObservationIndex, ids: list[int], cache: ChipCache | None
) -> dict[int, np.ndarray]:
    """Chips of the observations that read and pass their hash; the others are logged."""
    out: dict[int, np.ndarray] = {}
    for obs_id in ids:
        if obs_id < 0 or obs_id in out:
            continue
        key, sha = index.chip(obs_id)
        try:
            out[obs_id] = cache.get(store, key, sha) if cache else store.get(key, sha)
        except ChipStoreError as exc:
            logger.warning("skipping observation %d in training: %s", obs_id, exc)
    return out


def rank_rows(tuples: TupleBatch, *, rank: int, world_size: int) -> tuple[TupleBatch, int]:
    """This rank's contiguous share of a global batch (shares differ by at most one row).

    Returns:
        The share, and the position of its first row in the global batch.

    Raises:
        LearnerError: A rank would get fewer than 2 rows (contrastive learning
            needs in-batch negatives): fewer than ``2 x world_size`` locations.
    """
    if world_size == 1:
        return tuples, 0
    bounds = np.linspace(0, len(tuples), world_size + 1).astype(np.int64)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    if hi - lo < 2:
        raise LearnerError(
            f"a global batch of {len(tuples)} locations gives rank {rank} of {world_size} "
            f"{hi - lo} rows; {world_size} processes need observations of at least "
            f"{2 * world_size} locations (ingest more, or run fewer processes)"
        )
    rows = slice(lo, hi)
    share = TupleBatch(
        location_id=tuples.location_id[rows],
        query_id=tuples.query_id[rows],
        positive_id=tuples.positive_id[rows],
        longterm_id=tuples.longterm_id[rows],
        query_time=tuples.query_time[rows],
        longterm_time=tuples.longterm_time[rows],
    )
    return share, lo


def read_batch(
    *,
    step: int,
    tuples: TupleBatch,
    index: ObservationIndex,
    store: ChipStore,
    cache: ChipCache | None = None,
    offset: int = 0,
    total: int | None = None,
) -> RawBatch:
    """Read a batch's chips (each checked against its hash).

    Rows whose q fails to read are dropped; a k+ or k_lt that fails to read is
    treated as absent (second view of q; no change update).

    Args:
        step: The step.
        tuples: The batch's tuples (this rank's share of the global batch).
        index: The observations, for chip keys and hashes.
        store: The chip store.
        cache: Chips already read.
        offset: Position of the batch's first row in the step's global batch.
        total: Rows of the global batch; None: the batch is the global batch.

    Raises:
        LearnerError: Fewer than two rows are left, or the chips differ in shape.
    """
    chips = _read(
        store,
        index,
        [*tuples.query_id.tolist(), *tuples.positive_id.tolist(), *tuples.longterm_id.tolist()],
        cache,
    )
    keep = [i for i, q in enumerate(tuples.query_id.tolist()) if q in chips]
    if len(keep) < 2:
        raise LearnerError(
            f"step {step}: fewer than 2 readable query chips in a batch of {len(tuples)}; "
            "check the chip store (revisit chips verify)"
        )
    rows = np.asarray(keep, dtype=np.int64)
    positive = np.where(
        np.isin(tuples.positive_id[rows], list(chips)), tuples.positive_id[rows], -1
    )
    longterm = np.where(
        np.isin(tuples.longterm_id[rows], list(chips)), tuples.longterm_id[rows], -1
    )
    kept = TupleBatch(
        location_id=tuples.location_id[rows],
        query_id=tuples.query_id[rows],
        positive_id=positive,
        longterm_id=longterm,
        query_time=tuples.query_time[rows],
        longterm_time=np.where(longterm >= 0, tuples.longterm_time[rows], np.nan),
    )
    shapes = {chip.shape for chip in chips.values()}
    if len(shapes) != 1:
        raise LearnerError(f"step {step}: chips of different shapes in one batch: {sorted(shapes)}")
    shape = shapes.pop()

    def stack(ids: np.ndarray) -> np.ndarray:
        arr = np.zeros((len(ids), *shape), dtype=np.uint16)
        for i, obs_id in enumerate(ids.tolist()):
            if obs_id >= 0:
                arr[i] = chips[obs_id]
        return arr

    return RawBatch(
        step=step,
        tuples=kept,
        query=stack(kept.query_id),
        positive=stack(kept.positive_id),
        longterm=stack(kept.longterm_id),
        rows=Rows(
            torch.as_tensor(rows + offset, dtype=torch.long),
            len(tuples) if total is None else total,
        ),
    )


def assemble_batch(
    raw: RawBatch,
    *,
    augment: Augment,
    generator: torch.Generator,
    method: str,
    clusters: Mapping[int, int] | None = None,
) -> TrainBatch:
    """Scale a batch's chips and build the method's (augmented) views."""
    kept = raw.tuples

    def tensor(arr: np.ndarray) -> Tensor:
        return scale_dn(torch.from_numpy(arr.astype(np.int32)))

    x_query = tensor(raw.query)
    x_positive = tensor(raw.positive)
    x_longterm = tensor(raw.longterm)
    longterm_valid = torch.from_numpy(kept.longterm_id >= 0)
    fallback = torch.from_numpy(kept.positive_id < 0)
    rows = raw.rows if raw.rows is not None else Rows.all(len(kept))
    # At the chip's own size, like the real k+ it stands in for (the key side resizes
    # every key image to the training crop size alike). Drawn as rows of the global
    # batch, and drawn even when no row here needs one: the generator's state after
    # this must not depend on which rows (of any rank) do.
    chip_size = (int(x_query.shape[-2]), int(x_query.shape[-1]))
    x_positive[fallback] = replace(augment, size=chip_size)(
        x_query[fallback], generator, rows.subset(fallback)
    )

    query_state = generator.get_state()
    query_view = augment(x_query, generator, rows)
    seco_views = None
    if method == "seco":
        x_t2 = torch.where(longterm_valid[:, None, None, None], x_longterm, x_positive)
        same = torch.Generator().set_state(query_state)
        seco_views = (
            augment(x_positive, generator, rows),
            augment(x_t2, same, rows),
            augment(x_query, generator, rows),
        )
    cluster_id = None
    if clusters is not None:
        cluster_id = torch.tensor(
            [clusters.get(int(loc), 0) for loc in kept.location_id], dtype=torch.long
        )
    return TrainBatch(
        step=raw.step,
        tuples=kept,
        x_query=x_query,
        x_positive=x_positive,
        x_longterm=x_longterm,
        longterm_valid=longterm_valid,
        query_view=query_view,
        seco_views=seco_views,
        cluster_id=cluster_id,
    )


def prepare_batch(
    *,
    step: int,
    tuples: TupleBatch,
    index: ObservationIndex,
    store: ChipStore,
    augment: Augment,
    generator: torch.Generator,
    method: str,
    clusters: Mapping[int, int] | None = None,
    cache: ChipCache | None = None,
) -> TrainBatch:
    """:func:`read_batch` then :func:`assemble_batch`, in the calling thread."""
    raw = read_batch(step=step, tuples=tuples, index=index, store=store, cache=cache)
    return assemble_batch(
        raw, augment=augment, generator=generator, method=method, clusters=clusters
    )


FetchObservations = Callable[[int], ObservationTable]
"""Fetch usable observations with ids above the argument (the database read)."""


class BatchLoader:
    """Mines and prepares the batches of steps ``first_step, first_step + 1, …`` on a thread.

    Args:
        fetch: Reads newly ingested usable observations (ids above its argument).
        store: The chip store.
        augment: The augmentation.
        policy: Mining windows and replay weighting.
        method: The training method (``seco`` gets its extra views).
        batch_size: Locations per batch.
        seed: Seed of every step's randomness.
        first_step: The step of the first batch.
        refresh_every: Steps between fetches of new observations.
        prefetch: Batches prepared ahead.
        clusters: Location id → geo cluster, for ``geo-tp``.
        cache_bytes: Memory for chips already read (see :class:`ChipCache`).
        rank: This process's rank among ``world_size`` learner processes: each
            mines the global batch of ``batch_size x world_size`` locations and
            reads its own share (:func:`rank_rows`).
        world_size: Learner processes.
    """

    def __init__(
        self,
        *,
        fetch: FetchObservations,
        store: ChipStore,
        augment: Augment,
        policy: MiningPolicy,
        method: str,
        batch_size: int,
        seed: int,
        first_step: int,
        refresh_every: int = 50,
        prefetch: int = 3,
        clusters: Mapping[int, int] | None = None,
        cache_bytes: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._fetch = fetch
        self._rank = rank
        self._world_size = world_size
        self.cache = ChipCache(cache_bytes)
        self._store = store
        self._augment = augment
        self._policy = policy
        self._method = method
        self._batch_size = batch_size
        self._seed = seed
        self._next_step = first_step
        self._refresh_every = refresh_every
        self._clusters = clusters
        self.index = ObservationIndex()
        self._queue: queue.Queue[RawBatch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="revisit-batch-loader", daemon=True)
        self._since_refresh = refresh_every

    def start(self) -> None:
        """Load the observations held now and start preparing batches."""
        self.index.extend(self._fetch(self.index.last_id))
        self._since_refresh = 0
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._since_refresh >= self._refresh_every:
                    added = self.index.extend(self._fetch(self.index.last_id))
                    if added:
                        logger.info("learner sees %d new observations", added)
                    self._since_refresh = 0
                step = self._next_step
                rng, _ = step_seeds(self._seed, step)
                mined = self.index.sample(
                    rng, batch_size=self._batch_size * self._world_size, policy=self._policy
                )
                tuples, offset = rank_rows(mined, rank=self._rank, world_size=self._world_size)
                batch = read_batch(
                    step=step,
                    tuples=tuples,
                    index=self.index,
                    store=self._store,
                    cache=self.cache,
                    offset=offset,
                    total=len(mined),
                )
                self._next_step += 1
                self._since_refresh += 1
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)

    def get(self, timeout: float | None = None) -> TrainBatch:
        """The next batch, in step order.

        Raises:
            LearnerError: The loader failed (its error is chained) or timed out.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty as exc:
            raise LearnerError(f"no training batch within {timeout} s") from exc
        if isinstance(item, BaseException):
            if isinstance(item, LearnerError):
                raise item
            raise LearnerError(f"preparing a training batch failed: {item}") from item
        _, gen = step_seeds(self._seed, item.step)
        return assemble_batch(
            item, augment=self._augment, generator=gen, method=self._method, clusters=self._clusters
        )

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand) and drop what was prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._thread.join(timeout=30)
