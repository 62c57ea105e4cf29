"""Instance-label masks: one integer id per object (cell, nucleus, leaf ...), 0 = background.

Such maps are recognised by their shape rather than a flag: masks holding many ids, nearly every id one
connected region (class masks repeat a few ids in many pieces; interpolated binary masks smear values
along edges). In binary training they read as nonzero = foreground (encoding ``"instances"``); the
objects stay available per id through :func:`instance_masks`. In 8-bit masks 255 stays ignore (VOC's
``SegmentationObject`` borders); in 16/32-bit masks every nonzero value is an object.

>>> mask = np.array([[0, 1, 1], [2, 0, 3]], np.uint8)
>>> instance_ids(mask).tolist()
[1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .report import IGNORE_INDEX

SINGLE_REGION_SHARE = 0.9  # share of ids that must each be one connected region
MANY_IDS = 8  # ids in one mask from which a map reads as instances without a declared binary mode
MANY_IDS_BINARY = 3  # ... and with mode="binary" declared
MANY_DISTINCT = 32  # distinct ids over a dataset that also count as many (small tiles of a large label image)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def instance_ids(mask: np.ndarray) -> np.ndarray:
    """The object ids of an instance map, ascending (0 and, in 8-bit maps, 255 = ignore excluded).

    Args:
        mask: ``(h, w)`` ids as :func:`~convlora.data.read_mask` returns them.

    >>> instance_ids(np.array([[0, 4, 255], [4, 9, 0]], np.uint8)).tolist()
    [4, 9]
    """
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if mask.dtype == np.uint8:
        ids = ids[ids != IGNORE_INDEX]
    return ids


def instance_masks(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each object of an instance map as its own boolean mask.

    Args:
        mask: ``(h, w)`` ids as :func:`~convlora.data.read_mask` returns them.

    Returns:
        ``(ids, masks)``: int64 ``(n,)`` and bool ``(n, h, w)``, in ascending id order.

    >>> ids, masks = instance_masks(np.array([[0, 5, 5], [9, 0, 0]], np.uint16))
    >>> ids.tolist(), masks.sum(axis=(1, 2)).tolist()
    ([5, 9], [2, 1])
    """
    ids = instance_ids(mask).astype(np.int64)
    masks = np.stack([mask == i for i in ids]) if ids.size else np.zeros((0, *mask.shape), bool)
    return ids, masks


@dataclass(frozen=True)
class InstanceStats:
    """How instance-like one mask is.

    Args:
        ids: distinct nonzero values (255 excluded in 8-bit masks).
        single_region: how many of them form one connected region (8-connected).
    """

    ids: int
    single_region: int


def instance_stats(mask: np.ndarray) -> InstanceStats:
    """Count a mask's ids and how many of them are one connected region (cost: each id's bounding box).

    Args:
        mask: ``(h, w)`` ids as :func:`~convlora.data.read_mask` returns them.

    >>> instance_stats(np.array([[1, 0, 1], [2, 2, 0]], np.uint8))
    InstanceStats(ids=2, single_region=1)
    """
    ids = instance_ids(mask)
    if ids.size < 2:
        return InstanceStats(int(ids.size), int(ids.size))
    if mask.dtype.kind != "u" or mask.max() > 65535:
        values = np.searchsorted(np.concatenate([[0], ids]), mask)  # ids -> 1..n (others: anything, masked below)
        compact = np.where(np.isin(mask, ids), values, 0)
    else:
        lookup = np.zeros(int(mask.max()) + 1, np.int64)
        lookup[ids] = np.arange(1, ids.size + 1)
        compact = lookup[mask]
    single = 0
    for index, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        _, count = ndimage.label(compact[box] == index, structure=EIGHT_CONNECTED)
        single += count == 1
    return InstanceStats(int(ids.size), int(single))


def looks_like_instances(stats: Sequence[InstanceStats], distinct: int, *, binary: bool) -> bool:
    """Whether masks read as instance maps: many ids, nearly each one region.

    Args:
        stats: :func:`instance_stats` of (a sample of) the masks.
        distinct: distinct nonzero values over the whole dataset.
        binary: the task was declared binary (fewer ids suffice then).

    >>> looks_like_instances([InstanceStats(12, 12), InstanceStats(9, 8)], 20, binary=False)
    True
    >>> looks_like_instances([InstanceStats(3, 1)], 3, binary=True)
    False
    """
    multi = [s for s in stats if s.ids >= 2]
    if not multi:
        return False
    most = max(s.ids for s in multi)
    if most < (MANY_IDS_BINARY if binary else MANY_IDS) and distinct < MANY_DISTINCT:
        return False
    share = sum(s.single_region for s in multi) / sum(s.ids for s in multi)
    return share >= SINGLE_REGION_SHARE
