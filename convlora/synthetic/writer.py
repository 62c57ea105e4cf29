"""Sampling and writing synthetic datasets: per-sample seeds, PNG layout, reuse, previews.

Layout written by :func:`write_dataset`::

    out_dir/dataset.json                 domain, seed, size, counts, generator version, pixels_sha256
    out_dir/classes.json                 class names by id (multi-class and instance domains)
    out_dir/{train,val,test}/images/NNNNN.png  8-bit RGB, or grey where the domain draws one channel:
                                               16-bit (nuclei, uint16) or 8-bit (cells, uint8)
    out_dir/{train,val,test}/masks/NNNNN.png   {0, 255} (binary) or class ids (multi-class), 8-bit grey;
                                               instance ids 1..n (instance domains), 16-bit grey

Every sample draws its randomness from ``(seed, split, index, domain)`` alone, so a dataset of 100
images starts with the same 10 as a dataset of 10. ``pixels_sha256`` hashes the decoded pixels: PNG bytes
match across machines only with the same zlib build, the pixels match everywhere.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._io import atomic_dir, write_json
from .domains import DOMAINS, GENERATOR_VERSION, DomainSpec

SPLITS = ("train", "val", "test")
MIN_SIZE = 16

# Colours of class ids in previews (id 0 black).
_PREVIEW_COLOURS = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
], dtype=np.uint8)  # fmt: skip


def _spec(domain: str) -> DomainSpec:
    if domain not in DOMAINS:
        raise ValueError(f"Unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def sample(
    domain: str, index: int, *, split: str = "train", size: int = 128, seed: int = 0, square: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The ``index``-th sample of a domain's split: ``(image uint8 (h, w, 3), mask uint8 (h, w))``.

    Instance domains (``mode="instances"``) give their own types instead: a single-channel image (nuclei: a
    uint16 ``(h, w)`` 12-bit image; cells: a uint8 ``(h, w)`` grey one) and a uint16 map of instance ids.

    Height and width are drawn independently in ``[0.8 * size, 1.2 * size]`` unless ``square``.

    Args:
        domain: a key of ``DOMAINS``.
        index: position of the sample in its split (non-negative).
        split: ``"train"``, ``"val"`` or ``"test"``; the splits draw disjoint random streams.
        size: nominal image side in pixels (at least 16).
        seed: dataset seed (non-negative).
        square: force ``size x size`` images.

    >>> image, mask = sample("road", 3, size=64, square=True)
    >>> image.shape, mask.shape
    ((64, 64, 3), (64, 64))
    """
    spec = _spec(domain)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    entropy = [int(seed), SPLITS.index(split), int(index), zlib.crc32(domain.encode())]
    size_seq, content_seq = np.random.SeedSequence(entropy).spawn(2)
    if square:
        height = width = int(size)
    else:
        height, width = (int(v) for v in np.rint(size * np.random.default_rng(size_seq).uniform(0.8, 1.2, 2)))
    image, mask = spec.generate(np.random.default_rng(content_seq), height, width)
    return image, mask


def _request(spec: DomainSpec, counts: dict[str, int], size: int, seed: int, square: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "domain": spec.name,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "square": square,
        "counts": counts,
        "mode": spec.mode,
        "num_classes": spec.num_classes,
        "imitates": spec.imitates,
        "metric": spec.metric,
    }
    return json.loads(json.dumps(info))


