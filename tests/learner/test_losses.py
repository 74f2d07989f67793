"""The contrastive losses against hand-computed values, and the change-aware mask."""

from __future__ import annotations

import math

import pytest
import torch

from revisit.learner.losses import (
    CACoLoss,
    SeCoLoss,
    SeCoViews,
    caco_loss,
    caco_negative_mask,
    geo_classification_loss,
    info_nce,
    seco_head_loss,
    seco_loss,
)

SQRT3_2 = math.sqrt(3) / 2


def t(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def b(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# --- info_nce ---------------------------------------------------------------------------------


def test_info_nce_hand_value() -> None:
    # q·k+ = cos 60° = 0.5, q·n1 = 0, q·n2 = -1; τ = 0.5 → logits [1, 0, -2]
    # L = -log(e¹ / (e¹ + e⁰ + e⁻²)) = log(1 + e⁻¹ + e⁻³)
    q = t((1.0, 0.0))
    k = t((0.5, SQRT3_2))
    negatives = t((0.0, 1.0), (-1.0, 0.0))
    loss = info_nce(q, k, negatives, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-3)), rel=1e-12)


def test_info_nce_normalises_inputs() -> None:
    q = t((3.0, 0.0))
    k = t((5.0, 5 * math.sqrt(3)))  # |k| = 10, same direction as (0.5, √3/2)
    negatives = t((0.0, 0.2), (-7.0, 0.0))
    loss = info_nce(q, k, negatives, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-3)), rel=1e-12)


def test_info_nce_mask_removes_exactly_one_term() -> None:
    q = t((1.0, 0.0))
    k = t((0.5, SQRT3_2))
    negatives = t((0.0, 1.0), (-1.0, 0.0))
    # Masking n1 (logit 0) leaves L = log(1 + e⁻³).
    loss = info_nce(q, k, negatives, temperature=0.5, negative_mask=b(False, True).unsqueeze(0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3)), rel=1e-12)
    # Masking everything leaves only the positive: L = -log 1 = 0.
    none = info_nce(q, k, negatives, temperature=0.5, negative_mask=b(False, False).unsqueeze(0))
    assert none.item() == pytest.approx(0.0, abs=1e-12)


def test_info_nce_no_negatives_is_zero() -> None:
    q = t((1.0, 0.0))
    assert info_nce(q, q, torch.empty(0, 2, dtype=torch.float64)).item() == pytest.approx(0.0)


def test_info_nce_shared_queue_equals_per_row_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    queue = torch.randn(5, 8, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    shared = info_nce(q, k, queue, negative_mask=mask, reduction="none")
    per_row = info_nce(q, k, queue.expand(4, 5, 8), negative_mask=mask, reduction="none")
    torch.testing.assert_close(shared, per_row)
    assert shared.shape == (4,)
    torch.testing.assert_close(info_nce(q, k, queue, negative_mask=mask), shared.mean())


def test_info_nce_per_row_negatives_hand_value() -> None:
    # Row 0 as in the hand test; row 1: q·k+ = 1, one negative with q·n = 0, τ = 0.5:
    # L1 = -log(e² / (e² + 1)) = log(1 + e⁻²).
    q = t((1.0, 0.0), (0.0, 1.0))
    k = t((0.5, SQRT3_2), (0.0, 1.0))
    negatives = torch.stack([t((0.0, 1.0), (-1.0, 0.0)), t((1.0, 0.0), (1.0, 0.0))])
    mask = b(True, True, True, False).reshape(2, 2)
    loss = info_nce(q, k, negatives, temperature=0.5, negative_mask=mask, reduction="none")
    expected = [math.log(1 + math.exp(-1) + math.exp(-3)), math.log(1 + math.exp(-2))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_info_nce_rejects_bad_temperature(temperature: float) -> None:
    q = t((1.0, 0.0))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, q, temperature=temperature)


def test_info_nce_rejects_bad_shapes() -> None:
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="query"):
        info_nce(torch.zeros(3), torch.zeros(3), q)
    with pytest.raises(ValueError, match="positive"):
        info_nce(q, torch.zeros(2, 4), q)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(q, q, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="per-row"):
        info_nce(q, q, torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="empty"):
        info_nce(torch.zeros(0, 3), torch.zeros(0, 3), q)
    with pytest.raises(ValueError, match="bool"):
        info_nce(q, q, q, negative_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(N, M\)"):
        info_nce(q, q, q, negative_mask=torch.ones(2, 3, dtype=torch.bool))


# --- caco_negative_mask -----------------------------------------------------------------------


def test_caco_mask_layout() -> None:
    # N = 3, K = 2. Row 1 changed; row 2 has no long-term image.
    changed, valid = b(False, True, True), b(True, True, False)
    mask = caco_negative_mask(changed, valid, n_queue=2, mode="caco")
    #        queue |  k+_0  k+_1  k+_2 |  lt_0  lt_1  lt_2
    expected = [
        [1, 1, 0, 1, 1, 0, 1, 0],  # own lt_0 masked: unchanged
        [1, 1, 1, 0, 1, 1, 1, 0],  # own lt_1 kept: changed
        [1, 1, 1, 1, 0, 1, 1, 0],  # lt_2 is a dummy: never used, even though changed
    ]
    assert mask.tolist() == [[bool(v) for v in row] for row in expected]


def test_caco_mask_teco_always_keeps_own_longterm() -> None:
    changed, valid = b(False, False, True), b(True, True, False)
    mask = caco_negative_mask(changed, valid, n_queue=0, mode="teco")
    longterm = mask[:, 3:]
    assert longterm.tolist() == [[True, True, False], [True, True, False], [True, True, False]]


@pytest.mark.parametrize("mode", ["tp", "moco"])
def test_caco_mask_tp_and_moco_have_no_longterm(mode: str) -> None:
    mask = caco_negative_mask(b(True, True), b(True, True), n_queue=1, mode=mode)  # type: ignore[arg-type]
    assert mask.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]


