"""Training augmentations in plain torch, applied alike to an image and its label map.

Every random number of a sample comes from a ``torch.Generator`` seeded by ``(seed, epoch, index)``
(:func:`sample_generator`), so a sample looks the same in any worker process, on any machine, and after
a resumed run; another epoch gives another draw. Each sample draws the same fixed set of numbers
whatever is enabled, so switching one augmentation on or off leaves the others' draws unchanged.

The pipeline works in the model's frame (input size ``S``) to stay cheap on large photos: flips, one
resize of the longest side to ``S * scale`` (bilinear for the image, nearest for the labels), a random
``S x S`` crop where the result is larger, colour jitter, ImageNet normalisation, and padding (image 0,
labels 255 = ignore) where it is smaller. With every augmentation off it equals
:func:`convlora.models.processing.preprocess` exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..models.processing import (
    IGNORE_INDEX,
    SAM_INPUT,
    InputFormat,
    as_tensor,
    image_to_tensor,
    normalize,
    pad_square,
    resize_image,
    resize_labels,
    resized_shape,
)

# Slots of the per-sample random vector; fixed so that each augmentation always reads the same number.
_HFLIP, _VFLIP, _SCALE, _TOP, _LEFT, _BRIGHTNESS, _CONTRAST, _SATURATION = range(8)
_DRAWS = 8


@dataclass
class AugmentConfig:
    """Augmentation settings for training (evaluation never augments).

    The defaults are the paper's: random horizontal flips only.

    Args:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        scale: ``(low, high)`` range of a random zoom relative to the fitted size; above 1 a random
            ``S x S`` crop is taken, below 1 the rest is padding (ignored by the loss).
        color_jitter: strength used for brightness, contrast and saturation when those are unset.
        brightness: factor drawn from ``[1 - b, 1 + b]`` multiplying the image.
        contrast: factor drawn from ``[1 - c, 1 + c]`` blending the image with its mean grey level.
        saturation: factor drawn from ``[1 - s, 1 + s]`` blending the image with its grey version.

    >>> AugmentConfig(scale=[0.8, 1.2], color_jitter=0.2).jitter
    (0.2, 0.2, 0.2)
    """

    hflip: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    vflip: float = field(default=0.0, metadata={"help": "Probability of a vertical flip."})
    scale: tuple[float, float] = field(
        default=(1.0, 1.0), metadata={"help": "(low, high) range of a random zoom; crops above 1, pads below 1."}
    )
    color_jitter: float = field(
        default=0.0, metadata={"help": "Shared strength of brightness, contrast and saturation jitter."}
    )
    brightness: float | None = field(default=None, metadata={"help": "Brightness jitter strength in [0, 1)."})
    contrast: float | None = field(default=None, metadata={"help": "Contrast jitter strength in [0, 1)."})
    saturation: float | None = field(default=None, metadata={"help": "Saturation jitter strength in [0, 1)."})

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {value!r}")
        scale = self.scale
        if (
            not isinstance(scale, (list, tuple))
            or len(scale) != 2
            or not all(_is_number(v) and v > 0 for v in scale)
            or scale[0] > scale[1]
        ):
            raise ValueError(f"scale must be two positive numbers (low, high) with low <= high, got {scale!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        for name in ("color_jitter", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value is None and name != "color_jitter":
                continue
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")

    @property
    def jitter(self) -> tuple[float, float, float]:
        """Effective ``(brightness, contrast, saturation)`` strengths."""
        shared = float(self.color_jitter)
        return tuple(shared if v is None else float(v) for v in (self.brightness, self.contrast, self.saturation))

    @property
    def enabled(self) -> bool:
        """Whether any augmentation can change a sample."""
        return self.hflip > 0 or self.vflip > 0 or self.scale != (1.0, 1.0) or any(self.jitter)

    def to_dict(self) -> dict[str, object]:
        """JSON-able copy of the settings."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, index)``, identical on every machine.

    >>> a = torch.rand(2, generator=sample_generator(0, 1, 5))
    >>> torch.equal(a, torch.rand(2, generator=sample_generator(0, 1, 5)))
    True
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    digest = hashlib.blake2b(f"convlora-augment:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def augment_sample(
    image: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    input_size: int,
    config: AugmentConfig,
    generator: torch.Generator,
    input_format: InputFormat = SAM_INPUT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment and fit one sample into the model's square input.

    Args:
        image: uint8 ``(h, w, 3)`` RGB image.
        labels: integer ``(h, w)`` class ids (255 = ignore), or ``None`` for an unlabelled image.
        input_size: the model's square input size ``S``.
        config: the augmentation settings.
        generator: the sample's generator (see :func:`sample_generator`).
        input_format: the model family's normalisation and resizing (zoom then acts on the square input
            for families that resize to the square instead of padding).

    Returns:
        ``pixel_values`` float32 ``(3, S, S)`` and int64 ``(S, S)`` labels (``None`` without labels).

    >>> image = np.zeros((20, 40, 3), np.uint8)
    >>> x, y = augment_sample(image, np.zeros((20, 40), np.uint8), 32, AugmentConfig(), sample_generator(0, 0, 0))
    >>> x.shape, y.shape
    (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    """
    draws = torch.rand(_DRAWS, generator=generator, dtype=torch.float64).tolist()
    pixels = as_tensor(image)
    target = None
    if labels is not None:
        target = as_tensor(labels)
        if tuple(target.shape) != tuple(pixels.shape[:2]):
            raise ValueError(f"labels shape {tuple(target.shape)} does not match the image's {tuple(pixels.shape[:2])}")
    if draws[_HFLIP] < config.hflip:
        pixels, target = pixels.flip(1), None if target is None else target.flip(1)
    if draws[_VFLIP] < config.vflip:
        pixels, target = pixels.flip(0), None if target is None else target.flip(0)
    mean_grey = _mean_grey(pixels)

    low, high = config.scale
    zoom = low + (high - low) * draws[_SCALE]
    side = max(1, round(input_size * zoom))
    height, width = resized_shape(tuple(pixels.shape[:2]), side) if input_format.pad_to_square else (side, side)
    tensor = resize_image(image_to_tensor(pixels), (height, width))  # (3, h, w) in [0, 1]
    if target is not None:
        target = resize_labels(target, (height, width))
    top = min(int(draws[_TOP] * (height - input_size + 1)), height - input_size) if height > input_size else 0
    left = min(int(draws[_LEFT] * (width - input_size + 1)), width - input_size) if width > input_size else 0
    tensor = tensor[:, top : top + input_size, left : left + input_size]
    if target is not None:
        target = target[top : top + input_size, left : left + input_size]

    tensor = _color_jitter(tensor, mean_grey, config.jitter, draws)
    pixel_values = pad_square(normalize(tensor, input_format.mean, input_format.std), input_size)
    if target is not None:
        target = pad_square(target, input_size, value=IGNORE_INDEX)
    return pixel_values, target


def _mean_grey(pixels: torch.Tensor) -> float:
    """Mean luma of a uint8 image, from exact integer sums (no float reduction that depends on threads)."""
    weights = torch.tensor([299, 587, 114], dtype=torch.int64)
    total = int((pixels.to(torch.int64) * weights).sum())
    return total / (1000 * 255 * max(1, pixels.shape[0] * pixels.shape[1]))


def _color_jitter(
    image: torch.Tensor, mean_grey: float, strengths: tuple[float, float, float], draws: list[float]
) -> torch.Tensor:
    """Brightness, contrast and saturation in that order on a ``(3, h, w)`` image in [0, 1]."""
    brightness, contrast, saturation = strengths
    if brightness > 0:
        factor = 1.0 + brightness * (2.0 * draws[_BRIGHTNESS] - 1.0)
        image = (image * factor).clamp(0.0, 1.0)
        mean_grey = min(1.0, mean_grey * factor)
    if contrast > 0:
        factor = 1.0 + contrast * (2.0 * draws[_CONTRAST] - 1.0)
        image = (factor * image + (1.0 - factor) * mean_grey).clamp(0.0, 1.0)
    if saturation > 0:
        factor = 1.0 + saturation * (2.0 * draws[_SATURATION] - 1.0)
        grey = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # (h, w)
        image = (factor * image + (1.0 - factor) * grey[None]).clamp(0.0, 1.0)
    return image
