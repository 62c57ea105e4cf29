"""Inspecting a whole dataset at once: read every file, decide how masks encode classes, list every problem.

:func:`inspect_dataset` reads every file once and lists every problem it finds (it never stops at the
first one, and never crashes on a damaged file); :func:`check_dataset` turns the problems into one
:class:`~convlora.data.DatasetError`, or leaves the bad samples out with ``skip_bad=True``.

How masks are read is decided here, on all masks together: binary 0/255 or 0/1, class ids, instance
ids (many ids, each one object: binary with nonzero = foreground), or colour-coded classes (through the
colours of ``classes.json``). Class names come from ``classes.json``, ``class_names.txt`` or
``labels.txt`` at the dataset root (beside the CSV).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .classes import ClassTable, Color, find_class_table
from .decode import LOW_RANGE_SHARE, ImageReading, _decode, _decode_image, _decode_mask, _DecodeError
from .discover import discover
from .instances import instance_stats, looks_like_instances
from .report import ALL, IGNORE_INDEX, MAX_LISTED_PROBLEMS, MODES, SPLITS, DatasetError, DatasetReport, Problem, Sample
from .report import add_problem as _add

MASK_READINGS = ("auto", "instances", "classes")
INSTANCE_SAMPLE = 16  # masks (those with the most ids) checked for the shape of instance maps


@dataclass
class _Scan:
    """What reading one sample's files found."""

    image_size: tuple[int, int] | None = None
    image_stored: tuple[int, int] | None = None
    image: dict[str, Any] = field(default_factory=dict)
    mask_size: tuple[int, int] | None = None
    values: dict[int, int] = field(default_factory=dict)
    eight_bit: bool = True
    lossy: bool = False
    lossy_max: int = 0
    lossy_changed: int = 0
    wide_binary: bool = False
    colour_coded: bool = False
    problems: list[Problem] = field(default_factory=list)


def _scan(sample: Sample, reading: ImageReading, colors: Mapping[Color, int] | None) -> _Scan:
    result = _Scan()
    if Path(sample.image).is_file():
        try:
            array, info = _decode(_decode_image, Path(sample.image), reading)
            result.image_size = (int(array.shape[0]), int(array.shape[1]))
            result.image_stored, result.image = info["stored_size"], info
        except _DecodeError as error:
            if error.kind == "channels":
                _add(result.problems, sample.image, error.message, "channels", sample.id)
            else:
                _add(result.problems, sample.image, f"unreadable image: {error.message}", "unreadable_image", sample.id)
    if sample.mask is not None and Path(sample.mask).is_file():
        try:
            mask, info = _decode(_decode_mask, Path(sample.mask), colors)
        except _DecodeError as error:
            if error.kind in ("colour_mask", "mask_values", "unknown_color"):
                _add(result.problems, sample.mask, error.message, error.kind, sample.id)
            else:
                _add(result.problems, sample.mask, f"unreadable mask: {error.message}", "unreadable_mask", sample.id)
            return result
        result.mask_size = (int(mask.shape[0]), int(mask.shape[1]))
        result.lossy, result.lossy_max, result.wide_binary = info["lossy"], info["lossy_max"], info["wide_binary"]
        result.lossy_changed, result.colour_coded = info["lossy_changed"], info.get("colour_coded", False)
        result.eight_bit = mask.dtype == np.uint8
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

    Instance maps are recognised before this rule applies (see :func:`inspect_dataset`).

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


def _check_arguments(mode: str | None, num_classes: int | None, mask_reading: str) -> None:
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
    if mask_reading not in MASK_READINGS:
        raise ValueError(f"mask_reading must be one of {list(MASK_READINGS)}, got {mask_reading!r}")
    if mask_reading == "instances" and (mode == "multiclass" or (num_classes or 2) != 2):
        raise ValueError("mask_reading='instances' reads masks as binary (nonzero = foreground); it needs mode binary")


