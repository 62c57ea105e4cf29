"""Writing instance results as other tools read them: an id image, and COCO-style annotations with RLE masks.

The id image is a 16-bit PNG (what microscopy label tools such as napari, QuPath and CellProfiler read), or a
32-bit TIFF when there are more than 65,535 objects. The annotations follow COCO's result format (one entry
per object: ``segmentation`` as compressed RLE from pycocotools, ``bbox`` as ``[x, y, width, height]``,
``area``, ``score``), with SAM's ``predicted_iou``, ``stability_score`` and ``point_coords`` as in SAM's own
automatic mask generator output.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._io import atomic_file

# ids above this do not fit a 16-bit PNG
MAX_PNG_ID = 65535


def save_id_map(ids: np.ndarray, path_stem: str | Path) -> Path:
    """Write an instance-id map atomically: ``STEM.png`` (16-bit) or, above 65,535 objects, ``STEM.tif`` (32-bit).

    Args:
        ids: ``(h, w)`` non-negative integer ids, 0 = background.
        path_stem: the destination without its extension.

    Returns:
        The file written.

    >>> import tempfile
    >>> save_id_map(np.array([[0, 300]]), Path(tempfile.mkdtemp()) / "ids").suffix
    '.png'
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or (ids.size and ids.min() < 0):
        raise ValueError(f"ids must be a (h, w) map of non-negative integers, got dtype {ids.dtype}, shape {ids.shape}")
    stem = Path(path_stem)
    if ids.size == 0 or ids.max() <= MAX_PNG_ID:
        path = stem.with_name(stem.name + ".png")
        with atomic_file(path) as handle:
            Image.fromarray(ids.astype(np.uint16)).save(handle, format="PNG")
        return path
    import tifffile

    path = stem.with_name(stem.name + ".tif")
    buffer = io.BytesIO()  # tifffile wants a named file; the atomic handle is a bare descriptor
    tifffile.imwrite(buffer, ids.astype(np.uint32), compression="zlib")
    with atomic_file(path) as handle:
        handle.write(buffer.getvalue())
    return path


def coco_annotations(
    masks: np.ndarray,
    scores: np.ndarray,
    *,
    image_id: int | str = 0,
    category_id: int = 1,
    extra: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """COCO result entries of bool masks ``(n, h, w)``: compressed RLE, box ``[x, y, w, h]``, area and score.

    Args:
        masks: bool ``(n, h, w)``.
        scores: ``(n,)`` confidence of each.
        image_id: the image's id in the COCO file.
        category_id: the category of every mask.
        extra: more per-object values to record (name -> ``(n, ...)`` array), e.g. ``stability_score``.

    >>> entry = coco_annotations(np.eye(3, dtype=bool)[None], np.array([0.9]))[0]
    >>> entry["bbox"], entry["area"], entry["segmentation"]["size"]
    ([0.0, 0.0, 3.0, 3.0], 3, [3, 3])
    """
    from pycocotools import mask as coco_mask

    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, h, w), got shape {masks.shape}")
    entries = []
    for index, mask in enumerate(masks):
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        entry: dict[str, Any] = {
            "id": index + 1,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(coco_mask.area(rle)),
            "bbox": [float(v) for v in coco_mask.toBbox(rle)],
            "score": float(scores[index]),
        }
        for name, values in (extra or {}).items():
            value = np.asarray(values[index])
            entry[name] = value.tolist() if value.ndim else float(value)
        entries.append(entry)
    return entries


def decode_annotation(entry: dict[str, Any]) -> np.ndarray:
    """The bool mask of one COCO entry written by :func:`coco_annotations` (or any compressed-RLE entry).

    >>> mask = np.eye(3, dtype=bool)
    >>> bool((decode_annotation(coco_annotations(mask[None], np.array([1.0]))[0]) == mask).all())
    True
    """
    from pycocotools import mask as coco_mask

    rle = dict(entry["segmentation"])
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return coco_mask.decode(rle).astype(bool)
