"""Users' segmentation datasets on disk: finding the files, decoding them, and checking everything at once.

Layouts (``source`` is a folder or a CSV file):

- ``DATA/images/`` + ``DATA/masks/``, matched by the file name without extension (``a.jpg`` + ``a.png``
  pair up; sub-folders are kept in the name). A mask named ``a_mask.png`` (or ``_gt``, ``_label``,
  ``_segmentation`` ...) pairs with ``a`` when no mask is named ``a`` exactly.
- Split folders ``DATA/{train,val,test}/`` (``training``, ``valid``, ``validation``, ``testing`` also
  recognised), each holding ``images/`` + ``masks/`` or just images.
- A CSV file with a header: ``image`` (required), ``mask`` (optional, for labelled data), ``split``
  (optional: train/val/test). Paths are absolute or relative to the CSV's folder.
- A folder of images without masks (``DATA/*.png`` or ``DATA/images/`` alone), for prediction.

Extensions: .png .jpg .jpeg .bmp .tif .tiff .webp, in any letter case; hidden files are skipped. An
optional ``classes.json`` at the dataset root (beside the CSV) names the classes: a JSON list (index =
class id) or a dict ``{"0": "background", "1": "polyp"}``.

:func:`inspect_dataset` reads every file once and lists every problem it finds (it never stops at the
first one, and never crashes on a damaged file); :func:`check_dataset` turns the problems into one
:class:`DatasetError`, or leaves the bad samples out with ``skip_bad=True``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg")
IGNORE_INDEX = 255
ALL = "all"  # split name of the samples of a dataset without split folders
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
MASK_SUFFIXES = ("_mask", "_masks", "_gt", "_label", "_labels", "_segmentation", "_seg", "-mask", "-gt")
CSV_COLUMNS = ("image", "mask", "split")
MODES = ("binary", "multiclass")
# Mask encodings: 0/255 (binary, 255 = foreground), 0/1 (binary, 255 = ignore), ids (classes, 255 = ignore).
ENCODINGS = ("0/255", "0/1", "ids")
MAX_LISTED_PROBLEMS = 20
ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 swap height and width

# Problems that concern the whole dataset: leaving samples out cannot fix them.
FATAL_KINDS = ("empty", "not_found", "csv_columns", "classes_json", "soft_masks", "mixed_masks", "split_folders")


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; ``report`` holds the full :class:`DatasetReport` when known."""

    def __init__(self, message: str, report: DatasetReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Sample:
    """One image, its mask (``None`` when unlabelled) and where it came from.

    Args:
        image: path of the image file.
        mask: path of the mask file, or ``None``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (no split given).
        key: the image's path relative to the dataset root without extension; names the sample in
            messages and decides the seeded train/val split.
        size: ``(h, w)`` of the image after its EXIF orientation, once known.

    >>> Sample("data/images/a.png", "data/masks/a.png", key="a").labelled
    True
    """

    image: str
    mask: str | None = None
    split: str = ALL
    key: str = ""
    size: tuple[int, int] | None = None

    @property
    def labelled(self) -> bool:
        """Whether the sample has a mask."""
        return self.mask is not None

    @property
    def id(self) -> str:
        """``split:key``, unique within a dataset."""
        return f"{self.split}:{self.key}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Args:
        path: the file (or folder) concerned.
        message: one line saying what was found and what was expected.
        kind: a short category (``missing_mask``, ``size_mismatch``, ``unreadable_image`` ...).
        sample: id of the sample it disqualifies (``None`` for a stray file or the whole dataset).

    >>> str(Problem("masks/b.png", "mask without image", "missing_image"))
    'masks/b.png: mask without image'
    """

    path: str
    message: str
    kind: str
    sample: str | None = None

    @property
    def fatal(self) -> bool:
        """True when the problem concerns the whole dataset, so ``skip_bad`` cannot work around it."""
        return self.kind in FATAL_KINDS

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return {"path": self.path, "message": self.message, "kind": self.kind, "sample": self.sample}


@dataclass
class DatasetReport:
    """Everything :func:`inspect_dataset` found out about a dataset.

    Args:
        source: the folder or CSV file inspected.
        layout: ``"folder"`` (images/ + masks/), ``"splits"``, ``"csv"`` or ``"images"`` (no masks).
        samples: every sample found, by split (``"all"`` without split folders); sizes filled in.
        labelled: whether each split has masks.
        mode: ``"binary"`` or ``"multiclass"`` (``None`` for unlabelled data without a declared mode).
        num_classes: classes including the background (2 for binary).
        class_names: a name per class id.
        mask_encoding: ``"0/255"`` (binary, 255 = foreground), ``"0/1"`` (binary, 255 = ignore) or ``"ids"``.
        mask_values: pixel count of every mask value found (as stored, before the encoding is applied).
        mask_value_files: number of masks holding each value.
        image_sizes: ``(h, w)`` -> number of images.
        problems: everything wrong, each naming its file.
        notes: observations that are not errors (how masks were read, files ignored ...).
        domain: the ``domain`` of a ``dataset.json`` at the root (synthetic datasets), if any.
        skipped: samples left out by ``check_dataset(skip_bad=True)``.

    >>> report = inspect_dataset("data/polyp")  # doctest: +SKIP
    >>> report.mode, report.counts()["train"], report.problems[:1]  # doctest: +SKIP
    ('binary', {'images': 200, 'masks': 200, 'usable': 200}, [])
    """

    source: str
    layout: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    labelled: dict[str, bool] = field(default_factory=dict)
    mode: str | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    mask_encoding: str | None = None
    mask_values: dict[int, int] = field(default_factory=dict)
    mask_value_files: dict[int, int] = field(default_factory=dict)
    image_sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    domain: str | None = None
    skipped: int = 0

    @property
    def ok(self) -> bool:
        """No problems at all."""
        return not self.problems

    @property
    def splits(self) -> list[str]:
        """Split names present, in the order train, val, test, all."""
        return [s for s in (*SPLITS, ALL) if s in self.samples]

    def bad_samples(self) -> set[str]:
        """Ids of the samples that some problem disqualifies."""
        return {p.sample for p in self.problems if p.sample is not None}

    def usable_samples(self, split: str | None = None) -> list[Sample]:
        """The samples no problem disqualifies, of one split or (``None``) of all splits."""
        bad = self.bad_samples()
        splits = self.splits if split is None else [split]
        return [s for name in splits for s in self.samples.get(name, []) if s.id not in bad]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: ``images``, ``masks`` (matched to an image) and ``usable`` samples."""
        bad = self.bad_samples()
        return {
            name: {
                "images": len(self.samples[name]),
                "masks": sum(s.labelled for s in self.samples[name]),
                "usable": sum(s.id not in bad for s in self.samples[name]),
            }
            for name in self.splits
        }

    def size_stats(self) -> dict[str, Any]:
        """``min`` and ``max`` height and width, the ``most_common`` ``(h, w)`` with its count, ``distinct``."""
        if not self.image_sizes:
            return {}
        heights = [h for h, _ in self.image_sizes]
        widths = [w for _, w in self.image_sizes]
        common, count = max(self.image_sizes.items(), key=lambda item: (item[1], item[0]))
        return {
            "min": [min(heights), min(widths)],
            "max": [max(heights), max(widths)],
            "most_common": [list(common), count],
            "distinct": len(self.image_sizes),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (counts, sizes, mask values, classes, problems, notes); no sample lists."""
        return {
            "source": self.source,
            "layout": self.layout,
            "splits": self.counts(),
            "labelled": dict(self.labelled),
            "image_sizes": self.size_stats(),
            "mask_values": {
                str(v): {"pixels": int(n), "masks": int(self.mask_value_files.get(v, 0))}
                for v, n in sorted(self.mask_values.items())
            },
            "mode": self.mode,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mask_encoding": self.mask_encoding,
            "domain": self.domain,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
            "skipped": self.skipped,
        }

    def format(self, max_problems: int = 50) -> str:
        """A human-readable summary, problems last (at most ``max_problems`` of them listed)."""
        lines = [f"Dataset {self.source} ({_LAYOUT_NAMES.get(self.layout, self.layout)})"]
        for name, count in self.counts().items():
            masks = f"{count['masks']} with masks" if self.labelled.get(name) else "no masks"
            lines.append(f"  {name}: {count['images']} images, {masks}, {count['usable']} usable")
        stats = self.size_stats()
        if stats:
            (h0, w0), (h1, w1), ((hc, wc), n) = stats["min"], stats["max"], stats["most_common"]
            lines.append(
                f"  image sizes (h x w): min {h0}x{w0}, max {h1}x{w1}, most common {hc}x{wc} "
                f"({n} image{'s' * (n != 1)}), {stats['distinct']} distinct"
            )
        if self.mask_values:
            shown = sorted(self.mask_values.items())[:24]
            values = ", ".join(f"{v}: {n:,} px in {self.mask_value_files.get(v, 0)} masks" for v, n in shown)
            more = f" (+{len(self.mask_values) - 24} more)" if len(self.mask_values) > 24 else ""
            lines.append(f"  mask values: {values}{more}")
        if self.mode is not None:
            lines.append(f"  mode: {self.mode}, {self.num_classes} classes ({_encoding_text(self.mask_encoding)})")
        if self.class_names:
            names = ", ".join(f"{i}={name}" for i, name in enumerate(self.class_names[:30]))
            lines.append(f"  classes: {names}" + (" ..." if len(self.class_names) > 30 else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.skipped:
            lines.append(f"  skipped {self.skipped} bad samples (skip_bad)")
        if self.problems:
            lines.append(f"  {len(self.problems)} problems:")
            lines.extend(f"    {problem}" for problem in self.problems[:max_problems])
            if len(self.problems) > max_problems:
                lines.append(f"    ... and {len(self.problems) - max_problems} more")
        else:
            lines.append("  no problems found")
        return "\n".join(lines)


_LAYOUT_NAMES = {
    "folder": "images/ + masks/",
    "splits": "train/val/test split folders",
    "csv": "CSV file",
    "images": "images without masks",
}


def _encoding_text(encoding: str | None) -> str:
    return {
        "0/255": "masks hold 0/255: 255 is the foreground",
        "0/1": "masks hold 0/1, 255 = ignore",
        "ids": "masks hold class ids, 255 = ignore",
    }.get(encoding or "", "no masks")


# ---------------------------------------------------------------------------------------------- decoding


class _DecodeError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


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


def _decode(decoder: Any, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Run a decoder, turning any failure into a ``_DecodeError`` (a damaged file must never crash a scan)."""
    try:
        return decoder(path)
    except _DecodeError:
        raise
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> _DecodeError:
    detail = str(error).replace(f"'{path}'", "").replace(str(path), path.name).strip()
    return _DecodeError("unreadable", f"cannot be decoded ({type(error).__name__}: {detail})")


def _decode_image(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    image, stored = _open_oriented(path)
    mode = image.mode
    info: dict[str, Any] = {"stored_size": stored, "sixteen_bit": False}
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        elif mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0  # 65535 -> 255: the full 16-bit range onto the full 8-bit range
            info["sixteen_bit"] = True
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), info
    if mode == "L":
        grey = np.asarray(image)
        return np.repeat(grey[..., None], 3, axis=-1), info
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # RGBA/LA/PA: alpha dropped, not blended
    return np.asarray(rgb, dtype=np.uint8).copy(), info


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB ``(h, w, 3)``.

    Grayscale is repeated to three channels, alpha is dropped, palettes are expanded, 16-bit images are
    scaled by 255/65535, and the EXIF orientation is applied.

    Args:
        path: an image file.

    Raises:
        DatasetError: naming the file, when it is missing or cannot be decoded (truncated, not an image).

    >>> read_image("photo.jpg").shape  # doctest: +SKIP
    (480, 640, 3)
    """
    try:
        return _decode(_decode_image, Path(path))[0]
    except _DecodeError as error:
        raise DatasetError(f"{path}: image {error.message}") from None


def _decode_mask(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    image, stored = _open_oriented(path)
    mode = image.mode
    info: dict[str, Any] = {"stored_size": stored, "lossy": False, "lossy_max": 0, "wide_binary": False}
    if path.suffix.lower() in LOSSY_MASK_EXTENSIONS:
        # JPEG changes pixel values around every edge, so exact ids are lost: read it as a binary mask.
        info["lossy"] = True
        grey = np.asarray(image.convert("L"))
        info["lossy_max"] = int(grey.max()) if grey.size else 0
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
        values = np.asarray(image)
        if mode == "F":
            if values.size and not np.all(np.isfinite(values) & (values == np.round(values))):
                raise _DecodeError("mask_values", "mask holds fractional (float) values; expected integer class ids")
            values = values.astype(np.int64)
        if values.size and values.min() < 0:
            raise _DecodeError("mask_values", f"mask holds negative values (min {values.min()}); expected class ids")
        values = values.astype(np.int64) if values.dtype.kind == "i" else values.astype(np.uint16)
        present = np.unique(values)
        if present.size and present.max() == 65535 and set(present.tolist()) <= {0, 65535}:
            info["wide_binary"] = True  # a 16-bit 0/65535 mask is a 0/255 mask written at another depth
            return np.where(values > 0, 255, 0).astype(np.uint8), info
        return values, info
    rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].copy(), info
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours = np.unique(packed)
    examples = ", ".join(str((int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255)) for c in colours[:4])
    raise _DecodeError(
        "colour_mask",
        f"colour mask ({mode} with {colours.size} distinct colours, e.g. {examples}); expected one class id per "
        "pixel: convert it to an index mask (single-channel PNG, each colour mapped to its class id, 0 = "
        "background, 255 = ignore)",
    )


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a ``(h, w)`` integer array of the values it stores (EXIF orientation applied).

    8/16-bit single-channel and palette PNGs give their values (palette indices, not colours); RGB masks
    whose channels are equal are read as grey. A 16-bit mask holding only 0 and 65535 becomes 0/255, and
    a JPEG mask (lossy, so its values are blurred at edges) is thresholded at 128 to 0/255.
    :func:`mask_to_labels` turns the values into training labels.

    Args:
        path: a mask file.

    Raises:
        DatasetError: naming the file, when it is missing, damaged, a colour mask, has varying alpha, or
            holds negative or fractional values.

    >>> read_mask("masks/a.png")  # doctest: +SKIP
    array([[0, 0, 255], ...], dtype=uint8)
    """
    try:
        return _decode(_decode_mask, Path(path))[0]
    except _DecodeError as error:
        prefix = "mask " if error.kind in ("unreadable", "missing_file") else ""
        raise DatasetError(f"{path}: {prefix}{error.message}") from None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(h, w)`` of an image as :func:`read_image` returns it (EXIF orientation applied), without decoding.

    >>> read_image_size("photo.jpg")  # doctest: +SKIP
    (480, 640)
    """
    try:
        with Image.open(path) as handle:
            height, width = handle.height, handle.width
            orientation = handle.getexif().get(ORIENTATION_TAG, 1)
    except Exception as error:
        raise DatasetError(f"{path}: image cannot be opened ({type(error).__name__}: {error})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def mask_to_labels(mask: np.ndarray, encoding: str) -> np.ndarray:
    """Training labels from stored mask values: class ids with 255 = ignore (binary: 0, 1 and 255).

    Args:
        mask: values as returned by :func:`read_mask`.
        encoding: ``"0/255"`` maps 255 (foreground) to 1; ``"0/1"`` and ``"ids"`` keep the values.

    >>> mask_to_labels(np.array([[0, 255]], np.uint8), "0/255").tolist()
    [[0, 1]]
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "0/255":
        return np.where(mask == 255, 1, mask).astype(np.uint8)
    return mask


def read_classes(path: str | Path) -> list[str]:
    """Class names from a ``classes.json``: a list (index = class id) or a dict ``{"0": "background", ...}``.

    Raises:
        DatasetError: naming the file, when it is not valid JSON, ids are missing or names are not strings.

    >>> read_classes("data/classes.json")  # doctest: +SKIP
    ['background', 'polyp']
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a readable JSON file ({error})") from None
    if isinstance(data, Mapping):
        try:
            by_id = {int(k): v for k, v in data.items()}
        except ValueError:
            raise DatasetError(f'{path}: keys must be class ids such as "0", got {list(data)[:5]}') from None
        missing = sorted(set(range(len(by_id))) - set(by_id))
        if missing or min(by_id, default=0) < 0:
            raise DatasetError(f"{path}: class ids must run 0..{len(by_id) - 1} without gaps; missing {missing[:10]}")
        names = [by_id[i] for i in range(len(by_id))]
    elif isinstance(data, list):
        names = data
    else:
        raise DatasetError(f"{path}: expected a list of class names or a dict of id -> name, got {type(data).__name__}")
    if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{path}: expected at least 2 non-empty class names (background first), got {names[:5]}")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{path}: names {len(names)} classes; at most 255 are supported (255 marks ignored pixels)")
    return list(names)


# --------------------------------------------------------------------------------------------- discovery


def _add(problems: list[Problem], path: str | Path, message: str, kind: str, sample: str | None = None) -> None:
    problems.append(Problem(str(path), message, kind, sample))


@dataclass
class _Found:
    layout: str
    root: Path
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    labelled: dict[str, bool] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _list_files(folder: Path, recursive: bool) -> tuple[dict[str, list[Path]], int]:
    """Image files by key (relative path without extension), and the count of other files skipped."""
    found: dict[str, list[Path]] = {}
    others = 0
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            others += 1
            continue
        found.setdefault(relative.with_suffix("").as_posix(), []).append(path)
    return found, others


def _strip_mask_suffix(key: str) -> str | None:
    lower = key.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return None


def _pair_folder(found: _Found, folder: Path, split: str) -> None:
    """Samples of one folder holding images/ (+ masks/), or images directly."""
    image_dir, mask_dir = folder / "images", folder / "masks"
    has_image_dir = image_dir.is_dir()
    labelled = has_image_dir and mask_dir.is_dir()
    images, other_images = _list_files(image_dir if has_image_dir else folder, recursive=has_image_dir)
    masks, other_masks = _list_files(mask_dir, recursive=True) if labelled else ({}, 0)
    if has_image_dir and other_images + other_masks:
        found.notes.append(f"{folder}: {other_images + other_masks} files without an image extension were ignored")
    for kind, files in (("images", images), ("masks", masks)):
        for key, paths in files.items():
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                message = f"several {kind} share the name {key!r} ({names}); expected one, rename or remove the others"
                _add(found.problems, paths[0], message, "duplicate", f"{split}:{key}")
    by_stripped: dict[str, list[str]] = {}
    for key in masks:
        stripped = _strip_mask_suffix(key)
        if stripped is not None and stripped not in masks:
            by_stripped.setdefault(stripped, []).append(key)
    used: set[str] = set()
    samples = []
    for key, paths in images.items():
        mask_key = key if key in masks else None
        if mask_key is None and len(by_stripped.get(key, [])) == 1:
            mask_key = by_stripped[key][0]
        if mask_key is not None:
            used.add(mask_key)
        sample = Sample(str(paths[0]), None if mask_key is None else str(masks[mask_key][0]), split, key)
        samples.append(sample)
        if labelled and mask_key is None:
            message = f"image without mask: expected a mask named {key}.<ext> (e.g. {mask_dir / key}.png)"
            _add(found.problems, paths[0], message, "missing_mask", sample.id)
    for key, paths in masks.items():
        if key not in used:
            message = f"mask without image: expected an image named {key}.<ext> in {image_dir}"
            _add(found.problems, paths[0], message, "missing_image")
    suffixed = len(used - set(images))
    if suffixed:
        found.notes.append(f"{folder}: {suffixed} masks were matched after dropping a suffix such as _mask")
    found.samples[split] = samples
    found.labelled[split] = labelled
    if not samples and split == ALL:
        where = image_dir if has_image_dir else folder
        _add(found.problems, where, f"no images found (expected files ending in {' '.join(IMAGE_EXTENSIONS)})", "empty")
    elif not samples:  # an empty split folder is left out, not an error; a missing train split is caught later
        found.notes.append(f"{folder} holds no images; the {split} split is left out")
        del found.samples[split], found.labelled[split]


def _discover_folder(root: Path) -> _Found:
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    split_dirs: dict[str, list[Path]] = {}
    for name, path in children.items():
        if name in SPLIT_ALIASES:
            split_dirs.setdefault(SPLIT_ALIASES[name], []).append(path)
    if "images" in children:
        found = _Found("folder", root)
        if split_dirs:
            found.notes.append(f"split folders {sorted(split_dirs)} ignored: {root} has images/ at its root")
        _pair_folder(found, root, ALL)
        return found
    if split_dirs:
        found = _Found("splits", root)
        for split in SPLITS:
            paths = sorted(split_dirs.get(split, []))
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                _add(
                    found.problems,
                    root,
                    f"several folders hold the {split} split ({names}); expected one",
                    "split_folders",
                )
            if paths:
                _pair_folder(found, paths[0], split)
        if not found.samples:
            _add(found.problems, root, "no images found in any split folder (train/, val/, test/)", "empty")
        return found
    found = _Found("images", root)
    if "masks" in children:
        found.notes.append(f"{root / 'masks'} is ignored: masks are paired only with images in an images/ folder")
    if not any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        message = (
            "no images found: expected images/ and masks/ folders, train/val/test split folders, a CSV file, or "
            f"image files ({' '.join(IMAGE_EXTENSIONS)}) in the folder; found sub-folders {sorted(children)[:8]}"
        )
        _add(found.problems, root, message, "empty")
        return found
    _pair_folder(found, root, ALL)
    return found


def _discover_csv(path: Path) -> _Found:
    root = path.parent
    found = _Found("csv", root)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        _add(found.problems, path, f"cannot read the CSV file ({error}); expected UTF-8 text", "csv_columns")
        return found
    if not rows:
        _add(found.problems, path, "empty CSV: expected a header line 'image,mask' and one line per image", "empty")
        return found
    header = [cell.strip().lower() for cell in rows[0]]
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if unknown or "image" not in header or len(set(header)) != len(header):
        message = (
            f"CSV header {rows[0]} has unknown, missing or repeated columns ({', '.join(unknown) or 'image'}); "
            "expected 'image' and optionally 'mask' and 'split', e.g. 'image,mask'"
        )
        _add(found.problems, path, message, "csv_columns")
        if "image" not in header:
            return found
    column = {name: header.index(name) for name in CSV_COLUMNS if name in header}
    labelled = "mask" in column
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row] + [""] * len(header)
        where = f"{path.name} line {number}"
        split = SPLIT_ALIASES.get(cells[column["split"]].lower(), "?") if "split" in column else ALL
        image_text, mask_text = cells[column["image"]], cells[column["mask"]] if labelled else ""
        if split == "?":
            _add(
                found.problems,
                path,
                f"{where}: split {cells[column['split']]!r} is not train, val or test",
                "csv_values",
            )
            continue
        if not image_text:
            _add(found.problems, path, f"{where}: the image column is empty; expected an image path", "csv_values")
            continue
        image = _csv_path(root, image_text)
        key = _csv_key(root, image)
        if key in seen:
            _add(found.problems, image, f"{where}: image listed again (first on line {seen[key]})", "duplicate")
            continue
        seen[key] = number
        mask = _csv_path(root, mask_text) if mask_text else None
        sample = Sample(str(image), None if mask is None else str(mask), split, key)
        found.samples.setdefault(split, []).append(sample)
        found.labelled[split] = labelled
        for kind, file, text in (("image", image, image_text), ("mask", mask, mask_text)):
            if file is not None and not file.is_file():
                message = f"{where}: {kind} file {text!r} does not exist (relative paths are read from {root})"
                _add(found.problems, file, message, "missing_file", sample.id)
        if labelled and mask is None:
            _add(
                found.problems,
                image,
                f"{where}: image without mask (the mask column is empty)",
                "missing_mask",
                sample.id,
            )
    if not found.samples:
        _add(found.problems, path, "the CSV lists no images; expected one line per image after the header", "empty")
    return found


def _csv_path(root: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def _csv_key(root: Path, image: Path) -> str:
    try:
        return image.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return image.with_suffix("").as_posix()


def _discover(source: str | Path) -> _Found:
    path = Path(source).expanduser()
    if path.is_dir():
        return _discover_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _discover_csv(path)
    found = _Found("folder", path.parent if path.is_file() else path)
    what = "does not exist" if not path.exists() else f"is a {path.suffix or 'plain'} file"
    _add(found.problems, path, f"{what}: expected a dataset folder or a .csv file", "not_found")
    return found


# -------------------------------------------------------------------------------------------- inspection


@dataclass
class _Scan:
    """What reading one sample's files found."""

    image_size: tuple[int, int] | None = None
    image_stored: tuple[int, int] | None = None
    sixteen_bit: bool = False
    mask_size: tuple[int, int] | None = None
    values: dict[int, int] = field(default_factory=dict)
    lossy: bool = False
    lossy_max: int = 0
    wide_binary: bool = False
    problems: list[Problem] = field(default_factory=list)


def _scan(sample: Sample) -> _Scan:
    result = _Scan()
    if Path(sample.image).is_file():
        try:
            array, info = _decode(_decode_image, Path(sample.image))
            result.image_size = (int(array.shape[0]), int(array.shape[1]))
            result.image_stored, result.sixteen_bit = info["stored_size"], info["sixteen_bit"]
        except _DecodeError as error:
            _add(result.problems, sample.image, f"unreadable image: {error.message}", "unreadable_image", sample.id)
    if sample.mask is not None and Path(sample.mask).is_file():
        try:
            mask, info = _decode(_decode_mask, Path(sample.mask))
        except _DecodeError as error:
            if error.kind in ("colour_mask", "mask_values"):
                _add(result.problems, sample.mask, error.message, error.kind, sample.id)
            else:
                _add(result.problems, sample.mask, f"unreadable mask: {error.message}", "unreadable_mask", sample.id)
            return result
        result.mask_size = (int(mask.shape[0]), int(mask.shape[1]))
        result.lossy, result.lossy_max, result.wide_binary = info["lossy"], info["lossy_max"], info["wide_binary"]
        if mask.dtype == np.uint8:
            counts = np.bincount(mask.ravel(), minlength=256)
            result.values = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
        else:
            values, counts = np.unique(mask, return_counts=True)
            result.values = {int(v): int(n) for v, n in zip(values, counts, strict=True)}
        if result.image_size is not None and result.image_size != result.mask_size:
            _add(result.problems, sample.mask, _size_message(sample, result), "size_mismatch", sample.id)
    return result


def _size_message(sample: Sample, scan: _Scan) -> str:
    (ih, iw), (mh, mw) = scan.image_size, scan.mask_size  # type: ignore[misc]
    message = f"mask is {mh}x{mw} (h x w) but its image {Path(sample.image).name} is {ih}x{iw}"
    if scan.image_stored not in (None, scan.image_size) and scan.image_stored == scan.mask_size:
        message += " after the image's EXIF rotation (the mask matches the unrotated image)"
    return message + "; expected the same size"


def infer_mode(values: Iterable[int], class_names: Sequence[str] | None = None) -> tuple[str, int, str]:
    """Mode, class count and mask encoding of a dataset from the set of values its masks hold.

    The rule, in order:

    1. ``classes.json`` naming more than 2 classes: ``multiclass`` with that many classes, ids as stored.
    2. Values within ``{0, 255}``: ``binary`` and 255 is the foreground (class 1).
    3. Values within ``{0, 1, 255}``: ``binary``; 1 is the foreground and 255 = ignore.
    4. ``classes.json`` naming 2 classes: ``binary`` (other values are reported as problems).
    5. Otherwise ``multiclass`` with ``num_classes = max id + 1``, where 255 (ignore) and ids above it
       do not count.

    Args:
        values: every value found in the masks (255 included when present).
        class_names: names from ``classes.json``, if any.

    Returns:
        ``(mode, num_classes, encoding)`` with encoding ``"0/255"``, ``"0/1"`` or ``"ids"``.

    >>> infer_mode({0, 255}), infer_mode({0, 1, 255}), infer_mode({0, 3, 7, 255})
    (('binary', 2, '0/255'), ('binary', 2, '0/1'), ('multiclass', 8, 'ids'))
    """
    found = {int(v) for v in values}
    if class_names is not None and len(class_names) > 2:
        return "multiclass", len(class_names), "ids"
    if found <= {0, IGNORE_INDEX}:
        return "binary", 2, "0/255"
    if found <= {0, 1, IGNORE_INDEX} or (class_names is not None and len(class_names) == 2):
        return "binary", 2, "0/1"
    return "multiclass", _max_id(found) + 1, "ids"


def _max_id(values: Iterable[int]) -> int:
    return max([1, *(v for v in values if v < IGNORE_INDEX)])


def _resolve(
    values: set[int], mode: str | None, num_classes: int | None, class_names: list[str] | None
) -> tuple[str, int, str, str]:
    """Mode, class count, encoding, and where the class count came from (for messages)."""
    if mode is None and num_classes is not None:
        mode = "binary" if num_classes == 2 else "multiclass"
    if mode is None:
        origin = "from classes.json" if class_names is not None else "inferred from the masks"
        return (*infer_mode(values, class_names), origin)
    if mode == "binary":
        return "binary", 2, "0/1" if 1 in values else "0/255", "mode='binary'"
    if num_classes is not None:
        return "multiclass", num_classes, "ids", "as declared"
    if class_names is not None:
        return "multiclass", len(class_names), "ids", "from classes.json"
    return "multiclass", _max_id(values) + 1, "ids", "inferred from the masks"


def _check_arguments(mode: str | None, num_classes: int | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None (infer), got {mode!r}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= IGNORE_INDEX:
            raise ValueError(
                "num_classes counts the background and must be an integer in 2..255 (255 marks ignored pixels), "
                f"got {num_classes!r}"
            )
        if mode == "binary" and num_classes != 2:
            raise ValueError(f"mode='binary' means 2 classes, got num_classes={num_classes}")


def inspect_dataset(
    source: str | Path, mode: str | None = None, num_classes: int | None = None, *, workers: int | None = None
) -> DatasetReport:
    """Read every image and mask of a dataset once and report what it holds and everything wrong with it.

    Problems found (each names its file, says what was found and what was expected): no images; image
    without mask; mask without image; image/mask size mismatch; unreadable or truncated files; colour
    masks; mask values that fit neither binary masks nor the declared classes; class ids ``>=
    num_classes``; CSV lines pointing to missing files; unknown CSV columns; duplicate names; a bad
    ``classes.json``; soft (anti-aliased) or mixed mask encodings. Nothing raises on bad data.

    Args:
        source: dataset folder or CSV file (see the module docstring for layouts).
        mode: ``"binary"`` or ``"multiclass"``; inferred from the masks when ``None`` (see
            :func:`infer_mode`), and checked when given.
        num_classes: classes including the background; from ``classes.json`` or inferred when ``None``.
        workers: threads decoding files (default: up to 8).

    >>> report = inspect_dataset("data/polyp")  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
    """
    _check_arguments(mode, num_classes)
    found = _discover(source)
    report = DatasetReport(str(source), found.layout, labelled=found.labelled, problems=found.problems)
    report.notes = found.notes
    class_names = _load_metadata(found.root, report)
    samples = [s for name in (*SPLITS, ALL) for s in found.samples.get(name, [])]
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if workers > 1 and len(samples) > 8:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            scans = list(pool.map(_scan, samples))
    else:
        scans = [_scan(s) for s in samples]
    pixels: Counter[int] = Counter()
    files: Counter[int] = Counter()
    for scan in scans:
        report.problems.extend(scan.problems)
        pixels.update(scan.values)
        files.update(scan.values.keys())
    report.image_sizes = dict(Counter(scan.image_size for scan in scans if scan.image_size is not None))
    report.mask_values = dict(sorted(pixels.items()))
    report.mask_value_files = dict(sorted(files.items()))
    for sample, scan in zip(samples, scans, strict=True):
        report.samples.setdefault(sample.split, []).append(replace(sample, size=scan.image_size))
    for name in found.samples:
        report.samples.setdefault(name, [])
    _note_reading(report, scans)
    if any(report.labelled.values()) or mode is not None or num_classes is not None:
        _decide_classes(report, samples, scans, mode, num_classes, class_names, found.root / "classes.json")
    elif class_names is not None:
        report.class_names, report.num_classes = class_names, len(class_names)
    return report


def _load_metadata(root: Path, report: DatasetReport) -> list[str] | None:
    """Reads ``dataset.json``'s domain into the report; returns the names of ``classes.json``, if any."""
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            domain = json.loads(meta.read_text(encoding="utf-8")).get("domain")
            report.domain = domain if isinstance(domain, str) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            report.notes.append(f"{meta} is not readable JSON; ignored")
    classes = root / "classes.json"
    if not classes.is_file():
        return None
    try:
        return read_classes(classes)
    except DatasetError as error:
        _add(report.problems, classes, str(error).split(": ", 1)[-1], "classes_json")
        return None


def _note_reading(report: DatasetReport, scans: list[_Scan]) -> None:
    sixteen = sum(s.sixteen_bit for s in scans)
    if sixteen:
        report.notes.append(f"{sixteen} images are 16-bit; they were scaled to 8 bits (value * 255 / 65535)")
    lossy = sum(s.lossy for s in scans)
    if lossy:
        report.notes.append(f"{lossy} masks are JPEG files, which blur values at edges: read as binary (>= 128)")
    wide = sum(s.wide_binary for s in scans)
    if wide:
        report.notes.append(f"{wide} 16-bit masks holding only 0 and 65535 were read as 0/255")


def _decide_classes(
    report: DatasetReport,
    samples: list[Sample],
    scans: list[_Scan],
    mode: str | None,
    num_classes: int | None,
    class_names: list[str] | None,
    classes_path: Path,
) -> None:
    """Settle mode, class count, names and encoding, then check every mask's values against them."""
    values = set(report.mask_values)
    if mode is None and num_classes is None and class_names is None and _looks_soft(report.mask_values):
        between = [v for v in sorted(values) if 1 < v < IGNORE_INDEX]
        message = (
            f"masks hold {len(between)} distinct values between 1 and 255 (e.g. {between[:5]}) with most pixels at "
            "0 or 255: they look like soft or anti-aliased binary masks (e.g. resized with interpolation); expected "
            "0/255 masks (threshold them), or declare mode='multiclass' and num_classes if they are class ids"
        )
        _add(report.problems, report.source, message, "soft_masks")
    resolved, count, encoding, origin = _resolve(values, mode, num_classes, class_names)
    report.mode, report.num_classes, report.mask_encoding = resolved, count, encoding
    if class_names is not None and len(class_names) != count:
        message = (
            f"names {len(class_names)} classes but the dataset has {count} ({resolved}, {origin}); expected the same"
        )
        _add(report.problems, classes_path, message, "classes_json")
    if class_names is not None:
        report.class_names = class_names
    elif resolved == "binary":
        report.class_names = ["background", "foreground"]
    else:
        report.class_names = ["background", *(f"class_{i}" for i in range(1, count))]
    allowed = {0, 1, IGNORE_INDEX} if encoding == "0/1" else {0, IGNORE_INDEX}
    for sample, scan in zip(samples, scans, strict=True):
        present, mask = set(scan.values), str(sample.mask)
        if scan.lossy and resolved == "multiclass":
            message = "JPEG mask in a multi-class dataset: JPEG alters values, so class ids are lost; expected a PNG"
            _add(report.problems, mask, message, "mask_values", sample.id)
        elif scan.lossy and 0 < scan.lossy_max < 128:
            message = (
                f"JPEG mask whose largest value is {scan.lossy_max} (< 128) reads as all background; "
                "expected 0/255 masks, or class ids saved as PNG"
            )
            _add(report.problems, mask, message, "mask_values", sample.id)
        elif resolved == "binary" and not present <= allowed:
            extra = sorted(present - allowed)[:8]
            message = (
                f"mask values {extra} fit no binary encoding: expected 0/255 (255 = foreground) or 0/1 (255 = ignore)"
            )
            _add(report.problems, mask, message, "mask_values", sample.id)
        elif resolved == "multiclass":
            extra = sorted(v for v in present if v >= count and v != IGNORE_INDEX)[:8]
            if extra:
                message = (
                    f"class ids {extra} >= num_classes {count} ({origin}): expected ids 0..{count - 1}, 255 = ignore"
                )
                _add(report.problems, mask, message, "class_out_of_range", sample.id)
    _check_encodings(report, scans, values, encoding)


def _check_encodings(report: DatasetReport, scans: list[_Scan], values: set[int], encoding: str) -> None:
    """Notes on how masks were read, and the mixed 0/255-and-ids problem."""
    if encoding == "0/255" and IGNORE_INDEX in values:
        report.notes.append("masks hold 0 and 255: 255 is read as the foreground (class 1)")
    if values and not values - {0, IGNORE_INDEX} and (encoding != "0/255" or IGNORE_INDEX not in values):
        report.notes.append("no mask holds any foreground pixel")
    if encoding == "0/255" or IGNORE_INDEX not in values:
        return
    only = sum(1 for scan in scans if IGNORE_INDEX in scan.values and set(scan.values) <= {0, IGNORE_INDEX})
    read = sum(1 for scan in scans if scan.values)
    ids = sorted(v for v in values if 0 < v < IGNORE_INDEX)[:5]
    message = (
        f"{only} of {read} masks hold only 0 and 255 while others use ids {ids}: 255 is read as ignore here, so "
        "those masks have no foreground"
    )
    if only and only * 2 >= read:
        message += "; expected one encoding for all masks (binary 0/255 or 0/1, or class ids with 255 = ignore)"
        _add(report.problems, report.source, message, "mixed_masks")
    elif only:
        report.notes.append(f"{message} (if 255 means foreground there, convert them to 0/1)")


def _looks_soft(pixel_counts: Mapping[int, int]) -> bool:
    """Masks mostly at 0 and 255 with many values in between: the signature of interpolated binary masks."""
    total = sum(pixel_counts.values())
    if not total or 0 not in pixel_counts or IGNORE_INDEX not in pixel_counts:
        return False
    between = [v for v in pixel_counts if 1 < v < IGNORE_INDEX]
    return len(between) >= 16 and pixel_counts[0] + pixel_counts[IGNORE_INDEX] >= 0.9 * total


def check_dataset(
    source: str | Path,
    mode: str | None = None,
    num_classes: int | None = None,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
) -> DatasetReport:
    """:func:`inspect_dataset`, then refuse a dataset with problems, or leave its bad samples out.

    Args:
        source: dataset folder or CSV file.
        mode: ``"binary"``, ``"multiclass"`` or ``None`` (inferred).
        num_classes: classes including the background, or ``None``.
        skip_bad: drop the samples that have problems (``report.skipped`` counts them) instead of
            raising. Problems of the whole dataset (no images, bad CSV header, bad classes.json ...) still
            raise.
        workers: threads decoding files.

    Returns:
        The report; ``report.usable_samples()`` are the samples to use.

    Raises:
        DatasetError: listing the first problems and how many there are in all.

    >>> report = check_dataset("data/polyp", skip_bad=True)  # doctest: +SKIP
    """
    report = inspect_dataset(source, mode, num_classes, workers=workers)
    fatal = [p for p in report.problems if p.fatal]
    if report.problems and (fatal or not skip_bad):
        raise DatasetError(_problem_message(report, fatal if skip_bad else report.problems), report)
    report.skipped = len(report.bad_samples())
    if not report.usable_samples():
        raise DatasetError(f"{source}: no usable samples remain after leaving out {report.skipped} bad ones", report)
    return report


def _problem_message(report: DatasetReport, problems: list[Problem]) -> str:
    lines = [f"dataset {report.source} has {len(problems)} problem{'s' * (len(problems) != 1)}:"]
    lines.extend(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more (inspect_dataset lists them all)")
    if any(p.fatal for p in problems):
        lines.append("Fix these first: they concern the whole dataset.")
    elif report.bad_samples():
        lines.append(
            f"Fix them, or pass skip_bad=True (`--skip_bad true` on the command line) to leave out the "
            f"{len(report.bad_samples())} bad samples."
        )
    else:
        lines.append(
            "Fix them, or pass skip_bad=True (`--skip_bad true` on the command line) to ignore the stray files."
        )
    return "\n".join(lines)


def split_samples(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/val split: samples ranked by a hash of ``(seed, key)``, the first share is val.

    The split depends only on the samples' keys (relative paths), the seed and the fraction: not on
    the file order, the machine or library versions. Adding files keeps most earlier assignments.

    Args:
        samples: the samples to split (at least 2).
        val_fraction: share held out, in (0, 1); at least one sample goes to each side.
        seed: split seed.

    Returns:
        ``(train, val)``, each sorted by key.

    >>> train, val = split_samples([Sample(f"{i}.png", key=str(i)) for i in range(10)], 0.2, seed=0)
    >>> len(train), len(val)
    (8, 2)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(samples) < 2:
        raise ValueError(f"holding out a validation share needs at least 2 samples, got {len(samples)}")
    n_val = min(max(1, round(val_fraction * len(samples))), len(samples) - 1)

    def rank(sample: Sample) -> tuple[bytes, str]:
        return hashlib.blake2b(f"convlora-split:{seed}:{sample.key}".encode(), digest_size=16).digest(), sample.key

    ranked = sorted(samples, key=rank)
    return sorted(ranked[n_val:], key=lambda s: s.key), sorted(ranked[:n_val], key=lambda s: s.key)