def inspect_dataset(
    source: str | Path,
    mode: str | None = None,
    num_classes: int | None = None,
    *,
    workers: int | None = None,
    reading: ImageReading | Mapping[str, Any] | None = None,
    mask_reading: str = "auto",
) -> DatasetReport:
    """Read every image and mask of a dataset once and report what it holds and everything wrong with it.

    Problems found (each names its file, says what was found and what was expected): no images; image
    without mask; mask without image; image/mask size mismatch; unreadable or truncated files; images
    with more than 3 channels and no channel choice; colour masks without a colour table, or with a
    colour it lacks; mask values that fit neither binary masks nor the declared classes; class ids ``>=
    num_classes``; CSV lines pointing to missing files; unknown CSV columns; duplicate names; a bad
    ``classes.json``; soft (anti-aliased) or mixed mask encodings. Nothing raises on bad data.

    The report also gives each image's stored type and value range (``image_values``), with a warning
    for images using under 5% of their type's range, and notes how files were read (normalisation,
    instance ids, JPEG thresholding).

    Args:
        source: dataset folder or CSV file (see :mod:`convlora.data.discover` for layouts).
        mode: ``"binary"`` or ``"multiclass"``; inferred from the masks when ``None`` (see
            :func:`infer_mode`), and checked when given.
        num_classes: classes including the background; from ``classes.json`` or inferred when ``None``.
        workers: threads decoding files (default: up to 8).
        reading: how images are read (:class:`~convlora.data.ImageReading` or its dict); defaults when ``None``.
        mask_reading: ``"auto"`` (instance maps recognised), ``"instances"`` (every nonzero id is one
            object; binary, nonzero = foreground) or ``"classes"`` (values are class ids or binary
            encodings, never instances).

    >>> report = inspect_dataset("data/polyp")  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
    """
    _check_arguments(mode, num_classes, mask_reading)
    reading = ImageReading.of(reading)
    found = discover(source)
    report = DatasetReport(str(source), found.layout, labelled=found.labelled, problems=found.problems)
    report.notes = found.notes
    report.image_reading = reading.to_dict()
    table = _load_metadata(found.root, report)
    report.class_colors = dict(table.colors) if table is not None else {}
    samples = [s for name in (*SPLITS, ALL) for s in found.samples.get(name, [])]
    scan = partial(_scan, reading=reading, colors=report.class_colors or None)
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if workers > 1 and len(samples) > 8:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            scans = list(pool.map(scan, samples))
    else:
        scans = [scan(s) for s in samples]
    pixels: Counter[int] = Counter()
    files: Counter[int] = Counter()
    for result in scans:
        report.problems.extend(result.problems)
        pixels.update(result.values)
        files.update(result.values.keys())
    report.image_sizes = dict(Counter(result.image_size for result in scans if result.image_size is not None))
    report.mask_values = dict(sorted(pixels.items()))
    report.mask_value_files = dict(sorted(files.items()))
    for sample, result in zip(samples, scans, strict=True):
        report.samples.setdefault(sample.split, []).append(replace(sample, size=result.image_size))
    for name in found.samples:
        report.samples.setdefault(name, [])
    _note_images(report, samples, scans, reading)
    _note_masks(report, scans)
    class_names = table.names if table is not None else None
    if any(report.labelled.values()) or mode is not None or num_classes is not None:
        source_file = Path(table.source) if table is not None else found.root / "classes.json"
        _decide_classes(report, samples, scans, mode, num_classes, class_names, source_file, mask_reading)
    elif class_names is not None:
        report.class_names, report.num_classes = class_names, len(class_names)
    return report


def _load_metadata(root: Path, report: DatasetReport) -> ClassTable | None:
    """Reads ``dataset.json``'s domain into the report; returns the class table found at the root, if any."""
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            domain = json.loads(meta.read_text(encoding="utf-8")).get("domain")
            report.domain = domain if isinstance(domain, str) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            report.notes.append(f"{meta} is not readable JSON; ignored")
    try:
        table, notes = find_class_table(root)
    except DatasetError as error:
        path, _, message = str(error).partition(": ")
        _add(report.problems, path, message, "classes_json")
        return None
    report.notes.extend(notes)
    return table


