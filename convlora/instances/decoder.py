"""A trained instance decoder ("AIS"): a light head on the image embedding, its loss, and the watershed.

:class:`InstanceHead` turns the image encoder's embedding (SAM: ``last_hidden_state``; SAM 2 / 3: the coarsest
map of the pyramid), optionally with the image itself, into three maps: a foreground logit and two distance
maps, the centre and boundary maps of :mod:`convlora.instances.targets`. :func:`instance_loss` trains it against
:func:`~convlora.instances.targets.instance_targets`; :func:`ids_from_maps` turns the three maps into object ids
with a seeded watershed: seeds where the centre map is high, flooding down the boundary map within the
foreground, so two touching objects stay two as long as their centres are apart.

The approach follows micro-sam's trained decoder (Archit et al., 2025) and its distance-map watershed; the code
is convlora's own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import watershed
from torch import nn

from ..evaluation import relabel_sequential
from ..models.processing import ResizeInfo, postprocess_masks

# the output channels, in order
CHANNELS = ("foreground", "centre", "boundary")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _Up(nn.Module):
    """Twice the resolution: a 2x2 transposed convolution, then a 3x3 convolution, each normalised with GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            _norm(out_channels),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            _norm(out_channels),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Stem(nn.Module):
    """Features of the input image itself at 1/2 and 1/4 of its size: the detail the 16-pixel tokens lack."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.at_half = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, stride=2, padding=1),
            _norm(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            _norm(channels),
            nn.GELU(),
        )
        self.at_quarter = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1), _norm(channels), nn.GELU()
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.at_half(pixel_values)


class _Fuse(nn.Module):
    """Decoder features joined with image features of a finer grid (resized to it), by a 3x3 convolution."""

    def __init__(self, channels: int, image_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels + image_channels, channels, kernel_size=3, padding=1), _norm(channels), nn.GELU()
        )

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if features.shape[-2:] != image.shape[-2:]:  # SAM 3's 14-pixel patches: the grids differ slightly
            features = F.interpolate(features, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.layers(torch.cat([features, image], dim=1))


class InstanceHead(nn.Module):
    """Foreground and distance maps from the image encoder's embedding (and, optionally, the image itself).

    A 3x3 projection to ``hidden_channels`` and two upsampling stages halving the width each (transposed
    convolution, GroupNorm, GELU) bring the embedding to 4x its grid (SAM: 1/4 of the input); a 1x1 output
    convolution gives the three maps. That is 170k weights on SAM ViT-B at the default width, most of them in
    the projection (``9 * in_channels * hidden_channels``), small next to any image encoder.

    With ``image_channels`` the head also reads the preprocessed image, as micro-sam's UNETR decoder does: a
    small convolutional stem gives features at 1/2 and 1/4 of the input, joined with the decoder's at 1/4,
    then after a third upsampling at 1/2, where the maps come out. A token of SAM covers 16 x 16 pixels: the
    line where two touching nuclei meet is often finer than that, and the outlines of objects a few pixels
    wide are lost at 1/4.

    Args:
        in_channels: channels of the embedding (SAM ViT-B: 256; the tiny test SAM: 16).
        hidden_channels: width after the projection; the stages use ``hidden / 2`` and ``hidden / 4``
            (a multiple of 4).
        image_channels: width of the image stem; 0: no stem (maps at 4x the grid, the image is not read).

    >>> head = InstanceHead(16, hidden_channels=8)
    >>> head(torch.zeros(2, 16, 8, 8)).shape  # foreground logit, centre and boundary logits
    torch.Size([2, 3, 32, 32])
    >>> InstanceHead(16, 8, image_channels=4)(torch.zeros(2, 16, 8, 8), torch.zeros(2, 3, 128, 128)).shape
    torch.Size([2, 3, 64, 64])
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64, image_channels: int = 0) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(hidden_channels, int) or hidden_channels < 4 or hidden_channels % 4:
            raise ValueError(f"hidden_channels must be a positive multiple of 4, got {hidden_channels!r}")
        if not isinstance(image_channels, int) or image_channels < 0:
            raise ValueError(f"image_channels must be a non-negative integer, got {image_channels!r}")
        self.in_channels, self.hidden_channels, self.image_channels = in_channels, hidden_channels, image_channels
        self.project = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1), _norm(hidden_channels), nn.GELU()
        )
        half, quarter = hidden_channels // 2, hidden_channels // 4
        self.up = nn.Sequential(_Up(hidden_channels, half), _Up(half, quarter))
        if image_channels:
            self.stem = _Stem(image_channels)
            self.fuse_quarter = _Fuse(quarter, image_channels)
            self.up_half = nn.Sequential(
                nn.ConvTranspose2d(quarter, quarter, kernel_size=2, stride=2), _norm(quarter), nn.GELU()
            )
            self.fuse_half = _Fuse(quarter, image_channels)
        self.out = nn.Conv2d(quarter, len(CHANNELS), kernel_size=1)

    def forward(self, embedding: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, c, h, w)`` embedding (and ``(b, 3, S, S)`` image with a stem) -> ``(b, 3, m, m)`` logits.

        ``m`` is ``4h`` without a stem and ``S / 2`` with one; apply a sigmoid for the maps.
        """
        if embedding.ndim != 4 or embedding.shape[1] != self.in_channels:
            raise ValueError(f"embedding has shape {tuple(embedding.shape)}, expected (b, {self.in_channels}, h, w)")
        features = self.up(self.project(embedding))  # (b, hidden / 4, 4h, 4w)
        if not self.image_channels:
            return self.out(features)
        if pixel_values is None or pixel_values.ndim != 4 or pixel_values.shape[:2] != (embedding.shape[0], 3):
            found = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"this head reads the image too: pixel_values must be (b, 3, S, S), got {found}")
        half = self.stem(pixel_values)  # (b, image_channels, S/2, S/2)
        quarter = self.stem.at_quarter(half)  # (b, image_channels, S/4, S/4)
        features = self.fuse_quarter(features, quarter)
        features = self.fuse_half(self.up_half(features), half)  # (b, hidden / 4, S/2, S/2)
        return self.out(features)


def instance_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The head's training loss: BCE + Dice on the foreground, Dice + MSE on each of the two distance maps.

    Every term is a weighted mean over the valid pixels of the whole batch. The distance maps are regressed on
    **every** valid pixel, background included (their target there is 0): the watershed only looks at them
    inside the predicted foreground, but a map that is low outside objects keeps stray foreground pixels from
    growing seeds. Dice is pooled over the batch, so images without objects do not make it undefined.

    Why Dice on the distance maps too (soft Dice, the maps read as soft masks, as micro-sam's distance loss
    does): their MSE is small (a few hundredths) next to the foreground's BCE + Dice, so alone it leaves the
    centre peaks low and the seeds few; Dice weighs each map as much as the foreground whatever the objects'
    size. On the synthetic nuclei (decoder only, 12 epochs) it raised the test mSA from 0.11 to 0.21.

    Args:
        logits: ``(b, 3, h, w)`` from :class:`InstanceHead`; bilinearly upsampled to the targets' size when it
            differs (targets are best kept at full resolution: downsampled distance maps lose their peaks).
        targets: ``(b, 3, H, W)`` from :func:`~convlora.instances.targets.instance_targets`.
        weight: ``(b, H, W)`` from :func:`~convlora.instances.targets.target_weight` (0 = ignored pixel);
            all ones when ``None``.

    Returns:
        A scalar: ``bce + dice + dice(centre) + dice(boundary) + mse(centre) + mse(boundary)``.

    >>> targets = torch.zeros(1, 3, 8, 8)
    >>> round(instance_loss(torch.full((1, 3, 8, 8), -20.0), targets).item(), 4)  # all right: only Dice's eps
    0.0
    """
    if logits.ndim != 4 or logits.shape[1] != len(CHANNELS):
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected (b, 3, h, w)")
    if targets.ndim != 4 or targets.shape[:2] != logits.shape[:2]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({logits.shape[0]}, 3, H, W)")
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    if weight is None:
        weight = torch.ones_like(targets[:, 0])
    elif weight.shape != targets[:, 0].shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {tuple(targets[:, 0].shape)}")
    weight = weight.to(logits.dtype)
    total = weight.sum().clamp(min=1.0)
    targets = targets.to(logits.dtype)
    fg_logit, fg_target = logits[:, 0], targets[:, 0]
    bce = (F.binary_cross_entropy_with_logits(fg_logit, fg_target, reduction="none") * weight).sum() / total
    probability = torch.sigmoid(logits) * weight[:, None]  # (b, 3, H, W)
    overlap = (probability * targets).sum(dim=(0, 2, 3))
    sizes = probability.sum(dim=(0, 2, 3)) + (targets * weight[:, None]).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * overlap + 1.0) / (sizes + 1.0)  # (3,): foreground, centre, boundary
    distances = torch.sigmoid(logits[:, 1:])
    mse = (((distances - targets[:, 1:]) ** 2) * weight[:, None]).sum() / total  # sum of the two channels' MSE
    return bce + dice.sum() + mse


