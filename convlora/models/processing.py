"""SAM's image pre- and post-processing in plain torch, plus mask overlays and mask PNGs.

The official SAM processor resizes the longest side to the model's input size ``S``, scales to [0, 1],
normalises with the ImageNet mean and std and pads bottom/right to ``S x S``; mask logits
``(b, c, S/4, S/4)`` come back by upsampling to ``S x S``, cropping the padding and resizing to the
original ``(h, w)``. transformers' own image processor needs torchvision, so this module does the same
with ``torch.nn.functional``:

>>> import numpy as np
>>> pixel_values, info = preprocess(np.zeros((30, 60, 3), np.uint8), input_size=64)
>>> pixel_values.shape, info.resized_size
(torch.Size([3, 64, 64]), (32, 64))
>>> postprocess_masks(torch.zeros(1, 1, 16, 16), info).shape
torch.Size([1, 1, 30, 60])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from .._io import atomic_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # the label of pixels no loss or metric counts (VOC's boundary value)

# Colours of class ids 1, 2, ... in overlays (cycled beyond its length); class 0 and the ignore index stay
# uncoloured. Chosen to stay distinguishable from each other and on natural images.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
], dtype=np.uint8)  # fmt: skip


@dataclass(frozen=True)
class InputFormat:
    """How a model family's own processor turns an image into ``pixel_values``.

    Args:
        mean: per-channel mean subtracted from the [0, 1] image.
        std: per-channel standard deviation it is divided by.
        pad_to_square: resize the longest side to the input size and pad bottom/right (SAM), or resize the
            image to the square input as it is (SAM 2 and SAM 3).

    >>> InputFormat().pad_to_square, InputFormat(mean=(0.5,) * 3, std=(0.5,) * 3, pad_to_square=False).mean
    (True, (0.5, 0.5, 0.5))
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pad_to_square: bool = True


SAM_INPUT = InputFormat()


@dataclass(frozen=True)
class ResizeInfo:
    """How one image was fitted into the model's square input; all that postprocessing needs.

    Args:
        original_size: ``(h, w)`` of the image as read.
        resized_size: ``(h, w)`` after resizing: the longest side to ``input_size`` (padded inputs), or
            ``(input_size, input_size)`` (inputs resized to the square as they are).
        input_size: side ``S`` of the square input.

    >>> ResizeInfo.fit((480, 640), 1024).resized_size
    (768, 1024)
    >>> ResizeInfo.fit((480, 640), 1024, pad_to_square=False).resized_size
    (1024, 1024)
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int

    @classmethod
    def fit(
        cls, original_size: tuple[int, int] | torch.Tensor, input_size: int, pad_to_square: bool = True
    ) -> ResizeInfo:
        """The ``ResizeInfo`` of an image of ``original_size`` for a model input of ``input_size``."""
        height, width = (int(v) for v in original_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"original_size must be positive, got {(height, width)}")
        resized = resized_shape((height, width), input_size) if pad_to_square else (int(input_size),) * 2
        return cls((height, width), resized, int(input_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def resized_shape(original_size: tuple[int, int], input_size: int) -> tuple[int, int]:
    """``(h, w)`` with the longest side scaled to ``input_size`` (rounded half up, at least 1), as SAM does.

    Args:
        original_size: ``(h, w)`` of the image.
        input_size: target length of the longest side.

    >>> resized_shape((480, 640), 1024)
    (768, 1024)
    """
    height, width = (int(v) for v in original_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"original_size must be positive, got {(height, width)}")
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    scale = input_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor sharing memory with a writable numpy array, or a copy of a read-only one (e.g. from PIL)."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 ``(h, w, 3)`` RGB image as a float32 ``(3, h, w)`` tensor in [0, 1].

    >>> image_to_tensor(np.full((2, 2, 3), 255, np.uint8)).max().item()
    1.0
    """
    tensor = as_tensor(image)
    if tensor.ndim != 3 or tensor.shape[-1] != 3 or tensor.dtype != torch.uint8:
        raise ValueError(
            f"image must be a uint8 (h, w, 3) RGB array, got dtype {tensor.dtype} and shape {tuple(tensor.shape)}"
        )
    return rearrange(tensor, "h w d -> d h w").float() / 255.0


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float ``(d, h, w)`` image to ``size``, antialiased when shrinking."""
    height, width = image.shape[-2:]
    if (height, width) == tuple(size):
        return image
    shrink = size[0] < height or size[1] < width
    resized = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
    return resized[0]


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer ``(h, w)`` label map (pixel-centre aligned), as int64."""
    labels = labels.long()
    if tuple(labels.shape) == tuple(size):
        return labels
    # float32 holds every id up to 2**24 exactly; "nearest-exact" samples pixel centres like bilinear does.
    resized = F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[0, 0].long()


