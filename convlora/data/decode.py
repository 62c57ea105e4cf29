"""Decoding one image or mask file into arrays, faithfully or with a one-line error naming the file.

Images become uint8 RGB ``(h, w, 3)``. 8-bit images are kept as stored; images with more bits per sample
(12/16/32-bit integer, float; TIFF and PNG) are mapped to 0..255 as :class:`ImageReading` says, by
default per image between the 1st and 99.8th percentile of its values (the microscopy convention).
Grey is repeated to RGB, alpha is dropped, and images with more than 3 channels need a channel choice.

Masks become ``(h, w)`` integer arrays of the values they store (palette indices, class ids, instance
ids); RGB colour-coded masks are mapped to class ids through a colour table. :func:`mask_to_labels`
turns stored values into training labels.

TIFF files are read with tifffile (any bit depth, ``(c, h, w)`` or ``(h, w, c)`` channels); everything
else, and TIFFs tifffile cannot decode (e.g. LZW without imagecodecs), with Pillow.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .classes import Color, colors_to_ids, pack_colors, unpack_color
from .report import ENCODINGS, IGNORE_INDEX, DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg")
ORIENTATION_TAG = 0x0112  # EXIF/TIFF orientation; values 5-8 swap height and width
INTENSITIES = ("percentile", "minmax", "fixed", "none")
PERCENTILES = (1.0, 99.8)
LOW_RANGE_SHARE = 0.05  # an image whose values span less than this share of its type's range is flagged


@dataclass(frozen=True)
class ImageReading:
    """How images with more than 8 bits per sample are mapped to 0..255, and which channels are used.

    8-bit images are never rescaled. The choice is recorded with a trained model (``TaskInfo.image_reading``)
    so that prediction reads images exactly as training did.

    Args:
        intensity: ``"percentile"`` (default): per image, the 1st..99.8th percentile of its values onto
            0..255, clipping the tails; ``"minmax"``: per image, min..max onto 0..255; ``"fixed"``:
            ``intensity_range`` onto 0..255 for every image (e.g. ``(0, 4095)`` for a 12-bit camera);
            ``"none"``: values kept as they are, clipped to 0..255. Channels are scaled together.
        intensity_range: ``(low, high)`` for ``"fixed"``; only used there.
        channels: channel indices to keep, in order (1 to 3 of them; e.g. ``(0, 2)``); needed for images
            with more than 3 channels. One channel is repeated to grey RGB; two fill red and green.

    >>> ImageReading("fixed", (0, 4095)).to_dict()
    {'intensity': 'fixed', 'intensity_range': [0.0, 4095.0], 'channels': None}
    """

    intensity: str = "percentile"
    intensity_range: tuple[float, float] | None = None
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {list(INTENSITIES)}, got {self.intensity!r}")
        if self.intensity_range is not None:
            bounds = tuple(float(v) for v in self.intensity_range)
            if len(bounds) != 2 or not all(np.isfinite(bounds)) or bounds[0] >= bounds[1]:
                raise ValueError(f"intensity_range must be [low, high] with low < high, got {self.intensity_range!r}")
            object.__setattr__(self, "intensity_range", bounds)
        if self.intensity == "fixed" and self.intensity_range is None:
            raise ValueError("intensity='fixed' needs intensity_range, e.g. [0, 4095] for 12-bit images")
        if self.intensity != "fixed" and self.intensity_range is not None:
            raise ValueError(f"intensity_range only applies to intensity='fixed', not {self.intensity!r}")
        if self.channels is not None:
            channels = tuple(self.channels)
            if not 1 <= len(channels) <= 3 or any(isinstance(c, bool) or not isinstance(c, int) for c in channels):
                raise ValueError(f"channels must list 1 to 3 channel indices, got {self.channels!r}")
            if min(channels) < 0 or len(set(channels)) != len(channels):
                raise ValueError(f"channels must be distinct indices >= 0, got {self.channels!r}")
            object.__setattr__(self, "channels", channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (lists instead of tuples)."""
        return {
            "intensity": self.intensity,
            "intensity_range": None if self.intensity_range is None else list(self.intensity_range),
            "channels": None if self.channels is None else list(self.channels),
        }

    @classmethod
    def of(cls, reading: ImageReading | Mapping[str, Any] | None) -> ImageReading:
        """An :class:`ImageReading` from itself, a dict as :meth:`to_dict` writes, or ``None`` (defaults).

        >>> ImageReading.of({"intensity": "minmax"}).intensity
        'minmax'
        """
        if reading is None:
            return cls()
        if isinstance(reading, cls):
            return reading
        unknown = sorted(set(reading) - {"intensity", "intensity_range", "channels"})
        if unknown:
            raise ValueError(f"image reading has unknown keys {unknown}; expected intensity, intensity_range, channels")
        return cls(**reading)

    def describe(self) -> str:
        """A few words for notes: what happens to a high-bit-depth image."""
        if self.intensity == "percentile":
            low, high = PERCENTILES
            return f"normalised per image from its {_ordinal(low)}..{_ordinal(high)} percentile to 0..255"
        if self.intensity == "minmax":
            return "normalised per image from its min..max to 0..255"
        if self.intensity == "fixed":
            low, high = self.intensity_range  # type: ignore[misc]
            return f"mapped from the fixed range {low:g}..{high:g} to 0..255"
        return "kept as stored, clipped to 0..255"


