"""Tuple mining: which images of a location make q, k+ and k_lt (DESIGN §4).

For a location l the learner needs

- q, an image at t0;
- k+, an image of l at t1 in the same period: ``short_min ≤ |t1 - t0| ≤ short_max``
  (2 weeks to 4 months by default);
- k_lt, an image of l from an earlier period: ``t_lt ≤ t0 - long_min`` (330 days
  by default) with its day of year within ``doy_window`` (±45 days) of t0's.
  A location none of whose image pairs meets both (two dates 9 months apart, or a
  year apart in different seasons) falls back to the nearest-season image more
  than ``short_max`` before t0 (any earlier image that is not a short-term
  partner), so a place with two dates far enough apart is still measured;
  :attr:`TupleBatch.season_gap_days` records how far apart the two days of year
  are, so the estimate can say how seasonal its pair is.

Only observations above the learner's valid-fraction and below its
cloud-fraction thresholds are mined; :class:`ObservationIndex` holds them in
memory, grouped by location, and grows as ingest adds more.

Replay is weighted towards recent observations, so a newly ingested scene is
learned from soon after it lands: a share ``recency_mix`` of the weight follows
``2^(-age / half_life)`` (age measured from the newest observation held), the
rest is uniform. Locations are drawn with the weight of their newest
observation, t0 within a location with the weight of each observation; k+ and
k_lt uniformly among their candidates.

Fallbacks: a location with no k+ candidate still trains, with k+ a second
augmented view of q (:attr:`TupleBatch.positive_id` is -1; R's denominator is
then calibrated, see :mod:`revisit.learner.calibration`); a location with no
long-term image trains without a
change update (:attr:`TupleBatch.longterm_id` is -1).

Everything here is pure: numpy in, numpy out, randomness from the caller's
generator. Reading chips and the database happens in :mod:`revisit.learner.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from revisit.db.learning import ObservationTable
from revisit.errors import LearnerError

DAY_S = 86_400.0
YEAR_DAYS = 365.2425
#: Fallback k_lt candidates within this many days of year of the nearest season.
SEASON_TIE_DAYS = 1.0

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MiningPolicy:
    """The time windows and the replay weighting of tuple mining.

    Attributes:
        short_min_days: k+ at least this many days from q.
        short_max_days: k+ at most this many days from q.
        long_min_days: k_lt at least this many days before q.
        doy_window_days: k_lt's day of year within this many days of q's (circular).
        recency_half_life_days: The recency weight halves for every this many days of age.
        recency_mix: Share of the weight that follows recency, in [0, 1]; the rest is uniform.

    Raises:
        ValueError: On windows that cannot hold a tuple.
    """

    short_min_days: float = 14.0
    short_max_days: float = 120.0
    long_min_days: float = 330.0
    doy_window_days: float = 45.0
    recency_half_life_days: float = 180.0
    recency_mix: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_min_days < self.short_max_days:
            raise ValueError(
                f"need 0 ≤ short_min_days < short_max_days, got "
                f"{self.short_min_days} and {self.short_max_days}"
            )
        if self.long_min_days <= 0 or not 0.0 <= self.doy_window_days <= YEAR_DAYS / 2:
            raise ValueError(
                f"need long_min_days > 0 and 0 ≤ doy_window_days ≤ half a year, got "
                f"{self.long_min_days} and {self.doy_window_days}"
            )
        if self.recency_half_life_days <= 0 or not 0.0 <= self.recency_mix <= 1.0:
            raise ValueError(
                f"need recency_half_life_days > 0 and recency_mix in [0, 1], got "
                f"{self.recency_half_life_days} and {self.recency_mix}"
            )


@dataclass(frozen=True)
class TupleBatch:
    """Observation ids of one batch of training tuples, one row per distinct location.

    Attributes:
        location_id: (B,) the locations.
        query_id: (B,) observation of q.
        positive_id: (B,) observation of k+, -1 where k+ is a second view of q.
        longterm_id: (B,) observation of k_lt, -1 where the location has none yet.
        query_time: (B,) acquisition time of q, POSIX seconds.
        longterm_time: (B,) acquisition time of k_lt, NaN where there is none.
    """

    location_id: IntArray
    query_id: IntArray
    positive_id: IntArray
    longterm_id: IntArray
    query_time: FloatArray
    longterm_time: FloatArray

    @property
    def season_gap_days(self) -> FloatArray:
        """(B,) days between the days of year of q and k_lt (circular), NaN without k_lt."""
        out = np.full(self.query_time.shape, np.nan)
        have = np.isfinite(self.longterm_time)
        out[have] = doy_distance(self.longterm_time[have], self.query_time[have])
        return out

    def __len__(self) -> int:
        return int(self.location_id.shape[0])


class ObservationIndex:
    """Usable observations held in memory, grouped by location and sorted by time.

    ``extend`` adds rows fetched from the database: mostly ids above the highest
    held, and now and then a lower one that committed late (ingest workers commit
    their scenes in any order); ids already held are skipped. The grouping is
    rebuilt lazily on the next draw.
    """

    def __init__(self) -> None:
        self._id = np.empty(0, dtype=np.int64)
        self._location = np.empty(0, dtype=np.int64)
        self._time = np.empty(0, dtype=np.float64)
        self._keys: list[str] = []
        self._shas: list[str] = []
        self._row_of: dict[int, int] = {}
        self._grouped = False
        self._order = np.empty(0, dtype=np.int64)
        self._locations = np.empty(0, dtype=np.int64)
        self._starts = np.empty(0, dtype=np.int64)
        self._counts = np.empty(0, dtype=np.int64)
        self._standard: dict[tuple[int, float, float], bool] = {}
        self._max_id = 0

    def __len__(self) -> int:
        return int(self._id.shape[0])

    @property
    def last_id(self) -> int:
        """The highest observation id held (0 when empty): fetch after this one."""
        return self._max_id

    @property
    def n_locations(self) -> int:
        """Locations with at least one usable observation."""
        self._group()
        return int(self._locations.shape[0])

    def extend(self, table: ObservationTable) -> int:
        """Add newly fetched observations; returns how many were new.

        Raises:
            ValueError: If the table's ids are not increasing.
        """
        if len(table) == 0:
            return 0
        ids = np.asarray(table.id, dtype=np.int64)
        if np.any(np.diff(ids) <= 0):
            raise ValueError(f"observations must come in increasing id order, got {ids.tolist()}")
        new = np.fromiter((i not in self._row_of for i in ids.tolist()), dtype=bool, count=ids.size)
        if not new.all():
            rows = np.flatnonzero(new)
            table = ObservationTable(
                id=ids[rows],
                location_id=np.asarray(table.location_id)[rows],
                acquired_at=np.asarray(table.acquired_at)[rows],
                chip_key=[table.chip_key[i] for i in rows.tolist()],
                chip_sha256=[table.chip_sha256[i] for i in rows.tolist()],
            )
            ids = table.id
            if ids.size == 0:
                return 0
        self._max_id = max(self._max_id, int(ids[-1]))
        base = len(self)
        self._id = np.concatenate([self._id, ids])
        self._location = np.concatenate(
            [self._location, np.asarray(table.location_id, dtype=np.int64)]
        )
        self._time = np.concatenate([self._time, np.asarray(table.acquired_at, dtype=np.float64)])
        self._keys.extend(table.chip_key)
        self._shas.extend(table.chip_sha256)
        for i, obs_id in enumerate(ids.tolist()):
            self._row_of[obs_id] = base + i
        self._grouped = False
        return int(ids.shape[0])

    def chip(self, observation_id: int) -> tuple[str, str]:
        """(chip_key, chip_sha256) of an observation held.

        Raises:
            KeyError: If the observation is not held.
        """
        row = self._row_of[observation_id]
        return self._keys[row], self._shas[row]

    def _group(self) -> None:
        if self._grouped:
            return
        order = np.lexsort((self._time, self._location)).astype(np.int64)
        locations, starts, counts = np.unique(
            self._location[order], return_index=True, return_counts=True
        )
        self._order = order
        self._locations = locations.astype(np.int64)
        self._starts = starts.astype(np.int64)
        self._counts = counts.astype(np.int64)
        self._standard = {}
        self._grouped = True

    def _has_standard_pair(self, group: int, times: FloatArray, policy: MiningPolicy) -> bool:
        """Whether any two images of a location make a k_lt within the policy's windows."""
        key = (group, policy.long_min_days, policy.doy_window_days)
        found = self._standard.get(key)
        if found is None:
            long_min = policy.long_min_days * DAY_S
            found = False
            for start in range(0, times.size, 512):  # bounded memory for long series
                t0 = times[start : start + 512, None]
                ok = (times[None, :] <= t0 - long_min) & (
                    doy_distance(times[None, :], t0) <= policy.doy_window_days
                )
                if ok.any():
                    found = True
                    break
            self._standard[key] = found
        return found

    def sample(
        self, rng: np.random.Generator, *, batch_size: int, policy: MiningPolicy
    ) -> TupleBatch:
        """Draw one batch of tuples over distinct locations.

        Args:
            rng: Source of randomness (the caller seeds it per step).
            batch_size: Rows wanted; fewer when fewer locations have observations.
            policy: Windows and replay weighting.

        Returns:
            A :class:`TupleBatch` of ``min(batch_size, n_locations)`` rows.

        Raises:
            LearnerError: Fewer than two locations have usable observations
                (contrastive learning needs in-batch negatives).
        """
        self._group()
        n_loc = int(self._locations.shape[0])
        if n_loc < 2:
            raise LearnerError(
                f"need usable observations of at least 2 locations to train, have {n_loc}; "
                "ingest more scenes (revisit ingest) or relax learner.min_valid_fraction / "
                "learner.max_cloud_fraction"
            )
        times = self._time[self._order]
        newest = float(times.max())
        half_life = policy.recency_half_life_days * DAY_S
        recency = np.exp2(-(newest - times) / half_life)

        ends = self._starts + self._counts
        loc_recency = recency[ends - 1]  # newest observation of each location
        p_loc = (
            policy.recency_mix * loc_recency / loc_recency.sum()
            + (1.0 - policy.recency_mix) / n_loc
        )
        b = min(batch_size, n_loc)
        chosen = rng.choice(n_loc, size=b, replace=False, p=p_loc / p_loc.sum())

        short_min, short_max = policy.short_min_days * DAY_S, policy.short_max_days * DAY_S
        long_min = policy.long_min_days * DAY_S
        query = np.empty(b, dtype=np.int64)
        positive = np.full(b, -1, dtype=np.int64)
        longterm = np.full(b, -1, dtype=np.int64)
        query_time = np.empty(b, dtype=np.float64)
        longterm_time = np.full(b, np.nan, dtype=np.float64)
        for row, g in enumerate(chosen.tolist()):
            lo, hi = int(self._starts[g]), int(ends[g])
            t = times[lo:hi]
            w = policy.recency_mix * recency[lo:hi] / recency[lo:hi].sum() + (
                1.0 - policy.recency_mix
            ) / (hi - lo)
            i0 = int(rng.choice(hi - lo, p=w / w.sum()))
            t0 = t[i0]
            query[row] = self._id[self._order[lo + i0]]
            query_time[row] = t0
            gap = np.abs(t - t0)
            short = np.flatnonzero((gap >= short_min) & (gap <= short_max))
            if short.size:
                positive[row] = self._id[self._order[lo + int(rng.choice(short))]]
            season = doy_distance(t, t0)
            long = np.flatnonzero((t <= t0 - long_min) & (season <= policy.doy_window_days))
            if not long.size and not self._has_standard_pair(g, t, policy):
                # The nearest-season earlier image that is not a short-term partner.
                earlier = np.flatnonzero(t < t0 - short_max)
                if earlier.size:
                    nearest = season[earlier].min()
                    long = earlier[season[earlier] <= nearest + SEASON_TIE_DAYS]
            if long.size:
                pick = lo + int(rng.choice(long))
                longterm[row] = self._id[self._order[pick]]
                longterm_time[row] = times[pick]
        return TupleBatch(
            location_id=self._locations[chosen],
            query_id=query,
            positive_id=positive,
            longterm_id=longterm,
            query_time=query_time,
            longterm_time=longterm_time,
        )


def doy_distance(t: FloatArray | float, t0: FloatArray | float) -> FloatArray:
    """Circular distance in days between the days of year of POSIX times ``t`` and ``t0``.

    Element-wise, with numpy broadcasting between ``t`` and ``t0``.
    """
    days = (np.asarray(t, dtype=np.float64) - t0) / DAY_S
    d: FloatArray = np.abs(np.remainder(days + YEAR_DAYS / 2, YEAR_DAYS) - YEAR_DAYS / 2)
    return d
