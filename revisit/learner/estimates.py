"""The learner's in-memory view of every location's change estimate.

It starts from what ``change_estimate`` holds, applies each step's R with the
EMA of :func:`revisit.learner.change.ema_update`, reclassifies every location
when the mixture is refitted, and hands the rows that moved since the last
write (and the step's events) to the writer, which commits them with the
checkpoint they belong to. Pure: numpy and plain rows, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

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

    def short_refs(self) -> dict[int, float]:
        """Each location's running short-term distance from real pairs, where it has one."""
        return {loc: row.short_ref for loc, row in self._rows.items() if row.short_ref is not None}

    def forget_short_refs(self) -> None:
        """Drop every running short-term distance (they were measured on another scale)."""
        for loc, row in self._rows.items():
            if row.short_ref is not None:
                self._rows[loc] = replace(row, short_ref=None)
                self._dirty.add(loc)

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
        season_gap_days: Sequence[float] | None = None,
        denominators: Sequence[str] | None = None,
        short_refs: dict[int, float] | None = None,
    ) -> None:
        """Fold one step's R into r and record the events.

        Locations keep their current classification and change probability;
        only a refit changes them. Non-finite R (which a degenerate batch could
        give) is skipped.

        Args:
            short_dist: R's denominator per row (see revisit.learner.calibration).
            season_gap_days: Days of year between each row's q and k_lt.
            denominators: Where each row's denominator came from.
            short_refs: Running short-term distances from real pairs, by location
                (:attr:`ShortTermReference.own`); a location's is stored with it.
        """
        for i, loc in enumerate(location_ids):
            r_new = float(ratio[i])
            if not np.isfinite(r_new):
                continue
            loc = int(loc)
            old = self._rows.get(loc)
            gap = None if season_gap_days is None else _finite_or_none(season_gap_days[i])
            source = None if denominators is None else denominators[i]
            ref = (short_refs or {}).get(loc, None if old is None else old.short_ref)
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
                change_probability=None if old is None else old.change_probability,
                short_ref=ref,
                season_gap_days=gap,
                denominator=source,
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
                    season_gap_days=gap,
                    denominator=source,
                )
            )

    def reclassify(self, mixture: ChangeMixture) -> int:
        """Set every location's ``changed`` and change probability from the mixture.

        A location flips only when its posterior passes 0.5 by the mixture's
        margin (:meth:`ChangeMixture.classify`), so a refit on much the same
        ratios does not flip locations back and forth on noise.

        Returns:
            How many locations flipped.
        """
        if not self._rows:
            return 0
        locs = list(self._rows)
        r = np.array([self._rows[loc].ratio_ema for loc in locs])
        previous = np.array([self._rows[loc].changed for loc in locs], dtype=bool)
        flags = mixture.classify(r, previous)
        probability = mixture.posterior(r)
        flipped = 0
        for i, loc in enumerate(locs):
            row = self._rows[loc]
            flag = bool(flags[i])
            p = _finite_or_none(float(probability[i]))
            p = None if p is None else round(min(1.0, max(0.0, p)), 3)
            if row.changed != flag or row.change_probability != p:
                self._rows[loc] = replace(row, changed=flag, change_probability=p)
                self._dirty.add(loc)
                flipped += int(row.changed != flag)
        return flipped

    def take_pending(self) -> tuple[list[EstimateRow], list[EventRow]]:
        """The rows changed and the events recorded since the last call; clears both."""
        estimates = [self._rows[loc] for loc in sorted(self._dirty)]
        events = self._events
        self._dirty = set()
        self._events = []
        return estimates, events


def _finite_or_none(value: float) -> float | None:
    out = float(value)
    return out if np.isfinite(out) else None
