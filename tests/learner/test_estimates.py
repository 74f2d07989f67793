"""The learner's in-memory change estimates: refits set the flag (hysteresis) and P(changed)."""

from __future__ import annotations

import numpy as np

from revisit.db.learning import EstimateRow
from revisit.learner.change import fit_change_mixture
from revisit.learner.estimates import ChangeState


def _state(r: np.ndarray) -> ChangeState:
    return ChangeState(
        EstimateRow(
            location_id=i,
            ratio_ema=float(v),
            ratio_last=float(v),
            long_dist=0.5,
            short_dist=0.5,
            updates=1,
            changed=False,
        )
        for i, v in enumerate(r)
    )


def test_a_refit_stores_each_locations_probability_and_flags_the_upper_population() -> None:
    rng = np.random.default_rng(0)
    r = np.exp(np.concatenate([rng.normal(0, 0.15, 160), rng.normal(1.4, 0.15, 40)]))
    state = _state(r)
    mixture = fit_change_mixture(r)
    assert mixture.components == 2
    flipped = state.reclassify(mixture)
    rows, _ = state.take_pending()
    assert len(rows) == 200  # every probability is new
    assert flipped == sum(row.changed for row in rows)
    changed = np.array([row.changed for row in rows])
    prob = np.array([row.change_probability for row in rows], dtype=float)
    assert changed[160:].mean() > 0.95 and changed[:160].mean() < 0.02
    assert ((prob >= 0) & (prob <= 1)).all()
    assert prob[160:].min() > 0.5 > prob[:160].max()


def test_a_unimodal_cloud_flags_nobody_and_a_refit_does_not_flip_on_noise() -> None:
    rng = np.random.default_rng(1)
    r = np.exp(rng.normal(0, 0.3, 300))
    state = _state(r)
    assert state.reclassify(fit_change_mixture(r)) == 0
    assert state.changed_fraction() == 0.0
    rows, _ = state.take_pending()
    assert all(row.change_probability == 0.0 for row in rows)

    two = np.exp(np.concatenate([rng.normal(0, 0.2, 240), rng.normal(1.2, 0.2, 60)]))
    state = _state(two)
    state.reclassify(fit_change_mixture(two, random_state=0))
    before = state.changed(list(range(300)))
    jittered = two * np.exp(rng.normal(0, 0.02, two.size))
    for i, v in enumerate(jittered):  # the same places, r moved a little
        row = state.get(i)
        assert row is not None
        state._rows[i] = EstimateRow(**{**row.__dict__, "ratio_ema": float(v)})
    state.reclassify(fit_change_mixture(jittered, random_state=0))
    after = state.changed(list(range(300)))
    assert (before != after).sum() <= 1
