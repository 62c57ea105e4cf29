"""Instances of images far larger than the model input: overlapping windows, stitched into one id map.

Each window is segmented on its own (at the model's input size), so every window numbers its objects from 1
and objects near a window's edge are cut. :func:`stitch_instances` keeps, from each window, the objects whose
centre (the centroid of their pixels in that window) lies in the window's **core**: the part of the window
closer to it than to any neighbour (overlaps are split down the middle). Every object then comes from the one
window that holds its centre, whole as long as the overlap is at least its diameter, and ids are made unique
over the image. AMG and APG use it; AIS blends the decoder's maps across windows instead and runs one
watershed on the whole map, which keeps objects crossing a border whole at any overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels covering ``length`` with at least ``overlap`` shared.

    >>> tile_starts(1000, 400, 100)
    [0, 300, 600]
    >>> tile_starts(300, 400, 100)
    [0]
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # spread the windows evenly so the last one ends at the border
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def window_cores(length: int, tile: int, overlap: int) -> list[tuple[int, int, float, float]]:
    """Each window along one axis: ``(start, stop, core_start, core_stop)``, the cores tiling ``[0, length)``.

    >>> window_cores(10, 6, 2)
    [(0, 6, 0.0, 5.0), (4, 10, 5.0, 10.0)]
    """
    starts = tile_starts(length, tile, overlap)
    stops = [min(length, start + tile) for start in starts]
    cores = []
    for index, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        low = 0.0 if index == 0 else (start + stops[index - 1]) / 2
        high = float(length) if index == len(starts) - 1 else (starts[index + 1] + stop) / 2
        cores.append((start, stop, low, high))
    return cores


def stitch_instances(
    predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    pixels: np.ndarray,
    tile: int,
    overlap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids of a large image from overlapping windows (see the module docstring).

    Args:
        predict: window pixels ``(th, tw, 3)`` -> ``(ids (th, tw), scores (n,))``, ids ``1..n`` (score ``i - 1``
            belongs to id ``i``).
        pixels: uint8 ``(h, w, 3)`` image.
        tile: window side in pixels.
        overlap: pixels shared by neighbouring windows; at least the diameter of the largest object keeps
            every object whole.

    Returns:
        ``(ids, scores)``: int32 ``(h, w)`` ids ``1..n`` unique over the image, and ``(n,)`` scores.

    >>> image = np.zeros((10, 30, 3), np.uint8)
    >>> image[3:7, 12:18] = 255  # one object across the border of the two windows
    >>> def predict(crop):
    ...     ids = (crop[..., 0] > 0).astype(np.int32)
    ...     return ids, np.ones(int(ids.max()))
    >>> ids, scores = stitch_instances(predict, image, tile=20, overlap=10)
    >>> int(ids.max()), bool((ids[3:7, 12:18] == 1).all())
    (1, True)
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer (pixels), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer in [0, tile), got {overlap!r} for tile {tile}")
    height, width = pixels.shape[:2]
    ids = np.zeros((height, width), np.int32)
    scores: list[float] = []
    for top, bottom, row_low, row_high in window_cores(height, tile, overlap):
        for left, right, col_low, col_high in window_cores(width, tile, overlap):
            local, local_scores = predict(np.ascontiguousarray(pixels[top:bottom, left:right]))
            local = np.asarray(local, np.int64)
            count = int(local.max()) if local.size else 0
            if count == 0:
                continue
            centres = ndimage.center_of_mass(np.ones_like(local), local, np.arange(1, count + 1))
            boxes = ndimage.find_objects(local, max_label=count)
            region = ids[top:bottom, left:right]  # a view: writes go to the image's map
            for index, ((y, x), box) in enumerate(zip(centres, boxes, strict=True), start=1):
                if box is None:  # an id without pixels
                    continue
                y, x = y + top + 0.5, x + left + 0.5  # pixel centres, in image coordinates
                if not (row_low <= y < row_high and col_low <= x < col_high):
                    continue  # another window holds this object's centre
                free = (local[box] == index) & (region[box] == 0)
                if free.any():
                    scores.append(float(local_scores[index - 1]))
                    region[box][free] = len(scores)
    return ids, np.asarray(scores, np.float32)
