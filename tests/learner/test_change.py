"""The change ratio, its running mean, and the change mixture (model selection, hysteresis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from revisit.learner.change import (
    DEFAULT_MARGIN,
    MIN_MAJORITY_SEPARATION,
    MIN_SEPARATION,
    N_INIT,
    ChangeMixture,
    DegenerateRatiosError,
    ashman_d,
    change_ratio,
    dense_distance,
    ema_update,
    fit_change_mixture,
)


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


# --- dense_distance ---------------------------------------------------------------------------


def _maps(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 4, 8, 8, generator=g), torch.rand(n, 6, 4, 4, generator=g)]


def test_dense_distance_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    a, b = _maps(0), _maps(1)
    assert dense_distance(a, [m.clone() for m in a]).tolist() == [0.0, 0.0, 0.0]
    d = dense_distance(a, b)
    assert d.dtype == np.float64 and d.shape == (3,) and (d > 0).all()


def test_dense_distance_hand_value() -> None:
    # One level, one channel, 10 cells: a = 1 everywhere, b = 1 but 3 at the last cell.
    # Cell distances: nine 0, one 2; their 0.9-quantile (linear) is 0.2; the mean
    # length is (1 + 1.2) / 2 = 1.1; the distance 0.2 / 1.1.
    a = torch.ones(1, 1, 1, 10)
    b = a.clone()
    b[0, 0, 0, 9] = 3.0
    assert dense_distance([a], [b]).tolist() == pytest.approx([0.2 / 1.1], rel=1e-5)


def test_dense_distance_each_level_counts_whatever_its_scale() -> None:
    a, b = _maps(0), _maps(1)
    scaled_a = [a[0] * 1000.0, a[1]]
    scaled_b = [b[0] * 1000.0, b[1]]
    assert dense_distance(scaled_a, scaled_b) == pytest.approx(dense_distance(a, b), rel=1e-5)


def test_dense_distance_sees_a_local_change_the_pooled_average_hides() -> None:
    # A change over a fifth of the cells that leaves the chip's mean unchanged.
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 8, 10, 10, generator=g) + 1.0
    b = a.clone()
    b[:, :4, :2, :] += 0.5
    b[:, 4:, :2, :] -= 0.5
    b[:, :4, 2:4, :] -= 0.5
    b[:, 4:, 2:4, :] += 0.5
    pooled = (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).norm(dim=1)
    assert float(pooled) == pytest.approx(0.0, abs=1e-5)
    assert dense_distance([a], [b])[0] > 0.2  # cells 1.41 apart, vectors about 4.3 long
    # The larger the changed share, the larger the distance (here up to the quantile).
    small = a.clone()
    small[:, :4, :1, :5] += 0.5
    assert dense_distance([a], [small])[0] < dense_distance([a], [b])[0]


def test_dense_distance_refuses_bad_input() -> None:
    a, b = _maps(0), _maps(1)
    with pytest.raises(ValueError, match="quantile"):
        dense_distance(a, b, quantile=0.0)
    with pytest.raises(ValueError, match="levels"):
        dense_distance([], [])
    with pytest.raises(ValueError, match="levels"):
        dense_distance(a, b[:1])
    with pytest.raises(ValueError, match="level 1"):
        dense_distance(a, [b[0], b[1][:, :3]])


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
    assert mixture.components == 2
    assert mixture.bic is not None and mixture.bic[0] - mixture.bic[1] > 100
    assert mixture.separation == pytest.approx(ashman_d(mixture.log_means, mixture.log_stds))
    assert mixture.separation > MIN_MAJORITY_SEPARATION
    assert mixture.threshold is not None
    assert mixture.medians[0] < mixture.threshold < mixture.medians[1]
    assert mixture.posterior(np.array([mixture.threshold]))[0] == pytest.approx(0.5, abs=1e-6)


def test_mixture_posterior_is_sklearns() -> None:
    r, _ = synthetic(seed=1)
    mixture = fit_change_mixture(r, random_state=3)
    gmm = GaussianMixture(n_components=2, n_init=N_INIT, random_state=3)
    gmm.fit(np.log(r).reshape(-1, 1))
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
    assert mixture.components == 2 and mixture.bic is None and mixture.separation is None


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
    assert mixture.components == 2
    assert mixture.n_samples == 995  # the far-out low ones are left out of the fit
    assert not mixture.changed(r[:5]).any()
    assert mixture.posterior(r[:5]).max() < 1e-6
    assert mixture.changed(r)[truth].mean() >= 0.9
    assert mixture.changed(r)[~truth].mean() <= 0.01


def test_mixture_far_low_clump_does_not_make_the_rest_changed() -> None:
    # 5 % of the ratios at 0.01: without the low fence they would be the "unchanged"
    # component and every other location "changed".
    rng = np.random.default_rng(4)
    r = np.concatenate(
        [np.full(25, 0.01) * rng.lognormal(0, 0.05, 25), rng.lognormal(0, 0.25, 475)]
    )
    mixture = fit_change_mixture(r)
    assert mixture.components == 1
    assert not mixture.changed(r).any()


# --- model selection --------------------------------------------------------------------------


def lognormal_mix(
    rng: np.random.Generator, parts: list[tuple[int, float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Ratios from (count, median, sigma of log r) parts; truth marks all but the first part."""
    r = np.concatenate([rng.lognormal(math.log(med), sigma, n) for n, med, sigma in parts])
    truth = np.ones(r.size, dtype=bool)
    truth[: parts[0][0]] = False
    return r, truth


