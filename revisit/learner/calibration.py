"""The denominator of R when k+ is not a real second date (DESIGN §4, docs/change-estimates.md).

CACo's ratio R = ‖f(q) - f(k_lt)‖ / ‖f(q) - f(k+)‖ divides the long-term distance
by how far the place moves in embedding space over weeks without changing: the
short-term distance to a real image weeks away. Where a location has no such
image (two-date imagery such as OSCD, or a place seen once a season), k+ is a
second augmented view of q, and ‖f(q) - f(view)‖ measures how much an
augmentation moves the embedding (texture, not time); the ratio then inherits
that noise. So in that case the denominator is a *calibrated* short-term
distance instead, the first of:

1. ``own``: the location's own running short-term distance, an EMA of its real
   short-term distances, when it has had real pairs;
2. ``others``: the median of that running distance over every location that has
   one, when at least :data:`MIN_OTHERS` have (comparable locations: the same
   model, the same sensor);
3. ``date-pair``: the median long-term distance of the locations measured on the
   same two acquisition days (the same pair of scenes, usually), over the last
   :data:`RESERVOIR` measurements of that pair, when there are at least
   :data:`MIN_PAIR` of them; else over every pair's. Most places do not change
   between two dates, so this median is the distance of "no change" between
   those two days: their season, sun and atmosphere. R ≈ 1 then reads "as
   different as a typical place of that pair of dates", and a seasonal gap
   (recorded with each event) is discounted by the places that share it.

With a real k+ the denominator is CACo's (``pair``). Pure Python and numpy; the
state goes into the checkpoint (:meth:`ShortTermReference.state_dict`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: A location's running short-term distance: the weight of the old value.
OWN_BETA = 0.8
#: Locations with a running short-term distance needed before ``others`` is used.
MIN_OTHERS = 20
#: Long-term distances kept per pair of acquisition days.
RESERVOIR = 256
#: Distances of a pair of days needed before its own median is used.
MIN_PAIR = 8
#: Pairs of days held (the least recently measured go first): a bounded checkpoint.
MAX_PAIRS = 4096

DAY_S = 86_400.0

#: Where a row's denominator came from (``change_event.denominator``).
SOURCES = ("pair", "own", "others", "date-pair")


def pair_key(query_time: float, longterm_time: float) -> str:
    """The two acquisition days of a q / k_lt pair: their UTC day numbers, ``"17480-17136"``."""
    return f"{int(query_time // DAY_S)}-{int(longterm_time // DAY_S)}"


@dataclass(frozen=True)
class Denominators:
    """Per-row denominator of R and its source (one of :data:`SOURCES`)."""

    value: npt.NDArray[np.float64]
    source: list[str]


class ShortTermReference:
    """Calibrated short-term distances for rows whose k+ is a second view of q.

    Args:
        own: Each location's running real short-term distance, to start from
            (``change_estimate.short_ref``).
    """

    def __init__(self, own: Mapping[int, float] | None = None) -> None:
        self.own: dict[int, float] = {int(k): float(v) for k, v in (own or {}).items()}
        self._pairs: OrderedDict[str, deque[float]] = OrderedDict()

    def denominators(
        self,
        *,
        location_ids: Sequence[int],
        short_dist: npt.ArrayLike,
        long_dist: npt.ArrayLike,
        real_positive: npt.ArrayLike,
        pair_keys: Sequence[str | None],
    ) -> Denominators:
        """Fold one step's measurements in, then give each row its denominator.

        Args:
            location_ids: (B,) the rows' locations.
            short_dist: (B,) ‖f(q) - f(k+)‖ (to the view where k+ is not real).
            long_dist: (B,) ‖f(q) - f(k_lt)‖, NaN where the row has no k_lt.
            real_positive: (B,) whether k+ is a real second date.
            pair_keys: (B,) :func:`pair_key` of q and k_lt, None without k_lt.

        Returns:
            The denominators (NaN where the row has no k_lt) and their sources;
            R is ``long_dist / (denominator + ε)``.
        """
        short = np.asarray(short_dist, dtype=np.float64)
        long = np.asarray(long_dist, dtype=np.float64)
        real = np.asarray(real_positive, dtype=bool)
        n = len(location_ids)
        if not (short.shape == long.shape == real.shape == (n,)) or len(pair_keys) != n:
            raise ValueError(
                f"need {n} values per row, got {short.shape}, {long.shape}, {real.shape},"
                f" {len(pair_keys)}"
            )
        for i in range(n):
            if real[i] and np.isfinite(short[i]):
                loc = int(location_ids[i])
                old = self.own.get(loc)
                s = float(short[i])
                self.own[loc] = s if old is None else OWN_BETA * old + (1 - OWN_BETA) * s
            key = pair_keys[i]
            if key is not None and np.isfinite(long[i]):
                self._pairs.setdefault(key, deque(maxlen=RESERVOIR)).append(float(long[i]))
                self._pairs.move_to_end(key)
        while len(self._pairs) > MAX_PAIRS:
            self._pairs.popitem(last=False)
        # Computed once per call, and only if a row needs them: the reservoirs can be large.
        others: float | None = None
        everything: float | None = None
        others_known = False
        value = np.full(n, np.nan)
        source = ["pair"] * n
        for i in range(n):
            if not np.isfinite(long[i]):
                continue
            loc = int(location_ids[i])
            key = pair_keys[i]
            if real[i]:
                value[i], source[i] = short[i], "pair"
                continue
            if loc in self.own:
                value[i], source[i] = self.own[loc], "own"
                continue
            if not others_known:
                others, others_known = self._others(), True
            if others is not None:
                value[i], source[i] = others, "others"
                continue
            held = self._pairs.get(key) if key is not None else None
            if held is not None and len(held) >= MIN_PAIR:
                value[i] = float(np.median(np.fromiter(held, dtype=np.float64)))
            else:
                if everything is None:
                    everything = self._all_pairs()
                value[i] = everything
            source[i] = "date-pair"
        return Denominators(value=value, source=source)

    def _others(self) -> float | None:
        if len(self.own) < MIN_OTHERS:
            return None
        return float(np.median(np.fromiter(self.own.values(), dtype=np.float64)))

    def _all_pairs(self) -> float:
        values = [v for held in self._pairs.values() for v in held]
        return float(np.median(values)) if values else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """The reservoirs of long-term distances per pair of days (own values live in the DB)."""
        return {"pairs": {key: list(held) for key, held in self._pairs.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; None (a checkpoint from before it) starts empty."""
        self._pairs = OrderedDict()
        for key, values in ((state or {}).get("pairs") or {}).items():
            self._pairs[str(key)] = deque((float(v) for v in values), maxlen=RESERVOIR)
