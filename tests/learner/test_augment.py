"""Batched, generator-driven augmentations for 12-band reflectance."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from revisit.learner.augment import (
    AUGMENT_POLICIES,
    Augment,
    band_jitter,
    flip_rotate,
    gaussian_blur,
    gaussian_noise,
    global_gain,
    policy_augment,
    random_resized_crop,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Reflectance-like chips: band c has level 0.05 * (c + 1) plus texture."""
    g = torch.Generator().manual_seed(seed)
    level = 0.05 * torch.arange(1, 13, dtype=torch.float32).view(1, 12, 1, 1)
    return level + 0.05 * torch.rand(n, 12, size, size, generator=g)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square applied to (C, H, W)."""
    out: list[torch.Tensor] = []
    for flipped in (x, x.flip(-1)):
        out.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return out


def test_shape_dtype_finite() -> None:
    x = _batch()
    out = Augment()(x, _gen())
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_size_and_dtype_conversion() -> None:
    x = _batch(size=64).to(torch.float64)
    assert Augment(size=32)(x, _gen()).shape == (4, 12, 32, 32)
    out = Augment(size=(48, 48), crop=False)(x, _gen())
    assert out.shape == (4, 12, 48, 48) and out.dtype == torch.float32
    assert Augment(size=(40, 24), rotate=False)(x, _gen()).shape == (4, 12, 40, 24)


def test_deterministic_under_seeded_generator() -> None:
    x = _batch()
    augment = Augment()
    assert torch.equal(augment(x, _gen(7)), augment(x, _gen(7)))
    assert not torch.equal(augment(x, _gen(7)), augment(x, _gen(8)))


def test_two_calls_differ() -> None:
    x = _batch()
    g = _gen()
    augment = Augment()
    assert not torch.allclose(augment(x, g), augment(x, g))


def test_each_image_gets_its_own_parameters() -> None:
    x = _batch(n=1).expand(6, -1, -1, -1).contiguous()
    out = Augment()(x, _gen(3))
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.allclose(out[i], out[j]), (i, j)
    # Each step on its own, too.
    g = _gen(4)
    for y in (
        random_resized_crop(x, generator=g),
        flip_rotate(x, generator=g),
        band_jitter(x, generator=g, p=1.0),
        gaussian_blur(x, generator=g, p=1.0),
    ):
        distinct = {tuple(y[i].flatten()[:64].tolist()) for i in range(6)}
        assert len(distinct) >= 2


@pytest.mark.parametrize("band", [0, 7, 11])
def test_no_band_mixing(band: int) -> None:
    g = torch.Generator().manual_seed(band)
    x = torch.zeros(4, 12, 32, 32)
    x[:, band] = 0.1 + torch.rand(4, 32, 32, generator=g)
    out = Augment(jitter_p=1.0, blur_p=1.0)(x, _gen(band))
    others = [c for c in range(12) if c != band]
    assert out[:, others].eq(0).all()
    assert (out[:, band].abs().sum(dim=(-2, -1)) > 0).all()


def test_flips_and_rotations_permute_pixels_exactly() -> None:
    x = _batch(n=16)
    out = Augment(crop=False, jitter_p=0.0, blur_p=0.0)(x, _gen(5))
    seen = set()
    for i in range(16):
        matches = [k for k, t in enumerate(_dihedral(x[i])) if torch.equal(out[i], t)]
        assert len(matches) == 1, i
        seen.add(matches[0])
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
    assert len(seen) >= 4  # the symmetries do vary across the batch


def test_flip_rotate_probabilities() -> None:
    x = _batch(n=3)
    g = _gen()
    assert torch.equal(flip_rotate(x, generator=g, hflip_p=0, vflip_p=0, rotate=False), x)
    assert torch.equal(flip_rotate(x, generator=g, hflip_p=1, vflip_p=0, rotate=False), x.flip(-1))
    assert torch.equal(
        flip_rotate(x, generator=g, hflip_p=1, vflip_p=1, rotate=False), x.flip(-1).flip(-2)
    )
    with pytest.raises(ValueError, match="need square images"):
        flip_rotate(torch.zeros(1, 12, 32, 16), generator=g)
    with pytest.raises(ValueError, match=r"hflip_p must be in \[0, 1\]"):
        flip_rotate(x, generator=g, hflip_p=2)


def test_crop_of_whole_image_is_identity() -> None:
    x = _batch()
    out = random_resized_crop(x, generator=_gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


def test_crop_of_constant_image_is_constant() -> None:
    x = torch.full((4, 12, 32, 32), 0.3)
    out = random_resized_crop(x, generator=_gen(), size=20)
    assert out.shape == (4, 12, 20, 20)
    assert torch.allclose(out, x[..., :20, :20])


def test_crop_zooms_in() -> None:
    # A horizontal ramp: a crop of a share s of the area spans a narrower range of x.
    ramp = torch.linspace(0, 1, 64).expand(8, 12, 64, 64).contiguous()
    out = random_resized_crop(ramp, generator=_gen(), scale=(0.2, 0.3))
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert (spans < 0.8).all() and (spans > 0).all()


def test_band_jitter_keeps_range_per_band() -> None:
    x = _batch(n=8)
    out = band_jitter(x, generator=_gen(), brightness=0.1, contrast=0.1, p=1.0)
    mean_in = x.mean(dim=(-2, -1))
    mean_out = out.mean(dim=(-2, -1))
    ratio = mean_out / mean_in
    assert (ratio >= 0.9 - 1e-5).all() and (ratio <= 1.1 + 1e-5).all()
    assert not torch.allclose(ratio[:, 0], ratio[:, 1])  # bands jittered independently
    std_ratio = out.std(dim=(-2, -1)) / x.std(dim=(-2, -1))
    assert (std_ratio >= 0.9 - 1e-4).all() and (std_ratio <= 1.1 + 1e-4).all()
    assert torch.equal(band_jitter(x, generator=_gen(), p=0.0), x)


def test_blur_smooths_and_keeps_mean() -> None:
    x = _batch(n=4)
    out = gaussian_blur(x, generator=_gen(), sigma=(1.0, 2.0), p=1.0)
    assert out.shape == x.shape
    # Reflect padding keeps the mean close; the high-frequency texture shrinks.
    assert torch.allclose(out.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=2e-3)
    assert (out.std(dim=(-2, -1)) < 0.7 * x.std(dim=(-2, -1))).all()
    assert torch.equal(gaussian_blur(x, generator=_gen(), p=0.0), x)


def test_blur_is_applied_to_about_half() -> None:
    x = _batch(n=64, size=32)
    out = gaussian_blur(x, generator=_gen(), p=0.5)
    untouched = sum(torch.equal(out[i], x[i]) for i in range(64))
    assert 16 <= untouched <= 48


def test_large_values_stay_finite() -> None:
    x = torch.rand(4, 12, 32, 32, generator=_gen()) * 6.5535  # up to the uint16 maximum
    out = Augment(jitter_p=1.0, blur_p=1.0)(x, _gen())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must satisfy"),
        ({"crop_ratio": (0.0, 1.0)}, "crop_ratio must satisfy"),
        ({"blur_p": 1.5}, r"blur_p must be in \[0, 1\]"),
        ({"brightness": -0.1}, "brightness must be non-negative"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma must satisfy"),
        ({"size": 0}, "size must be positive"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Augment(**kwargs)  # type: ignore[arg-type]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, C, H, W\)"):
        Augment()(torch.zeros(12, 32, 32), _gen())
    with pytest.raises(ValueError, match="expected floating-point reflectance"):
        Augment()(torch.zeros(1, 12, 32, 32, dtype=torch.uint16), _gen())


def test_global_gain_keeps_band_ratios() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 12, 8, 8) * 0.3 + 0.01
    out = global_gain(x, generator=gen, gain=0.1, p=1.0)
    ratio = out / x  # one factor for every pixel and band of an image
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert bool(((per_image >= 0.9 - 1e-6) & (per_image <= 1.1 + 1e-6)).all())
    assert not torch.allclose(per_image[:, 0], torch.ones(16))


def test_gaussian_noise_is_reproducible_and_bounded_by_its_sigma() -> None:
    x = torch.full((32, 12, 16, 16), 0.1)
    a = gaussian_noise(x, generator=torch.Generator().manual_seed(1), sigma=0.003, p=1.0)
    b = gaussian_noise(x, generator=torch.Generator().manual_seed(1), sigma=0.003, p=1.0)
    assert torch.equal(a, b)
    spread = (a - x).flatten(1).std(dim=1)
    assert float(spread.max()) < 0.004 and float(spread.mean()) > 0.0005
    untouched = gaussian_noise(x, generator=torch.Generator().manual_seed(1), p=0.0)
    assert torch.equal(untouched, x)


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_policies_give_crops_of_the_asked_size(policy: str) -> None:
    augment = policy_augment(policy, size=32, crop_scale=(0.15, 0.6))
    out = augment(torch.rand(4, 12, 64, 64) * 0.3, torch.Generator().manual_seed(0))
    assert out.shape == (4, 12, 32, 32) and bool(torch.isfinite(out).all())


def test_only_band_jitter_moves_band_ratios() -> None:
    # A flat image: crops, flips and blur keep it flat, so what moves B08/B04 is colour.
    x = torch.ones(32, 12, 64, 64) * torch.linspace(0.05, 0.3, 12).view(1, 12, 1, 1)
    ratios = {}
    for policy in AUGMENT_POLICIES:
        augment = policy_augment(policy, size=32)
        if policy == "spectral":  # noise would move single pixels; compare image means
            augment = replace(augment, noise_p=0.0)
        out = augment(x, torch.Generator().manual_seed(0)).mean(dim=(2, 3))
        ratios[policy] = out[:, 7] / out[:, 3]
    expected = x[:, 7, 0, 0] / x[:, 3, 0, 0]
    torch.testing.assert_close(ratios["spectral"], expected)
    torch.testing.assert_close(ratios["geometric"], expected)
    assert float((ratios["band-jitter"] - expected).abs().max()) > 0.05


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        policy_augment("hue")