def _note_images(report: DatasetReport, samples: list[Sample], scans: list[_Scan], reading: ImageReading) -> None:
    """Value ranges per image; notes on normalisation and channels; the low-range warning."""
    deep: Counter[str] = Counter()
    low: list[tuple[Sample, dict[str, Any]]] = []
    two_channel = nonfinite = colour16 = 0
    for sample, scan in zip(samples, scans, strict=True):
        info = scan.image
        if not info:
            continue
        report.image_values[sample.id] = {k: info[k] for k in ("type", "channels", "min", "max")}
        deep.update([info["type"]] if info.get("normalised") else [])
        two_channel += (reading.channels is None and info["channels"] == 2) or len(reading.channels or ()) == 2
        nonfinite += info.get("nonfinite", 0) > 0
        colour16 += info.get("png16_colour", False)
        limits = info.get("type_range")
        if limits is not None and info["max"] - info["min"] < LOW_RANGE_SHARE * (limits[1] - limits[0]):
            low.append((sample, info))
    if deep:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(deep.items()))
        report.notes.append(
            f"{sum(deep.values())} images store more than 8 bits per sample ({kinds}): {reading.describe()} "
            f"(intensity={reading.intensity!r})"
        )
    if reading.channels is not None:
        report.notes.append(f"channels {list(reading.channels)} of each image are used, in that order")
    if two_channel:
        report.notes.append(f"{two_channel} images have 2 channels: read as red and green, blue = 0")
    if nonfinite:
        report.notes.append(f"{nonfinite} float images hold NaN or infinite values: read as 0")
    if colour16:
        report.notes.append(
            f"{colour16} images are 16-bit RGB PNGs, which are read at 8 bits (the high byte of each value); save "
            "low-range ones as 16-bit TIFF to have them normalised"
        )
    if low:
        sample, info = low[0]
        lo, hi = info["type_range"]
        stretched = reading.intensity in ("percentile", "minmax") and all(i.get("normalised") for _, i in low)
        consequence = (
            f"stretched per image (intensity={reading.intensity!r})"
            if stretched
            else "read without stretching, so they look almost uniform; check the files, or set intensity"
        )
        many = len(low) != 1
        report.warnings.append(
            f"{len(low)} {'images use' if many else 'image uses'} under {LOW_RANGE_SHARE:.0%} of "
            f"{'their' if many else 'its'} type's value range (e.g. {Path(sample.image).name}: values "
            f"{_num(info['min'])}..{_num(info['max'])} of {info['type']} {_num(lo)}..{_num(hi)}): {consequence}"
        )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _note_masks(report: DatasetReport, scans: list[_Scan]) -> None:
    lossy = [s for s in scans if s.lossy]
    if lossy:
        changed = sum(s.lossy_changed for s in lossy)
        total = sum(sum(s.values.values()) for s in lossy)
        report.notes.append(
            f"{len(lossy)} masks are JPEG files, which blur values at edges: thresholded at 128 to 0/255, changing "
            f"{changed:,} pixels ({changed / max(total, 1):.2%} of their pixels) that were neither 0 nor 255"
        )
    wide = sum(s.wide_binary for s in scans)
    if wide:
        report.notes.append(f"{wide} 16-bit masks holding only 0 and 65535 were read as 0/255")
    colour = sum(s.colour_coded for s in scans)
    if colour:
        report.notes.append(f"{colour} masks are colour-coded: mapped to class ids through the colours of classes.json")


def _instance_reading(
    report: DatasetReport,
    samples: list[Sample],
    scans: list[_Scan],
    mode: str | None,
    num_classes: int | None,
    class_names: list[str] | None,
    mask_reading: str,
) -> tuple[bool, bool]:
    """Whether the masks are read as instance maps (see :mod:`convlora.data.instances`), and whether they
    would be with ``mode="binary"`` declared (for a hint when they were not)."""
    if mask_reading != "auto":
        return mask_reading == "instances", False
    values = set(report.mask_values)
    named = class_names is not None and len(class_names) != 2
    if mode == "multiclass" or num_classes not in (None, 2) or report.class_colors or named:
        return False, False
    if values <= {0, 1, IGNORE_INDEX} or any(p.kind == "soft_masks" for p in report.problems):
        return False, False
    if any(s.lossy for s in scans):
        return False, False
    eight_bit = all(s.eight_bit for s in scans if s.values)
    distinct = len(values - {0} - ({IGNORE_INDEX} if eight_bit else set()))

    def ids(scan: _Scan) -> int:
        return len(set(scan.values) - {0} - ({IGNORE_INDEX} if scan.eight_bit else set()))

    ranked = sorted(
        (pair for pair in zip(samples, scans, strict=True) if pair[1].values), key=lambda p: (-ids(p[1]), p[0].key)
    )
    stats = []
    for sample, _ in ranked[:INSTANCE_SAMPLE]:
        try:
            mask, _ = _decode(_decode_mask, Path(str(sample.mask)), None)
        except _DecodeError:
            continue
        stats.append(instance_stats(mask))
    decided = looks_like_instances(stats, distinct, binary=mode == "binary")
    return decided, not decided and mode is None and looks_like_instances(stats, distinct, binary=True)


