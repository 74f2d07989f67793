"""Per-location change estimate (CACo, DESIGN §4): the ratio R, its running mean r, the mixture.

Pure functions over arrays; no I/O. The learner computes R for each location in
a batch from key-encoder embeddings, folds it into the location's running r
with :func:`ema_update`, and from time to time fits :func:`fit_change_mixture`
to all current r to decide which locations count as changed. That fit keeps a
second ("changed") component only when the data clearly show one, so a unimodal
cloud of ratios yields "nothing changed" instead of being split in two; and
:meth:`ChangeMixture.classify` adds hysteresis so that refits do not flip the
locations near the threshold back and forth. Until a mixture exists (warm-up),
the caller keeps every own long-term key masked.

NaN is this module's "no value": a NaN previous r means "no estimate yet", a
NaN R means "not measured this time", and a NaN r is never changed.
"""

from __future__ import annotations

import math
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
#: Initialisations of the two-component fit (the best one is kept): one k-means
#: start can land in a poor local optimum, a few make the fit stable.
N_INIT = 3
#: The two-component fit must lower the BIC by at least this much to be kept.
#: ΔBIC ≥ 10 is "very strong" evidence on the Kass-Raftery scale; smaller gains
#: come from skew or a heavy tail of one population, not from a second one.
MIN_BIC_GAIN = 10.0
#: Ashman's D the two components need to be taken as two populations. An equal
#: mix of two equal-width Gaussians is bimodal only from D = 2 on; below it the
#: "components" are two overlapping halves of one skewed cloud.
MIN_SEPARATION = 2.0
#: Ashman's D needed when the upper ("changed") component has more than half
#: the weight. "Most locations changed" is the claim a wrongly split unimodal
#: cloud makes, so it needs a clearer gap (at D = 3 the valley is deep).
MIN_MAJORITY_SEPARATION = 3.0
#: Half-width of the hysteresis band of :meth:`ChangeMixture.classify` around a
#: posterior of 0.5: a location flips to changed at ≥ 0.65, back at ≤ 0.35.
DEFAULT_MARGIN = 0.15
#: Far-out low log r, below Q1 - LOW_FENCE_IQR·IQR (Tukey's outer fence), are
#: left out of the fit.
LOW_FENCE_IQR = 3.0


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


#: How many of the key encoder's levels :func:`dense_distance` compares by default,
#: besides its standardised input: the stem, layer1 and layer2 (cells of 1, 4, 4 and
#: 8 pixels of the key view).
DEFAULT_DENSE_DEPTH = 3
#: The quantile of the cell distances :func:`dense_distance` takes (0.9: a change
#: over a tenth of the chip's cells sets the distance; the unchanged rest does not).
DEFAULT_DENSE_QUANTILE = 0.9


