"""R's denominator where k+ is not a real second date (revisit.learner.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from revisit.learner.calibration import (
    MIN_OTHERS,
    MIN_PAIR,
    OWN_BETA,
    ShortTermReference,
    pair_key,
)

DAY = 86_400.0


def _call(ref: ShortTermReference, locs, short, long, real, keys):  # type: ignore[no-untyped-def]
    return ref.denominators(
        location_ids=locs,
        short_dist=np.asarray(short, dtype=float),
        long_dist=np.asarray(long, dtype=float),
        real_positive=np.asarray(real, dtype=bool),
        pair_keys=keys,
    )


def test_a_real_pair_keeps_cacos_denominator_and_feeds_the_locations_own() -> None:
    ref = ShortTermReference()
    got = _call(ref, [1], [0.2], [0.9], [True], ["a"])
    assert got.value.tolist() == [0.2] and got.source == ["pair"]
    _call(ref, [1], [0.4], [0.9], [True], ["a"])
    assert ref.own[1] == pytest.approx(OWN_BETA * 0.2 + (1 - OWN_BETA) * 0.4)
    # Later without a real k+: the location's own running distance, not the view's.
    got = _call(ref, [1], [0.01], [0.9], [False], ["a"])
    assert got.source == ["own"] and got.value[0] == pytest.approx(ref.own[1])


def test_without_history_comparable_locations_stand_in() -> None:
    ref = ShortTermReference(own={loc: 0.1 + 0.01 * loc for loc in range(MIN_OTHERS)})
    got = _call(ref, [999], [0.001], [0.5], [False], ["b"])
    assert got.source == ["others"]
    assert got.value[0] == pytest.approx(np.median([0.1 + 0.01 * k for k in range(MIN_OTHERS)]))


def test_two_date_imagery_is_calibrated_by_its_pair_of_days() -> None:
    # No real pair anywhere (OSCD): each pair of days is its own reference, so a
    # city whose dates differ more (season, sun) does not look more changed.
    ref = ShortTermReference()
    rng = np.random.default_rng(0)
    keys = [pair_key(400 * DAY, 10 * DAY)] * 20 + [pair_key(800 * DAY, 30 * DAY)] * 20
    long = np.concatenate([rng.uniform(0.2, 0.3, 20), rng.uniform(0.8, 1.2, 20)])
    got = _call(ref, list(range(40)), np.full(40, 0.01), long, np.zeros(40), keys)
    assert set(got.source) == {"date-pair"}
    ratio = long / got.value
    assert abs(np.median(ratio[:20]) - 1) < 0.1 and abs(np.median(ratio[20:]) - 1) < 0.1
    assert MIN_PAIR <= 20


def test_a_new_pair_borrows_every_pairs_median_until_it_has_its_own() -> None:
    ref = ShortTermReference()
    _call(ref, list(range(10)), np.zeros(10), np.full(10, 0.5), np.zeros(10), ["x"] * 10)
    got = _call(ref, [50], [0.0], [2.0], [False], ["y"])
    assert got.source == ["date-pair"]
    assert got.value[0] == pytest.approx(0.5)  # 10 of 0.5 and one of 2.0


def test_rows_without_a_long_term_image_get_no_denominator() -> None:
    got = _call(ShortTermReference(), [1, 2], [0.1, 0.1], [np.nan, 0.4], [True, False], [None, "k"])
    assert np.isnan(got.value[0]) and got.value[1] == pytest.approx(0.4)


def test_the_state_round_trips_and_bad_shapes_are_refused() -> None:
    ref = ShortTermReference()
    _call(ref, [1, 2], [0.1, 0.1], [0.3, 0.5], [False, False], ["k", "k"])
    again = ShortTermReference()
    again.load_state_dict(ref.state_dict())
    assert again.state_dict() == ref.state_dict()
    again.load_state_dict(None)
    assert again.state_dict() == {"pairs": {}}
    with pytest.raises(ValueError, match="values per row"):
        _call(ref, [1, 2], [0.1], [0.3, 0.5], [False, False], ["k", "k"])


def test_pair_key_names_the_two_days() -> None:
    assert pair_key(1.5 * DAY, 0.2 * DAY) == "1-0"
