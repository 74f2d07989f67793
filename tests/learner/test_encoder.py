"""The 12-band ResNet-18 encoder and DN scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from revisit.learner.encoder import BasicBlock, ResNet18Encoder, scale_dn
from revisit.types import CANONICAL_BANDS

# torchvision's resnet18 without its fc layer has 11,176,512 parameters; the stem
# conv grows from 3 to 12 input bands: + 64 * 9 * 7 * 7 = 28,224.
RESNET18_12BAND_PARAMS = 11_176_512 + 64 * 9 * 7 * 7


@pytest.fixture(scope="module")
def encoder() -> ResNet18Encoder:
    torch.manual_seed(0)
    return ResNet18Encoder()


@pytest.mark.parametrize("size", [32, 64])
def test_output_shape(encoder: ResNet18Encoder, size: int) -> None:
    torch.manual_seed(1)
    x = torch.rand(2, len(CANONICAL_BANDS), size, size)
    out = encoder(x)
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert encoder.feature_dim == 512


def test_pooled_levels_hold_every_depth_and_end_in_the_features(
    encoder: ResNet18Encoder,
) -> None:
    torch.manual_seed(3)
    encoder.eval()
    x = torch.rand(3, len(CANONICAL_BANDS), 48, 64)
    with torch.no_grad():
        levels = encoder.pooled_levels(x)
        features = encoder(x)
        stem = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(encoder.normalize(x)))))
    assert levels.shape == (3, encoder.levels_dim) == (3, 1024)
    torch.testing.assert_close(levels[:, -512:], features, rtol=0, atol=1e-6)
    torch.testing.assert_close(levels[:, :64], stem.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected input of shape"):
        encoder.pooled_levels(torch.rand(2, 3, 32, 32))


def test_level_maps_are_the_levels_shallowest_first(encoder: ResNet18Encoder) -> None:
    torch.manual_seed(4)
    encoder.eval()
    x = torch.rand(2, len(CANONICAL_BANDS), 64, 64)
    with torch.no_grad():
        maps = encoder.level_maps(x)
        shallow = encoder.level_maps(x, depth=2)
        levels = encoder.pooled_levels(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 16, 16),
        (2, 64, 16, 16),
        (2, 128, 8, 8),
        (2, 256, 4, 4),
        (2, 512, 2, 2),
    ]
    assert len(shallow) == 2
    torch.testing.assert_close(shallow[1], maps[1], rtol=0, atol=0)
    pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
    torch.testing.assert_close(pooled, levels, rtol=0, atol=0)
    for depth in (0, 6):
        with pytest.raises(ValueError, match="depth must be 1 to 5"):
            encoder.level_maps(x, depth=depth)


def test_non_square_input(encoder: ResNet18Encoder) -> None:
    x = torch.rand(2, 12, 48, 64)
    assert encoder(x).shape == (2, 512)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    # zero_init_residual zeroes bn2 weights, which would stop gradients to conv1 of
    # each block in the first step; check the plain network so every path is tested.
    model = ResNet18Encoder(zero_init_residual=False)
    x = torch.rand(2, 12, 32, 32, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_zero_init_residual() -> None:
    torch.manual_seed(3)
    zeroed = ResNet18Encoder()
    plain = ResNet18Encoder(zero_init_residual=False)
    for model, expected_zero in ((zeroed, True), (plain, False)):
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 8
        for block in blocks:
            assert bool((block.bn2.weight == 0).all()) is expected_zero
    # The stem is Kaiming-initialised (fan_out, ReLU): std = sqrt(2 / (64 * 7 * 7)).
    std = zeroed.conv1.weight.std().item()
    assert std == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.05)
    assert bool(zeroed.bn1.weight.eq(1).all()) and bool(zeroed.bn1.bias.eq(0).all())


def test_parameter_count(encoder: ResNet18Encoder) -> None:
    n = sum(p.numel() for p in encoder.parameters())
    assert n == RESNET18_12BAND_PARAMS  # 11,204,736
    assert encoder.conv1.weight.shape == (64, 12, 7, 7)


def test_in_channels() -> None:
    model = ResNet18Encoder(in_channels=4)
    assert model(torch.rand(2, 4, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="in_channels must be positive"):
        ResNet18Encoder(in_channels=0)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (12, 32, 32), (2, 12, 32, 32, 1)])
def test_bad_input_shape(encoder: ResNet18Encoder, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 12, H, W\)"):
        encoder(torch.zeros(shape))


def test_scale_dn() -> None:
    dn = torch.tensor([0, 1, 10000, 65535], dtype=torch.uint16)
    out = scale_dn(dn)
    assert out.dtype == torch.float32
    assert out[2].item() == 1.0
    assert out.tolist() == pytest.approx([0.0, 1e-4, 1.0, 6.5535])
    assert scale_dn(torch.tensor([[10000]], dtype=torch.int32)).shape == (1, 1)
    assert scale_dn(torch.full((2, 12, 4, 4), 10000, dtype=torch.int64)).eq(1.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_scale_dn_rejects_non_integers(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="expects integer digital numbers"):
        scale_dn(torch.zeros(3, dtype=dtype))


@pytest.mark.slow
def test_onnx_export_dynamic_shapes(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    model = ResNet18Encoder(zero_init_residual=False).eval()
    batch = torch.export.Dim("batch")
    height = torch.export.Dim("height", min=32, max=1024)
    width = torch.export.Dim("width", min=32, max=1024)
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(
        model,
        (torch.rand(2, 12, 64, 64),),
        str(path),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
    )
    session = ort.InferenceSession(str(path))
    for shape in [(3, 12, 32, 32), (1, 12, 96, 80)]:
        x = torch.rand(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == (shape[0], 512)
        assert abs(out - expected).max() < 1e-4