def _decide_classes(
    report: DatasetReport,
    samples: list[Sample],
    scans: list[_Scan],
    mode: str | None,
    num_classes: int | None,
    class_names: list[str] | None,
    classes_path: Path,
    mask_reading: str = "auto",
) -> None:
    """Settle mode, class count, names and encoding, then check every mask's values against them."""
    values = set(report.mask_values)
    if (
        mode is None
        and num_classes is None
        and class_names is None
        and mask_reading == "auto"
        and _looks_soft(report.mask_values)
    ):
        between = [v for v in sorted(values) if 1 < v < IGNORE_INDEX]
        message = (
            f"masks hold {len(between)} distinct values between 1 and 255 (e.g. {between[:5]}) with most pixels at "
            "0 or 255: they look like soft or anti-aliased binary masks (e.g. resized with interpolation); expected "
            "0/255 masks (threshold them), or declare mode='multiclass' and num_classes if they are class ids"
        )
        _add(report.problems, report.source, message, "soft_masks")
    instances, plausible = _instance_reading(report, samples, scans, mode, num_classes, class_names, mask_reading)
    if instances:
        _read_as_instances(report, scans, class_names, classes_path, mask_reading)
        return
    resolved, count, encoding, origin = _resolve(values, mode, num_classes, class_names)
    if plausible and resolved == "multiclass":
        report.notes.append(
            "the masks could also be instance ids (few ids per mask, each one region): if each id is one object, "
            "pass mode='binary' (--mode binary) or mask_reading='instances' to read them as binary"
        )
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
                f"mask values {extra} fit no binary encoding: expected 0/255 (255 = foreground) or 0/1 (255 = ignore), "
                "or instance ids (mask_reading='instances')"
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


def _read_as_instances(
    report: DatasetReport, scans: list[_Scan], class_names: list[str] | None, classes_path: Path, mask_reading: str
) -> None:
    report.mode, report.num_classes, report.mask_encoding = "binary", 2, "instances"
    if class_names is not None and len(class_names) != 2:
        message = f"names {len(class_names)} classes but instance masks make a binary task; expected 2 names"
        _add(report.problems, classes_path, message, "classes_json")
    report.class_names = class_names if class_names is not None and len(class_names) == 2 else ["background", "object"]
    counts = [len(set(s.values) - {0} - ({IGNORE_INDEX} if s.eight_bit else set())) for s in scans if s.values]
    how = "as mask_reading='instances' says" if mask_reading == "instances" else "recognised by their shape"
    ignore = " (255 in 8-bit masks = ignore)" if any(s.eight_bit and IGNORE_INDEX in s.values for s in scans) else ""
    report.notes.append(
        f"{len(counts)} masks hold instance ids (up to {max(counts, default=0)} objects per mask; {how}): read as "
        f"binary, nonzero = foreground{ignore}; mask_reading='classes' reads them as class ids instead"
    )


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
    reading: ImageReading | Mapping[str, Any] | None = None,
    mask_reading: str = "auto",
    skip_advice: str = "skip_bad=True (`--skip_bad true` on the command line)",
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
        reading: how images are read (see :func:`inspect_dataset`).
        mask_reading: ``"auto"``, ``"instances"`` or ``"classes"`` (see :func:`inspect_dataset`).
        skip_advice: how the refusal tells the caller to leave bad samples out (the command's own option).

    Returns:
        The report; ``report.usable_samples()`` are the samples to use.

    Raises:
        DatasetError: listing the first problems and how many there are in all.

    >>> report = check_dataset("data/polyp", skip_bad=True)  # doctest: +SKIP
    """
    report = inspect_dataset(source, mode, num_classes, workers=workers, reading=reading, mask_reading=mask_reading)
    fatal = [p for p in report.problems if p.fatal]
    if report.problems and (fatal or not skip_bad):
        raise DatasetError(_problem_message(report, fatal if skip_bad else report.problems, skip_advice), report)
    report.skipped = len(report.bad_samples())
    if not report.usable_samples():
        raise DatasetError(f"{source}: no usable samples remain after leaving out {report.skipped} bad ones", report)
    return report


def _problem_message(report: DatasetReport, problems: list[Problem], skip_advice: str) -> str:
    lines = [f"dataset {report.source} has {len(problems)} problem{'s' * (len(problems) != 1)}:"]
    lines.extend(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more (inspect_dataset lists them all)")
    if any(p.fatal for p in problems):
        lines.append("Fix these first: they concern the whole dataset.")
    elif report.bad_samples():
        lines.append(f"Fix them, or pass {skip_advice} to leave out the {len(report.bad_samples())} bad samples.")
    else:
        lines.append(f"Fix them, or pass {skip_advice} to ignore the stray files.")
    return "\n".join(lines)