@pytest.mark.parametrize("seed", range(5))
def test_all_unchanged_is_one_component(seed: int) -> None:
    r = np.random.default_rng(seed).lognormal(0.0, 0.25, 500)
    mixture = fit_change_mixture(np.concatenate([r, [np.nan]]))
    assert mixture.components == 1
    assert mixture.threshold is None
    assert mixture.weights == (1.0, 0.0)
    assert mixture.log_means[0] == mixture.log_means[1] == pytest.approx(np.log(r).mean())
    assert mixture.log_stds[0] == pytest.approx(np.log(r).std(), rel=1e-3)
    assert mixture.n_samples == 500
    assert mixture.bic is not None and mixture.separation is not None
    assert not mixture.changed(r).any()
    assert not mixture.classify(r, np.ones(r.size, dtype=bool)).any()
    post = mixture.posterior(np.array([0.0, 1.0, 1e6, np.nan]))
    assert post[:3].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(post[3])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["gamma4", "gamma2", "exgauss", "log-t"])
def test_skewed_unimodal_cloud_is_not_split(seed: int, kind: str) -> None:
    # BIC alone prefers two components for most of these (skew, heavy tails);
    # the separation rule does not let them through.
    rng = np.random.default_rng(seed)
    n = 1000
    if kind == "gamma4":
        r = rng.gamma(4.0, 0.25, n)
    elif kind == "gamma2":
        r = rng.gamma(2.0, 0.5, n)
    elif kind == "exgauss":  # log-normal with an exponential right tail in log r
        r = np.exp(rng.normal(0.0, 0.2, n) + rng.exponential(0.2, n))
    else:
        r = np.exp(0.25 * rng.standard_t(4, n))
    mixture = fit_change_mixture(r)
    assert mixture.changed(r).mean() <= 0.05
    assert mixture.classify(r, np.zeros(n, dtype=bool)).mean() <= 0.05
    assert mixture.components == 1
    assert mixture.separation is not None and mixture.separation < MIN_SEPARATION


