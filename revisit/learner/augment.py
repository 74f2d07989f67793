"""Augmentations for 12-band reflectance chips, batched and reproducible.

Every function takes a batch ``(N, C, H, W)`` of float reflectance and an explicit
:class:`torch.Generator`, and draws its own parameters for each image of the batch,
without a Python loop over the batch. Nothing mixes bands: there is no RGB-only
operation (no hue or saturation jitter, no grayscale); each band is cropped,
flipped, jittered and blurred on its own, so an input with one non-zero band keeps
every other band exactly zero.

Random numbers are drawn on the generator's device and then moved to the data's,
so a CPU generator can drive augmentations of a batch on an accelerator. For a
given generator state, batch shape and configuration, the result is always the same.

A batch can be some rows of a larger *virtual* batch (:class:`Rows`): parameters
are drawn for the whole virtual batch and the batch's rows take theirs. That is
how the ranks of a distributed learner, each holding a share of one global
batch, augment their rows exactly as one process augments the global batch
(``revisit.learner.distributed``); the draws cost little next to the image work,
which is only done for the rows held.

:class:`Augment` composes them in MoCo v2's order: random resized crop, flips and
90-degree rotations, a colour step (a global gain, or per-band jitter), Gaussian
blur, sensor noise. :func:`policy_augment` builds the learner's named policies
(``learner.augment``):

- ``spectral`` (the default): crop, flips/rotations, a small *global* gain
  (every band of an image scaled by one factor), mild blur and sensor noise.
  Each keeps spectral identity: band ratios such as NDVI, which separate land
  covers, are unchanged by a global gain, and noise and blur are what a second
  acquisition of the same ground looks like.
- ``geometric``: crop and flips/rotations only.
- ``band-jitter``: the MoCo-style policy the learner had first: per-band
  brightness and contrast (±10 % a band, which moves band ratios by up to ~20 %
  and so teaches invariance to what tells forest from pasture), stronger blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "AUGMENT_POLICIES",
    "Augment",
    "Rows",
    "band_jitter",
    "flip_rotate",
    "gaussian_blur",
    "gaussian_noise",
    "global_gain",
    "policy_augment",
    "random_resized_crop",
]

#: The named augmentation policies of ``learner.augment``.
AUGMENT_POLICIES: tuple[str, ...] = ("spectral", "geometric", "band-jitter")


def _check_batch(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point reflectance, got dtype {x.dtype}")


@dataclass(frozen=True)
class Rows:
    """Which rows of a larger virtual batch a batch holds.

    Attributes:
        index: (N,) positions of the batch's rows in the virtual batch, distinct.
        total: Rows of the virtual batch.
    """

    index: Tensor
    total: int

    def __post_init__(self) -> None:
        if self.index.ndim != 1 or self.index.dtype != torch.long:
            raise ValueError(f"Rows.index must be (N,) int64, got {tuple(self.index.shape)}")
        if self.index.numel() and not (
            int(self.index.min()) >= 0 and int(self.index.max()) < self.total
        ):
            raise ValueError(f"Rows.index must lie in [0, {self.total}), got {self.index.tolist()}")

    @classmethod
    def all(cls, n: int) -> Rows:
        """All rows of a batch of ``n``: the batch is the virtual batch."""
        return cls(torch.arange(n), n)

    def subset(self, mask: Tensor) -> Rows:
        """The rows of ``mask`` (a (N,) bool over this batch's rows), in the same virtual batch."""
        return Rows(self.index[mask.to(self.index.device)], self.total)


def _rows(rows: Rows | None, n: int) -> Rows:
    if rows is None:
        return Rows.all(n)
    if rows.index.numel() != n:
        raise ValueError(f"rows holds {rows.index.numel()} positions for a batch of {n}")
    return rows


def _rand(shape: tuple[int, ...], generator: torch.Generator, rows: Rows | None) -> Tensor:
    """``torch.rand(shape)`` of a batch's rows: drawn for the virtual batch, then picked."""
    if rows is None:
        return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    full = torch.rand(
        (rows.total, *shape[1:]), generator=generator, device=generator.device, dtype=torch.float32
    )
    if rows.total == shape[0] and torch.equal(rows.index, torch.arange(rows.total)):
        return full
    return full.index_select(0, rows.index.to(full.device))


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    generator: torch.Generator,
    like: Tensor,
    rows: Rows | None = None,
) -> Tensor:
    """Uniform samples in [low, high), drawn on the generator's device, on ``like``'s."""
    u = _rand(shape, generator, rows)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {value}")


