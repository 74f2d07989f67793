"""Projection heads, momentum updates, key queues and the bundled contrastive model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revisit.learner.heads import (
    ContrastiveModel,
    KeyQueue,
    ProjectionHead,
    deactivate_requires_grad,
    l2_normalize,
    update_momentum,
)


class _SmallNet(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)


def _small_net(hidden: int = 4) -> _SmallNet:
    return _SmallNet(hidden)


# ---------------------------------------------------------------- ProjectionHead


def test_projection_head_shapes() -> None:
    torch.manual_seed(0)
    head = ProjectionHead()
    out = head(torch.randn(5, 512))
    assert out.shape == (5, 128)
    # Not normalised: MoCo v2's head is a plain MLP, the loss normalises.
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))
    small = ProjectionHead(in_dim=16, hidden_dim=8, out_dim=4)
    assert small(torch.randn(3, 16)).shape == (3, 4)
    layers = [type(m) for m in small.modules()][2:]
    assert layers == [nn.Linear, nn.ReLU, nn.Linear]


def test_projection_head_rejects_bad_dims() -> None:
    with pytest.raises(ValueError, match="out_dim must be positive"):
        ProjectionHead(out_dim=0)


def test_l2_normalize() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(x)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert torch.allclose(l2_normalize(x.T, dim=0), out.T)


# ---------------------------------------------------------------- update_momentum


def test_update_momentum_zero_copies_one_keeps_half_averages() -> None:
    torch.manual_seed(1)
    model, ema = _small_net(), _small_net()
    model.bn.register_buffer("running_mean", torch.full((4,), 0.7))
    w_model = model.fc1.weight.detach().clone()
    w_ema = ema.fc1.weight.detach().clone()
    assert not torch.allclose(w_model, w_ema)

    update_momentum(model, ema, m=1.0)
    assert torch.equal(ema.fc1.weight, w_ema)

    update_momentum(model, ema, m=0.5)
    assert torch.allclose(ema.fc1.weight, 0.5 * w_model + 0.5 * w_ema)
    # Buffers are copied, whatever m is.
    buffers = dict(model.named_buffers())
    for name, buffer in ema.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert torch.equal(dict(ema.named_buffers())["bn.running_mean"], torch.full((4,), 0.7))

    update_momentum(model, ema, m=0.0)
    for p, p_ema in zip(model.parameters(), ema.parameters(), strict=True):
        assert torch.equal(p, p_ema)
    # The model itself is never touched, and no autograd history is recorded.
    assert torch.equal(model.fc1.weight, w_model)
    assert ema.fc1.weight.grad_fn is None


def test_update_momentum_numeric_value() -> None:
    model, ema = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    update_momentum(model, ema, m=0.9)
    assert ema.weight.item() == pytest.approx(0.1)
    update_momentum(model, ema, m=0.9)
    assert ema.weight.item() == pytest.approx(0.19)


@pytest.mark.parametrize("m", [-0.1, 1.5, float("nan")])
def test_update_momentum_rejects_bad_m(m: float) -> None:
    with pytest.raises(ValueError, match=r"momentum m must be in \[0, 1\]"):
        update_momentum(_small_net(), _small_net(), m)


def test_update_momentum_rejects_mismatched_modules() -> None:
    ema = _small_net()
    before = ema.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"shape \(5, 3\) in model but \(4, 3\)"):
        update_momentum(_small_net(hidden=5), ema, 0.5)
    with pytest.raises(ValueError, match="different parameters"):
        update_momentum(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.5)
    with pytest.raises(ValueError, match="different buffers"):
        update_momentum(nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False), 0.5)
    assert torch.equal(ema.fc1.weight, before)


def test_deactivate_requires_grad() -> None:
    net = _small_net()
    deactivate_requires_grad(net)
    assert all(not p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------- KeyQueue


def _keys(start: int, n: int, dim: int = 4) -> torch.Tensor:
    """Unit keys whose first coordinate identifies them: key i = (i, 1, 0, ...) normalised."""
    raw = torch.zeros(n, dim)
    raw[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    raw[:, 1] = 1.0
    return l2_normalize(raw)


def test_queue_starts_empty() -> None:
    queue = KeyQueue(size=8, dim=4)
    assert len(queue) == 0
    assert queue.keys.shape == (0, 4)


def test_queue_fills_and_wraps_in_fifo_order() -> None:
    queue = KeyQueue(size=5, dim=4)
    queue.enqueue(_keys(0, 3))
    assert len(queue) == 3
    assert torch.allclose(queue.keys, _keys(0, 3))
    queue.enqueue(_keys(3, 3))  # wraps: key 5 overwrites key 0
    assert len(queue) == 5
    assert int(queue.ptr) == 1
    assert torch.allclose(queue.keys, _keys(1, 5))  # oldest first
    queue.enqueue(_keys(6, 5))  # a whole queue's worth replaces everything
    assert len(queue) == 5
    assert torch.allclose(queue.keys, _keys(6, 5))
    queue.enqueue(_keys(11, 0))
    assert torch.allclose(queue.keys, _keys(6, 5))


def test_queue_normalises_and_detaches() -> None:
    queue = KeyQueue(size=4, dim=2)
    keys = torch.tensor([[3.0, 4.0]], requires_grad=True)
    queue.enqueue(keys * 2)
    assert torch.allclose(queue.keys, torch.tensor([[0.6, 0.8]]))
    assert not queue.keys.requires_grad


def test_queue_rejects_bad_batches() -> None:
    queue = KeyQueue(size=4, dim=2)
    with pytest.raises(ValueError, match="cannot enqueue 5 keys into a queue of size 4"):
        queue.enqueue(torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"keys must have shape \(B, 2\)"):
        queue.enqueue(torch.ones(3, 3))
    with pytest.raises(ValueError, match="queue size must be positive"):
        KeyQueue(size=0)


def test_queue_state_dict_round_trip() -> None:
    queue = KeyQueue(size=5, dim=4)
    queue.enqueue(_keys(0, 4))
    queue.enqueue(_keys(4, 3))
    state = queue.state_dict()
    assert set(state) == {"queue", "ptr", "count"}
    restored = KeyQueue(size=5, dim=4)
    restored.load_state_dict(state)
    assert len(restored) == 5
    assert int(restored.ptr) == int(queue.ptr) == 2
    assert torch.equal(restored.keys, queue.keys)
    # Both continue the same way.
    queue.enqueue(_keys(7, 2))
    restored.enqueue(_keys(7, 2))
    assert torch.equal(restored.keys, queue.keys)
    assert torch.allclose(restored.keys, _keys(4, 5))


# ---------------------------------------------------------------- ContrastiveModel


@pytest.fixture(scope="module")
def seco_model() -> ContrastiveModel:
    torch.manual_seed(2)
    return ContrastiveModel(n_heads=3, queue_size=64, geo_classes=100)


def test_contrastive_model_shapes(seco_model: ContrastiveModel) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 12, 32, 32)
    queries = seco_model.query(x)
    keys = seco_model.key(x)
    assert len(queries) == len(keys) == 3
    for q, k in zip(queries, keys, strict=True):
        assert q.shape == k.shape == (2, 128)
        assert q.requires_grad
        assert not k.requires_grad
        assert torch.allclose(k.norm(dim=1), torch.ones(2), atol=1e-5)
    assert seco_model.features(x).shape == (2, 512)
    assert seco_model.geo_logits(queries[0]).shape == (2, 100)
    assert len(seco_model.queues) == 3
    assert all(isinstance(q, KeyQueue) and q.size == 64 for q in seco_model.queues)


def test_key_with_maps_gives_the_keys_the_standardised_input_and_the_shallow_maps(
    seco_model: ContrastiveModel,
) -> None:
    torch.manual_seed(5)
    seco_model.eval()
    x = torch.rand(2, 12, 32, 32)
    keys, maps = seco_model.key_with_maps(x, 3)
    for got, expected in zip(keys, seco_model.key(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    expected_maps = [
        seco_model.key_encoder.normalize(x),
        *seco_model.key_encoder.level_maps(x, depth=3),
    ]
    assert len(maps) == 4
    for got_map, expected_map in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(got_map, expected_map, rtol=0, atol=0)
        assert not got_map.requires_grad
    seco_model.train()


def test_key_side_has_no_grad(seco_model: ContrastiveModel) -> None:
    key_params = [*seco_model.key_encoder.parameters(), *seco_model.key_heads.parameters()]
    assert key_params and all(not p.requires_grad for p in key_params)
    query_params = [*seco_model.encoder.parameters(), *seco_model.heads.parameters()]
    assert all(p.requires_grad for p in query_params)
    # The key side is a copy, not the same tensors.
    assert seco_model.key_encoder.conv1.weight is not seco_model.encoder.conv1.weight
    trainable = {id(p) for p in seco_model.parameters() if p.requires_grad}
    assert trainable.isdisjoint(id(p) for p in key_params)


def test_state_dict_holds_everything(seco_model: ContrastiveModel) -> None:
    keys = seco_model.state_dict().keys()
    for prefix in ("encoder.", "heads.2.", "key_encoder.", "key_heads.2.", "geo_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"queues.0.queue", "queues.2.ptr", "queues.1.count"} <= keys


def test_momentum_update_moves_key_side_towards_query() -> None:
    torch.manual_seed(4)
    model = ContrastiveModel(n_heads=3, queue_size=16, momentum=0.9)
    with torch.no_grad():  # pretend the query side took a step
        for p in [*model.encoder.parameters(), *model.heads.parameters()]:
            p.add_(0.1 * torch.randn_like(p))

    def distance() -> float:
        pairs = [
            *zip(model.encoder.parameters(), model.key_encoder.parameters(), strict=True),
            *zip(model.heads.parameters(), model.key_heads.parameters(), strict=True),
        ]
        return float(sum((p - k).square().sum().item() for p, k in pairs) ** 0.5)

    def first_weight(head: nn.Module) -> torch.Tensor:
        assert isinstance(head, ProjectionHead)
        linear = head.net[0]
        assert isinstance(linear, nn.Linear)
        return linear.weight

    before = distance()
    q_w = first_weight(model.heads[2]).detach().clone()
    k_w = first_weight(model.key_heads[2]).detach().clone()
    model.momentum_update()
    assert distance() == pytest.approx(0.9 * before, rel=1e-4)  # the gap shrinks by m
    assert torch.allclose(first_weight(model.key_heads[2]), 0.9 * k_w + 0.1 * q_w)
    model.momentum_update(m=0.0)
    assert distance() == 0.0


def test_contrastive_model_defaults_and_errors() -> None:
    model = ContrastiveModel(queue_size=8)
    assert model.n_heads == 1 and model.momentum == 0.999 and model.geo_head is None
    with pytest.raises(ValueError, match="no geo head"):
        model.geo_logits(torch.zeros(1, 128))
    with pytest.raises(ValueError, match="n_heads must be positive"):
        ContrastiveModel(n_heads=0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        ContrastiveModel(momentum=1.1)
    with pytest.raises(ValueError, match="geo_classes must be positive"):
        ContrastiveModel(geo_classes=0)