def write_dataset(
    domain: str,
    out_dir: str | Path,
    *,
    train: int = 200,
    val: int = 50,
    test: int = 100,
    size: int = 128,
    seed: int = 0,
    square: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a domain's train/val/test splits as PNGs under ``out_dir`` (atomically) and return ``out_dir``.

    An ``out_dir`` already holding the same dataset (same ``dataset.json``) is reused as it is; one holding
    anything else is replaced only with ``overwrite=True``. The same arguments give the same files.

    Args:
        domain: a key of ``DOMAINS``.
        out_dir: dataset directory to create.
        train: number of training samples.
        val: number of validation samples.
        test: number of test samples.
        size: nominal image side in pixels (sides vary within +-20% unless ``square``).
        seed: dataset seed.
        square: force ``size x size`` images.
        overwrite: regenerate even if ``out_dir`` exists.

    >>> import tempfile
    >>> root = write_dataset("leaf", Path(tempfile.mkdtemp()) / "leaf", train=2, val=1, test=1, size=32)
    >>> sorted(p.name for p in (root / "train" / "images").iterdir())
    ['00000.png', '00001.png']
    """
    spec = _spec(domain)
    counts = {"train": train, "val": val, "test": test}
    for split, count in counts.items():
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"{split} must be a non-negative integer count, got {count!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    info = _request(spec, {k: int(v) for k, v in counts.items()}, int(size), int(seed), bool(square))
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        meta = out_dir / "dataset.json"
        try:
            existing = json.loads(meta.read_text())
        except (OSError, ValueError):
            existing = None
        if isinstance(existing, dict) and {k: v for k, v in existing.items() if k != "pixels_sha256"} == info:
            return out_dir
        raise FileExistsError(
            f"{out_dir} exists and does not hold this dataset ({meta.name} differs or is missing); "
            "pass overwrite=True to replace it"
        )
    digest = hashlib.sha256()
    with atomic_dir(out_dir, "dataset") as tmp:
        for split, count in counts.items():
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "masks").mkdir()
            for i in range(count):
                image, mask = sample(domain, i, split=split, size=size, seed=seed, square=square)
                if spec.mode == "instances":
                    mask = mask.astype(np.uint16)  # 16-bit PNG whatever the count of ids
                digest.update(f"{split}/{i}:{mask.shape}".encode() + _le_bytes(image) + _le_bytes(mask))
                # uint16 (h, w) arrays become 16-bit grey PNGs (Pillow's "I;16"), uint8 (h, w) 8-bit ones ("L")
                Image.fromarray(image).save(tmp / split / "images" / f"{i:05d}.png", compress_level=6)
                Image.fromarray(mask).save(tmp / split / "masks" / f"{i:05d}.png", compress_level=6)
        if spec.mode != "binary":
            write_json(tmp / "classes.json", list(spec.class_names))
        write_json(tmp / "dataset.json", {**info, "pixels_sha256": digest.hexdigest()})
    return out_dir


def _le_bytes(array: np.ndarray) -> bytes:
    """The array's bytes in little-endian order (the same digest on any machine for 16-bit samples)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def mask_to_rgb(mask: np.ndarray, mode: str) -> np.ndarray:
    """A viewable RGB rendering of a mask: grey levels for binary masks, a fixed colour per class id otherwise.

    Instance ids cycle through the colours, never black, so every object shows.

    >>> mask_to_rgb(np.array([[0, 2]], np.uint8), "multiclass")[0, 1].tolist()
    [60, 180, 75]
    >>> mask_to_rgb(np.array([[0, 12]], np.uint16), "instances")[0, 1].tolist()
    [230, 25, 75]
    """
    if mode == "binary":
        return np.repeat(mask[..., None], 3, axis=-1)
    if mode == "instances":
        ids = mask.astype(np.int64)
        return _PREVIEW_COLOURS[np.where(ids > 0, 1 + (ids - 1) % (len(_PREVIEW_COLOURS) - 1), 0)]
    return _PREVIEW_COLOURS[mask % len(_PREVIEW_COLOURS)]


def _viewable(image: np.ndarray) -> np.ndarray:
    """uint8 RGB of a sample image: 8-bit RGB as it is, others (8- or 16-bit grey) read as convlora reads files."""
    if image.dtype == np.uint8 and image.ndim == 3:
        return image
    from ..data.decode import to_rgb8  # the data package loads torch: only when a preview needs it

    return to_rgb8(image)


def preview_grid(domain: str, n: int = 8, seed: int = 0, *, size: int = 128, columns: int = 4) -> np.ndarray:
    """A uint8 picture of ``n`` training samples of ``domain``, each shown as image | mask, ``columns`` per row.

    Args:
        domain: a key of ``DOMAINS``.
        n: number of samples.
        seed: dataset seed.
        size: side of each (square) sample.
        columns: samples per row.

    >>> preview_grid("skin", n=2, size=32, columns=2).shape
    (32, 130, 3)
    """
    spec = _spec(domain)
    if n < 1 or columns < 1:
        raise ValueError(f"n and columns must be positive, got n={n}, columns={columns}")
    gap = 2
    tiles = []
    for i in range(n):
        image, mask = sample(domain, i, size=size, seed=seed, square=True)
        tiles.append(np.concatenate([_viewable(image), mask_to_rgb(mask, spec.mode)], axis=1))
    tile_h, tile_w = size, 2 * size
    rows = -(-n // columns)
    cols = min(columns, n)
    grid = np.full((rows * (tile_h + gap) - gap, cols * (tile_w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (tile_h + gap) : r * (tile_h + gap) + tile_h, c * (tile_w + gap) : c * (tile_w + gap) + tile_w] = tile
    return grid
