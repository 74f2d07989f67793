"""The online learner: resume, train on what the database holds, write r back, checkpoint.

:class:`OnlineLearner` ties the parts together:

1. **Open**: take the learner's advisory lock (one learner per database), read
   the newest ``model_version`` and resume from its checkpoint (model, key
   encoder, queues, optimiser, mixture, geo clusters, RNG), load every current
   change estimate, and start the batch loader.
2. **Run**: for each step, take the prepared batch, decide which locations are
   changed (nobody during the warm-up), take the step, and fold R into r in
   memory. The mixture is refitted every ``refit_every`` steps after the warm-up.
3. **Checkpoint** every ``checkpoint_every`` steps and when a run ends: write the
   file atomically, then in *one* transaction insert the ``model_version`` row and
   write the estimates and events of the steps since the last checkpoint
   (COPY + one ``UPDATE … FROM``).

Because the estimates, the events and the checkpoint commit together, a kill at
any moment resumes from the last commit with the database agreeing with the
model: the step counter never goes back, no step's events are written twice,
and ``change_estimate.updates`` only grows. The steps after the last commit are
taken again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import revisit
from revisit.config import Settings
from revisit.db import learning
from revisit.errors import ChipStoreError, DegenerateRatiosError, LearnerError
from revisit.ingest.chips import ChipStore
from revisit.learner import checkpoint as ckpt
from revisit.learner.calibration import ShortTermReference, pair_key
from revisit.learner.change import DEFAULT_EPS, ChangeMixture, fit_change_mixture
from revisit.learner.distributed import Distributed, state_digest
from revisit.learner.encoder import band_statistics
from revisit.learner.estimates import ChangeState
from revisit.learner.geo import assign_geo_clusters, fit_geo_clusters
from revisit.learner.heads import upgrade_model_state
from revisit.learner.loader import BatchLoader
from revisit.learner.mining import MiningPolicy, TupleBatch
from revisit.learner.trainer import Trainer, learner_augment

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger(__name__)

#: How long an observation id missing below the newest one the learner has is looked
#: for again (an ingest transaction that took its ids earlier and commits later), in
#: seconds; a scene's transaction takes seconds to minutes.
LATE_COMMIT_S = 3600.0
#: ... and only among the newest this many ids (older gaps are deletions, rollbacks).
LATE_WINDOW_IDS = 100_000


@dataclass(frozen=True)
class StepReport:
    """Progress after one step.

    Attributes:
        step: The step just taken.
        loss: Its loss.
        steps_per_s: Recent training speed.
        changed_fraction: Share of measured locations classified as changed.
        measured: Locations with a change estimate.
        checkpointed: A checkpoint was committed after this step.
    """

    step: int
    loss: float
    steps_per_s: float
    changed_fraction: float
    measured: int
    checkpointed: bool


@dataclass(frozen=True)
class LearnSummary:
    """What a call of :meth:`OnlineLearner.run` did."""

    method: str
    first_step: int
    last_step: int
    mean_loss: float
    seconds: float
    changed_fraction: float
    measured: int
    model_version_id: int | None
    stopped: bool

    @property
    def steps(self) -> int:
        """Steps taken."""
        return self.last_step - self.first_step + 1 if self.last_step >= self.first_step else 0


def _mixture_to_dict(mixture: ChangeMixture | None) -> dict[str, Any] | None:
    return None if mixture is None else asdict(mixture)


def _mixture_from_dict(raw: Any) -> ChangeMixture | None:
    if raw is None:
        return None
    bic = raw.get("bic")
    separation = raw.get("separation")
    return ChangeMixture(
        log_means=(float(raw["log_means"][0]), float(raw["log_means"][1])),
        log_stds=(float(raw["log_stds"][0]), float(raw["log_stds"][1])),
        weights=(float(raw["weights"][0]), float(raw["weights"][1])),
        threshold=None if raw["threshold"] is None else float(raw["threshold"]),
        n_samples=int(raw["n_samples"]),
        # Checkpoints from before model selection always held two components.
        components=int(raw.get("components", 2)),
        bic=None if bic is None else (float(bic[0]), float(bic[1])),
        separation=None if separation is None else float(separation),
    )


def _concat_tuples(parts: list[TupleBatch]) -> TupleBatch:
    """The rows of several ranks' tuple batches, in order."""
    return TupleBatch(
        location_id=np.concatenate([p.location_id for p in parts]),
        query_id=np.concatenate([p.query_id for p in parts]),
        positive_id=np.concatenate([p.positive_id for p in parts]),
        longterm_id=np.concatenate([p.longterm_id for p in parts]),
        query_time=np.concatenate([p.query_time for p in parts]),
        longterm_time=np.concatenate([p.longterm_time for p in parts]),
    )