def dense_distance(
    maps_a: list[torch.Tensor],
    maps_b: list[torch.Tensor],
    *,
    quantile: float = DEFAULT_DENSE_QUANTILE,
) -> FloatArray:
    r"""How far two images of a place are, cell by cell, on several levels of the encoder.

    For each level l (feature maps :math:`a_l, b_l` of shape (N, C, H, W)), the
    distance of every cell is :math:`\lVert a_l[:, :, i, j] - b_l[:, :, i, j] \rVert`
    over the channels; the level's distance is the ``quantile`` of its cells'
    distances, divided by the mean length of its feature vectors (over both images
    and all cells), so that every level counts alike whatever its scale; the
    result is the mean over levels.

    The learner passes the key encoder's standardised input and its stem, layer1
    and layer2 maps (:meth:`ContrastiveModel.key_with_maps`): the hypercolumn of
    deep change vector analysis (Saha et al., TGRS 2019), input level included,
    as the pair maps have it (:mod:`revisit.export.hypercolumn`).

    Why not the distance of the pooled embeddings (CACo's): a change that covers a
    few percent of a chip (a building, a cleared field) barely moves a global
    average of 4,096 pixels, and the deep projection is trained to ignore much of
    what a change looks like (colour and brightness shifts among the
    augmentations). A high quantile of local distances on the shallow levels sees
    a local change whatever the rest of the chip does (docs/change-estimates.md
    measures both on the OSCD cities).

    Args:
        maps_a: Feature maps of the first images, shallowest level first.
        maps_b: The same levels of the second images, same shapes.
        quantile: The quantile of the cell distances, in (0, 1].

    Returns:
        (N,) float64 distances, ≥ 0; 0 when the two images' maps are equal.

    Raises:
        ValueError: On no levels, mismatched shapes or a quantile out of range.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    if not maps_a or len(maps_a) != len(maps_b):
        raise ValueError(
            f"need the same, non-zero number of levels, got {len(maps_a)} and {len(maps_b)}"
        )
    per_level = []
    for level, (a, b) in enumerate(zip(maps_a, maps_b, strict=True)):
        if a.ndim != 4 or a.shape != b.shape:
            raise ValueError(
                f"level {level}: maps must be (N, C, H, W) of one shape, got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        a, b = a.detach().float(), b.detach().float()
        cells = (a - b).norm(dim=1).flatten(1)  # (N, H*W)
        scale = 0.5 * (a.norm(dim=1).flatten(1).mean(1) + b.norm(dim=1).flatten(1).mean(1))
        spread = torch.quantile(cells, quantile, dim=1)
        per_level.append(spread / (scale + 1e-6))
    out: FloatArray = torch.stack(per_level).mean(0).to("cpu", torch.float64).numpy()
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
    """The change model on log r: one Gaussian (nothing changed) or two (the upper one "changed").

    Plain floats, so it can be logged, checkpointed and rebuilt without sklearn.
    Index 0 of each pair is the unchanged component, index 1 the changed one.
    :func:`fit_change_mixture` keeps two components only when the data show a
    second, separate population (see there); otherwise ``components`` is 1, the
    single Gaussian sits in index 0 and is repeated in index 1 with weight 0,
    and nothing is changed: :meth:`posterior` is 0, :meth:`changed` and
    :meth:`classify` are False everywhere.

    The fields added after the first release (``components``, ``bic``,
    ``separation``) have defaults, so a mixture saved without them rebuilds as
    the two-component mixture it was.

    Attributes:
        log_means: Component means of log r (changed > unchanged).
        log_stds: Component standard deviations of log r.
        weights: Mixing weights, summing to 1 ((1, 0) for one component).
        threshold: The r between the two medians exp(log_means) where the
            posterior of "changed" crosses 0.5, or None when it does not cross
            there (always None for one component).
        n_samples: How many finite ratios the mixture was fitted on (far-out
            low ratios left out, see :func:`fit_change_mixture`).
        components: 1 (no evidence of a changed population) or 2.
        bic: BIC of the one- and the two-component fit, None if not recorded.
        separation: Ashman's D of the two-component fit, also when that fit
            was rejected; None if not recorded.
    """

    log_means: tuple[float, float]
    log_stds: tuple[float, float]
    weights: tuple[float, float]
    threshold: float | None
    n_samples: int
    components: int = 2
    bic: tuple[float, float] | None = None
    separation: float | None = None

    def __post_init__(self) -> None:
        if self.components not in (1, 2):
            raise ValueError(f"components must be 1 or 2, got {self.components!r}")

    @property
    def medians(self) -> tuple[float, float]:
        """The components' medians in r units, exp(log_means)."""
        return (float(np.exp(self.log_means[0])), float(np.exp(self.log_means[1])))

    def _log_joint(self, x: FloatArray, k: int) -> FloatArray:
        z = (x - self.log_means[k]) / self.log_stds[k]
        with np.errstate(divide="ignore"):  # a weight of 0 gives -inf
            out: FloatArray = np.log(self.weights[k]) - np.log(self.log_stds[k]) - 0.5 * z * z
        return out

    def _turning_point(self) -> tuple[float, int] | None:
        """Where the log-odds of "changed" stop rising, and on which side; None if never.

        The log-odds l1(x) - l0(x) is a quadratic in x = log r with vertex v.
        If the changed Gaussian is the narrower one (s1 < s0) it is concave and
        falls again right of v (returned with side +1); if it is the wider one
        it is convex and rises again left of v (side -1), so that tiny r would
        look changed. With m0 < m1 both turning points lie outside [m0, m1].
        Equal widths: a straight line, no turning point.
        """
        m0, m1 = self.log_means
        p0, p1 = 1.0 / self.log_stds[0] ** 2, 1.0 / self.log_stds[1] ** 2
        curvature = p0 - p1  # twice the quadratic's leading coefficient
        if abs(curvature) <= 1e-12 * max(p0, p1):
            return None
        vertex = (m1 * p1 - m0 * p0) / (p1 - p0)
        return (float(vertex), 1 if curvature < 0 else -1)

    def posterior(self, r: npt.ArrayLike) -> FloatArray:
        """P(changed | r) under the mixture, made non-decreasing in r; 0 for one component.

        Between the two means (and wherever it is rising) this is exactly what
        sklearn's ``predict_proba`` gives for the upper component. Beyond the
        log-odds' turning point (see :meth:`_turning_point`) it is held at its
        value there instead of falling again: a narrow "changed" Gaussian would
        otherwise give the far right tail a low posterior, and a narrow
        "unchanged" one would give near-zero r a high one. So a larger r is
        never less likely changed than a smaller one.

        Args:
            r: ratios ≥ 0; NaN allowed.

        Returns:
            Probabilities of the same shape, NaN where r is NaN.

        Raises:
            ValueError: on negative or infinite r.
        """
        values = _as_ratios("r", r)
        if self.components == 1:
            out: FloatArray = np.where(np.isnan(values), np.nan, 0.0)
            return out
        x = np.log(np.maximum(values, LOG_FLOOR))
        turning = self._turning_point()
        if turning is not None:
            vertex, side = turning
            with np.errstate(invalid="ignore"):
                x = np.minimum(x, vertex) if side > 0 else np.maximum(x, vertex)
        l0, l1 = self._log_joint(x, 0), self._log_joint(x, 1)
        with np.errstate(invalid="ignore"):  # NaN in, NaN out
            out = np.exp(l1 - np.logaddexp(l0, l1))
        return out

    def changed(self, r: npt.ArrayLike) -> BoolArray:
        """Which ratios count as changed, without hysteresis.

        ``r > threshold`` when the threshold exists; it agrees with the mixture's
        most probable component everywhere between and around the two means, and
        stays monotone in the far upper tail where a narrower "changed" Gaussian
        would otherwise lose to a wider "unchanged" one. Without a threshold,
        ``posterior(r) > 0.5`` (monotone too). One component: nothing. NaN is
        never changed.

        Args:
            r: ratios ≥ 0; NaN allowed.

        Returns:
            Bool array of the same shape.

        Raises:
            ValueError: on negative or infinite r.
        """
        values = _as_ratios("r", r)
        if self.components == 1:
            return np.zeros(values.shape, dtype=np.bool_)
        if self.threshold is not None:
            with np.errstate(invalid="ignore"):
                out: BoolArray = values > self.threshold
            return out
        post = self.posterior(values)
        return np.where(np.isnan(post), False, post > 0.5)

    def classify(
        self,
        r: npt.ArrayLike,
        previous: npt.ArrayLike | None,
        *,
        margin: float = DEFAULT_MARGIN,
    ) -> BoolArray:
        """Which ratios count as changed, with hysteresis against the previous flags.

        A location not changed before becomes changed only when
        ``posterior(r) >= 0.5 + margin``; one changed before stays changed
        unless ``posterior(r) <= 0.5 - margin``. So a refit that moves the
        threshold a little, or a ratio that wobbles around it, does not flip
        the locations near it back and forth. The posterior is non-decreasing
        in r, so for fixed previous flags the result is monotone in r (the far
        upper tail is changed). ``previous=None`` (no flags yet) is the plain
        rule :meth:`changed`. One component: nothing is changed, whatever the
        previous flags (no changed population left). NaN is never changed.

        Args:
            r: ratios ≥ 0; NaN allowed.
            previous: the locations' previous flags, bool, same shape as r, or None.
            margin: half-width of the band around 0.5, in [0, 0.5).

        Returns:
            Bool array of the same shape.

        Raises:
            ValueError: on negative or infinite r, a shape mismatch, or a bad margin.
        """
        if not (0.0 <= margin < 0.5):
            raise ValueError(f"margin must lie in [0, 0.5), got {margin!r}")
        values = _as_ratios("r", r)
        if previous is None:
            return self.changed(values)
        before = np.asarray(previous)
        if before.shape != values.shape:
            raise ValueError(
                f"previous and r must have the same shape, got {before.shape}, {values.shape}"
            )
        if before.dtype != np.bool_:
            raise ValueError(f"previous must be a bool array, got dtype {before.dtype}")
        if self.components == 1:
            return np.zeros(values.shape, dtype=np.bool_)
        post = self.posterior(values)
        with np.errstate(invalid="ignore"):  # NaN compares False: never changed
            out: BoolArray = np.where(before, post > 0.5 - margin, post >= 0.5 + margin)
        return out


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


