"""The change ratio, its running mean, and the two-component change mixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from revisit.learner.change import (
    ChangeMixture,
    DegenerateRatiosError,
    change_ratio,
    ema_update,
    fit_change_mixture,
)


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


# --- change_ratio -----------------------------------------------------------------------------


def test_change_ratio_hand_values() -> None:
    # Chord of two unit vectors at angle θ: 2·sin(θ/2).
    # Row 0: k+ at 60° → 1, k_lt at 180° → 2, R = 2 / (1 + 1e-4).
    # Row 1: k+ at 90° → √2, k_lt at 60° → 1, R = 1 / (√2 + 1e-4).
    q = np.array([unit(0), unit(30)])
    kp = np.array([unit(60), unit(120)])
    klt = np.array([unit(180), unit(90)])
    result = change_ratio(q, kp, klt)
    assert result.short_dist.tolist() == pytest.approx([1.0, math.sqrt(2)], rel=1e-12)
    assert result.long_dist.tolist() == pytest.approx([2.0, 1.0], rel=1e-12)
    expected = [2 / (1 + 1e-4), 1 / (math.sqrt(2) + 1e-4)]
    assert result.ratio.tolist() == pytest.approx(expected, rel=1e-12)


def test_change_ratio_normalises_and_takes_tensors() -> None:
    q = torch.tensor([[3.0, 0.0]], requires_grad=True)
    kp = torch.tensor([unit(60)]) * 0.1
    klt = torch.tensor([[-5.0, 0.0]])
    result = change_ratio(q, kp, klt)
    assert result.ratio.dtype == np.float64
    assert result.ratio.tolist() == pytest.approx([2 / (1 + 1e-4)], rel=1e-6)


def test_change_ratio_eps_when_query_equals_positive() -> None:
    q = np.array([unit(0)])
    klt = np.array([unit(60)])  # long distance 1
    assert change_ratio(q, q, klt).ratio.tolist() == pytest.approx([1e4])
    assert change_ratio(q, q, klt, eps=0.5).ratio.tolist() == pytest.approx([2.0])
    assert change_ratio(q, q, q).ratio.tolist() == [0.0]


def test_change_ratio_rejects_bad_input() -> None:
    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match="same shape"):
        change_ratio(q, q, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        change_ratio(np.zeros(3), q, q)
    with pytest.raises(ValueError, match="eps"):
        change_ratio(q, q, q, eps=0.0)
    bad = q.copy()
    bad[1, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"f_longterm has non-finite values in 1 rows, first \[1\]"
    ):
        change_ratio(q, q, bad)


# --- ema_update -------------------------------------------------------------------------------


def test_ema_sequence_hand_values() -> None:
    # β = 0.8: r1 = 1, r2 = 0.8·1 + 0.2·2 = 1.2, r3 = 0.8·1.2 + 0.2·3 = 1.56
    r = np.array([np.nan])
    seen = []
    for value in (1.0, 2.0, 3.0):
        r = ema_update(r, np.array([value]))
        seen.append(float(r[0]))
    assert seen == pytest.approx([1.0, 1.2, 1.56], rel=1e-12)


def test_ema_elementwise_nan_rules() -> None:
    previous = np.array([np.nan, 2.0, 2.0, np.nan])
    ratio = np.array([5.0, 7.0, np.nan, np.nan])
    out = ema_update(previous, ratio, beta=0.5)
    assert out[:3].tolist() == [5.0, 4.5, 2.0]
    assert np.isnan(out[3])
    assert ema_update(np.array([2.0]), np.array([7.0]), beta=0.0).tolist() == [7.0]


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, float("nan")])
def test_ema_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        ema_update(np.array([1.0]), np.array([1.0]), beta=beta)


def test_ema_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ema_update(np.array([1.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="negative"):
        ema_update(np.array([1.0]), np.array([-1.0]))
    with pytest.raises(ValueError, match="infinite"):
        ema_update(np.array([np.inf]), np.array([1.0]))


# --- fit_change_mixture -----------------------------------------------------------------------


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    unchanged = rng.lognormal(mean=0.0, sigma=0.2, size=900)
    changed = rng.lognormal(mean=math.log(3.0), sigma=0.2, size=100)
    r = np.concatenate([unchanged, changed])
    truth = np.zeros(r.size, dtype=bool)
    truth[900:] = True
    return r, truth


def test_mixture_recovers_the_changed_tenth() -> None:
    r, truth = synthetic()
    mixture = fit_change_mixture(r)
    predicted = mixture.changed(r)
    recall = predicted[truth].mean()
    false_positive_rate = predicted[~truth].mean()
    assert recall >= 0.95
    assert false_positive_rate <= 0.01
    assert mixture.weights[1] == pytest.approx(0.1, abs=0.02)
    assert mixture.medians[0] == pytest.approx(1.0, rel=0.05)
    assert mixture.medians[1] == pytest.approx(3.0, rel=0.1)
    assert mixture.n_samples == 1000
    assert mixture.threshold is not None
    assert mixture.medians[0] < mixture.threshold < mixture.medians[1]
    assert mixture.posterior(np.array([mixture.threshold]))[0] == pytest.approx(0.5, abs=1e-6)


def test_mixture_posterior_is_sklearns() -> None:
    r, _ = synthetic(seed=1)
    mixture = fit_change_mixture(r, random_state=3)
    gmm = GaussianMixture(n_components=2, random_state=3).fit(np.log(r).reshape(-1, 1))
    changed_component = int(np.argmax(gmm.means_.ravel()))
    expected = gmm.predict_proba(np.log(r).reshape(-1, 1))[:, changed_component]
    np.testing.assert_allclose(mixture.posterior(r), expected, atol=1e-9)
    # Between the medians, the threshold rule and sklearn's predict agree.
    inside = (r > mixture.medians[0]) & (r < mixture.medians[1])
    predicted = gmm.predict(np.log(r).reshape(-1, 1)) == changed_component
    np.testing.assert_array_equal(mixture.changed(r)[inside], predicted[inside])


def test_mixture_is_deterministic_and_ignores_nan() -> None:
    r, _ = synthetic()
    first, second = fit_change_mixture(r, random_state=7), fit_change_mixture(r, random_state=7)
    assert first == second
    with_nan = fit_change_mixture(np.concatenate([r, [np.nan] * 5]), random_state=7)
    assert with_nan == first
    assert first.changed(np.array([np.nan, 100.0, 0.0])).tolist() == [False, True, False]


def test_mixture_without_threshold_uses_the_posterior() -> None:
    # The changed component outweighs the other even at the unchanged mean: no crossing there.
    mixture = ChangeMixture(
        log_means=(0.0, 1.0),
        log_stds=(1.0, 1.0),
        weights=(0.01, 0.99),
        threshold=None,
        n_samples=100,
    )
    r = np.array([0.001, 1.0, 10.0, np.nan])
    post = mixture.posterior(r)
    assert mixture.changed(r).tolist() == [bool(post[0] > 0.5), True, True, False]


def test_mixture_degenerate_inputs() -> None:
    with pytest.raises(DegenerateRatiosError, match=r"at least 10 finite ratios.*got 9"):
        fit_change_mixture(np.linspace(1, 2, 9))
    with pytest.raises(DegenerateRatiosError, match="got 3"):
        fit_change_mixture(np.array([1.0, 2.0, 3.0] + [np.nan] * 20))
    with pytest.raises(DegenerateRatiosError, match="all 50 ratios are equal"):
        fit_change_mixture(np.full(50, 1.3))
    with pytest.raises(ValueError, match="negative"):
        fit_change_mixture(np.array([-1.0] + [1.0] * 20))
    assert issubclass(DegenerateRatiosError, ValueError)


def test_mixture_handles_zero_ratios() -> None:
    r, truth = synthetic()
    r[:5] = 0.0  # f(q) = f(k_lt): clipped before the log, still unchanged
    mixture = fit_change_mixture(r)
    assert not mixture.changed(r[:5]).any()
    assert mixture.changed(r)[truth].mean() >= 0.9