def ids_from_maps(
    foreground: np.ndarray | torch.Tensor,
    center: np.ndarray | torch.Tensor,
    boundary: np.ndarray | torch.Tensor,
    *,
    foreground_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_size: int = 10,
) -> np.ndarray:
    """Object ids from the three maps (probabilities in [0, 1]) by a seeded watershed.

    1. foreground = ``foreground > foreground_threshold``;
    2. seeds = the 4-connected components of ``center > seed_threshold`` within the foreground;
    3. the seeds flood the negated boundary map (from the deepest pixels outwards) within the foreground
       (``skimage.segmentation.watershed``), so touching objects meet where both are shallowest;
    4. a foreground region that holds no seed (a small or faint object whose centre stayed low) becomes an
       object of its own rather than being lost;
    5. objects of fewer than ``min_size`` pixels are dropped, and the ids renumbered 1..n.

    Args:
        foreground: ``(h, w)`` foreground probability (numpy or torch).
        center: ``(h, w)`` centre map.
        boundary: ``(h, w)`` boundary map.
        foreground_threshold: foreground above this.
        seed_threshold: centre map above this seeds an object; the centre map falls linearly from 1 at an
            object's centre to 0 at its nearest edge, so 0.5 seeds a disc of half the object's inscribed radius.
        min_size: smallest object kept, in pixels (1 keeps everything).

    Returns:
        int32 ``(h, w)`` ids 1..n, 0 = background.

    >>> from convlora.instances.targets import instance_targets
    >>> truth = np.zeros((9, 14), np.int64)
    >>> truth[2:7, 1:6], truth[1:8, 6:13] = 1, 2  # a 5x5 and a 7x7 square that touch
    >>> ids = ids_from_maps(*instance_targets(truth), min_size=1)
    >>> int(ids.max()), bool((ids[truth == 1] == ids[4, 3]).all())
    (2, True)
    """
    maps = [
        np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float32)
        for m in (foreground, center, boundary)
    ]
    if maps[0].ndim != 2 or any(m.shape != maps[0].shape for m in maps):
        shapes = [m.shape for m in maps]
        raise ValueError(f"foreground, center and boundary must be (h, w) maps of one shape, got {shapes}")
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size!r}")
    mask = maps[0] > foreground_threshold
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    seeds, count = ndimage.label((maps[1] > seed_threshold) & mask)
    ids = watershed(-maps[2], markers=seeds, mask=mask) if count else np.zeros(mask.shape, dtype=np.int64)
    unseeded, extra = ndimage.label(mask & (ids == 0))
    ids = np.where(unseeded > 0, unseeded + count, ids)
    if extra + count and min_size > 1:
        sizes = np.bincount(ids.ravel(), minlength=count + extra + 1)
        ids[sizes[ids] < min_size] = 0
    return relabel_sequential(ids).astype(np.int32)