def _ordinal(value: float) -> str:
    """A percentile as an English ordinal: ``1.0`` -> ``"1st"``, ``99.8`` -> ``"99.8th"``.

    >>> [_ordinal(v) for v in (1.0, 2, 3, 11, 22, 99.8)]
    ['1st', '2nd', '3rd', '11th', '22nd', '99.8th']
    """
    text = f"{value:g}"
    if not float(value).is_integer() or 10 <= int(value) % 100 <= 20:
        return f"{text}th"
    return text + {1: "st", 2: "nd", 3: "rd"}.get(int(value) % 10, "th")


class _DecodeError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _decode(decoder: Any, path: Path, *args: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Run a decoder, turning any failure into a ``_DecodeError`` (a damaged file must never crash a scan)."""
    try:
        return decoder(path, *args)
    except _DecodeError:
        raise
    except FileNotFoundError:
        raise _DecodeError("missing_file", "file does not exist") from None
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> _DecodeError:
    detail = str(error).replace(f"'{path}'", "").replace(str(path), path.name).strip()
    return _DecodeError("unreadable", f"cannot be decoded ({type(error).__name__}: {detail})")


# ------------------------------------------------------------------------------------------- file readers


def _open_oriented(path: Path) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decoded image with its EXIF orientation applied, and the ``(h, w)`` as stored."""
    try:
        with Image.open(path) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. palette transparency notices
            handle.load()
            stored = (handle.height, handle.width)
            image = ImageOps.exif_transpose(handle)
            image.load()
    except FileNotFoundError:
        raise _DecodeError("missing_file", "file does not exist") from None
    except Exception as error:  # damaged files surface as OSError, SyntaxError, ValueError, zlib errors ...
        raise _unreadable(path, error) from error
    return image, stored


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply a TIFF/EXIF orientation code to a ``(h, w, ...)`` array, as Pillow's ``exif_transpose`` does."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(turned[orientation](array)) if orientation in turned else array


def _tiff_layout(axes: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """Axes and shape without length-1 axes (Y and X kept)."""
    kept = [(a, n) for a, n in zip(axes, shape, strict=True) if n != 1 or a in "YX"]
    return "".join(a for a, _ in kept), tuple(n for _, n in kept)


def _read_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """``(h, w)`` or ``(h, w, c)`` array of a TIFF as stored, or ``None`` to let Pillow read it (palette,
    CMYK, YCbCr or min-is-white photometrics; compressions tifffile cannot decode without imagecodecs)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise _DecodeError("unreadable", "TIFF holds no image")
        series = tif.series[0]
        page = tif.pages[0]
        if int(page.photometric) not in (1, 2):  # MINISBLACK, RGB
            return None
        try:
            array = series.asarray()
        except (ValueError, NotImplementedError, KeyError) as error:
            if "imagecodecs" in str(error):
                return None
            raise
        orientation_tag = page.tags.get(ORIENTATION_TAG)
        orientation = int(orientation_tag.value) if orientation_tag is not None else 1
        extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
        axes, shape = _tiff_layout(series.axes, array.shape)
    array = array.reshape(shape)
    if "Y" not in axes or "X" not in axes:
        raise _DecodeError("unreadable", f"TIFF axes {series.axes} have no Y and X; expected a 2-D image")
    if len(axes) > 3:
        raise _DecodeError(
            "channels",
            f"image is {len(axes)}-dimensional (axes {axes}, shape {shape}); expected one 2-D image with at most one "
            "channel axis: save a single plane or time point",
        )
    if len(axes) == 3:
        other = next(a for a in axes if a not in "YX")
        array = np.moveaxis(array, axes.index(other), -1)
        axes = axes.replace(other, "") + other
    if axes.index("Y") > axes.index("X"):
        array = array.swapaxes(0, 1)
    alpha = sum(1 for e in extrasamples if e in (1, 2)) if array.ndim == 3 else 0  # associated/unassociated alpha
    if alpha:
        array = array[..., : array.shape[-1] - alpha]
        if array.shape[-1] == 1:
            array = array[..., 0]
    stored = (int(array.shape[0]), int(array.shape[1]))
    return _orient(array, orientation), {"stored_size": stored, "type": array.dtype.name}


def _png_16_bit_colour(path: Path) -> bool:
    """Whether a PNG stores 16-bit RGB(A) samples, which Pillow reads at 8 bits (the high byte of each)."""
    if path.suffix.lower() != ".png":
        return False
    with path.open("rb") as handle:
        header = handle.read(26)
    return len(header) == 26 and header[24] == 16 and header[25] in (2, 6)


def _image_array(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The image's samples as stored: ``(h, w)`` or ``(h, w, c)`` (alpha dropped), dtype kept."""
    if path.suffix.lower() in TIFF_EXTENSIONS:
        read = _read_tiff(path)
        if read is not None:
            return read
    image, stored = _open_oriented(path)
    mode = image.mode
    info: dict[str, Any] = {"stored_size": stored, "type": "uint8"}
    if _png_16_bit_colour(path):
        info["png16_colour"] = True
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), {**info, "type": "uint16"}
    if mode == "I":
        # PNG holds at most 16 bits per sample; Pillow may still hand a 16-bit grey PNG over as 32-bit "I".
        kind = "uint16" if path.suffix.lower() == ".png" else "int32"
        return np.asarray(image).astype(np.int64 if kind == "int32" else np.uint16), {**info, "type": kind}
    if mode == "F":
        return np.asarray(image).astype(np.float32), {**info, "type": "float32"}
    if mode == "L":
        return np.asarray(image).copy(), info
    if mode == "1":
        return np.asarray(image.convert("L")).copy(), info
    if mode in ("LA", "La"):
        return np.asarray(image)[..., 0].copy(), info
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # RGBA/PA: alpha dropped, not blended
    return np.asarray(rgb, dtype=np.uint8).copy(), info


# ----------------------------------------------------------------------------------------------- images


def _type_range(dtype: np.dtype) -> tuple[float, float] | None:
    if dtype.kind in "ui":
        limits = np.iinfo(dtype)
        return float(limits.min), float(limits.max)
    return None


def _scale(values: np.ndarray, reading: ImageReading, finite: np.ndarray) -> np.ndarray:
    """Float values mapped to uint8 0..255 as ``reading`` says (non-finite values become 0)."""
    valid = values[finite]
    if reading.intensity == "none":
        low, high = 0.0, 255.0
    elif reading.intensity == "fixed":
        low, high = reading.intensity_range  # type: ignore[misc]
    elif not valid.size:
        low, high = 0.0, 1.0
    else:
        low, high = float(valid.min()), float(valid.max())
        if reading.intensity == "percentile":
            p_low, p_high = (float(v) for v in np.percentile(valid, PERCENTILES))
            if p_high > p_low:  # a sparse image (e.g. a few bright spots) can have equal percentiles
                low, high = p_low, p_high
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    scaled[~finite] = 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb8(array: np.ndarray, reading: ImageReading, info: dict[str, Any]) -> np.ndarray:
    """Channel choice, intensity mapping and RGB expansion of an image array; fills ``info``."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise _DecodeError("channels", f"image array has shape {array.shape}; expected (h, w) or (h, w, c)")
    count = int(array.shape[-1])
    info["channels"] = count
    if reading.channels is not None:
        if max(reading.channels) >= count:
            raise _DecodeError(
                "channels",
                f"image has {count} channel{'s' * (count != 1)} (shape {array.shape}); channels "
                f"{list(reading.channels)} asks for channel {max(reading.channels)}; expected indices 0..{count - 1}",
            )
        array = array[..., list(reading.channels)]
    elif count > 3:
        raise _DecodeError(
            "channels",
            f"image has {count} channels (shape {array.shape}, channels last); expected at most 3: choose 1 to 3 "
            "of them with channels (e.g. --channels 0,2)",
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        values = array
        info["min"], info["max"] = (int(array.min()), int(array.max())) if array.size else (0, 0)
    else:
        exact = array.dtype.itemsize <= 2 or array.dtype == np.float32  # float32 holds every 16-bit value exactly
        floats = array.astype(np.float32 if exact else np.float64)
        finite = np.isfinite(floats)
        valid = floats[finite]
        info["min"], info["max"] = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 0.0)
        info["nonfinite"] = int(floats.size - valid.size)
        info["normalised"] = True
        values = _scale(floats, reading, finite)
    channels = values.shape[-1]
    if channels == 1:
        return np.repeat(values, 3, axis=-1)
    if channels == 2:  # two channels (e.g. nuclei + cytoplasm) fill red and green
        return np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return np.ascontiguousarray(values)


def _decode_image(path: Path, reading: ImageReading) -> tuple[np.ndarray, dict[str, Any]]:
    array, info = _image_array(path)
    info["type_range"] = _type_range(np.dtype(info["type"]))
    return _to_rgb8(array, reading, info), info


def to_rgb8(array: np.ndarray, reading: ImageReading | Mapping[str, Any] | None = None) -> np.ndarray:
    """An image array as uint8 RGB ``(h, w, 3)``, read as :func:`read_image` reads files.

    ``(h, w)`` or ``(h, w, c)`` arrays of any dtype: uint8 is kept as it is, other types are mapped to
    0..255 as ``reading`` says; grey is repeated to RGB; more than 3 channels need ``reading.channels``.

    Args:
        array: the image.
        reading: an :class:`ImageReading`, its dict, or ``None`` for the defaults.

    Raises:
        ValueError: the array has more than 3 channels and no channel choice, or an unusable shape.

    >>> to_rgb8(np.array([[0, 100], [200, 235]], np.uint16), {"intensity": "minmax"})[..., 0].tolist()
    [[0, 109], [217, 255]]
    """
    try:
        return _to_rgb8(np.asarray(array), ImageReading.of(reading), {})
    except _DecodeError as error:
        raise ValueError(error.message) from None


def read_image(path: str | Path, reading: ImageReading | Mapping[str, Any] | None = None) -> np.ndarray:
    """Read an image as uint8 RGB ``(h, w, 3)``.

    8-bit images are kept as stored; 12/16/32-bit and float images are mapped to 0..255 as ``reading``
    says (by default per image from the 1st..99.8th percentile). Grey is repeated to three channels,
    alpha is dropped, palettes are expanded, and the EXIF/TIFF orientation is applied.

    Args:
        path: an image file.
        reading: an :class:`ImageReading` (or its dict); ``None`` for the defaults.

    Raises:
        DatasetError: naming the file, when it is missing, cannot be decoded (truncated, not an image),
            or has more than 3 channels without a channel choice.

    >>> read_image("photo.jpg").shape  # doctest: +SKIP
    (480, 640, 3)
    """
    try:
        return _decode(_decode_image, Path(path), ImageReading.of(reading))[0]
    except _DecodeError as error:
        prefix = "image " if error.kind in ("unreadable", "missing_file") else ""
        raise DatasetError(f"{path}: {prefix}{error.message}") from None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(h, w)`` of an image as :func:`read_image` returns it (orientation applied), without decoding.

    >>> read_image_size("photo.jpg")  # doctest: +SKIP
    (480, 640)
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series, page = tif.series[0], tif.pages[0]
                axes, shape = _tiff_layout(series.axes, series.shape)
                height, width = shape[axes.index("Y")], shape[axes.index("X")]
                tag = page.tags.get(ORIENTATION_TAG)
                orientation = int(tag.value) if tag is not None else 1
        else:
            with Image.open(path) as handle:
                height, width = handle.height, handle.width
                orientation = handle.getexif().get(ORIENTATION_TAG, 1)
    except Exception as error:
        raise DatasetError(f"{path}: image cannot be opened ({type(error).__name__}: {error})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


# ------------------------------------------------------------------------------------------------ masks


def _integer_mask(values: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A single-channel mask of 16/32-bit or float samples: integer ids as stored (0/65535 -> 0/255)."""
    if values.dtype.kind == "f":
        if values.size and not np.all(np.isfinite(values) & (values == np.round(values))):
            raise _DecodeError("mask_values", "mask holds fractional (float) values; expected integer class ids")
        values = values.astype(np.int64)
    if values.dtype == np.bool_:
        return np.where(values, 255, 0).astype(np.uint8), info
    if values.size and values.min() < 0:
        raise _DecodeError("mask_values", f"mask holds negative values (min {values.min()}); expected class ids")
    if values.dtype == np.uint8:
        return values, info
    values = values.astype(np.uint16) if values.size and values.max() <= 65535 else values.astype(np.int64)
    present = np.unique(values)
    if present.size and present.max() == 65535 and set(present.tolist()) <= {0, 65535}:
        info["wide_binary"] = True  # a 16-bit 0/65535 mask is a 0/255 mask written at another depth
        return np.where(values > 0, 255, 0).astype(np.uint8), info
    return values, info


def _colour_mask(rgb: np.ndarray, colors: Mapping[Color, int] | None, mode: str, info: dict[str, Any]) -> np.ndarray:
    if colors:
        try:
            ids = colors_to_ids(rgb, colors)
        except ValueError as error:
            raise _DecodeError("unknown_color", str(error)) from None
        info["colour_coded"] = True
        return ids
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].copy()
    colours = np.unique(pack_colors(rgb))
    examples = ", ".join(str(unpack_color(c)) for c in colours[:4])
    raise _DecodeError(
        "colour_mask",
        f"colour mask ({mode} with {colours.size} distinct colours, e.g. {examples}); expected one class id per "
        "pixel: convert it to an index mask (single-channel PNG, each colour mapped to its class id, 0 = "
        "background, 255 = ignore), or give each class its colour in classes.json",
    )