def normalize(
    image: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Per-channel normalisation (ImageNet's by default) of a ``(3, h, w)`` image in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - mean_t) / std_t


def pad_square(tensor: torch.Tensor, input_size: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dimensions bottom/right to ``input_size x input_size`` with ``value``."""
    height, width = tensor.shape[-2:]
    if height > input_size or width > input_size:
        raise ValueError(f"cannot pad a {height}x{width} tensor to {input_size}x{input_size}: it is larger")
    return F.pad(tensor, (0, input_size - width, 0, input_size - height), value=value)


def preprocess(
    image: np.ndarray | torch.Tensor, input_size: int = 1024, input_format: InputFormat = SAM_INPUT
) -> tuple[torch.Tensor, ResizeInfo]:
    """SAM's input for one image: resize longest side, scale to [0, 1], normalise, pad bottom/right.

    Args:
        image: uint8 ``(h, w, 3)`` RGB image (see ``convlora.data.read_image``).
        input_size: the model's square input size ``S``.
        input_format: the family's normalisation and resizing (SAM's by default; see ``ModelFamily``).

    Returns:
        ``pixel_values`` float32 ``(3, S, S)`` (padding is 0, i.e. the mean colour) and the
        :class:`ResizeInfo` that :func:`postprocess_masks` needs.

    >>> pixel_values, info = preprocess(np.zeros((10, 20, 3), np.uint8), input_size=32)
    >>> info.resized_size, pixel_values[:, 16:].abs().max().item()
    ((16, 32), 0.0)
    """
    tensor = image_to_tensor(image)
    info = ResizeInfo.fit(tensor.shape[-2:], input_size, input_format.pad_to_square)
    pixel_values = normalize(resize_image(tensor, info.resized_size), input_format.mean, input_format.std)
    return pad_square(pixel_values, input_size), info


def preprocess_batch(
    images: list[np.ndarray] | list[torch.Tensor], input_size: int = 1024, input_format: InputFormat = SAM_INPUT
) -> tuple[torch.Tensor, list[ResizeInfo]]:
    """:func:`preprocess` for several images of any sizes: ``(b, 3, S, S)`` and one ``ResizeInfo`` each.

    >>> batch, infos = preprocess_batch([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 8, 3), np.uint8)], 16)
    >>> batch.shape, infos[1].resized_size
    (torch.Size([2, 3, 16, 16]), (8, 16))
    """
    pairs = [preprocess(image, input_size, input_format) for image in images]
    return torch.stack([pixel_values for pixel_values, _ in pairs]), [info for _, info in pairs]


def preprocess_mask(
    mask: np.ndarray | torch.Tensor, input_size: int = 1024, pad_to_square: bool = True
) -> torch.Tensor:
    """A label map fitted like its image: nearest resize of the longest side, padding set to ignore (255).

    Args:
        mask: integer ``(h, w)`` class ids (255 = ignore).
        input_size: the model's square input size ``S``.
        pad_to_square: as the image's :class:`InputFormat` (``False``: resized to the square as it is).

    Returns:
        int64 ``(S, S)`` labels.

    >>> preprocess_mask(np.ones((2, 4), np.uint8), input_size=8)[:, 0].tolist()
    [1, 1, 1, 1, 255, 255, 255, 255]
    """
    labels = as_tensor(mask)
    if labels.ndim != 2:
        raise ValueError(f"mask must be a (h, w) array of class ids, got shape {tuple(labels.shape)}")
    info = ResizeInfo.fit(labels.shape, input_size, pad_to_square)
    return pad_square(resize_labels(labels, info.resized_size), input_size, value=IGNORE_INDEX)


def postprocess_masks(logits: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Mask logits at the original image size: upsample to ``S``, crop the padding, resize to ``(h, w)``.

    Args:
        logits: ``(b, c, s, s)`` mask logits of images that share ``info`` (SAM gives ``s = S / 4``; any
            square size works, logits already at ``S`` included).
        info: the :class:`ResizeInfo` from :func:`preprocess` (or ``ResizeInfo.fit(original_size, S)``).

    Returns:
        float32 ``(b, c, h, w)`` logits (bilinear, so they can be thresholded or arg-maxed afterwards).

    >>> info = ResizeInfo.fit((30, 60), 64)
    >>> postprocess_masks(torch.zeros(2, 3, 16, 16), info).shape
    torch.Size([2, 3, 30, 60])
    """
    if logits.ndim != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be (b, c, s, s) square mask logits, got shape {tuple(logits.shape)}")
    size = info.input_size
    logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    height, width = info.resized_size
    logits = logits[..., :height, :width]
    return F.interpolate(logits, size=info.original_size, mode="bilinear", align_corners=False)


