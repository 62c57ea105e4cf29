"""What an inspection of a dataset found: the samples, their problems and notes, and the error a bad dataset raises.

:class:`DatasetReport` is filled in by :func:`~convlora.data.inspect_dataset`; every problem is a
:class:`Problem` naming its file, and :class:`DatasetError` carries the report of a refused dataset.

>>> str(Problem("masks/b.png", "mask without image", "missing_image"))
'masks/b.png: mask without image'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.processing import IGNORE_INDEX

ALL = "all"  # split name of the samples of a dataset without split folders
SPLITS = ("train", "val", "test")
MODES = ("binary", "multiclass")
# Mask encodings: 0/255 (binary, 255 = foreground), 0/1 (binary, 255 = ignore), ids (classes, 255 = ignore),
# instances (one id per object: nonzero = foreground; in 8-bit masks 255 = ignore).
ENCODINGS = ("0/255", "0/1", "ids", "instances")
MAX_LISTED_PROBLEMS = 20

# Problems that concern the whole dataset: leaving samples out cannot fix them.
FATAL_KINDS = ("empty", "not_found", "csv_columns", "classes_json", "soft_masks", "mixed_masks", "split_folders")

__all__ = ["ALL", "ENCODINGS", "IGNORE_INDEX", "MODES", "SPLITS", "DatasetError", "DatasetReport", "Problem", "Sample"]


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
        class_colors: ``(r, g, b)`` -> class id, when ``classes.json`` gives colours (colour-coded masks).
        image_reading: how images were read (:class:`~convlora.data.ImageReading` as a dict).
        image_values: per sample id, the image's stored ``type``, ``channels`` and value ``min``/``max``
            (before normalisation).
        domain: the ``domain`` of a ``dataset.json`` at the root (synthetic datasets), if any.
        warnings: observations that probably mean trouble but do not stop training (e.g. images using under
            5% of their type's value range).
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
    class_colors: dict[tuple[int, int, int], int] = field(default_factory=dict)
    image_reading: dict[str, Any] = field(default_factory=dict)
    image_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    domain: str | None = None
    warnings: list[str] = field(default_factory=list)
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
            "class_colors": {_hex(color): class_id for color, class_id in sorted(self.class_colors.items())},
            "image_reading": dict(self.image_reading),
            "image_values": {key: dict(values) for key, values in self.image_values.items()},
            "domain": self.domain,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
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
        lines.extend(self._value_lines())
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
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
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

    def _value_lines(self) -> list[str]:
        """One line per stored image type: how many images, and the lowest and highest value found."""
        by_type: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for values in self.image_values.values():
            by_type.setdefault((values["type"], values["channels"]), []).append(values)
        lines = []
        for (kind, channels), group in sorted(by_type.items()):
            low, high = min(v["min"] for v in group), max(v["max"] for v in group)
            lines.append(
                f"  images: {len(group)} {kind} with {channels} channel{'s' * (channels != 1)}, "
                f"values {_number(low)}..{_number(high)}"
            )
        return lines


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
        "instances": "masks hold instance ids: nonzero is the foreground",
    }.get(encoding or "", "no masks")


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def add_problem(problems: list[Problem], path: str | Path, message: str, kind: str, sample: str | None = None) -> None:
    """Append a :class:`Problem` (the shorthand every check uses).

    Args:
        problems: the list to extend.
        path: the file or folder concerned.
        message: what was found and what was expected.
        kind: the problem's category.
        sample: id of the sample it disqualifies, if any.

    >>> found = []
    >>> add_problem(found, "masks/b.png", "mask without image", "missing_image")
    >>> str(found[0])
    'masks/b.png: mask without image'
    """
    problems.append(Problem(str(path), message, kind, sample))