@pytest.mark.parametrize("seed", range(5))
def test_a_few_outliers_are_changed(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bulk = rng.lognormal(0.0, 0.25, 300)
    outliers = rng.lognormal(0.0, 0.25, 6) * 8.0
    r = np.concatenate([bulk, outliers])
    mixture = fit_change_mixture(r)
    assert mixture.components == 2
    flags = mixture.changed(r)
    assert flags[300:].all()
    assert flags[:300].mean() <= 0.02
    np.testing.assert_array_equal(mixture.classify(r, None), flags)
    # Far above the outliers' narrow component, still changed.
    assert mixture.changed(np.array([1e3, 1e5])).all()
    assert (mixture.posterior(np.array([1e3, 1e5])) > 0.99).all()


@pytest.mark.parametrize("seed", range(5))
def test_clear_two_populations(seed: int) -> None:
    r, truth = lognormal_mix(np.random.default_rng(seed), [(800, 1.0, 0.15), (200, 4.0, 0.15)])
    mixture = fit_change_mixture(r)
    assert mixture.components == 2
    flags = mixture.changed(r)
    assert flags.mean() == pytest.approx(0.2, abs=0.05)
    assert truth[flags].mean() >= 0.98  # precision
    assert flags[truth].mean() >= 0.95  # recall
    assert mixture.threshold is not None
    assert 1.0 < mixture.threshold < 4.0


@pytest.mark.parametrize("seed", range(5))
def test_weakly_separated_majority_is_not_called_changed(seed: int) -> None:
    r, _ = lognormal_mix(np.random.default_rng(seed), [(400, 1.0, 0.3), (600, math.exp(0.5), 0.3)])
    mixture = fit_change_mixture(r)
    assert mixture.components == 1 or mixture.changed(r).mean() <= 0.5
    assert mixture.classify(r, np.zeros(r.size, dtype=bool)).mean() <= 0.5


@pytest.mark.parametrize("seed", range(5))
def test_clearly_separated_majority_is_changed(seed: int) -> None:
    r, truth = lognormal_mix(np.random.default_rng(seed), [(300, 1.0, 0.1), (700, 6.0, 0.1)])
    mixture = fit_change_mixture(r)
    assert mixture.components == 2
    assert mixture.weights[1] > 0.5
    assert mixture.separation is not None and mixture.separation >= MIN_MAJORITY_SEPARATION
    flags = mixture.changed(r)
    assert flags.mean() == pytest.approx(0.7, abs=0.02)
    np.testing.assert_array_equal(flags, truth)


def test_majority_rule_needs_the_stricter_separation() -> None:
    # Same shape, swapped weights: a 30 % upper population at D ≈ 2.6 is kept,
    # a 70 % one at the same D is not.
    rng = np.random.default_rng(0)
    gap = 2.6 * 0.2  # equal widths s: D = sqrt(2)·gap / sqrt(2·s²) = gap / s
    minority = fit_change_mixture(
        lognormal_mix(rng, [(1400, 1.0, 0.2), (600, math.exp(gap), 0.2)])[0]
    )
    majority = fit_change_mixture(
        lognormal_mix(rng, [(600, 1.0, 0.2), (1400, math.exp(gap), 0.2)])[0]
    )
    assert minority.components == 2
    assert majority.components == 1
    assert majority.separation is not None
    assert MIN_SEPARATION <= majority.separation < MIN_MAJORITY_SEPARATION


def test_fit_is_deterministic() -> None:
    r, _ = lognormal_mix(np.random.default_rng(3), [(700, 1.0, 0.3), (300, 3.0, 0.3)])
    assert fit_change_mixture(r, random_state=11) == fit_change_mixture(r, random_state=11)
    unimodal = np.random.default_rng(3).gamma(4.0, 0.25, 800)
    one = fit_change_mixture(unimodal, random_state=11)
    assert one == fit_change_mixture(unimodal, random_state=11)
    assert one.components == 1


# --- one component by hand, posterior monotone, hysteresis -------------------------------------


def test_hand_built_one_component_mixture() -> None:
    mixture = ChangeMixture(
        log_means=(0.0, 0.0),
        log_stds=(0.3, 0.3),
        weights=(1.0, 1.0),
        threshold=None,
        n_samples=50,
        components=1,
    )
    r = np.array([0.0, 0.5, 1.0, 3.0, 1e4, np.nan])
    post = mixture.posterior(r)
    assert post[:5].tolist() == [0.0] * 5
    assert np.isnan(post[5])
    assert not mixture.changed(r).any()
    assert not mixture.classify(r, np.ones(r.size, dtype=bool)).any()
    assert not mixture.classify(r, None).any()
    with pytest.raises(ValueError, match="components must be 1 or 2"):
        ChangeMixture((0.0, 1.0), (1.0, 1.0), (0.5, 0.5), None, 10, components=3)


def narrow_upper_mixture() -> ChangeMixture:
    rng = np.random.default_rng(0)
    r, _ = lognormal_mix(rng, [(800, 1.0, 0.4), (200, 5.0, 0.1)])
    mixture = fit_change_mixture(r)
    assert mixture.components == 2
    assert mixture.log_stds[1] < mixture.log_stds[0] / 2
    return mixture


def test_posterior_and_flags_are_monotone_with_a_narrow_upper_component() -> None:
    mixture = narrow_upper_mixture()
    grid = np.geomspace(1e-5, 1e5, 40001)
    post = mixture.posterior(grid)
    assert np.all(np.diff(post) >= 0)
    assert post[-1] > 0.99  # the raw two-Gaussian posterior would be 0 out there
    for flags in (
        mixture.changed(grid),
        mixture.classify(grid, None),
        mixture.classify(grid, np.zeros(grid.size, dtype=bool)),
        mixture.classify(grid, np.ones(grid.size, dtype=bool)),
    ):
        assert np.all(np.diff(flags.astype(int)) >= 0)
        assert not flags[0] and flags[-1]


def test_posterior_monotone_with_a_narrow_lower_component() -> None:
    # A wide changed Gaussian would otherwise win again at tiny r.
    mixture = ChangeMixture(
        log_means=(0.0, 1.5), log_stds=(0.1, 1.0), weights=(0.5, 0.5), threshold=None, n_samples=10
    )
    grid = np.geomspace(1e-6, 1e6, 20001)
    post = mixture.posterior(grid)
    assert np.all(np.diff(post) >= 0)
    assert post[0] < 0.5
    assert not mixture.changed(np.array([1e-6, 1e-3])).any()


def ratio_with_posterior(mixture: ChangeMixture, p: float) -> float:
    # Equal widths: the log-odds are linear in log r.
    (m0, m1), (s, _), (w0, w1) = mixture.log_means, mixture.log_stds, mixture.weights
    logit = math.log(p / (1 - p))
    x = (logit - math.log(w1 / w0)) * s * s / (m1 - m0) + 0.5 * (m0 + m1)
    return math.exp(x)


def test_classify_hysteresis_rules() -> None:
    mixture = ChangeMixture(
        log_means=(0.0, 1.0), log_stds=(0.3, 0.3), weights=(0.8, 0.2), threshold=None, n_samples=10
    )
    probs = [0.3, 0.45, 0.55, 0.7]
    r = np.array([ratio_with_posterior(mixture, p) for p in probs] + [np.nan])
    np.testing.assert_allclose(mixture.posterior(r[:4]), probs, rtol=1e-9)
    assert DEFAULT_MARGIN == 0.15
    no = np.zeros(r.size, dtype=bool)
    yes = np.ones(r.size, dtype=bool)
    # Unchanged before: only ≥ 0.65 becomes changed (0.55 stays unchanged).
    assert mixture.classify(r, no).tolist() == [False, False, False, True, False]
    # Changed before: only ≤ 0.35 goes back (0.45 stays changed); NaN is never changed.
    assert mixture.classify(r, yes).tolist() == [False, True, True, True, False]
    # No previous flags, or no margin: the plain 0.5 rule.
    assert mixture.classify(r, None).tolist() == [False, False, True, True, False]
    assert mixture.classify(r, no, margin=0.0).tolist() == mixture.changed(r).tolist()
    with pytest.raises(ValueError, match="margin"):
        mixture.classify(r, no, margin=0.5)
    with pytest.raises(ValueError, match="same shape"):
        mixture.classify(r, no[:2])
    with pytest.raises(ValueError, match="bool"):
        mixture.classify(r, np.zeros(r.size))


@pytest.mark.parametrize("seed", range(3))
def test_hysteresis_keeps_refits_stable(seed: int) -> None:
    rng = np.random.default_rng(seed)
    r1, _ = lognormal_mix(rng, [(2100, 1.0, 0.3), (900, 3.0, 0.3)])
    r2 = r1 * np.exp(rng.normal(0.0, 0.02, r1.size))
    first, second = fit_change_mixture(r1), fit_change_mixture(r2)
    assert first.components == second.components == 2
    plain_flips = int((second.changed(r2) != first.changed(r1)).sum())
    previous = first.classify(r1, None)
    hysteresis_flips = int((second.classify(r2, previous) != previous).sum())
    assert plain_flips >= 5
    assert hysteresis_flips <= plain_flips // 4
