"""The encoder: a ResNet-18 whose stem takes the 12 canonical Sentinel-2 bands.

The network is the standard ResNet-18 (He et al., 2016; BasicBlock x [2, 2, 2, 2],
widths 64/128/256/512, BatchNorm, ReLU) with three changes: the stem convolution
takes ``len(CANONICAL_BANDS)`` = 12 bands instead of 3, there is no classifier, and
the output is the globally average-pooled 512-d feature vector. It is written here
rather than taken from torchvision, which the service does not depend on.

Model input is reflectance as DN / 10000 (:func:`scale_dn`), bands in
:data:`revisit.types.CANONICAL_BANDS` order. The first module is a fixed
per-band standardisation (:class:`BandNormalize`): reflectance of 0-0.3 straight
into a Kaiming-initialised convolution leaves the dark bands (B01, B09) all but
silent and lets the bright NIR bands dominate every filter. Its mean and standard
deviation per band are buffers, estimated once from the chips the learner first
trains on (:func:`band_statistics`) and frozen into the checkpoint and the ONNX
graph, so the exported models' input contract stays DN / 10000.

``forward`` has no data-dependent control flow, so the module can be exported with
``torch.onnx.export(..., dynamo=True)`` with dynamic batch and spatial sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from revisit.types import CANONICAL_BANDS, DN_SCALE

__all__ = ["BandNormalize", "BasicBlock", "ResNet18Encoder", "band_statistics", "scale_dn"]


def scale_dn(x: Tensor) -> Tensor:
    """Scale digital numbers to the model's input, float32 DN / 10000.

    Args:
        x: Integer DN (uint16 as chips store them, or any other integer dtype), any shape.

    Returns:
        A float32 tensor of the same shape, ``x * DN_SCALE``.

    Raises:
        ValueError: If ``x`` is not of an integer dtype (a float tensor has probably
            been scaled already; scaling it twice would silently ruin the input).
    """
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"scale_dn expects integer digital numbers, got dtype {x.dtype}")
    return x.to(torch.float32) * DN_SCALE


def band_statistics(chips: npt.NDArray[np.integer]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of chips, in reflectance (DN / 10000).

    Only pixels with data in every band count: a DN of 0 is Sentinel-2's no-data
    value, and a pixel with it in any band is left out, so chip edges outside a
    product's footprint do not pull the mean towards 0.

    Args:
        chips: (N, C, H, W) integer DN, as chips store them.

    Returns:
        (mean, std), C floats each; std is at least 1e-4 (a constant band does not
        divide by zero).

    Raises:
        ValueError: If ``chips`` is not 4-d integers, or no pixel has data in every band.
    """
    if chips.ndim != 4 or not np.issubdtype(chips.dtype, np.integer):
        raise ValueError(f"expected (N, C, H, W) integer DN, got {chips.dtype} {chips.shape}")
    dn = np.moveaxis(chips, 1, -1).reshape(-1, chips.shape[1])
    pixels = dn[(dn > 0).all(axis=1)].astype(np.float64) * DN_SCALE
    if pixels.shape[0] == 0:
        raise ValueError("no pixel has data in every band: cannot estimate band statistics")
    mean = pixels.mean(axis=0)
    std = np.maximum(pixels.std(axis=0), 1e-4)
    return [float(v) for v in mean], [float(v) for v in std]