def _decode_mask(path: Path, colors: Mapping[Color, int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {"lossy": False, "lossy_max": 0, "lossy_changed": 0, "wide_binary": False}
    if path.suffix.lower() in TIFF_EXTENSIONS:
        read = _read_tiff(path)
        if read is not None:
            array, tiff_info = read
            info["stored_size"] = tiff_info["stored_size"]
            if array.ndim == 2:
                return _integer_mask(array, info)
            if array.shape[-1] == 3 and array.dtype == np.uint8:
                return _colour_mask(array, colors, "RGB", info), info
            raise _DecodeError(
                "colour_mask",
                f"mask has {array.shape[-1]} channels of {array.dtype} (shape {array.shape}); expected a "
                "single-channel mask of ids, or an 8-bit RGB colour mask with a colour table",
            )
    image, stored = _open_oriented(path)
    mode = image.mode
    info["stored_size"] = stored
    if path.suffix.lower() in LOSSY_MASK_EXTENSIONS:
        # JPEG changes pixel values around every edge, so exact ids are lost: read it as a binary mask.
        info["lossy"] = True
        grey = np.asarray(image.convert("L"))
        info["lossy_max"] = int(grey.max()) if grey.size else 0
        info["lossy_changed"] = int(np.count_nonzero((grey != 0) & (grey != 255)))
        return np.where(grey >= 128, 255, 0).astype(np.uint8), info
    if mode == "1":
        return np.array(image.convert("L")), info
    if mode in ("L", "P"):
        return np.asarray(image).copy(), info
    if mode in ("LA", "PA", "RGBA"):
        array = np.asarray(image)
        alpha = array[..., -1]
        if alpha.size and alpha.min() != alpha.max():
            raise _DecodeError(
                "colour_mask",
                f"mask has a transparency channel with varying alpha ({mode}); expected a single-channel mask of "
                "class ids: save it without alpha (e.g. as an 8-bit grey PNG)",
            )
        if mode in ("LA", "PA"):
            return array[..., 0].copy(), info
        image = image.convert("RGB")
        mode = "RGB"
    if mode.startswith("I") or mode == "F":
        return _integer_mask(np.asarray(image), info)
    rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    return _colour_mask(rgb, colors, mode, info), info


def read_mask(path: str | Path, colors: Mapping[Color, int] | None = None) -> np.ndarray:
    """Read a mask as a ``(h, w)`` integer array of the values it stores (EXIF orientation applied).

    8/16/32-bit single-channel masks (PNG, TIFF) and palette PNGs give their values (palette indices, not
    colours); RGB masks whose channels are equal are read as grey. With ``colors``, RGB masks are
    colour-coded classes mapped to their ids. A 16-bit mask holding only 0 and 65535 becomes 0/255, and a
    JPEG mask (lossy, so its values are blurred at edges) is thresholded at 128 to 0/255.
    :func:`mask_to_labels` turns the values into training labels.

    Args:
        path: a mask file.
        colors: colour table ``(r, g, b)`` -> class id, for colour-coded masks.

    Raises:
        DatasetError: naming the file, when it is missing, damaged, a colour mask (without a colour table,
            or with a colour the table lacks), has varying alpha, or holds negative or fractional values.

    >>> read_mask("masks/a.png")  # doctest: +SKIP
    array([[0, 0, 255], ...], dtype=uint8)
    """
    try:
        return _decode(_decode_mask, Path(path), colors)[0]
    except _DecodeError as error:
        prefix = "mask " if error.kind in ("unreadable", "missing_file") else ""
        raise DatasetError(f"{path}: {prefix}{error.message}") from None


def mask_to_labels(mask: np.ndarray, encoding: str) -> np.ndarray:
    """Training labels from stored mask values: class ids with 255 = ignore (binary: 0, 1 and 255).

    Args:
        mask: values as returned by :func:`read_mask`.
        encoding: ``"0/255"`` maps 255 (foreground) to 1; ``"0/1"`` and ``"ids"`` keep the values;
            ``"instances"`` (one id per object) maps every nonzero id to 1, except 255 in 8-bit masks (ignore).

    >>> mask_to_labels(np.array([[0, 255]], np.uint8), "0/255").tolist()
    [[0, 1]]
    >>> mask_to_labels(np.array([[0, 7, 300]], np.uint16), "instances").tolist()
    [[0, 1, 1]]
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "0/255":
        return np.where(mask == 255, 1, mask).astype(np.uint8)
    if encoding == "instances":
        labels = (mask != 0).astype(np.uint8)
        if mask.dtype == np.uint8:
            labels[mask == IGNORE_INDEX] = IGNORE_INDEX
        return labels
    return mask
