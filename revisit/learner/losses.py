"""Contrastive losses of the learner: InfoNCE, CACo, SeCo's three heads, GASSL's geo head.

Pure functions over tensors, with thin :class:`torch.nn.Module` shells. Every
contrastive loss L2-normalises the query and every key along the last dimension
before taking dot products, so callers may pass raw projections; a zero vector
stays zero (``F.normalize`` with eps 1e-12) and scores 0 against everything.

Keys come from the momentum (key) encoder and never receive gradients: the
CACo and SeCo losses detach every key, queue and long-term tensor themselves, so
only the query carries gradients back to the query encoder. :func:`info_nce`
itself is generic and leaves gradients as they are.

Masked negatives get a logit of -∞, so they vanish from the softmax denominator
(exp(-∞) = 0) and receive no gradient. The positive logit is never masked, so
the loss stays finite.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Default softmax temperature τ (MoCo v2, SeCo, CACo).
DEFAULT_TEMPERATURE = 0.07

#: Which long-term keys are negatives (DESIGN §4):
#: ``caco``: a location's own long-term key only when it changed;
#: ``teco``: its own long-term key always;
#: ``tp`` / ``moco``: no long-term keys at all (``geo-tp`` uses ``tp`` here).
CACoMode = Literal["caco", "teco", "tp", "moco"]
CACO_MODES: tuple[str, ...] = get_args(CACoMode)

Reduction = Literal["mean", "none"]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def info_nce(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    negative_mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""InfoNCE with one positive per row and shared or per-row negatives.

    With q, k+ and k L2-normalised along the last dimension, per row i:

    .. math::

        L_i = -\log \frac{\exp(q_i \cdot k^+_i / \tau)}
            {\exp(q_i \cdot k^+_i / \tau) + \sum_{m\ \mathrm{kept}} \exp(q_i \cdot k_{im} / \tau)}

    computed stably as cross-entropy over the logits ``[q·k+ | q·k_1 … q·k_M] / τ``
    with target 0; a masked negative has logit -∞.

    Args:
        query: (N, D) queries.
        positive: (N, D) the positive key of each row.
        negatives: (M, D) negatives shared by every row (a queue), or (N, M, D)
            negatives per row. M may be 0.
        temperature: τ > 0.
        negative_mask: optional (N, M) bool; True keeps a negative, False masks
            it out of row i's denominator.
        reduction: ``"mean"`` over rows (a scalar) or ``"none"`` (N,) per-row losses.

    Returns:
        The loss: a scalar for ``"mean"``, an (N,) tensor for ``"none"``.

    Raises:
        ValueError: on bad shapes, an empty batch, a non-bool mask, τ ≤ 0, or an
            unknown reduction.
    """
    _check_temperature(temperature)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if query.ndim != 2:
        raise ValueError(f"query must be (N, D), got shape {_shape(query)}")
    n, d = query.shape
    if n == 0:
        raise ValueError("query is an empty batch (N = 0)")
    if positive.shape != query.shape:
        raise ValueError(
            f"positive must have the query's shape {_shape(query)}, got {_shape(positive)}"
        )
    if negatives.ndim == 2:
        if negatives.shape[1] != d:
            raise ValueError(f"negatives (M, D) must have D = {d}, got shape {_shape(negatives)}")
    elif negatives.ndim == 3:
        if negatives.shape[0] != n or negatives.shape[2] != d:
            raise ValueError(
                f"per-row negatives must be (N, M, D) = ({n}, M, {d}), got {_shape(negatives)}"
            )
    else:
        raise ValueError(f"negatives must be (M, D) or (N, M, D), got shape {_shape(negatives)}")
    m = negatives.shape[-2]
    if negative_mask is not None:
        if negative_mask.dtype != torch.bool:
            raise ValueError(f"negative_mask must be bool, got {negative_mask.dtype}")
        if negative_mask.shape != (n, m):
            raise ValueError(
                f"negative_mask must be (N, M) = ({n}, {m}), got {_shape(negative_mask)}"
            )

    q = F.normalize(query, dim=-1)
    k_pos = F.normalize(positive, dim=-1)
    k_neg = F.normalize(negatives, dim=-1)

    l_pos = (q * k_pos).sum(dim=-1, keepdim=True)  # (N, 1)
    # (N, M) either way.
    l_neg = q @ k_neg.T if k_neg.ndim == 2 else torch.einsum("nd,nmd->nm", q, k_neg)
    if negative_mask is not None:
        l_neg = l_neg.masked_fill(~negative_mask, float("-inf"))

    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(n, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def _check_rows(name: str, t: Tensor, n: int) -> None:
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be (N,) = ({n},), got shape {_shape(t)}")


def caco_negative_mask(
    changed: Tensor,
    longterm_valid: Tensor,
    *,
    n_queue: int,
    mode: CACoMode = "caco",
) -> Tensor:
    """Which negatives each row keeps in :func:`caco_loss`.

    The negatives are laid out as ``[queue (K) | positives k+_j (N) | long-term keys k_lt_j (N)]``,
    so the mask is (N, K + 2N), True = kept. For row i:

    - queue: every entry kept;
    - positives: k+_j kept for every j ≠ i (k+_i is row i's positive, not a negative);
    - long-term keys: k_lt_j kept for j ≠ i when ``longterm_valid[j]``; its own
      k_lt_i kept when ``longterm_valid[i]`` and, in mode ``caco``, ``changed[i]``;
      in mode ``teco`` always (when valid); modes ``tp``/``moco`` keep none.

    Args:
        changed: (N,) bool, the location of row i is classified as changed.
            Ignored by every mode but ``caco``.
        longterm_valid: (N,) bool, row i has a real long-term key (False: a dummy
            row that must never be used).
        n_queue: K, the number of queue entries in front (≥ 0).
        mode: ``caco``, ``teco``, ``tp`` or ``moco``.

    Returns:
        (N, K + 2N) bool mask on ``changed``'s device.

    Raises:
        ValueError: on bad shapes or dtypes, a negative ``n_queue`` or an unknown mode.
    """
    if mode not in CACO_MODES:
        raise ValueError(f"mode must be one of {CACO_MODES}, got {mode!r}")
    if isinstance(n_queue, bool) or not isinstance(n_queue, int) or n_queue < 0:
        raise ValueError(f"n_queue must be an int ≥ 0, got {n_queue!r}")
    if changed.ndim != 1:
        raise ValueError(f"changed must be (N,), got shape {_shape(changed)}")
    n = changed.shape[0]
    _check_rows("changed", changed, n)
    _check_rows("longterm_valid", longterm_valid, n)

    device = changed.device
    eye = torch.eye(n, dtype=torch.bool, device=device)
    queue_block = torch.ones(n, n_queue, dtype=torch.bool, device=device)
    positive_block = ~eye
    if mode in ("tp", "moco"):
        longterm_block = torch.zeros(n, n, dtype=torch.bool, device=device)
    else:
        valid = longterm_valid.to(device)
        own = valid & changed if mode == "caco" else valid
        longterm_block = (valid.unsqueeze(0) & ~eye) | torch.diag(own)
    return torch.cat([queue_block, positive_block, longterm_block], dim=1)


def caco_loss(
    query: Tensor,
    positive: Tensor,
    longterm: Tensor,
    queue: Tensor,
    *,
    changed: Tensor,
    longterm_valid: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    mode: CACoMode = "caco",
) -> Tensor:
    r"""Change-aware contrastive loss for one projection head (CACo, DESIGN §4).

    InfoNCE with k+ as the only positive and the negatives of
    :func:`caco_negative_mask` (layout ``[queue | k+_j | k_lt_j]``):

    .. math::

        L = \frac{1}{N}\sum_i -\log \frac{\exp(q_i\cdot k^+_i/\tau)}
            {\exp(q_i\cdot k^+_i/\tau) + \sum_{k \in N_i} \exp(q_i\cdot k/\tau)}

    with N_i the union of the queue, {k+_j : j ≠ i}, {k_lt_j : j ≠ i, valid_j}
    and, if valid_i and changed_i, {k_lt_i}. The long-term image is never a
    positive: an unchanged location's own k_lt is simply left out.

    All vectors are L2-normalised inside. ``positive``, ``longterm`` and
    ``queue`` are detached here (they are momentum-encoder keys): gradients reach
    the query only. Rows of ``longterm`` with ``longterm_valid`` False are
    replaced by zeros before any product, so a dummy row (even NaN) never leaks
    into the loss or its gradient.

    Args:
        query: (N, D) query-encoder projections of q.
        positive: (N, D) key-encoder projections of k+.
        longterm: (N, D) key-encoder projections of k_lt (dummy rows allowed).
        queue: (K, D) past keys of this head; K may be 0.
        changed: (N,) bool, location i is currently classified as changed.
        longterm_valid: (N,) bool, row i of ``longterm`` is a real image.
        temperature: τ > 0.
        mode: ``caco`` (default), ``teco``, ``tp`` or ``moco``.

    Returns:
        The mean loss over the batch, a scalar.

    Raises:
        ValueError: on bad shapes or dtypes, τ ≤ 0 or an unknown mode.
    """
    if query.ndim != 2:
        raise ValueError(f"query must be (N, D), got shape {_shape(query)}")
    for name, t in (("positive", positive), ("longterm", longterm)):
        if t.shape != query.shape:
            raise ValueError(f"{name} must have the query's shape {_shape(query)}, got {_shape(t)}")
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (K, D) with D = {query.shape[1]}, got {_shape(queue)}")
    _check_rows("changed", changed, query.shape[0])
    _check_rows("longterm_valid", longterm_valid, query.shape[0])
    mask = caco_negative_mask(changed, longterm_valid, n_queue=queue.shape[0], mode=mode)

    positive = positive.detach()
    valid = longterm_valid.to(longterm.device).unsqueeze(1)
    longterm = torch.where(valid, longterm.detach(), torch.zeros_like(longterm))
    keys = torch.cat([queue.detach().to(query.dtype), positive, longterm], dim=0)
    return info_nce(
        query, positive, keys, temperature=temperature, negative_mask=mask.to(query.device)
    )


class SeCoViews(NamedTuple):
    """One batch of SeCo views as projected by one head (each (N, D); ``queue`` (K, D)).

    With x_t0, x_t1, x_t2 three images of a location at different times (seasons)
    and aug(.) a random artificial augmentation (colour jitter, grey, blur, flip), in
    the names of the SeCo reference code:

    Attributes:
        query: q = x_t0 (query encoder).
        season_aug: k0 = aug(x_t1): other season and other augmentation.
        season: k1 = x_t2: other season, the query's augmentation.
        aug: k2 = aug(x_t0): same time, other augmentation.
        queue: this head's queue of past positive keys.
    """

    query: Tensor
    season_aug: Tensor
    season: Tensor
    aug: Tensor
    queue: Tensor


SeCoHead = Literal["invariant", "season-variant", "augmentation-variant"]
SECO_HEADS: tuple[str, ...] = get_args(SeCoHead)


def seco_head_loss(
    views: SeCoViews, *, head: SeCoHead, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """InfoNCE of one SeCo head (Mañas et al., ICCV 2021); see :func:`seco_loss`.

    Args:
        views: the head's projections of q, k0, k1, k2 and its queue.
        head: ``invariant``, ``season-variant`` or ``augmentation-variant``.
        temperature: τ > 0.

    Returns:
        The mean loss of that head, a scalar.

    Raises:
        ValueError: on bad shapes, τ ≤ 0 or an unknown head.
    """
    if head not in SECO_HEADS:
        raise ValueError(f"head must be one of {SECO_HEADS}, got {head!r}")
    q = views.query
    k0, k1, k2 = views.season_aug.detach(), views.season.detach(), views.aug.detach()
    for name, t in (("season_aug", k0), ("season", k1), ("aug", k2)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the query's shape {_shape(q)}, got {_shape(t)}")
    queue = views.queue.detach()
    if queue.ndim != 2 or q.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue must be (K, D) matching query (N, D); got {_shape(queue)}, {_shape(q)}"
        )
    queue = queue.to(q.dtype)
    if head == "invariant":
        positive, negatives = k0, queue
    elif head == "season-variant":
        positive, negatives = k2, torch.cat([queue, k0, k1], dim=0)
    else:
        positive, negatives = k1, torch.cat([queue, k0, k2], dim=0)
    return info_nce(q, positive, negatives, temperature=temperature)


def seco_loss(
    invariant: SeCoViews,
    season_variant: SeCoViews,
    augmentation_variant: SeCoViews,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """SeCo's multi-head loss: the sum of three InfoNCE losses, one per embedding subspace.

    Views (see :class:`SeCoViews`): q = x_t0, k0 = aug(x_t1), k1 = x_t2, k2 = aug(x_t0).
    Each head projects q and every key with its own head; negatives shared by all
    rows, in-batch keys of every row (the row's own included) and no mask:

    - ``invariant`` (to season and augmentation): positive k0; negatives: its queue.
    - ``season-variant`` (augmentation-invariant): positive k2;
      negatives: the queue, k0_j and k1_j for all j (other-season views push away).
    - ``augmentation-variant`` (season-invariant): positive k1;
      negatives: the queue, k0_j and k2_j for all j (other-augmentation views push away).

    L = L_invariant + L_season-variant + L_augmentation-variant. This is the
    reference code (ServiceNow/seasonal-contrast, ``MocoV2.forward`` with
    ``emb_spaces=3``), whose head 1 (positive k1) is our augmentation-variant
    head and whose head 2 (positive k2) our season-variant head. Each head's
    queue holds that head's past positive keys (the caller enqueues them).

    Args:
        invariant: views projected by the invariant head.
        season_variant: views projected by the season-variant head.
        augmentation_variant: views projected by the augmentation-variant head.
        temperature: τ > 0.

    Returns:
        The summed loss, a scalar.

    Raises:
        ValueError: on bad shapes or τ ≤ 0.
    """
    return (
        seco_head_loss(invariant, head="invariant", temperature=temperature)
        + seco_head_loss(season_variant, head="season-variant", temperature=temperature)
        + seco_head_loss(augmentation_variant, head="augmentation-variant", temperature=temperature)
    )


def geo_classification_loss(logits: Tensor, cluster_ids: Tensor) -> Tensor:
    r"""GASSL's geo-location loss: cross-entropy of the query's cluster.

    .. math:: L = -\frac{1}{N}\sum_i \log \mathrm{softmax}(z_i)_{c_i}

    The weight (1 in GASSL) is applied by the caller.

    Args:
        logits: (N, C) scores of the geo head for C clusters (K-means, C = 100).
        cluster_ids: (N,) integer cluster of each row, in [0, C).

    Returns:
        The mean cross-entropy, a scalar.

    Raises:
        ValueError: on bad shapes, a non-integer ``cluster_ids`` or an id out of range.
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (N, C) with N, C > 0, got shape {_shape(logits)}")
    n, c = logits.shape
    if cluster_ids.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"cluster_ids must be an integer tensor, got {cluster_ids.dtype}")
    if cluster_ids.shape != (n,):
        raise ValueError(f"cluster_ids must be (N,) = ({n},), got shape {_shape(cluster_ids)}")
    lo, hi = int(cluster_ids.min()), int(cluster_ids.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"cluster_ids must lie in [0, {c}), got values in [{lo}, {hi}]")
    return F.cross_entropy(logits, cluster_ids.long())


class CACoLoss(nn.Module):
    """Module shell over :func:`caco_loss` with a fixed temperature and mode.

    Args:
        temperature: τ > 0.
        mode: ``caco`` (default), ``teco``, ``tp`` or ``moco``.

    Raises:
        ValueError: τ ≤ 0 or an unknown mode.
    """

    def __init__(self, *, temperature: float = DEFAULT_TEMPERATURE, mode: CACoMode = "caco"):
        super().__init__()
        _check_temperature(temperature)
        if mode not in CACO_MODES:
            raise ValueError(f"mode must be one of {CACO_MODES}, got {mode!r}")
        self.temperature = temperature
        self.mode: CACoMode = mode

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        longterm: Tensor,
        queue: Tensor,
        *,
        changed: Tensor,
        longterm_valid: Tensor,
    ) -> Tensor:
        """See :func:`caco_loss`."""
        return caco_loss(
            query,
            positive,
            longterm,
            queue,
            changed=changed,
            longterm_valid=longterm_valid,
            temperature=self.temperature,
            mode=self.mode,
        )


class SeCoLoss(nn.Module):
    """Module shell over :func:`seco_loss` with a fixed temperature.

    Args:
        temperature: τ > 0.

    Raises:
        ValueError: τ ≤ 0.
    """

    def __init__(self, *, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, invariant: SeCoViews, season_variant: SeCoViews, augmentation_variant: SeCoViews
    ) -> Tensor:
        """See :func:`seco_loss`."""
        return seco_loss(
            invariant, season_variant, augmentation_variant, temperature=self.temperature
        )
