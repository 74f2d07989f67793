"""Tuple mining: windows, fallbacks, recency weighting, distinct locations."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from revisit.db.learning import ObservationTable
from revisit.errors import ChipStoreError, LearnerError
from revisit.ingest.chips import ChipStore
from revisit.learner.loader import ChipCache
from revisit.learner.mining import DAY_S, MiningPolicy, ObservationIndex, doy_distance

T0 = datetime(2023, 1, 1, tzinfo=UTC).timestamp()


def _table(rows: list[tuple[int, int, float]]) -> ObservationTable:
    """(id, location, day offset from T0) rows."""
    return ObservationTable(
        id=np.array([r[0] for r in rows], dtype=np.int64),
        location_id=np.array([r[1] for r in rows], dtype=np.int64),
        acquired_at=np.array([T0 + r[2] * DAY_S for r in rows], dtype=np.float64),
        chip_key=[f"ab/cd/{r[0]:064x}.npy" for r in rows],
        chip_sha256=[f"{r[0]:064x}" for r in rows],
    )


def _days(index_rows: list[tuple[int, int, float]]) -> dict[int, float]:
    return {r[0]: r[2] for r in index_rows}


def test_doy_distance_is_circular() -> None:
    t0 = datetime(2024, 1, 5, tzinfo=UTC).timestamp()
    dec = datetime(2022, 12, 27, tzinfo=UTC).timestamp()
    assert doy_distance(dec, t0) == pytest.approx(9, abs=1.0)
    jul = datetime(2023, 7, 5, tzinfo=UTC).timestamp()
    assert doy_distance(jul, t0) == pytest.approx(182, abs=2.0)


def test_tuples_respect_the_windows() -> None:
    # Location 1: every 5 days for two years. Location 2: the same, shifted.
    rows = []
    obs = 1
    for loc in (1, 2, 3):
        for k in range(146):
            rows.append((obs, loc, 5.0 * k + loc))
            obs += 1
    index = ObservationIndex()
    assert index.extend(_table(rows)) == len(rows)
    day = _days(rows)
    policy = MiningPolicy()
    rng = np.random.default_rng(0)
    seen_longterm = 0
    for _ in range(200):
        batch = index.sample(rng, batch_size=3, policy=policy)
        assert sorted(batch.location_id.tolist()) == [1, 2, 3]  # distinct locations
        for q, p, lt in zip(
            batch.query_id.tolist(),
            batch.positive_id.tolist(),
            batch.longterm_id.tolist(),
            strict=True,
        ):
            assert p >= 0  # every date has a neighbour 14-120 days away
            assert 14 <= abs(day[p] - day[q]) <= 120
            if lt >= 0:
                seen_longterm += 1
                assert day[q] - day[lt] >= 330
                gap = (day[q] - day[lt]) % 365.2425
                assert min(gap, 365.2425 - gap) <= 45
            elif day[q] >= 330 + 45:
                pytest.fail(f"query on day {day[q]} should have a long-term image")
    assert seen_longterm > 0


def test_two_dates_fall_back_to_a_second_view_and_no_longterm() -> None:
    # Two dates 5 days apart: too close for k+, too close for k_lt.
    index = ObservationIndex()
    index.extend(_table([(1, 1, 0), (2, 1, 5), (3, 2, 0), (4, 2, 5)]))
    batch = index.sample(np.random.default_rng(1), batch_size=8, policy=MiningPolicy())
    assert len(batch) == 2
    assert batch.positive_id.tolist() == [-1, -1]
    assert batch.longterm_id.tolist() == [-1, -1]


def test_one_location_is_a_clear_error() -> None:
    index = ObservationIndex()
    index.extend(_table([(1, 1, 0), (2, 1, 30)]))
    with pytest.raises(LearnerError, match="at least 2 locations"):
        index.sample(np.random.default_rng(0), batch_size=4, policy=MiningPolicy())


def test_replay_prefers_recent_observations() -> None:
    rows = []
    obs = 1
    for loc in range(1, 41):
        for k in range(100):
            rows.append((obs, loc, float(k * 5)))
            obs += 1
    index = ObservationIndex()
    index.extend(_table(rows))
    day = _days(rows)
    recent = MiningPolicy(recency_mix=1.0, recency_half_life_days=60)
    uniform = MiningPolicy(recency_mix=0.0)
    rng = np.random.default_rng(0)
    q_recent = [
        day[q] for _ in range(50) for q in index.sample(rng, batch_size=8, policy=recent).query_id
    ]
    q_uniform = [
        day[q] for _ in range(50) for q in index.sample(rng, batch_size=8, policy=uniform).query_id
    ]
    assert np.mean(q_recent) > 400  # the record spans days 0-495
    assert abs(np.mean(q_uniform) - 247.5) < 40


def test_new_locations_get_drawn_soon_after_they_land() -> None:
    rows = [(i + 1, 1 + i % 20, float(i // 20) * 5) for i in range(20 * 50)]
    index = ObservationIndex()
    index.extend(_table(rows))
    # A new location appears with only the latest scene.
    newest = max(r[2] for r in rows)
    index.extend(_table([(5000, 99, newest + 5), (5001, 99, newest + 20)]))
    policy = MiningPolicy(recency_mix=0.9, recency_half_life_days=30)
    rng = np.random.default_rng(3)
    hits = sum(99 in index.sample(rng, batch_size=4, policy=policy).location_id for _ in range(50))
    assert hits > 50 * 4 / 21  # drawn more often than its uniform share


def test_extend_skips_held_ids_takes_late_ones_and_refuses_disorder() -> None:
    index = ObservationIndex()
    index.extend(_table([(5, 1, 0), (7, 2, 0)]))
    assert index.last_id == 7
    assert index.extend(_table([(7, 1, 10)])) == 0  # held already: skipped
    assert index.extend(_table([(6, 1, 10), (8, 2, 20)])) == 2  # 6 committed late
    assert index.last_id == 8 and len(index) == 4 and index.chip(6)[1] == f"{6:064x}"
    with pytest.raises(ValueError, match="increasing id order"):
        index.extend(_table([(10, 1, 10), (9, 1, 0)]))
    assert index.chip(5)[1] == f"{5:064x}"


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="short_min_days"):
        MiningPolicy(short_min_days=30, short_max_days=20)
    with pytest.raises(ValueError, match="recency_mix"):
        MiningPolicy(recency_mix=1.5)


def test_same_seed_same_batch() -> None:
    rows = [(i + 1, 1 + i % 7, float(i // 7) * 5) for i in range(7 * 80)]
    index = ObservationIndex()
    index.extend(_table(rows))
    a = index.sample(np.random.default_rng(42), batch_size=5, policy=MiningPolicy())
    b = index.sample(np.random.default_rng(42), batch_size=5, policy=MiningPolicy())
    assert a.query_id.tolist() == b.query_id.tolist()
    assert a.longterm_id.tolist() == b.longterm_id.tolist()


def test_chip_cache_reads_once_and_keeps_to_its_budget(tmp_path: Path) -> None:
    store = ChipStore(tmp_path / "chips", fsync=False)
    chips = [np.full((12, 8, 8), i, dtype=np.uint16) for i in range(4)]
    stored = [store.put(c) for c in chips]
    cache = ChipCache(max_bytes=2 * chips[0].nbytes)
    for s in (*stored, *stored[-2:]):
        cache.get(store, s.key, s.sha256)
    assert (cache.misses, cache.hits) == (4, 2)
    assert cache.bytes == 2 * chips[0].nbytes
    for s in (stored[0], stored[3]):
        (tmp_path / "chips" / s.key).write_bytes(b"damaged")
    assert int(cache.get(store, stored[3].key, stored[3].sha256)[0, 0, 0]) == 3  # cached
    with pytest.raises(ChipStoreError, match="fails its hash"):
        cache.get(store, stored[0].key, stored[0].sha256)  # evicted: read and checked again


def test_dates_nine_months_apart_fall_back_to_the_nearest_season() -> None:
    # As OSCD's bercy: two dates 272 days apart, under long_min_days (330).
    index = ObservationIndex()
    index.extend(_table([(1, 1, 0), (2, 2, 0), (3, 1, 272), (4, 2, 272)]))
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(40):
        batch = index.sample(rng, batch_size=2, policy=MiningPolicy())
        for q, lt, gap in zip(
            batch.query_id.tolist(),
            batch.longterm_id.tolist(),
            batch.season_gap_days.tolist(),
            strict=True,
        ):
            if q in (3, 4):  # the newer date: the older one stands in for k_lt
                assert lt == q - 2
                assert gap == pytest.approx(365.2425 - 272, abs=0.01)
                seen += 1
            else:  # nothing before the older date
                assert lt == -1 and np.isnan(gap)
    assert seen > 0


def test_a_year_apart_in_another_season_is_measured_with_its_gap() -> None:
    # 445 days apart: long enough, but 80 days of year apart, outside the ±45-day window.
    index = ObservationIndex()
    index.extend(_table([(1, 1, 0), (2, 2, 0), (3, 1, 445), (4, 2, 445)]))
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(20):
        batch = index.sample(rng, batch_size=2, policy=MiningPolicy(doy_window_days=45))
        newer = np.flatnonzero(batch.query_id >= 3)
        assert (batch.longterm_id[newer] == batch.query_id[newer] - 2).all()
        gaps += batch.season_gap_days[newer].tolist()
    assert gaps and np.allclose(gaps, 445 - 365.2425, atol=0.01)


def test_the_fallback_is_for_places_without_any_standard_pair() -> None:
    # A dense series two years long has standard pairs: a query in its first year
    # gets no off-season stand-in, it waits for a long-term image of its own season.
    rows = [(k + 1, 1 + (k % 2), 5.0 * (k // 2)) for k in range(2 * 146)]
    index = ObservationIndex()
    index.extend(_table(rows))
    day = _days(rows)
    rng = np.random.default_rng(0)
    for _ in range(100):
        batch = index.sample(rng, batch_size=2, policy=MiningPolicy())
        for q, lt in zip(batch.query_id.tolist(), batch.longterm_id.tolist(), strict=True):
            if lt >= 0:
                assert day[q] - day[lt] >= 330


def test_dates_within_the_short_window_give_no_long_term_pair() -> None:
    index = ObservationIndex()
    index.extend(_table([(1, 1, 0), (2, 2, 0), (3, 1, 90), (4, 2, 90)]))
    for seed in range(10):
        batch = index.sample(np.random.default_rng(seed), batch_size=2, policy=MiningPolicy())
        assert batch.longterm_id.tolist() == [-1, -1]
        assert (batch.positive_id >= 0).all()  # 90 days: a short-term pair instead
