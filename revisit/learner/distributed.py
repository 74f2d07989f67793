"""One model trained by N processes: torch.distributed for the online learner (DESIGN §6).

``revisit learn --nproc N`` (or ``torchrun … -m revisit learn`` across machines)
starts N processes, each a *rank*. :class:`Distributed` is what a rank knows of
the others, and the collectives the learner needs; :meth:`Distributed.single`
is the one-process case, where every collective is the identity, so the
learner's code has one path.

How a step is shared (``revisit.learner.online`` and ``revisit.learner.trainer``):

- **The batch.** Every rank mines the same *global* batch of ``batch_size x N``
  distinct locations from the same observations with the same ``(seed, step)``
  generator, and takes its own contiguous slice of it: no location is in two
  ranks' rows. The observations are the same on every rank because every fetch
  is bounded by an observation id that rank 0 publishes in the rendezvous store
  (:meth:`publish`, :meth:`wait_value`). Each rank draws its augmentations from
  ``(seed, step, rank)``.
- **The gradient.** The query encoder and heads are wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on
  CUDA), which averages the gradients; the learning rate is that of the global
  batch.
- **The keys.** The keys of every rank's rows are gathered (:meth:`gather_blocks`):
  the other ranks' keys are in-batch negatives of this rank's queries, exactly as
  in one process with the global batch, and the keys that enter the queues are
  every rank's, in rank order, so every rank holds the same queues.
- **Batch norm.** Each rank's batch norm normalises with its own rows' batch
  statistics (no shuffle across ranks: a row's q, k+ and k_lt stay in one key
  batch, as in one process; ``learner.bn_splits`` groups each rank's own rows as it
  does in one process), and after every step the running statistics of both encoders are
  averaged over the ranks (:meth:`average_`), so every rank holds the same
  buffers and the exported model's are those of the global batch.
- **Change estimates.** R of every rank's rows is gathered to every rank
  (:meth:`all_gather_objects`), so every rank holds the same in-memory estimates
  and classifies its rows alike; the mixture is fitted on rank 0 and broadcast.
  Rank 0 alone writes estimates, events, checkpoints and ``model_version``.
- **Agreement.** A run stops at the same step everywhere (:meth:`any`), and every
  checkpoint compares a digest of every rank's model (:func:`state_digest`): a
  rank that drifted stops the run instead of training silently apart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from revisit.errors import LearnerError
from revisit.learner.launch import RANK_ENV, launched

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a collective may wait for the other ranks: a checkpoint on rank 0
#: (file, transaction) and a database fetch must fit in it.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's whole state (parameters, buffers, queues), in name order.

    Two ranks whose digests agree hold bit-identical models.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    return [
        buf
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    ]


@dataclass
class Distributed:
    """This process's place among the learner's processes, and their collectives.

    Build it with :meth:`from_environment` (a rank of ``torchrun``) or
    :meth:`single` (one process); call :meth:`close` at the end.

    Attributes:
        rank: This process's rank, 0 … ``world_size`` - 1; rank 0 writes to the database.
        world_size: Number of processes.
        local_rank: Rank on this machine (the CUDA device it uses).
        device: The torch device of this rank.
        backend: ``gloo``, ``nccl`` or ``none`` (one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"
    _store: Any = None
    _cpu_group: Any = None

    @classmethod
    def single(cls, device: torch.device | None = None) -> Distributed:
        """One process: every collective is the identity."""
        return cls(device=device or torch.device("cpu"))

    @classmethod
    def from_environment(cls, device_setting: str) -> Distributed:
        """Join the process group of a ``torchrun`` launch (or one process without one).

        Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
        ``MASTER_PORT``. The backend is NCCL when this rank trains on CUDA
        (``learner.device`` ``cuda``, or ``auto`` with a GPU: each rank takes
        ``cuda:LOCAL_RANK``), gloo otherwise. The rendezvous store is torchrun's
        (its agent hosts it), or rank 0's when the ranks were started by hand.

        Args:
            device_setting: ``learner.device``: ``cpu``, ``cuda`` or ``auto``.

        Raises:
            LearnerError: The environment is incomplete, or ``cuda`` is asked for
                without a GPU for this rank.
        """
        if not launched():
            from revisit.learner.trainer import resolve_device

            try:
                return cls.single(resolve_device(device_setting))
            except ValueError as exc:
                raise LearnerError(str(exc)) from exc
        missing = [name for name in RANK_ENV if not os.environ.get(name)]
        if missing:
            raise LearnerError(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                "is not set: start the ranks with torchrun (or `revisit learn --nproc N`)"
            )
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
        if cuda:
            if torch.cuda.device_count() <= local_rank:
                raise LearnerError(
                    f"rank {rank} needs CUDA device {local_rank}, but PyTorch sees "
                    f"{torch.cuda.device_count()}; start at most that many processes per node"
                )
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(  # type: ignore[attr-defined]
            host,
            port,
            world_size,
            is_master=rank == 0 and not agent,
            timeout=COLLECTIVE_TIMEOUT,
            wait_for_workers=False,
        )
        # A restarted launch (torchrun --max-restarts) must not read the last one's keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        run = os.environ.get("TORCHELASTIC_RUN_ID", "revisit")
        prefix = f"revisit/{run}/{attempt}"
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"{prefix}/pg", store),  # type: ignore[attr-defined]
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        # Python objects travel on gloo even when the tensors go through NCCL.
        cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        logger.info(
            "learner rank %d of %d on %s (%s, store %s:%d)",
            rank,
            world_size,
            device,
            backend,
            host,
            port,
        )
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            device=device,
            backend=backend,
            _store=dist.PrefixStore(f"{prefix}/learner", store),  # type: ignore[attr-defined]
            _cpu_group=cpu_group,
        )

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes to the database."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives on Python objects (gloo) ------------------------------------------

    def all_gather_objects(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (the others pass anything)."""
        if not self.enabled:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0, group=self._cpu_group)
        return box[0]  # type: ignore[no-any-return]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (to stop together)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier(group=self._cpu_group)

    # -- collectives on tensors (the backend's) ----------------------------------------

    def gather_blocks(self, blocks: Sequence[Tensor]) -> list[list[Tensor]]:
        """Every rank's ``blocks`` (2-D, one row width; row counts may differ by rank).

        Two collectives whatever the number of blocks: the row counts, then the
        rows padded to the largest rank's.

        Returns:
            ``out[r][b]``: rank r's block b.
        """
        if not self.enabled:
            return [list(blocks)]
        if not blocks:
            return [[] for _ in range(self.world_size)]
        width = blocks[0].shape[1]
        device = blocks[0].device
        counts = torch.tensor([b.shape[0] for b in blocks], dtype=torch.int64, device=device)
        all_counts = [torch.empty_like(counts) for _ in range(self.world_size)]
        dist.all_gather(all_counts, counts)
        totals = [int(c.sum()) for c in all_counts]
        rows = torch.cat([b.reshape(-1, width) for b in blocks], dim=0)
        padded = torch.zeros((max(totals), width), dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        out: list[list[Tensor]] = []
        for rank_rows, rank_counts in zip(gathered, all_counts, strict=True):
            out.append(list(torch.split(rank_rows[: int(rank_counts.sum())], rank_counts.tolist())))
        out[self.rank] = list(blocks)  # our own, as given (the same values)
        return out

    def average_batchnorm_(self, module: nn.Module) -> None:
        """Average the batch-norm running statistics of ``module`` over the ranks, in place."""
        if not self.enabled:
            return
        buffers = _batchnorm_buffers(module)
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for buf in buffers:
            n = buf.numel()
            buf.copy_(flat[offset : offset + n].view_as(buf))
            offset += n

    # -- values in the rendezvous store, for the batch loader's thread ----------------

    def publish(self, key: str, value: Any) -> None:
        """Rank 0 makes ``value`` known under ``key`` (see :meth:`wait_value`)."""
        if self.enabled:
            self._store.set(key, pickle.dumps(value))

    def wait_value(self, key: str, *, stop: threading.Event, poll_s: float = 0.5) -> Any:
        """The value rank 0 published under ``key``, waiting for it until ``stop`` is set.

        The batch loader's thread waits here, not in a collective: a collective on
        a second thread could not be abandoned when the learner closes.

        Raises:
            LearnerError: ``stop`` was set first, or rank 0 published nothing within
                :data:`COLLECTIVE_TIMEOUT`.
        """
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        while True:
            if stop.is_set():
                raise LearnerError(f"rank {self.rank} closing while it waited for {key}")
            try:
                self._store.wait([key], timedelta(seconds=poll_s))
                return pickle.loads(self._store.get(key))
            except (RuntimeError, dist.DistError) as exc:  # the wait timed out
                if time.monotonic() > deadline:
                    raise LearnerError(
                        f"rank {self.rank}: rank 0 published no {key} within "
                        f"{COLLECTIVE_TIMEOUT}; is it alive?"
                    ) from exc
