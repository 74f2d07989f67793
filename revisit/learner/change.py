"""Per-location change estimate (CACo, DESIGN §4): the ratio R, its running mean r, the mixture.

Pure functions over arrays; no I/O. The learner computes R for each location in
a batch from key-encoder embeddings, folds it into the location's running r
with :func:`ema_update`, and from time to time fits :func:`fit_change_mixture`
to all current r to decide which locations count as changed. Until a mixture
exists (warm-up), the caller keeps every own long-term key masked.

NaN is this module's "no value": a NaN previous r means "no estimate yet", a
NaN R means "not measured this time", and a NaN r is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.mixture import GaussianMixture

from revisit.errors import DegenerateRatiosError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
#: Embeddings may come as numpy arrays or (detached or not) torch tensors.
Embeddings = npt.NDArray[np.floating[Any]] | torch.Tensor

#: The ε of the ratio's denominator (CACo reference code: 0.0001).
DEFAULT_EPS = 1e-4
#: The EMA weight of the old value (CACo reference code: (4·r + R) / 5).
DEFAULT_BETA = 0.8
#: Fewer finite ratios than this and no mixture is fitted.
MIN_MIXTURE_SAMPLES = 10
#: Ratios are clipped to at least this before the log (R = 0 when f(q) = f(k_lt)).
LOG_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class ChangeRatio:
    """Per-row change ratio and the two distances it is made of, each (N,) float64.

    Attributes:
        ratio: R = long_dist / (short_dist + ε).
        long_dist: ‖f(q) - f(k_lt)‖, the distance to the long-term image.
        short_dist: ‖f(q) - f(k+)‖, the distance to the short-term image.
    """

    ratio: FloatArray
    long_dist: FloatArray
    short_dist: FloatArray


def _as_matrix(name: str, x: Embeddings) -> FloatArray:
    if isinstance(x, torch.Tensor):
        array: FloatArray = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {array.shape}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:10].tolist()
        raise ValueError(f"{name} has non-finite values in {int(bad.sum())} rows, first {rows}")
    return array


def _l2_normalise(x: FloatArray) -> FloatArray:
    # As torch.nn.functional.normalize: a zero row stays zero.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: FloatArray = x / np.maximum(norms, 1e-12)
    return out


def change_ratio(
    f_query: Embeddings,
    f_positive: Embeddings,
    f_longterm: Embeddings,
    *,
    eps: float = DEFAULT_EPS,
) -> ChangeRatio:
    r"""How much farther a location's long-term image is than its short-term one.

    Each row is L2-normalised inside, then

    .. math::

        R = \frac{\lVert f(I_{t_0}) - f(I_{lt}) \rVert}
                 {\lVert f(I_{t_0}) - f(I_{t_1}) \rVert + \varepsilon}

    Pass the key encoder's head-0 projections of q, k+ and k_lt (no gradients
    needed; tensors are detached and copied to float64 numpy). With unit vectors
    each distance lies in [0, 2]; if q = k+ the ratio is long_dist / ε.

    Args:
        f_query: (N, D) embeddings of the query image I_t0.
        f_positive: (N, D) embeddings of the short-term image I_t1.
        f_longterm: (N, D) embeddings of the long-term image I_lt.
        eps: ε > 0 of the denominator.

    Returns:
        :class:`ChangeRatio` of (N,) float64 arrays.

    Raises:
        ValueError: on mismatched or non-2-D shapes, non-finite values, or ε ≤ 0.
    """
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    q = _l2_normalise(_as_matrix("f_query", f_query))
    kp = _l2_normalise(_as_matrix("f_positive", f_positive))
    klt = _l2_normalise(_as_matrix("f_longterm", f_longterm))
    if kp.shape != q.shape or klt.shape != q.shape:
        raise ValueError(
            "f_query, f_positive and f_longterm must have the same shape, got "
            f"{q.shape}, {kp.shape}, {klt.shape}"
        )
    long_dist: FloatArray = np.linalg.norm(q - klt, axis=1)
    short_dist: FloatArray = np.linalg.norm(q - kp, axis=1)
    return ChangeRatio(
        ratio=long_dist / (short_dist + eps), long_dist=long_dist, short_dist=short_dist
    )


def _as_ratios(name: str, r: npt.ArrayLike) -> FloatArray:
    array: FloatArray = np.asarray(r, dtype=np.float64)
    if np.isinf(array).any():
        raise ValueError(f"{name} has infinite values")
    if (array < 0).any():
        raise ValueError(f"{name} has negative values; ratios are ≥ 0")
    return array


def ema_update(
    previous: npt.ArrayLike, ratio: npt.ArrayLike, *, beta: float = DEFAULT_BETA
) -> FloatArray:
    r"""Fold new ratios into the running estimates: r ← (1 - β)·R + β·r.

    Element-wise; NaN ``previous`` (no estimate yet) is initialised with R, and
    NaN ``ratio`` (not measured this time) keeps ``previous`` unchanged.

    Args:
        previous: r so far, NaN where there is none.
        ratio: new R, same shape, NaN where there is none.
        beta: β in [0, 1), the weight of the old value.

    Returns:
        The new r, float64, same shape.

    Raises:
        ValueError: on mismatched shapes, infinite or negative values, or β outside [0, 1).
    """
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
    old = _as_ratios("previous", previous)
    new = _as_ratios("ratio", ratio)
    if old.shape != new.shape:
        raise ValueError(
            f"previous and ratio must have the same shape, got {old.shape}, {new.shape}"
        )
    blended = (1.0 - beta) * new + beta * old
    out: FloatArray = np.where(np.isnan(old), new, np.where(np.isnan(new), old, blended))
    return out


@dataclass(frozen=True)
class ChangeMixture:
    """A two-component Gaussian mixture on log r; the component with the higher mean is "changed".

    Plain floats, so it can be logged, checkpointed and rebuilt without sklearn.
    Index 0 of each pair is the unchanged component, index 1 the changed one.

    Attributes:
        log_means: Component means of log r (changed > unchanged).
        log_stds: Component standard deviations of log r.
        weights: Mixing weights, summing to 1.
        threshold: The r between the two medians exp(log_means) where the
            posterior of "changed" crosses 0.5, or None when it does not cross there.
        n_samples: How many finite ratios the mixture was fitted on.
    """

    log_means: tuple[float, float]
    log_stds: tuple[float, float]
    weights: tuple[float, float]
    threshold: float | None
    n_samples: int

    @property
    def medians(self) -> tuple[float, float]:
        """The components' medians in r units, exp(log_means)."""
        return (float(np.exp(self.log_means[0])), float(np.exp(self.log_means[1])))

    def _log_joint(self, x: FloatArray, k: int) -> FloatArray:
        z = (x - self.log_means[k]) / self.log_stds[k]
        out: FloatArray = np.log(self.weights[k]) - np.log(self.log_stds[k]) - 0.5 * z * z
        return out

    def posterior(self, r: npt.ArrayLike) -> FloatArray:
        """P(changed | r) under the mixture (what sklearn's ``predict_proba`` gives).

        Args:
            r: ratios ≥ 0; NaN allowed.

        Returns:
            Probabilities of the same shape, NaN where r is NaN.

        Raises:
            ValueError: on negative or infinite r.
        """
        x = np.log(np.maximum(_as_ratios("r", r), LOG_FLOOR))
        l0, l1 = self._log_joint(x, 0), self._log_joint(x, 1)
        with np.errstate(invalid="ignore"):  # NaN in, NaN out
            out: FloatArray = np.exp(l1 - np.logaddexp(l0, l1))
        return out

    def changed(self, r: npt.ArrayLike) -> BoolArray:
        """Which ratios count as changed.

        ``r > threshold`` when the threshold exists; it agrees with the mixture's
        most probable component everywhere between and around the two means, and
        stays monotone in the far upper tail where a narrower "changed" Gaussian
        would otherwise lose to a wider "unchanged" one. Without a threshold, the
        most probable component (posterior > 0.5). NaN is never changed.

        Args:
            r: ratios ≥ 0; NaN allowed.

        Returns:
            Bool array of the same shape.

        Raises:
            ValueError: on negative or infinite r.
        """
        values = _as_ratios("r", r)
        if self.threshold is not None:
            with np.errstate(invalid="ignore"):
                out: BoolArray = values > self.threshold
            return out
        post = self.posterior(values)
        return np.where(np.isnan(post), False, post > 0.5)