def ashman_d(log_means: tuple[float, float], log_stds: tuple[float, float]) -> float:
    r"""Ashman's D of two Gaussians: :math:`\sqrt{2}\,|m_1 - m_0| / \sqrt{s_0^2 + s_1^2}`.

    D > 2 is needed for a clean separation of two populations; an equal mixture
    of two equal-width Gaussians is bimodal only from D = 2 on.
    """
    gap = abs(log_means[1] - log_means[0])
    spread = math.sqrt(log_stds[0] ** 2 + log_stds[1] ** 2)
    return math.inf if spread == 0.0 else math.sqrt(2.0) * gap / spread


def _far_low_fence(x: FloatArray) -> float:
    """Tukey's far-out fence below, Q1 - 3·IQR of log r."""
    q1, q3 = np.quantile(x, [0.25, 0.75])
    return float(q1 - LOW_FENCE_IQR * (q3 - q1))


def fit_change_mixture(r: npt.ArrayLike, *, random_state: int = 0) -> ChangeMixture:
    """Fit the change model: one Gaussian on log r, or two when a changed population shows.

    Fitted on log r, not r: ratios are positive and right-skewed (a ratio of
    distances), unchanged locations cluster around a ratio of about 1 and changed
    ones spread over several times that, so on a log scale both groups are close
    to Gaussian; on a linear scale the long right tail of the unchanged group
    tends to be taken for a component of its own. Ratios below ``LOG_FLOOR`` are
    clipped to it first.

    Far-out low values, below Tukey's fence Q1 - 3·IQR of log r (e.g. R = 0
    clipped to ``LOG_FLOOR``), are left out of the fit: they are unchanged
    whatever the model says, and a clump of them would otherwise be a "lower
    component" that makes everything else look changed. They still get a
    posterior (≈ 0, it is monotone) like every other ratio.

    ``sklearn.mixture.GaussianMixture`` with 1 and with 2 components (``n_init``
    = ``N_INIT``, ``random_state``, so it is deterministic) is fitted, and the
    two-component model is kept only when all of these hold:

    * its BIC is at least ``MIN_BIC_GAIN`` lower than the one-component BIC
      (the second component explains the data, not a bit of skew);
    * the two Gaussians are separated, Ashman's D ≥ ``MIN_SEPARATION``
      (a unimodal but skewed cloud is split by BIC alone, into overlapping parts);
    * if the upper ("changed") component holds more than half of the locations,
      D ≥ ``MIN_MAJORITY_SEPARATION``: most locations changed is a strong claim.

    Otherwise the result has one component: no evidence of a changed population.

    NaN entries ("no estimate yet") are left out of the fit. Too few finite
    values (fewer than ``MIN_MIXTURE_SAMPLES``) or all equal raise
    :class:`DegenerateRatiosError`: the caller keeps its warm-up (nothing changed).

    Args:
        r: current running ratios of all locations, any shape; NaN allowed.
        random_state: seed of the mixtures' initialisation.

    Returns:
        The :class:`ChangeMixture`, with the BICs and D recorded for the logs.

    Raises:
        DegenerateRatiosError: fewer than ``MIN_MIXTURE_SAMPLES`` finite values, or
            all equal (also once the far-out low ones are left out).
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
    x = x[x >= _far_low_fence(x)]
    if np.ptp(x) <= 1e-12:
        raise DegenerateRatiosError(
            f"all {x.size} ratios above the far-out low ones are equal "
            f"({float(np.exp(x[0])):.6g}); no mixture to fit"
        )
    data = x.reshape(-1, 1)
    one = GaussianMixture(n_components=1, covariance_type="full", random_state=random_state)
    one.fit(data)
    two = GaussianMixture(
        n_components=2, covariance_type="full", n_init=N_INIT, random_state=random_state
    )
    two.fit(data)
    bic = (float(one.bic(data)), float(two.bic(data)))

    means = np.asarray(two.means_, dtype=np.float64).ravel()
    stds = np.sqrt(np.asarray(two.covariances_, dtype=np.float64).ravel())
    weights = np.asarray(two.weights_, dtype=np.float64).ravel()
    order = np.argsort(means, kind="stable")
    unchanged, changed = int(order[0]), int(order[1])
    log_means = (float(means[unchanged]), float(means[changed]))
    log_stds = (float(stds[unchanged]), float(stds[changed]))
    separation = ashman_d(log_means, log_stds)
    upper_weight = float(weights[changed])
    keep_two = (
        bic[0] - bic[1] >= MIN_BIC_GAIN
        and separation >= MIN_SEPARATION
        and (upper_weight <= 0.5 or separation >= MIN_MAJORITY_SEPARATION)
    )
    if not keep_two:
        mean = float(np.asarray(one.means_, dtype=np.float64).ravel()[0])
        std = float(np.sqrt(np.asarray(one.covariances_, dtype=np.float64).ravel()[0]))
        return ChangeMixture(
            log_means=(mean, mean),
            log_stds=(std, std),
            weights=(1.0, 0.0),
            threshold=None,
            n_samples=int(x.size),
            components=1,
            bic=bic,
            separation=separation,
        )
    mixture = ChangeMixture(
        log_means=log_means,
        log_stds=log_stds,
        weights=(float(weights[unchanged]), upper_weight),
        threshold=None,
        n_samples=int(x.size),
        components=2,
        bic=bic,
        separation=separation,
    )
    crossing = _crossing(mixture)
    if crossing is None:
        return mixture
    return replace(mixture, threshold=float(np.exp(crossing)))
