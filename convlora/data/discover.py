"""Finding the samples of a dataset on disk: which images pair with which masks, in which split.

Layouts (``source`` is a folder or a CSV file):

- ``DATA/images/`` + ``DATA/masks/``, matched by the file name without extension (``a.jpg`` + ``a.png``
  pair up; sub-folders are kept in the name). A mask named ``a_mask.png`` (or ``_gt``, ``_label``,
  ``_segmentation`` ...) pairs with ``a`` when no mask is named ``a`` exactly.
- Split folders ``DATA/{train,val,test}/`` (``training``, ``valid``, ``validation``, ``testing`` also
  recognised), each holding ``images/`` + ``masks/`` or just images.
- A CSV file with a header: ``image`` (required), ``mask`` (optional, for labelled data), ``split``
  (optional: train/val/test). Paths are absolute or relative to the CSV's folder.
- A folder of images without masks (``DATA/*.png`` or ``DATA/images/`` alone), for prediction.

Extensions: .png .jpg .jpeg .bmp .tif .tiff .webp, in any letter case; hidden files are skipped. Nothing
is decoded here: :mod:`convlora.data.inspect` reads the files found.

>>> found = discover("data/polyp")  # doctest: +SKIP
>>> found.layout, sorted(found.samples)  # doctest: +SKIP
('splits', ['test', 'train', 'val'])
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .decode import IMAGE_EXTENSIONS
from .report import ALL, SPLITS, Problem, Sample
from .report import add_problem as _add

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
MASK_SUFFIXES = ("_mask", "_masks", "_gt", "_label", "_labels", "_segmentation", "_seg", "-mask", "-gt")
CSV_COLUMNS = ("image", "mask", "split")


@dataclass
class Found:
    """The samples found at a source, before any file is decoded (``layout`` as in ``DatasetReport``)."""

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


def _pair_folder(found: Found, folder: Path, split: str) -> None:
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


def _discover_folder(root: Path) -> Found:
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    split_dirs: dict[str, list[Path]] = {}
    for name, path in children.items():
        if name in SPLIT_ALIASES:
            split_dirs.setdefault(SPLIT_ALIASES[name], []).append(path)
    if "images" in children:
        found = Found("folder", root)
        if split_dirs:
            found.notes.append(f"split folders {sorted(split_dirs)} ignored: {root} has images/ at its root")
        _pair_folder(found, root, ALL)
        return found
    if split_dirs:
        found = Found("splits", root)
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
    found = Found("images", root)
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


def _discover_csv(path: Path) -> Found:
    root = path.parent
    found = Found("csv", root)
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


def discover(source: str | Path) -> Found:
    """The samples of a dataset folder or CSV file, with the problems of its layout (nothing is decoded).

    Args:
        source: a dataset folder or CSV file (see the module docstring for layouts).

    >>> discover("data/polyp").layout  # doctest: +SKIP
    'splits'
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _discover_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _discover_csv(path)
    found = Found("folder", path.parent if path.is_file() else path)
    what = "does not exist" if not path.exists() else f"is a {path.suffix or 'plain'} file"
    _add(found.problems, path, f"{what}: expected a dataset folder or a .csv file", "not_found")
    return found


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
