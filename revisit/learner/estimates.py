"""The learner's in-memory view of every location's change estimate.

It starts from what ``change_estimate`` holds, applies each step's R with the
EMA of :func:`revisit.learner.change.ema_update`, reclassifies every location
when the mixture is refitted, and hands the rows that moved since the last
write (and the step's events) to the writer, which commits them with the
checkpoint they belong to. Pure: numpy and plain rows, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from revisit.db.learning import EstimateRow, EventRow
from revisit.learner.change import ChangeMixture, ema_update


class ChangeState:
    """Current r, R and classification of every location the learner has measured.

    Args:
        rows: The stored estimates to start from.
        beta: Weight of the old ratio in r ← (1 - β)·R + β·r.
    """

    def __init__(self, rows: Iterable[EstimateRow] = (), *, beta: float = 0.8) -> None:
        self.beta = beta
        self._rows: dict[int, EstimateRow] = {row.location_id: row for row in rows}
        self._dirty: set[int] = set()
        self._events: list[EventRow] = []

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, location_id: int) -> EstimateRow | None:
        """The current estimate of a location, or None before its first R."""
        return self._rows.get(location_id)

    def changed(self, location_ids: Sequence[int]) -> npt.NDArray[np.bool_]:
        """Whether each location is currently classified as changed (False if unmeasured)."""
        out = np.zeros(len(location_ids), dtype=bool)
        for i, loc in enumerate(location_ids):
            row = self._rows.get(int(loc))
            out[i] = bool(row is not None and row.changed)
        return out

    def changed_fraction(self) -> float:
        """Share of measured locations classified as changed (0 when none is measured)."""
        if not self._rows:
            return 0.0
        return sum(row.changed for row in self._rows.values()) / len(self._rows)

    def ratios(self) -> npt.NDArray[np.float64]:
        """Every current r, in no particular order."""
        return np.fromiter((row.ratio_ema for row in self._rows.values()), dtype=np.float64)

    def update(
        self,
        *,
        step: int,
        location_ids: Sequence[int],
        ratio: Sequence[float],
        long_dist: Sequence[float],
        short_dist: Sequence[float],
        query_ids: Sequence[int],
        positive_ids: Sequence[int | None],
        longterm_ids: Sequence[int],
    ) -> None:
        """Fold one step's R into r and record the events.

        Locations keep their current classification; only a refit changes it.
        Non-finite R (which a degenerate batch could give) is skipped.
        """
        for i, loc in enumerate(location_ids):
            r_new = float(ratio[i])
            if not np.isfinite(r_new):
                continue
            loc = int(loc)
            old = self._rows.get(loc)
            ema = float(
                ema_update(
                    np.array([np.nan if old is None else old.ratio_ema]),
                    np.array([r_new]),
                    beta=self.beta,
                )[0]
            )
            self._rows[loc] = EstimateRow(
                location_id=loc,
                ratio_ema=ema,
                ratio_last=r_new,
                long_dist=float(long_dist[i]),
                short_dist=float(short_dist[i]),
                updates=1 if old is None else old.updates + 1,
                changed=False if old is None else old.changed,
            )
            self._dirty.add(loc)
            self._events.append(
                EventRow(
                    location_id=loc,
                    step=step,
                    ratio=r_new,
                    ratio_ema=ema,
                    long_dist=float(long_dist[i]),
                    short_dist=float(short_dist[i]),
                    query_observation_id=int(query_ids[i]),
                    positive_observation_id=positive_ids[i],
                    longterm_observation_id=int(longterm_ids[i]),
                )
            )

    def reclassify(self, mixture: ChangeMixture) -> int:
        """Set every location's ``changed`` from the mixture; returns how many flipped."""
        if not self._rows:
            return 0
        locs = list(self._rows)
        flags = mixture.changed(np.array([self._rows[loc].ratio_ema for loc in locs]))
        flipped = 0
        for loc, flag in zip(locs, flags.tolist(), strict=True):
            row = self._rows[loc]
            if row.changed != flag:
                self._rows[loc] = EstimateRow(
                    location_id=row.location_id,
                    ratio_ema=row.ratio_ema,
                    ratio_last=row.ratio_last,
                    long_dist=row.long_dist,
                    short_dist=row.short_dist,
                    updates=row.updates,
                    changed=bool(flag),
                )
                self._dirty.add(loc)
                flipped += 1
        return flipped

    def take_pending(self) -> tuple[list[EstimateRow], list[EventRow]]:
        """The rows changed and the events recorded since the last call; clears both."""
        estimates = [self._rows[loc] for loc in sorted(self._dirty)]
        events = self._events
        self._dirty = set()
        self._events = []
        return estimates, events