def random_resized_crop(
    x: Tensor,
    *,
    generator: torch.Generator,
    size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    rows: Rows | None = None,
) -> Tensor:
    """Crop a random box of each image and resize it (bilinear) to ``size``.

    As torchvision's ``RandomResizedCrop``: the box covers a share of the image area
    drawn uniformly from ``scale``, with an aspect ratio drawn log-uniformly from
    ``ratio``; of ``attempts`` draws per image the first that fits is used, and the
    whole image if none does. Box positions are continuous, not whole pixels. The
    crop is one ``affine_grid`` + ``grid_sample`` for the whole batch; it does not
    anti-alias, which matters only when ``size`` is much smaller than the box.

    Args:
        x: (N, C, H, W) float.
        generator: Source of randomness.
        size: Output (height, width) or one side; None (the default) keeps (H, W).
        scale: Range of the box's share of the image area; (0.2, 1.0) by default.
        ratio: Range of the box's width / height; (3/4, 4/3) by default.
        attempts: Draws per image before falling back to the whole image; 10.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, *size), float.

    Raises:
        ValueError: For a bad batch, an empty or reversed ``scale``/``ratio`` range,
            or ``attempts`` < 1.
    """
    _check_batch(x)
    _check_range("scale", scale, 0.0, 1.0)
    if scale[1] <= 0.0:
        raise ValueError(f"scale must allow a non-empty box, got {scale}")
    _check_range("ratio", ratio, 0.0, math.inf)
    if ratio[0] <= 0.0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if attempts < 1:
        raise ValueError(f"attempts must be positive, got {attempts}")
    n, c, h, w = x.shape
    out_h, out_w = _pair(size) if size is not None else (h, w)
    rows = _rows(rows, n)

    area = _uniform((n, attempts), scale[0], scale[1], generator, x, rows)
    log_ratio = _uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, x, rows)
    aspect = torch.exp(log_ratio)
    # Box width and height as shares of the image's width and height.
    box_w = torch.sqrt(area * aspect * (h / w))
    box_h = torch.sqrt(area / aspect * (w / h))
    fits = (box_w <= 1.0) & (box_h <= 1.0) & (box_w > 0.0) & (box_h > 0.0)
    # First attempt that fits (argmax returns the first maximum); whole image if none.
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    any_fits = fits.any(dim=1)
    ones = torch.ones(n, device=x.device, dtype=x.dtype)
    box_w = torch.where(any_fits, box_w.gather(1, first).squeeze(1), ones)
    box_h = torch.where(any_fits, box_h.gather(1, first).squeeze(1), ones)
    left = _uniform((n,), 0.0, 1.0, generator, x, rows) * (1.0 - box_w)
    top = _uniform((n,), 0.0, 1.0, generator, x, rows) * (1.0 - box_h)

    if n == 0:  # an empty batch (its draws are made all the same)
        return x.new_zeros((0, c, out_h, out_w))
    # Map the output's normalised coordinates [-1, 1] onto the box.
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = box_w
    theta[:, 0, 2] = 2.0 * left + box_w - 1.0
    theta[:, 1, 1] = box_h
    theta[:, 1, 2] = 2.0 * top + box_h - 1.0
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip_rotate(
    x: Tensor,
    *,
    generator: torch.Generator,
    hflip_p: float = 0.5,
    vflip_p: float = 0.5,
    rotate: bool = True,
    rows: Rows | None = None,
) -> Tensor:
    """Flip each image horizontally and vertically at random, then rotate it by k x 90°.

    With the defaults every image gets one of the 8 symmetries of the square, each
    with probability 1/8. The result is an exact permutation of the pixels.

    Args:
        x: (N, C, H, W); H == W if ``rotate``.
        generator: Source of randomness.
        hflip_p: Probability of a left-right flip; 0.5 by default.
        vflip_p: Probability of an up-down flip; 0.5 by default.
        rotate: Rotate by k x 90° with k uniform in {0, 1, 2, 3}; True by default.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, H, W), the same dtype.

    Raises:
        ValueError: For a bad batch or probability, or non-square images with ``rotate``.
    """
    _check_batch(x)
    for name, p in (("hflip_p", hflip_p), ("vflip_p", vflip_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    n, _, h, w = x.shape
    if rotate and h != w:
        raise ValueError(f"90-degree rotations need square images, got {h}x{w}")

    picked = _rows(rows, n)

    def draw() -> Tensor:
        u = _rand((n,), generator, picked)
        return u.to(x.device).view(n, 1, 1, 1)

    hflip = draw() < hflip_p
    vflip = draw() < vflip_p
    k = (draw() * 4).floor().clamp(max=3) if rotate else torch.zeros_like(hflip, dtype=x.dtype)
    # One symmetry per image: transform each group of images that share one, not
    # every image every way (a 64-image batch copies once instead of five times).
    code = (hflip.long() + 2 * vflip.long() + 4 * k.long()).view(n)
    out = torch.empty_like(x)
    for symmetry in torch.unique(code).tolist():
        members = torch.nonzero(code == symmetry).view(-1)
        group = x.index_select(0, members)
        if symmetry & 1:
            group = group.flip(-1)
        if symmetry & 2:
            group = group.flip(-2)
        if symmetry >> 2:
            group = torch.rot90(group, symmetry >> 2, dims=(-2, -1))
        out.index_copy_(0, members, group)
    x = out
    return x


def band_jitter(
    x: Tensor,
    *,
    generator: torch.Generator,
    brightness: float = 0.1,
    contrast: float = 0.1,
    p: float = 0.8,
    rows: Rows | None = None,
) -> Tensor:
    """Jitter each band's brightness and contrast independently, per image.

    For band c of an image with mean m_c (over its pixels), with probability ``p``::

        x_c <- m_c + a_c * (x_c - m_c) + b_c * m_c

    where the contrast factor a_c is uniform in [1 - contrast, 1 + contrast] and the
    relative brightness shift b_c is uniform in [-brightness, brightness]. The shift is
    relative to the band's mean so it means the same for dark (B01) and bright (B08)
    bands, and a band that is zero stays zero. Nothing mixes bands.

    Args:
        x: (N, C, H, W) float.
        generator: Source of randomness.
        brightness: Largest relative shift of a band's mean; 0.1 by default.
        contrast: Largest relative change of a band's contrast; 0.1 by default.
        p: Probability that an image is jittered at all; 0.8 (MoCo v2) by default.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, H, W), the same dtype.

    Raises:
        ValueError: For a bad batch, negative ``brightness``, ``contrast`` outside
            [0, 1], or ``p`` outside [0, 1].
    """
    _check_batch(x)
    if brightness < 0.0:
        raise ValueError(f"brightness must be non-negative, got {brightness}")
    if not 0.0 <= contrast <= 1.0:
        raise ValueError(f"contrast must be in [0, 1], got {contrast}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, c, _, _ = x.shape
    rows = _rows(rows, n)
    apply = (_uniform((n, 1, 1, 1), 0.0, 1.0, generator, x, rows) < p).to(x.dtype)
    factor = 1.0 + apply * _uniform((n, c, 1, 1), -contrast, contrast, generator, x, rows)
    shift = apply * _uniform((n, c, 1, 1), -brightness, brightness, generator, x, rows)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return mean + factor * (x - mean) + shift * mean


def global_gain(
    x: Tensor,
    *,
    generator: torch.Generator,
    gain: float = 0.05,
    p: float = 0.8,
    rows: Rows | None = None,
) -> Tensor:
    """Scale every band of an image by one random factor, as a change of illumination does.

    With probability ``p`` an image is multiplied by a factor uniform in
    [1 - gain, 1 + gain], the same for all its bands, so band ratios (NDVI and
    the like) are unchanged.

    Args:
        x: (N, C, H, W) float.
        generator: Source of randomness.
        gain: Largest relative change; 0.05 by default.
        p: Probability that an image is scaled; 0.8 by default.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, H, W), the same dtype.

    Raises:
        ValueError: For a bad batch, ``gain`` outside [0, 1) or ``p`` outside [0, 1].
    """
    _check_batch(x)
    if not 0.0 <= gain < 1.0:
        raise ValueError(f"gain must be in [0, 1), got {gain}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n = x.shape[0]
    rows = _rows(rows, n)
    apply = (_uniform((n, 1, 1, 1), 0.0, 1.0, generator, x, rows) < p).to(x.dtype)
    factor = 1.0 + apply * _uniform((n, 1, 1, 1), -gain, gain, generator, x, rows)
    return x * factor


def gaussian_noise(
    x: Tensor,
    *,
    generator: torch.Generator,
    sigma: float = 0.003,
    p: float = 0.5,
    rows: Rows | None = None,
) -> Tensor:
    """Add white Gaussian noise to an image, with probability ``p``, as sensor noise.

    The noise's standard deviation is drawn per image uniformly in [0, ``sigma``],
    in reflectance units (Sentinel-2's radiometric noise is of the order of 0.001
    to 0.003 in reflectance); each pixel of each band gets its own draw. The
    noise of an image comes from a generator of its own, seeded from
    ``generator``, so a row of a virtual batch gets its noise without the whole
    virtual batch's pixels being drawn.

    Args:
        x: (N, C, H, W) float reflectance.
        generator: Source of randomness.
        sigma: Largest noise standard deviation; 0.003 by default.
        p: Probability that an image gets noise; 0.5 by default.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, H, W), the same dtype.

    Raises:
        ValueError: For a bad batch, a negative ``sigma`` or ``p`` outside [0, 1].
    """
    _check_batch(x)
    if sigma < 0.0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n = x.shape[0]
    rows = _rows(rows, n)
    apply = (_uniform((n, 1, 1, 1), 0.0, 1.0, generator, x, rows) < p).to(x.dtype)
    scale = apply * _uniform((n, 1, 1, 1), 0.0, sigma, generator, x, rows)
    seeds = (_rand((n,), generator, rows).double() * 2.0**53).long().tolist()
    noisy = torch.nonzero(apply.view(n)).view(-1).tolist()
    if not noisy:
        return x
    image = torch.Generator(device=generator.device)
    noise = torch.zeros(x.shape, device=generator.device, dtype=torch.float32)
    for i in noisy:
        image.manual_seed(seeds[i])
        noise[i] = torch.randn(
            x.shape[1:], generator=image, device=generator.device, dtype=torch.float32
        )
    return x + scale * noise.to(device=x.device, dtype=x.dtype)


def gaussian_blur(
    x: Tensor,
    *,
    generator: torch.Generator,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    rows: Rows | None = None,
) -> Tensor:
    """Blur each image, with probability ``p``, by a Gaussian of random sigma (pixels).

    The blur is separable (a horizontal then a vertical 1-d convolution), with one
    kernel per image for all its bands, reflect padding at the edges, and kernel
    radius ``ceil(3 * sigma[1])``. An image that is not blurred gets a unit impulse
    kernel and comes back unchanged.

    Args:
        x: (N, C, H, W) float.
        generator: Source of randomness.
        sigma: Range of the standard deviation, in pixels; (0.1, 2.0) (MoCo v2) by
            default.
        p: Probability that an image is blurred; 0.5 by default.
        rows: The batch's rows in a virtual batch (see :class:`Rows`); None: its own.

    Returns:
        (N, C, H, W), the same dtype.

    Raises:
        ValueError: For a bad batch, a non-positive or reversed ``sigma`` range, or
            ``p`` outside [0, 1].
    """
    _check_batch(x)
    if not 0.0 < sigma[0] <= sigma[1]:
        raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, c, h, w = x.shape
    picked = _rows(rows, n)
    apply = _uniform((n, 1), 0.0, 1.0, generator, x, picked) < p
    sigmas = _uniform((n, 1), sigma[0], sigma[1], generator, x, picked)
    radius = min(math.ceil(3.0 * sigma[1]), h - 1, w - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigmas) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    blurred = torch.nonzero(apply.view(n)).view(-1)
    if blurred.numel() == 0:
        return x
    # Only the images drawn for a blur are convolved; the others come back as they are.
    m = blurred.numel()
    # One group per (image, band): the same kernel for every band of an image.
    weight = kernel[blurred].repeat_interleave(c, dim=0).view(m * c, 1, 1, 2 * radius + 1)
    flat = x.index_select(0, blurred).reshape(1, m * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight, groups=m * c)
    weight_v = weight.view(m * c, 1, 2 * radius + 1, 1)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight_v, groups=m * c)
    return x.index_copy(0, blurred, flat.view(m, c, h, w))


@dataclass(frozen=True, kw_only=True)
class Augment:
    """The learner's augmentation: crop, flips/rotations, gain or band jitter, blur, noise.

    Call it as ``augment(x, generator)`` on a (N, C, H, W) float batch; each image
    gets its own parameters. The output is float32 and finite for finite input.

    Attributes:
        size: Output (height, width) or one side; None (the default) keeps (H, W).
        crop: Apply :func:`random_resized_crop`; True by default. Without it, an
            output ``size`` different from the input's is reached by a bilinear
            resize of the whole image.
        crop_scale: Range of the crop's share of the image area; (0.2, 1.0).
        crop_ratio: Range of the crop's aspect ratio; (3/4, 4/3).
        hflip_p: Probability of a left-right flip; 0.5.
        vflip_p: Probability of an up-down flip; 0.5.
        rotate: Random 90-degree rotations; True.
        brightness: Largest relative shift of a band's mean; 0.1.
        contrast: Largest relative change of a band's contrast; 0.1.
        jitter_p: Probability of jittering an image's bands; 0.8. 0 disables it.
        blur_sigma: Range of the blur's sigma, in pixels; (0.1, 2.0).
        blur_p: Probability of blurring an image; 0.5. 0 disables it.
        gain: Largest relative global gain (all bands alike); 0.05.
        gain_p: Probability of a global gain; 0 (off) by default.
        noise_sigma: Largest sensor-noise standard deviation (reflectance); 0.003.
        noise_p: Probability of sensor noise; 0 (off) by default.

    Raises:
        ValueError: At construction, for an invalid setting.
    """

    size: int | tuple[int, int] | None = None
    crop: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rotate: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    jitter_p: float = 0.8
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    gain: float = 0.05
    gain_p: float = 0.0
    noise_sigma: float = 0.003
    noise_p: float = 0.0

    def __post_init__(self) -> None:
        if self.size is not None and min(_pair(self.size)) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[1] <= 0.0:
            raise ValueError(f"crop_scale must allow a non-empty box, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name, p in (
            ("hflip_p", self.hflip_p),
            ("vflip_p", self.vflip_p),
            ("jitter_p", self.jitter_p),
            ("blur_p", self.blur_p),
            ("gain_p", self.gain_p),
            ("noise_p", self.noise_p),
            ("contrast", self.contrast),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if self.brightness < 0.0:
            raise ValueError(f"brightness must be non-negative, got {self.brightness}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if not 0.0 <= self.gain < 1.0:
            raise ValueError(f"gain must be in [0, 1), got {self.gain}")
        if self.noise_sigma < 0.0:
            raise ValueError(f"noise_sigma must be non-negative, got {self.noise_sigma}")

    def __call__(self, x: Tensor, generator: torch.Generator, rows: Rows | None = None) -> Tensor:
        """Augment a batch.

        Args:
            x: (N, C, H, W) float reflectance.
            generator: Source of randomness; the same state gives the same output.
            rows: The batch's rows in a larger virtual batch: each row gets what it
                would get there (see :class:`Rows`); None: the batch is its own.

        Returns:
            (N, C, *size) float32.

        Raises:
            ValueError: If ``x`` is not a 4-d float batch, or ``rotate`` is on and the
                output is not square.
        """
        _check_batch(x)
        x = x.to(torch.float32)
        rows = _rows(rows, x.shape[0])
        if self.crop:
            x = random_resized_crop(
                x,
                generator=generator,
                size=self.size,
                scale=self.crop_scale,
                ratio=self.crop_ratio,
                rows=rows,
            )
        elif self.size is not None and _pair(self.size) != tuple(x.shape[-2:]):
            x = F.interpolate(
                x, size=_pair(self.size), mode="bilinear", align_corners=False, antialias=True
            )
        x = flip_rotate(
            x,
            generator=generator,
            hflip_p=self.hflip_p,
            vflip_p=self.vflip_p,
            rotate=self.rotate,
            rows=rows,
        )
        if self.jitter_p > 0.0:
            x = band_jitter(
                x,
                generator=generator,
                brightness=self.brightness,
                contrast=self.contrast,
                p=self.jitter_p,
                rows=rows,
            )
        if self.gain_p > 0.0:
            x = global_gain(x, generator=generator, gain=self.gain, p=self.gain_p, rows=rows)
        if self.blur_p > 0.0:
            x = gaussian_blur(
                x, generator=generator, sigma=self.blur_sigma, p=self.blur_p, rows=rows
            )
        if self.noise_p > 0.0:
            x = gaussian_noise(
                x, generator=generator, sigma=self.noise_sigma, p=self.noise_p, rows=rows
            )
        return x


def policy_augment(
    policy: str, *, size: int | None = None, crop_scale: tuple[float, float] = (0.4, 1.0)
) -> Augment:
    """The augmentation of a named policy (see the module docstring).

    Args:
        policy: One of :data:`AUGMENT_POLICIES`.
        size: Output side (the training crop); None keeps the input's.
        crop_scale: Range of the crop box's share of the input's area.

    Returns:
        The :class:`Augment`.

    Raises:
        ValueError: For an unknown policy.
    """
    if policy == "spectral":
        return Augment(
            size=size,
            crop_scale=crop_scale,
            jitter_p=0.0,
            gain=0.05,
            gain_p=0.8,
            blur_sigma=(0.1, 1.0),
            blur_p=0.3,
            noise_sigma=0.003,
            noise_p=0.5,
        )
    if policy == "geometric":
        return Augment(size=size, crop_scale=crop_scale, jitter_p=0.0, blur_p=0.0)
    if policy == "band-jitter":
        return Augment(size=size, crop_scale=crop_scale)
    raise ValueError(f"augmentation policy must be one of {AUGMENT_POLICIES}, got {policy!r}")