def test_caco_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mode"):
        caco_negative_mask(b(True), b(True), n_queue=0, mode="seco")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_queue"):
        caco_negative_mask(b(True), b(True), n_queue=-1)
    with pytest.raises(ValueError, match="longterm_valid"):
        caco_negative_mask(b(True), b(True, False), n_queue=0)
    with pytest.raises(ValueError, match="changed must be a bool"):
        caco_negative_mask(torch.ones(1), b(True), n_queue=0)


# --- caco_loss --------------------------------------------------------------------------------
# Two locations, D = 3, τ = 0.5, empty queue:
#   q0 = e1, k+0 = e2 (far positive), k_lt0 = e1 = q0 (long-term image identical to the query)
#   q1 = e3, k+1 = e3,                k_lt1 = e2
# Row 0 logits / τ: pos 0 | k+1: 0 | lt1: 0 | own lt0: 2
# Row 1 logits / τ: pos 2 | k+0: 0 | lt0: 0 | own lt1: 0
E1, E2, E3 = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
TAU = 0.5


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return t(E1, E3), t(E2, E3), t(E1, E2), torch.empty(0, 3, dtype=torch.float64)


L0_UNCHANGED = math.log(3)  # -log(1 / (1 + 1 + 1))
L0_CHANGED = math.log(3 + math.exp(2))  # -log(1 / (1 + 1 + 1 + e²))
L1_UNCHANGED = math.log(1 + 2 * math.exp(-2))  # -log(e² / (e² + 2))
L1_CHANGED = math.log(1 + 3 * math.exp(-2))  # -log(e² / (e² + 3))


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ((False, False), (L0_UNCHANGED + L1_UNCHANGED) / 2),
        ((True, False), (L0_CHANGED + L1_UNCHANGED) / 2),
        ((False, True), (L0_UNCHANGED + L1_CHANGED) / 2),
        ((True, True), (L0_CHANGED + L1_CHANGED) / 2),
    ],
)
def test_caco_loss_hand_values(changed: tuple[bool, bool], expected: float) -> None:
    q, k, lt, queue = batch()
    loss = caco_loss(
        q, k, lt, queue, changed=b(*changed), longterm_valid=b(True, True), temperature=TAU
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_unchanged_own_longterm_is_masked_and_lowers_the_loss() -> None:
    q, k, lt, queue = batch()
    kwargs = {"longterm_valid": b(True, True), "temperature": TAU}
    unchanged = caco_loss(q, k, lt, queue, changed=b(False, False), **kwargs)  # type: ignore[arg-type]
    changed = caco_loss(q, k, lt, queue, changed=b(True, False), **kwargs)  # type: ignore[arg-type]
    assert unchanged.item() < changed.item()
    assert changed.item() - unchanged.item() == pytest.approx((L0_CHANGED - L0_UNCHANGED) / 2)


def test_longterm_is_never_a_positive() -> None:
    # k_lt0 == q0 exactly and k+0 is orthogonal: an unchanged location's long-term
    # image is dropped, not rewarded. Row 0's loss is exactly the loss with its own
    # long-term slot absent: negatives {k+1, k_lt1} only.
    q, k, lt, queue = batch()
    loss = caco_loss(
        q, k, lt, queue, changed=b(False, False), longterm_valid=b(True, True), temperature=TAU
    )
    row0_without_own = info_nce(q[:1], k[:1], torch.stack([k[1], lt[1]]), temperature=TAU)
    assert row0_without_own.item() == pytest.approx(L0_UNCHANGED)
    assert 2 * loss.item() - L1_UNCHANGED == pytest.approx(row0_without_own.item(), rel=1e-12)
    # Had k_lt0 counted as a positive, row 0 would be -log((1 + e²) / (3 + e²)) < log 3.
    as_positive = -math.log((1 + math.exp(2)) / (3 + math.exp(2)))
    assert 2 * loss.item() - L1_UNCHANGED > as_positive + 0.5


def test_other_rows_longterm_keys_are_always_negatives() -> None:
    # Move k_lt1 onto q0: row 0's loss grows even though nobody changed.
    q, k, lt, queue = batch()
    lt_near = t(E1, E1)
    kwargs = {"changed": b(False, False), "longterm_valid": b(True, True), "temperature": TAU}
    base = caco_loss(q, k, lt, queue, **kwargs)  # type: ignore[arg-type]
    near = caco_loss(q, k, lt_near, queue, **kwargs)  # type: ignore[arg-type]
    # Row 0: lt1 logit 0 → 2: L0 = log(2 + e²); row 1: own lt1 masked, lt0·q1 = 0 unchanged.
    assert near.item() == pytest.approx((math.log(2 + math.exp(2)) + L1_UNCHANGED) / 2)
    assert near.item() > base.item()


def test_invalid_longterm_rows_never_appear() -> None:
    q, k, lt, queue = batch()
    kwargs = {"changed": b(True, True), "longterm_valid": b(True, False), "temperature": TAU}
    lt_nan = lt.clone()
    lt_nan[1] = float("nan")
    qg = q.clone().requires_grad_(True)
    loss = caco_loss(qg, k, lt_nan, queue, **kwargs)  # type: ignore[arg-type]
    loss.backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    # Row 0: pos 0 | k+1 0 | own lt0 2 → log(2 + e²); row 1: pos 2 | k+0 0 | lt0 0 → log(1 + 2e⁻²).
    expected = (math.log(2 + math.exp(2)) + math.log(1 + 2 * math.exp(-2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    other = caco_loss(q, k, t(E1, (5.0, -1.0, 2.0)), queue, **kwargs)  # type: ignore[arg-type]
    assert other.item() == pytest.approx(loss.item(), rel=1e-12)


def test_teco_equals_caco_with_everything_changed() -> None:
    q, k, lt, queue = batch()
    valid = b(True, True)
    teco = caco_loss(q, k, lt, queue, changed=b(False, False), longterm_valid=valid, mode="teco")
    caco = caco_loss(q, k, lt, queue, changed=b(True, True), longterm_valid=valid, mode="caco")
    assert teco.item() == pytest.approx(caco.item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["tp", "moco"])
def test_tp_and_moco_ignore_longterm(mode: str) -> None:
    q, k, lt, queue = batch()
    kwargs = {"changed": b(True, True), "longterm_valid": b(True, True), "temperature": TAU}
    loss = caco_loss(q, k, lt, queue, mode=mode, **kwargs)  # type: ignore[arg-type]
    other = caco_loss(q, k, t(E2, E1), queue, mode=mode, **kwargs)  # type: ignore[arg-type]
    # Row 0: pos 0 | k+1 0 → log 2; row 1: pos 2 | k+0 0 → log(1 + e⁻²).
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert other.item() == pytest.approx(expected, rel=1e-12)


def test_caco_queue_is_a_negative_for_every_row() -> None:
    q, k, lt, _ = batch()
    queue = t(E1)  # q0·e1 = 1, q1·e1 = 0
    loss = caco_loss(
        q, k, lt, queue, changed=b(False, False), longterm_valid=b(True, True), temperature=TAU
    )
    expected = (math.log(3 + math.exp(2)) + math.log(1 + 3 * math.exp(-2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_caco_gradients_reach_the_query_only() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, lt, queue = (torch.randn(n, 6, generator=g).requires_grad_() for n in (4, 4, 4, 8))
    loss = caco_loss(
        q,
        k,
        lt,
        queue,
        changed=b(True, False, True, False),
        longterm_valid=b(True, True, False, True),
    )
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and lt.grad is None and queue.grad is None


def test_caco_loss_rejects_bad_input() -> None:
    q, k, lt, queue = batch()
    valid, changed = b(True, True), b(False, False)
    with pytest.raises(ValueError, match="longterm"):
        caco_loss(q, k, lt[:1], queue, changed=changed, longterm_valid=valid)
    with pytest.raises(ValueError, match="queue"):
        caco_loss(q, k, lt, torch.zeros(3, 4), changed=changed, longterm_valid=valid)
    with pytest.raises(ValueError, match="changed"):
        caco_loss(q, k, lt, queue, changed=b(False), longterm_valid=valid)
    with pytest.raises(ValueError, match="temperature"):
        caco_loss(q, k, lt, queue, changed=changed, longterm_valid=valid, temperature=0.0)


def test_caco_module_is_the_function() -> None:
    q, k, lt, queue = batch()
    kwargs = {"changed": b(True, False), "longterm_valid": b(True, True)}
    module = CACoLoss(temperature=TAU, mode="caco")
    assert module(q, k, lt, queue, **kwargs).item() == pytest.approx(
        caco_loss(q, k, lt, queue, temperature=TAU, **kwargs).item()  # type: ignore[arg-type]
    )
    with pytest.raises(ValueError, match="mode"):
        CACoLoss(mode="simclr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        CACoLoss(temperature=-1.0)


# --- seco_loss --------------------------------------------------------------------------------
# N = 1, D = 2, τ = 1, q = (1, 0), queue = [(0, -1)]:
#   k0 = aug(x_t1) = (0, 1): q·k0 = 0;  k1 = x_t2 = (1, 0): q·k1 = 1;  k2 = aug(x_t0) = (-1, 0): -1
#   invariant:            pos k0 (0)  | queue 0                → log 2
#   season-variant:       pos k2 (-1) | queue 0, k0 0, k1 1    → log((1 + e)²)
#   augmentation-variant: pos k1 (1)  | queue 0, k0 0, k2 -1   → log((1 + e⁻¹)²)


def seco_views() -> SeCoViews:
    return SeCoViews(
        query=t((1.0, 0.0)),
        season_aug=t((0.0, 1.0)),
        season=t((1.0, 0.0)),
        aug=t((-1.0, 0.0)),
        queue=t((0.0, -1.0)),
    )


def test_seco_heads_hand_values() -> None:
    views = seco_views()
    expected = {
        "invariant": math.log(2),
        "season-variant": 2 * math.log(1 + math.e),
        "augmentation-variant": 2 * math.log(1 + math.exp(-1)),
    }
    for head, value in expected.items():
        loss = seco_head_loss(views, head=head, temperature=1.0)  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(value, rel=1e-12), head
    total = seco_loss(views, views, views, temperature=1.0)
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-12)
    assert SeCoLoss(temperature=1.0)(views, views, views).item() == pytest.approx(total.item())


def test_seco_in_batch_keys_of_every_row_are_negatives() -> None:
    # Two rows, empty queue; the season-variant head's negatives are k0 and k1 of both rows.
    g = torch.Generator().manual_seed(2)
    q, k0, k1, k2 = (torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(4))
    views = SeCoViews(q, k0, k1, k2, torch.empty(0, 4, dtype=torch.float64))
    loss = seco_head_loss(views, head="season-variant", temperature=0.2)
    expected = info_nce(q, k2, torch.cat([k0, k1]), temperature=0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_seco_gradients_reach_the_query_only() -> None:
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, 4, generator=g).requires_grad_() for n in (3, 3, 3, 3, 5)]
    views = SeCoViews(*tensors)
    seco_loss(views, views, views).backward()
    assert tensors[0].grad is not None and tensors[0].grad.abs().sum() > 0
    assert all(x.grad is None for x in tensors[1:])


def test_seco_rejects_bad_input() -> None:
    views = seco_views()
    with pytest.raises(ValueError, match="head"):
        seco_head_loss(views, head="spatial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="season"):
        seco_loss(views._replace(season=t((1.0, 0.0, 0.0))), views, views)


# --- geo_classification_loss ------------------------------------------------------------------


def test_geo_loss_hand_value() -> None:
    # Uniform logits over C = 4: -log(1/4) = log 4. One-hot logit 2 on the true class,
    # 0 elsewhere, C = 3: -log(e² / (e² + 2)).
    assert geo_classification_loss(torch.zeros(2, 4), torch.tensor([0, 3])).item() == (
        pytest.approx(math.log(4))
    )
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    loss = geo_classification_loss(logits, torch.tensor([0, 2], dtype=torch.int32))
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-12)


def test_geo_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        geo_classification_loss(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        geo_classification_loss(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        geo_classification_loss(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="logits"):
        geo_classification_loss(torch.zeros(4), torch.tensor([0]))