class OnlineLearner:
    """Trains one method on the database's observations and keeps the change estimates.

    Use it as a context manager (or call :meth:`open` and :meth:`close`)::

        with OnlineLearner(settings=settings, engine=db.engine) as learner:
            learner.run(steps=1000)

    Args:
        settings: The whole configuration (``learner``, ``data_dir``).
        engine: The database.
        store: The chip store; ``<data_dir>/chips`` by default.
        method: Overrides ``settings.learner.method``.
        new_model: Start a fresh model even if the database holds a checkpoint
            (of any method); the step counter goes on from the last one and the
            change estimates are kept.
        init_from: With ``new_model``: a checkpoint file (another data
            directory's, say) whose encoders, heads and input standardisation the
            new model starts from -- to adapt a model trained elsewhere to this
            database's places. The optimiser, queues and step start afresh.
        dist: This process's place among the learner's processes (``revisit learn
            --nproc``, :mod:`revisit.learner.distributed`); one process when None.
            Every rank trains and holds the same estimates; rank 0 alone takes the
            learner's lock and writes to the database.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        store: ChipStore | None = None,
        method: str | None = None,
        new_model: bool = False,
        init_from: Path | None = None,
        dist: Distributed | None = None,
    ) -> None:
        if init_from is not None and not new_model:
            raise LearnerError("init_from starts a new model: it needs new_model")
        learner_settings = settings.learner
        if method is not None and method != learner_settings.method:
            learner_settings = learner_settings.model_copy(update={"method": method})
            # model_copy skips validation; the method literal is checked by Trainer.
        self.settings = settings
        self.config = learner_settings
        self.method = learner_settings.method
        self.engine = engine
        self.data_dir = settings.data_dir
        self.store = store or ChipStore(settings.data_dir / "chips")
        self.new_model = new_model
        self.init_from = init_from
        self.step = 0
        self.model_version_id: int | None = None
        self.mixture: ChangeMixture | None = None
        self.geo_centroids: np.ndarray | None = None
        self.clusters: dict[int, int] | None = None
        self._trainer: Trainer | None = None
        self._state: ChangeState | None = None
        self._reference = ShortTermReference()
        self._loader: BatchLoader | None = None
        self._lock_conn: Connection | None = None
        self._last_checkpoint_step = 0
        self._broken: str | None = None
        self._recent_losses: list[float] = []
        self._needs_band_statistics = False
        self.dist = dist
        self._d = dist or Distributed.single()
        self._fetches = 0
        self._closing = threading.Event()
        self._missing: dict[int, float] = {}  # ids missing below the newest fetched: since when

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> OnlineLearner:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(checkpoint=exc[0] is None)

    @property
    def trainer(self) -> Trainer:
        """The model and optimiser (after :meth:`open`)."""
        if self._trainer is None:
            raise LearnerError("the learner is not open")
        return self._trainer

    @property
    def state(self) -> ChangeState:
        """The in-memory change estimates (after :meth:`open`)."""
        if self._state is None:
            raise LearnerError("the learner is not open")
        return self._state

    def open(self) -> None:
        """Take the lock, resume from the newest checkpoint and start the loader.

        Raises:
            LearnerError: Another learner holds the lock, the newest checkpoint is
                of another method (and ``new_model`` is off), or it is damaged.
        """
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        conn: Connection | None = None
        locked = True
        if self._d.is_main:  # one lock for all ranks: rank 0's
            conn = self.engine.connect()
            try:
                locked = learning.try_learner_lock(conn)
                conn.commit()
            except BaseException:
                conn.close()
                raise
            if not locked:
                conn.close()
        if not self._d.broadcast_object(locked):
            raise LearnerError(
                "another learner is running against this database "
                "(it holds the learner's advisory lock); stop it first"
            )
        self._lock_conn = conn
        try:
            self._resume()
            self._start_loader()
        except BaseException:
            self._release_lock()
            raise

    def _resume(self) -> None:
        with self.engine.connect() as conn:
            latest = learning.latest_model_version(conn)
            last_event_step = learning.max_event_step(conn) or 0
            estimates = learning.load_change_estimates(conn)
        learning.check_resumable(latest, self.method, new_model=self.new_model)
        trainer = Trainer(self.config, dist=self.dist)
        payload: dict[str, Any] | None = None
        if latest is not None and not self.new_model:
            if latest.checkpoint_key is None:
                raise LearnerError(
                    f"model version {latest.id} (step {latest.step}) has no checkpoint file"
                )
            payload = ckpt.load_checkpoint(
                self.data_dir, latest.checkpoint_key, sha256=latest.metrics.get("sha256")
            )
            if payload.get("method") != self.method or int(payload["step"]) != latest.step:
                raise ckpt.CheckpointError(
                    f"checkpoint {latest.checkpoint_key} holds method {payload.get('method')!r} "
                    f"step {payload.get('step')}, but its model_version row says "
                    f"{latest.method!r} step {latest.step}"
                )
            trainer.load_state_dict(payload["trainer"])
            self.mixture = _mixture_from_dict(payload.get("mixture"))
            centroids = payload.get("geo_centroids")
            self.geo_centroids = None if centroids is None else np.asarray(centroids)
            torch.set_rng_state(payload["torch_rng"])
            logger.info(
                "learner resumes %s at step %d from %s",
                self.method,
                latest.step,
                latest.checkpoint_key,
            )
        initialised = False
        if payload is None and self.init_from is not None:
            self._initialise_from(trainer, self.init_from)
            initialised = True
        # A new model estimates its input standardisation before its first step; a
        # resumed one has it (or, migrated from before it, keeps the identity), and so
        # does one started from another model's weights (they were trained with its).
        self._needs_band_statistics = (
            payload is None and not initialised and self.config.normalization == "data"
        )
        self.step = max(latest.step if latest is not None else 0, last_event_step)
        if payload is None:
            trainer.start_step = self.step
        self.model_version_id = latest.id if latest is not None else None
        self._last_checkpoint_step = self.step
        self._trainer = trainer
        self._state = ChangeState(estimates, beta=self.config.beta)
        calibration = None if payload is None else payload.get("calibration")
        own = self._state.short_refs()
        if payload is not None:
            # A checkpoint from before learner.change_distance measured embeddings.
            before = (payload.get("settings") or {}).get("change_distance", "embedding")
            if before != self.config.change_distance:
                logger.warning(
                    "learner.change_distance is %s, the checkpoint's was %s: the calibrated"
                    " short-term distances (other scale) start over",
                    self.config.change_distance,
                    before,
                )
                calibration, own = None, {}
                self._state.forget_short_refs()
        self._reference = ShortTermReference(own=own)
        self._reference.load_state_dict(calibration)
        if self.method == "geo-tp":
            self._assign_clusters()

    def _initialise_from(self, trainer: Trainer, path: Path) -> None:
        """Copy a checkpoint's weights (those of matching name and shape) into ``trainer``.

        Queues and anything whose shape differs (another ``queue_size``, another
        method's heads) keep their fresh values.

        Raises:
            CheckpointError: The file is not a readable checkpoint, or holds no
                encoder weights this model can take.
        """
        payload = ckpt.load_checkpoint_file(path)
        source = upgrade_model_state(payload["trainer"]["model"])
        target = trainer.model.state_dict()
        taken = {
            k: v
            for k, v in source.items()
            if k in target and tuple(v.shape) == tuple(target[k].shape) and "queue" not in k
        }
        if not any(k.startswith("encoder.") for k in taken):
            raise ckpt.CheckpointError(f"checkpoint {path} holds no encoder this model can take")
        target.update(taken)
        trainer.model.load_state_dict(target)
        logger.info(
            "new model starts from %s (method %s, step %s): %d of %d tensors taken",
            path,
            payload.get("method"),
            payload.get("step"),
            len(taken),
            len(target),
        )

    def _assign_clusters(self) -> None:
        """Geo clusters of every location: rank 0 fits, assigns and writes; all ranks take them."""
        if self._d.enabled:
            if self._d.is_main:
                self._assign_clusters_here()
            centroids, clusters = self._d.broadcast_object((self.geo_centroids, self.clusters))
            self.geo_centroids = centroids
            if self.clusters is None:
                self.clusters = dict(clusters or {})
            else:  # the loader holds this dict: update it in place
                self.clusters.update(clusters or {})
            return
        self._assign_clusters_here()

    def _assign_clusters_here(self) -> None:
        with self.engine.begin() as conn:
            table = learning.location_table(conn)
            if table.id.size == 0:
                self.clusters = {}
                return
            if self.geo_centroids is None:
                self.geo_centroids = fit_geo_clusters(
                    table.lon, table.lat, k=self.config.geo_clusters, seed=self.config.seed
                )
            ids = assign_geo_clusters(table.lon, table.lat, self.geo_centroids)
            stale = ids != table.cluster_id
            if stale.any():
                learning.set_cluster_ids(conn, location_ids=table.id[stale], cluster_ids=ids[stale])
        clusters = dict(zip(table.id.tolist(), ids.tolist(), strict=True))
        if self.clusters is None:
            self.clusters = clusters
        else:  # the loader holds this dict: update it in place
            self.clusters.update(clusters)

    def _fetch(self, after_id: int, up_to_id: int | None = None) -> learning.ObservationTable:
        with self.engine.connect() as conn:
            return learning.usable_observations(
                conn,
                after_id=after_id,
                up_to_id=up_to_id,
                min_valid_fraction=self.config.min_valid_fraction,
                max_cloud_fraction=self.config.max_cloud_fraction,
            )

    def _fetch_shared(self, after_id: int) -> learning.ObservationTable:
        """The loader's fetch: observations after ``after_id``, and those that committed late.

        Ingest (several workers, or a worker beside a manual ``revisit ingest``)
        commits scenes in any order, so an observation id below the newest one
        fetched may become visible later: the ids missing below the newest are
        looked for again at every fetch, for :data:`LATE_COMMIT_S` (after that a
        missing id is taken for a rolled-back one).

        With several ranks, each fetch has a number; rank 0 publishes under it the
        largest observation id and the late ids it found, and every rank (rank 0
        too) reads exactly those, so every rank's index holds the same
        observations and mines the same global batch.
        """
        key = f"fetch/{self._fetches}"
        self._fetches += 1
        if self._d.is_main:
            with self.engine.connect() as conn:
                bound = learning.max_observation_id(conn)
                present, late = learning.observation_ids(
                    conn, after_id=after_id, up_to_id=bound, among=sorted(self._missing)
                )
            now = time.monotonic()
            for found in late.tolist():
                self._missing.pop(found, None)
            # Only recent ids can belong to a transaction still open.
            expected = np.arange(max(after_id, bound - LATE_WINDOW_IDS) + 1, bound + 1)
            for gap in np.setdiff1d(expected, present).tolist():
                self._missing.setdefault(gap, now)
            for gap, since in list(self._missing.items()):
                if now - since > LATE_COMMIT_S:
                    del self._missing[gap]
            shared = (bound, late.tolist())
            self._d.publish(key, shared)
        else:
            shared = self._d.wait_value(key, stop=self._closing)
        bound, late_ids = int(shared[0]), list(shared[1])
        table = self._fetch(after_id, up_to_id=bound)
        if late_ids:
            with self.engine.connect() as conn:
                recovered = learning.usable_observations(
                    conn,
                    ids=late_ids,
                    min_valid_fraction=self.config.min_valid_fraction,
                    max_cloud_fraction=self.config.max_cloud_fraction,
                )
            if len(recovered):
                logger.info("learner picks up %d observations committed late", len(recovered))
            table = learning.concat_observations([table, recovered])
        return table

    def _start_loader(self) -> None:
        c = self.config
        self._loader = BatchLoader(
            fetch=self._fetch_shared,
            store=self.store,
            augment=learner_augment(self.config),
            policy=MiningPolicy(
                short_min_days=c.short_min_days,
                short_max_days=c.short_max_days,
                long_min_days=c.long_min_days,
                doy_window_days=c.doy_window_days,
                recency_half_life_days=c.recency_half_life_days,
                recency_mix=c.recency_mix,
            ),
            method=self.method,
            batch_size=c.batch_size,
            seed=c.seed,
            first_step=self.step + 1,
            refresh_every=c.refresh_every,
            prefetch=c.prefetch,
            clusters=self.clusters,
            cache_bytes=c.chip_cache_mb * 2**20,
            rank=self._d.rank,
            world_size=self._d.world_size,
        )
        self._loader.start()

    def _release_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is None:
            return
        try:
            learning.release_learner_lock(conn)
            conn.commit()
        except Exception as exc:  # the lock goes with the session anyway
            logger.warning("could not release the learner lock cleanly: %s", exc)
        finally:
            conn.close()

    def close(self, *, checkpoint: bool = True) -> None:
        """Stop the loader, checkpoint unsaved steps (when ``checkpoint``) and release the lock."""
        self._closing.set()
        try:
            if self._loader is not None:
                self._loader.close()
                self._loader = None
            if checkpoint and self._broken is None and self.step > self._last_checkpoint_step:
                self.checkpoint()
        finally:
            self._release_lock()

    # -- training -------------------------------------------------------------------

    def run(
        self,
        steps: int,
        *,
        stop: threading.Event | None = None,
        max_seconds: float | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        checkpoint: bool = True,
    ) -> LearnSummary:
        """Take up to ``steps`` steps, then checkpoint.

        Args:
            steps: How many steps at most.
            stop: Ends the run after the step in progress when set.
            max_seconds: Ends the run after the step that passes this much time.
            on_step: Called after every step with its :class:`StepReport`.
            checkpoint: Checkpoint at the end when steps were taken since the
                last checkpoint. The daemon, which runs many short chunks on one
                open learner, turns it off: checkpoints then come every
                ``checkpoint_every`` steps and at :meth:`close`.

        Returns:
            A :class:`LearnSummary`.

        Raises:
            LearnerError: The learner is not open or broke on an earlier error,
                or a step failed (the database keeps the last checkpoint).
        """
        if self._broken is not None:
            raise LearnerError(
                f"the learner stopped on an error and must be reopened: {self._broken}"
            )
        if self._loader is None:
            raise LearnerError("the learner is not open")
        if steps < 0:
            raise ValueError(f"steps must be ≥ 0, got {steps}")
        first = self.step + 1
        started = time.monotonic()
        losses: list[float] = []
        window: list[float] = []
        stopped = False
        try:
            for _ in range(steps):
                done = (stop is not None and stop.is_set()) or (
                    max_seconds is not None and time.monotonic() - started >= max_seconds
                )
                if self._d.any(done):  # every rank stops at the same step
                    stopped = True
                    break
                report = self._one_step(window)
                losses.append(report.loss)
                if on_step is not None:
                    on_step(report)
            if checkpoint and self.step > self._last_checkpoint_step:
                self.checkpoint()
        except BaseException as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        return LearnSummary(
            method=self.method,
            first_step=first,
            last_step=self.step,
            mean_loss=float(np.mean(losses)) if losses else float("nan"),
            seconds=time.monotonic() - started,
            changed_fraction=self.state.changed_fraction(),
            measured=len(self.state),
            model_version_id=self.model_version_id,
            stopped=stopped,
        )

    def _one_step(self, window: list[float]) -> StepReport:
        if self._loader is None:
            raise LearnerError("the learner is not open")
        batch = self._loader.get(timeout=600)
        step = batch.step
        if step != self.step + 1:
            raise LearnerError(f"the loader gave step {step}, expected {self.step + 1}")
        if self._needs_band_statistics:
            self._estimate_band_statistics()
        tuples = batch.tuples
        locations = tuples.location_id.tolist()
        warm = step > self.config.warmup_steps and self.mixture is not None
        changed = self.state.changed(locations) if warm else np.zeros(len(locations), dtype=bool)
        result = self.trainer.train_step(batch, changed=changed)
        loss, long_dist, short_dist = result.loss, result.long_dist, result.short_dist
        if self._d.enabled:
            # Every rank's rows, in rank order: every rank folds the global batch's R
            # into the same estimates (rank 0 alone writes them).
            parts = self._d.all_gather_objects((tuples, loss, long_dist, short_dist))
            tuples = _concat_tuples([p[0] for p in parts])
            losses = [p[1] for p in parts]
            loss = float(np.mean(losses))
            long_dist = np.concatenate([p[2] for p in parts])
            short_dist = np.concatenate([p[3] for p in parts])
            if not np.all(np.isfinite(losses)):
                raise LearnerError(
                    f"step {step}: the ranks' losses are {losses}; training diverged"
                )
        if not np.isfinite(loss):
            raise LearnerError(f"step {step}: the loss is {loss}; training diverged")
        self.step = step
        # R's denominator: the real short-term distance where k+ is a real second date,
        # else a calibrated one (revisit.learner.calibration).
        gaps = tuples.season_gap_days
        keys = [
            pair_key(float(q), float(lt)) if np.isfinite(lt) else None
            for q, lt in zip(tuples.query_time.tolist(), tuples.longterm_time.tolist(), strict=True)
        ]
        denominators = self._reference.denominators(
            location_ids=tuples.location_id.tolist(),
            short_dist=short_dist,
            long_dist=long_dist,
            real_positive=tuples.positive_id >= 0,
            pair_keys=keys,
        )
        ratio = long_dist / (denominators.value + DEFAULT_EPS)
        rows = np.flatnonzero(np.isfinite(ratio))
        if rows.size:
            self.state.update(
                step=step,
                location_ids=tuples.location_id[rows].tolist(),
                ratio=ratio[rows].tolist(),
                long_dist=long_dist[rows].tolist(),
                short_dist=denominators.value[rows].tolist(),
                query_ids=tuples.query_id[rows].tolist(),
                positive_ids=[None if p < 0 else p for p in tuples.positive_id[rows].tolist()],
                longterm_ids=tuples.longterm_id[rows].tolist(),
                season_gap_days=gaps[rows].tolist(),
                denominators=[denominators.source[i] for i in rows.tolist()],
                short_refs=self._reference.own,
            )
        if step >= self.config.warmup_steps and (
            self.mixture is None or step % self.config.refit_every == 0
        ):
            self.refit()
        checkpointed = False
        if step % self.config.checkpoint_every == 0:
            self.checkpoint()
            checkpointed = True
        now = time.monotonic()
        window.append(now)
        del window[:-21]
        rate = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
        return StepReport(
            step=step,
            loss=loss,
            steps_per_s=rate,
            changed_fraction=self.state.changed_fraction(),
            measured=len(self.state),
            checkpointed=checkpointed,
        )

    def _estimate_band_statistics(self) -> None:
        """Freeze a new model's input standardisation: band statistics of a sample of chips.

        Up to ``learner.normalization_chips`` usable observations, drawn uniformly
        with the learner's seed from what the database holds now, are read (each
        checked against its hash); :func:`band_statistics` gives the per-band mean
        and standard deviation of their valid pixels. They go into the model, and
        from the next checkpoint on they are the model's for good.

        With several ranks, rank 0 estimates and the others take its figures.

        Raises:
            LearnerError: No chip could be read.
        """
        outcome: tuple[list[float], list[float], int] | str | None = None
        if self._d.is_main:
            try:
                outcome = self._band_statistics_here()
            except LearnerError as exc:
                outcome = str(exc)
        outcome = self._d.broadcast_object(outcome)
        if isinstance(outcome, str) or outcome is None:
            raise LearnerError(outcome or "rank 0 estimated no band statistics")
        mean, std, n_chips = outcome
        self.trainer.set_band_statistics(mean, std)
        self._needs_band_statistics = False
        logger.info(
            "input standardisation estimated on %d chips: mean %s, std %s",
            n_chips,
            " ".join(f"{v:.4f}" for v in mean),
            " ".join(f"{v:.4f}" for v in std),
        )

    def _band_statistics_here(self) -> tuple[list[float], list[float], int]:
        table = self._fetch(0)
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x6E6F726D]))
        n = min(len(table), self.config.normalization_chips)
        rows = np.sort(rng.choice(len(table), size=n, replace=False))
        chips: list[np.ndarray] = []
        for row in rows.tolist():
            try:
                chips.append(self.store.get(table.chip_key[row], table.chip_sha256[row]))
            except ChipStoreError as exc:
                logger.warning("band statistics skip observation %d: %s", table.id[row], exc)
        shapes = {chip.shape for chip in chips}
        if not chips or len(shapes) != 1:
            raise LearnerError(
                f"cannot estimate band statistics: {len(chips)} readable chips of shapes "
                f"{sorted(shapes)}; check the chip store (revisit chips verify)"
            )
        try:
            mean, std = band_statistics(np.stack(chips))
        except ValueError as exc:
            raise LearnerError(f"cannot estimate band statistics: {exc}") from exc
        return list(mean), list(std), len(chips)

    def refit(self) -> ChangeMixture | None:
        """Refit the change mixture on every current r and reclassify; None if too few ratios.

        With several ranks (which hold the same ratios), rank 0 fits and every rank
        reclassifies with its mixture.
        """
        fitted: ChangeMixture | str | None = None
        if self._d.is_main:
            try:
                fitted = fit_change_mixture(self.state.ratios(), random_state=self.config.seed)
            except DegenerateRatiosError as exc:
                fitted = str(exc)
        fitted = self._d.broadcast_object(fitted)
        if not isinstance(fitted, ChangeMixture):
            logger.info("step %d: change mixture not refitted: %s", self.step, fitted)
            return None
        mixture = fitted
        flipped = self.state.reclassify(mixture)
        self.mixture = mixture
        logger.info(
            "step %d: change mixture refitted on %d ratios: %d component(s)%s (BIC %s,"
            " separation %s), threshold %s; %d locations flipped, %.1f%% changed",
            self.step,
            mixture.n_samples,
            mixture.components,
            "" if mixture.components == 2 else ", no changed population",
            "n/a" if mixture.bic is None else f"{mixture.bic[0]:.1f} vs {mixture.bic[1]:.1f}",
            "n/a" if mixture.separation is None else f"{mixture.separation:.2f}",
            "none" if mixture.threshold is None else f"{mixture.threshold:.3f}",
            flipped,
            100 * self.state.changed_fraction(),
        )
        return mixture

    def checkpoint(self) -> int:
        """Write a checkpoint and commit it with the pending estimates and events.

        With several ranks, every rank calls it at the same step: their models'
        digests are compared first (a rank that drifted stops the run), rank 0
        writes, and the others drop their pending rows (rank 0's are the same).

        Returns:
            The new ``model_version`` id.

        Raises:
            LearnerError: Writing the file or the transaction failed, or the ranks'
                models differ. The database keeps the previous checkpoint; the
                learner must be reopened.
        """
        step = self.step
        extra: dict[str, Any] = {}
        if self._d.enabled:
            digests = self._d.all_gather_objects(state_digest(self.trainer.model))
            if len(set(digests)) != 1:
                self._broken = (
                    f"step {step}: the ranks' models differ (state digests "
                    f"{', '.join(d[:12] for d in digests)}); the run stops unsaved"
                )
                raise LearnerError(self._broken)
            extra = {"processes": self._d.world_size, "state_digest": digests[0]}
        outcome: int | str = 0
        error: BaseException | None = None
        if self._d.is_main:
            try:
                outcome = self._write_checkpoint(step, extra)
            except BaseException as exc:
                outcome, error = f"checkpoint at step {step} failed: {exc}", exc
        else:
            self.state.take_pending()  # rank 0 writes the same rows
        outcome = self._d.broadcast_object(outcome)
        try:
            if isinstance(outcome, str):
                raise LearnerError(outcome) from error
            if self.method == "geo-tp":
                self._assign_clusters()
        except BaseException as exc:
            self._broken = (
                str(exc)
                if isinstance(exc, LearnerError)
                else (f"checkpoint at step {step} failed: {exc}")
            )
            if isinstance(exc, LearnerError):
                raise
            raise LearnerError(self._broken) from exc
        self.model_version_id = outcome
        self._last_checkpoint_step = step
        if self._d.is_main:
            self._prune()
        return outcome

    def _write_checkpoint(self, step: int, extra: dict[str, Any]) -> int:
        key = ckpt.checkpoint_key(self.method, step)
        payload = {
            "method": self.method,
            "step": step,
            "trainer": self.trainer.state_dict(),
            "mixture": _mixture_to_dict(self.mixture),
            "geo_centroids": None if self.geo_centroids is None else self.geo_centroids.tolist(),
            "torch_rng": torch.get_rng_state(),
            "calibration": self._reference.state_dict(),
            "settings": self.config.model_dump(mode="json"),
            "revisit_version": revisit.__version__,
            "created_at": datetime.now(UTC).isoformat(),
        }
        sha256, size = ckpt.save_checkpoint(self.data_dir, key, payload)
        estimates, events = self.state.take_pending()
        metrics = {
            "sha256": sha256,
            "size_bytes": size,
            "changed_fraction": self.state.changed_fraction(),
            "measured": len(self.state),
            "mixture": _mixture_to_dict(self.mixture),
            # What v_change judges an unmeasured location's observations by.
            "usable": {
                "min_valid_fraction": self.config.min_valid_fraction,
                "max_cloud_fraction": self.config.max_cloud_fraction,
                "pair_gap_days": self.config.short_max_days,
            },
            **extra,
        }
        with self.engine.begin() as conn:
            version = learning.insert_model_version(
                conn, step=step, method=self.method, checkpoint_key=key, metrics=metrics
            )
            learning.write_change_batch(
                conn, estimates=estimates, events=events, model_version_id=version
            )
        logger.info(
            "step %d: checkpoint %s committed as model version %d (%d estimates, %d events)",
            step,
            key,
            version,
            len(estimates),
            len(events),
        )
        return version

    def _prune(self) -> None:
        try:
            with self.engine.connect() as conn:
                versions = learning.model_versions(conn)
            keep = [v.checkpoint_key for v in versions if v.checkpoint_key][
                -self.config.keep_checkpoints :
            ]
            removed = ckpt.prune_checkpoints(self.data_dir, keep=keep)
            if removed:
                logger.debug("pruned %d checkpoint files", len(removed))
        except Exception as exc:  # pruning is housekeeping: never fails a run
            logger.warning("could not prune checkpoints: %s", exc)
