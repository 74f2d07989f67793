"""The encoder's fixed input standardisation, its estimate and the migration of old models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revisit.learner.encoder import BandNormalize, ResNet18Encoder, band_statistics
from revisit.learner.heads import ContrastiveModel, upgrade_model_state
from revisit.types import DN_SCALE


def test_band_statistics_ignore_pixels_without_data_in_every_band() -> None:
    rng = np.random.default_rng(0)
    chips = rng.integers(500, 3000, size=(3, 12, 8, 8), dtype=np.uint16)
    chips[:, 4, :2, :] = 0  # no data in one band: the whole pixel is left out
    mean, std = band_statistics(chips)
    keep = np.moveaxis(chips[:, :, 2:, :], 1, -1).reshape(-1, 12).astype(np.float64) * DN_SCALE
    np.testing.assert_allclose(mean, keep.mean(axis=0))
    np.testing.assert_allclose(std, keep.std(axis=0))


def test_band_statistics_refuse_chips_without_data() -> None:
    with pytest.raises(ValueError, match="no pixel has data"):
        band_statistics(np.zeros((2, 12, 4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="integer DN"):
        band_statistics(np.zeros((2, 12, 4, 4), dtype=np.float32))


def test_a_constant_band_gets_a_positive_std() -> None:
    chips = np.full((1, 12, 4, 4), 1000, dtype=np.uint16)
    _, std = band_statistics(chips)
    assert min(std) > 0


def test_band_normalize_standardises_and_starts_as_identity() -> None:
    layer = BandNormalize(3)
    x = torch.rand(2, 3, 5, 5)
    assert layer.is_identity and torch.equal(layer(x), x)
    layer.set_statistics([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    assert not layer.is_identity
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ([0.0] * 2, [1.0] * 3, "need 3"),
        ([0.0] * 3, [1.0, 0.0, 1.0], "positive"),
        ([float("nan")] * 3, [1.0] * 3, "finite"),
    ],
)
def test_band_normalize_rejects_bad_statistics(
    mean: list[float], std: list[float], match: str
) -> None:
    layer = BandNormalize(3)
    with pytest.raises(ValueError, match=match):
        layer.set_statistics(mean, std)
    assert layer.is_identity  # nothing changed


def test_statistics_travel_with_the_state_dict() -> None:
    encoder = ResNet18Encoder()
    encoder.normalize.set_statistics([0.1] * 12, [0.05] * 12)
    copy = ResNet18Encoder()
    copy.load_state_dict(encoder.state_dict())
    assert torch.equal(copy.normalize.mean, encoder.normalize.mean)
    assert torch.equal(copy.normalize.std, encoder.normalize.std)


def test_model_sets_query_and_key_encoders_alike() -> None:
    model = ContrastiveModel(queue_size=8)
    model.set_band_statistics([0.1] * 12, [0.05] * 12)
    for encoder in (model.encoder, model.key_encoder):
        assert torch.allclose(encoder.normalize.mean, torch.full((12,), 0.1))
    model.momentum_update()  # buffers are copied, so they stay equal
    assert torch.equal(model.key_encoder.normalize.std, model.encoder.normalize.std)


def test_an_old_model_state_is_migrated_and_computes_what_it_did() -> None:
    torch.manual_seed(0)
    old = ContrastiveModel(queue_size=8).eval()
    state = {k: v for k, v in old.state_dict().items() if ".normalize." not in k}
    with pytest.raises(RuntimeError, match="normalize"):
        ContrastiveModel(queue_size=8).load_state_dict(state)
    new = ContrastiveModel(queue_size=8)
    new.set_band_statistics([0.3] * 12, [0.1] * 12)  # overwritten by the migration
    new.load_state_dict(upgrade_model_state(state))
    new.eval()
    x = torch.rand(2, 12, 32, 32) * 0.3
    assert new.encoder.normalize.is_identity
    torch.testing.assert_close(new.features(x), old.features(x))


def test_a_current_state_is_left_as_it_is() -> None:
    model = ContrastiveModel(queue_size=8)
    model.set_band_statistics([0.1] * 12, [0.05] * 12)
    state = model.state_dict()
    upgraded = upgrade_model_state(state)
    assert upgraded.keys() == state.keys()
    assert all(upgraded[k] is state[k] for k in state)