# colorize's colours of the ids 0..255 (0 and the ignore value 255 black)
_COLOUR_TABLE = PALETTE[(np.arange(256) - 1) % len(PALETTE)].astype(np.uint8)
_COLOUR_TABLE[[0, IGNORE_INDEX]] = 0


def colorize(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Class ids ``(h, w)`` as uint8 RGB ``(h, w, 3)`` in :data:`PALETTE` colours (0 and 255 black).

    >>> colorize(np.array([[0, 1]]))[0].tolist()
    [[0, 0, 0], [230, 25, 75]]
    """
    ids = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if ids.ndim != 2:
        raise ValueError(f"mask must be a (h, w) array of class ids, got shape {ids.shape}")
    if ids.dtype in (np.bool_, np.uint8):  # most masks: one table look-up per pixel
        return _COLOUR_TABLE[ids.astype(np.uint8)]
    ids = ids.astype(np.int64)
    colours = PALETTE[(ids - 1) % len(PALETTE)]
    colours[(ids <= 0) | (ids == IGNORE_INDEX)] = 0
    return colours


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image; background (0) and ignored (255) pixels keep the image.

    Args:
        image: uint8 ``(h, w, 3)`` RGB image.
        mask: ``(h, w)`` class ids (binary masks: 0/1; a bool mask works too).
        alpha: opacity of the class colours, in [0, 1].

    Returns:
        uint8 ``(h, w, 3)`` image.

    >>> overlay(np.zeros((1, 2, 3), np.uint8), np.array([[0, 1]]), alpha=1.0)[0, 1].tolist()
    [230, 25, 75]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 (h, w, 3) RGB array, got dtype {image.dtype}, shape {image.shape}")
    ids = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if ids.shape != image.shape[:2]:
        raise ValueError(f"mask shape {ids.shape} does not match the image's (h, w) {image.shape[:2]}")
    coloured = (ids > 0) & (ids != IGNORE_INDEX)
    blended = image.copy()
    under = image[coloured].astype(np.float32)
    blended[coloured] = np.rint((1.0 - alpha) * under + alpha * colorize(ids)[coloured].astype(np.float32))
    return blended


def save_mask_png(mask: np.ndarray | torch.Tensor, path: str | Path, binary: bool = False) -> Path:
    """Write class ids as a single-channel index PNG, atomically; returns the path.

    The file reads back as the same ids with any image library (8-bit grey, or 16-bit for ids above 255).
    Binary masks (``binary=True``, values 0/1 or bool) are written as 0/255 so they are visible.

    Args:
        mask: ``(h, w)`` non-negative integer class ids.
        path: destination, ending in ``.png``.
        binary: write a 0/1 mask as 0/255.

    >>> save_mask_png(np.array([[0, 1]]), "/tmp/convlora-doc-mask.png", binary=True)
    PosixPath('/tmp/convlora-doc-mask.png')
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"mask path {path} must end in .png")
    ids = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if ids.ndim != 2:
        raise ValueError(f"mask must be a (h, w) array of class ids, got shape {ids.shape}")
    if ids.dtype == bool:
        ids = ids.astype(np.uint8)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"mask must hold integer class ids, got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"mask holds negative values (min {ids.min()}); class ids must be >= 0")
    if binary:
        extra = sorted(set(np.unique(ids).tolist()) - {0, 1})
        if extra:
            raise ValueError(f"binary mask must hold only 0 and 1, found {extra[:5]}")
        picture = Image.fromarray((ids * 255).astype(np.uint8))
    elif ids.size == 0 or ids.max() <= 255:
        picture = Image.fromarray(ids.astype(np.uint8))
    elif ids.max() <= 65535:
        picture = Image.fromarray(ids.astype(np.uint16))
    else:
        raise ValueError(f"mask holds class id {ids.max()}; a PNG stores at most 65535")
    with atomic_file(path, "wb") as handle:
        picture.save(handle, format="PNG")
    return path


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """``(b, 1, h, w)`` binary logits → 0/1; ``(b, k, h, w)`` class logits → class ids. Returns ``(b, h, w)``."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