class BandNormalize(nn.Module):
    """A fixed per-band standardisation, ``(x - mean) / std``, with the statistics as buffers.

    It starts as the identity (mean 0, std 1) and gets its statistics once, by
    :meth:`set_statistics`; nothing trains them. Being buffers, they travel with
    ``state_dict`` (checkpoints), with ``.to(device)`` and into the ONNX graph.

    Args:
        channels: Number of bands.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def set_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the mean and standard deviation (reflectance units, one per band).

        Raises:
            ValueError: For the wrong number of values, a non-finite value or a std <= 0.
        """
        m = torch.as_tensor(list(mean), dtype=torch.float32)
        s = torch.as_tensor(list(std), dtype=torch.float32)
        n = self.mean.numel()
        if m.shape != (n,) or s.shape != (n,):
            raise ValueError(f"need {n} means and {n} stds, got {m.numel()} and {s.numel()}")
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(s).all())):
            raise ValueError("band statistics must be finite")
        if bool((s <= 0).any()):
            raise ValueError(f"band stds must be positive, got {s.tolist()}")
        self.mean.copy_(m)
        self.std.copy_(s)

    @property
    def is_identity(self) -> bool:
        """Whether no statistics were set (mean 0, std 1: the input passes unchanged)."""
        return bool((self.mean == 0).all()) and bool((self.std == 1).all())

    def forward(self, x: Tensor) -> Tensor:
        """Standardise (N, C, H, W) reflectance band by band."""
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        """The band count, for ``repr``."""
        return f"channels={self.mean.numel()}"


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training and while :attr:`segments` is set, normalises consecutive
    row segments of the batch each on its own statistics.

    ``segments`` (row counts summing to the batch) is what :func:`batchnorm_segments`
    sets for one pass; the convolutions still see the whole batch, only the batch
    statistics are per segment, so a pass is as fast as an ungrouped one. This is
    MoCo's SplitBatchNorm (its single-GPU demo), with segments of any size instead of
    equal splits. Unset, or in eval mode, it is :class:`torch.nn.BatchNorm2d`, with
    the same parameters and buffers (checkpoints and exports do not see the class).
    Each segment moves the running statistics as a batch of its own would.
    """

    segments: list[int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        segments = self.segments
        if not self.training or segments is None or len(segments) < 2:
            return super().forward(x)
        if sum(segments) != x.shape[0]:
            raise ValueError(f"segments {segments} do not add up to a batch of {x.shape[0]}")
        parts = torch.split(x, segments)
        return torch.cat([super(GroupedBatchNorm2d, self).forward(p) for p in parts])


@contextmanager
def batchnorm_segments(module: nn.Module, segments: Sequence[int] | None) -> Iterator[None]:
    """Within the block, every :class:`GroupedBatchNorm2d` of ``module`` uses ``segments``.

    Args:
        module: The network (its grouped batch norms are found among its modules).
        segments: Row counts of consecutive segments of the next batches; None or
            one segment: ordinary batch norm.
    """
    norms = [m for m in module.modules() if isinstance(m, GroupedBatchNorm2d)]
    value = None if segments is None else [int(s) for s in segments]
    for norm in norms:
        norm.segments = value
    try:
        yield
    finally:
        for norm in norms:
            norm.segments = None


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/34.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = GroupedBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = GroupedBatchNorm2d(out_channels)
        self.downsample: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                GroupedBatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: (N, in_channels, H, W).

        Returns:
            (N, out_channels, H / stride, W / stride).
        """
        identity: Tensor = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet18Encoder(nn.Module):
    """ResNet-18 backbone for multispectral chips, ending in 512-d pooled features.

    Input: :class:`BandNormalize` (identity until its statistics are set).
    Stem: 7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool, as in the
    ImageNet ResNet; the total stride is 32, so a 32x32 chip reaches layer4 at 1x1 and
    the default 64x64 chip at 2x2. Any chip of 32 pixels or more works.

    Args:
        in_channels: Input bands; 12 (the canonical Sentinel-2 bands) by default.
        zero_init_residual: Zero the last BatchNorm scale of every residual block, so
            each block starts as the identity (Goyal et al., 2017); True by default.

    Raises:
        ValueError: If ``in_channels`` is not positive.
    """

    #: Dimension of the features :meth:`forward` returns.
    feature_dim: int = 512

    def __init__(
        self, *, in_channels: int = len(CANONICAL_BANDS), zero_init_residual: bool = True
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.in_channels = in_channels
        self.normalize = BandNormalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = GroupedBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, self.feature_dim, stride=2)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, *, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels=in_channels, out_channels=out_channels, stride=stride),
            BasicBlock(in_channels=out_channels, out_channels=out_channels),
        )

    def _stem(self, x: Tensor) -> Tensor:
        """The input checked, standardised, and through the stem and its max-pool."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        stem: Tensor = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        return stem

    def forward(self, x: Tensor) -> Tensor:
        """Encode a batch of chips.

        Args:
            x: (N, in_channels, H, W) float reflectance (DN / 10000), H and W >= 32.

        Returns:
            (N, 512) globally average-pooled features.

        Raises:
            ValueError: If ``x`` is not 4-d or has the wrong number of bands. (Only
                static properties are checked, so export with dynamic sizes stays
                guard-free.)
        """
        x = self._stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    #: Dimension of :meth:`pooled_levels`: the stem's 64 channels and the four layers'.
    levels_dim: int = 64 + 64 + 128 + 256 + 512

    def pooled_levels(self, x: Tensor) -> Tensor:
        """Globally average-pooled features of every depth, concatenated.

        The stem (after its max-pool), layer1, layer2, layer3 and layer4, each
        averaged over the chip: (N, 64 + 64 + 128 + 256 + 512 = 1024), the last 512
        being :meth:`forward`'s. Shallow levels keep what a chip's spectrum and fine
        texture say, which the deepest level, trained to ignore what the
        augmentations change, gives up; a linear probe on all of them does better
        on real land cover than on layer4 alone (docs/probes.md). Concatenating the
        pooled outputs of several depths for linear evaluation follows DINO (Caron
        et al., ICCV 2021), which probes its last four blocks.

        Args:
            x: As :meth:`forward`.

        Returns:
            (N, :attr:`levels_dim`) features.

        Raises:
            ValueError: As :meth:`forward`.
        """
        return torch.cat([m.mean(dim=(2, 3)) for m in self.level_maps(x)], dim=1)

    #: How many feature maps :meth:`level_maps` gives at most: the stem and four layers.
    n_levels: int = 5

    def level_maps(self, x: Tensor, depth: int = n_levels) -> list[Tensor]:
        """The feature maps of the first ``depth`` levels, shallowest first.

        Level 1 is the stem after its max-pool (64 channels, stride 4), then
        layer1 (64, stride 4), layer2 (128, stride 8), layer3 (256, stride 16) and
        layer4 (512, stride 32): at ``depth`` 5 the last map, averaged over its
        cells, is :meth:`forward`'s output.

        Args:
            x: As :meth:`forward`.
            depth: How many levels, 1 to :attr:`n_levels`; the deeper ones are not
                computed.

        Returns:
            ``depth`` tensors of shape (N, C_l, H_l, W_l).

        Raises:
            ValueError: As :meth:`forward`, or if ``depth`` is out of range.
        """
        if not 1 <= depth <= self.n_levels:
            raise ValueError(f"depth must be 1 to {self.n_levels}, got {depth}")
        x = self._stem(x)
        maps = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[: depth - 1]:
            x = layer(x)
            maps.append(x)
        return maps