def ids_from_logits(
    logits: torch.Tensor,
    info: ResizeInfo | None = None,
    *,
    foreground_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_size: int = 10,
) -> np.ndarray:
    """Object ids of one image from :class:`InstanceHead` logits, at the original image size.

    Args:
        logits: ``(3, s, s)`` or ``(1, 3, s, s)`` logits of one image.
        info: the image's :class:`~convlora.models.processing.ResizeInfo` (from ``preprocess``): the logits
            are upsampled to the input size, cropped of padding and resized to the original size, as
            :func:`~convlora.models.processing.postprocess_masks` does for SAM's masks; ``None`` keeps their size.
        foreground_threshold: see :func:`ids_from_maps`.
        seed_threshold: see :func:`ids_from_maps`.
        min_size: see :func:`ids_from_maps` (pixels of the original image).

    Returns:
        int32 ``(h, w)`` ids 1..n, 0 = background.

    >>> ids_from_logits(torch.full((3, 16, 16), -5.0), ResizeInfo.fit((30, 60), 64)).shape
    (30, 60)
    """
    batch = logits[None] if logits.ndim == 3 else logits
    if batch.ndim != 4 or batch.shape[:2] != (1, len(CHANNELS)):
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected (3, s, s) or (1, 3, s, s)")
    with torch.no_grad():
        if info is not None:
            batch = postprocess_masks(batch, info)
        maps = torch.sigmoid(batch[0].float())
    return ids_from_maps(
        *maps, foreground_threshold=foreground_threshold, seed_threshold=seed_threshold, min_size=min_size
    )