def _crossing(mixture: ChangeMixture) -> float | None:
    """log r in [m0, m1] where the posterior is 0.5, by bisection; None if no sign change."""
    lo, hi = mixture.log_means

    def gap(x: float) -> float:
        point = np.array([x])
        return float((mixture._log_joint(point, 1) - mixture._log_joint(point, 0))[0])

    g_lo, g_hi = gap(lo), gap(hi)
    if not (g_lo < 0 < g_hi):
        return None
    # One root in the interval: a quadratic that changes sign between its ends.
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gap(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def fit_change_mixture(r: npt.ArrayLike, *, random_state: int = 0) -> ChangeMixture:
    """Fit the two-component Gaussian mixture that splits locations into unchanged and changed.

    Fitted on log r, not r: ratios are positive and right-skewed (a ratio of
    distances), unchanged locations cluster around a ratio of about 1 and changed
    ones spread over several times that, so on a log scale both groups are close
    to Gaussian and a mixture of two Gaussians fits them; on a linear scale the
    long right tail of the unchanged group tends to be taken for a component of
    its own. Ratios below ``LOG_FLOOR`` are clipped to it first. The fit is
    ``sklearn.mixture.GaussianMixture(n_components=2)`` with ``random_state``,
    so it is deterministic.

    NaN entries ("no estimate yet") are left out of the fit. Too few finite
    values (fewer than ``MIN_MIXTURE_SAMPLES``) or all equal raise
    :class:`DegenerateRatiosError`: the caller keeps its warm-up (nothing changed).

    Args:
        r: current running ratios of all locations, any shape; NaN allowed.
        random_state: seed of the mixture's initialisation.

    Returns:
        The fitted :class:`ChangeMixture`.

    Raises:
        DegenerateRatiosError: fewer than ``MIN_MIXTURE_SAMPLES`` finite values, or all equal.
        ValueError: negative or infinite values.
    """
    values = _as_ratios("r", r).ravel()
    values = values[~np.isnan(values)]
    if values.size < MIN_MIXTURE_SAMPLES:
        raise DegenerateRatiosError(
            f"need at least {MIN_MIXTURE_SAMPLES} finite ratios to fit the change mixture, "
            f"got {values.size}"
        )
    x = np.log(np.maximum(values, LOG_FLOOR))
    if np.ptp(x) <= 1e-12:
        raise DegenerateRatiosError(
            f"all {values.size} ratios are equal ({float(values[0]):.6g}); "
            "no two-component mixture to fit"
        )
    gmm = GaussianMixture(n_components=2, covariance_type="full", random_state=random_state)
    gmm.fit(x.reshape(-1, 1))
    means = np.asarray(gmm.means_, dtype=np.float64).ravel()
    stds = np.sqrt(np.asarray(gmm.covariances_, dtype=np.float64).ravel())
    weights = np.asarray(gmm.weights_, dtype=np.float64).ravel()
    order = np.argsort(means, kind="stable")
    unchanged, changed = int(order[0]), int(order[1])
    mixture = ChangeMixture(
        log_means=(float(means[unchanged]), float(means[changed])),
        log_stds=(float(stds[unchanged]), float(stds[changed])),
        weights=(float(weights[unchanged]), float(weights[changed])),
        threshold=None,
        n_samples=int(values.size),
    )
    crossing = _crossing(mixture)
    if crossing is None:
        return mixture
    return replace(mixture, threshold=float(np.exp(crossing)))
