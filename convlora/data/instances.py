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


def instance_labels(mask: np.ndarray) -> np.ndarray:
    """An instance map as training labels: ids renumbered 1..n with 255 skipped, 255 = ignore (int64).

    Training pads and marks ignored pixels with 255 (convlora's ignore value), so no object may keep that id:
    ids are renumbered in ascending order and every one from 255 on moves up by one. Ignored pixels of an
    8-bit map (255) stay 255. The numbering carries no meaning (the instance targets do not depend on it).

    Args:
        mask: ``(h, w)`` ids as :func:`~convlora.data.read_mask` returns them.

    >>> instance_labels(np.array([[0, 40, 255], [7, 40, 0]], np.uint8)).tolist()
    [[0, 2, 255], [1, 2, 0]]
    """
    ids = instance_ids(mask)
    labels = np.zeros(mask.shape, np.int64)
    if ids.size:
        order = np.searchsorted(ids, mask)  # position of each pixel's id among the object ids
        inside = np.isin(mask, ids)
        numbers = np.arange(1, ids.size + 1)
        numbers[numbers >= IGNORE_INDEX] += 1
        labels[inside] = numbers[order[inside]]
    if mask.dtype == np.uint8:
        labels[mask == IGNORE_INDEX] = IGNORE_INDEX
    return labels


def check_instance_masks(masks: Sequence[np.ndarray], source: str) -> None:
    """Refuse masks that hold at most one object id each (binary masks) for instance training.

    Args:
        masks: a sample of the dataset's masks as :func:`~convlora.data.read_mask` returns them.
        source: the dataset, for the message.

    >>> check_instance_masks([np.array([[0, 1, 2]], np.uint16)], "data")
    """
    counts = [int(instance_ids(mask).size) for mask in masks]
    if counts and max(counts) <= 1:
        raise ValueError(
            f"{source}: --mode instances needs masks holding one id per object, but every mask read holds at most "
            f"one object id ({len(counts)} masks: binary masks); train them with --mode binary, or label each "
            "object with its own id (16-bit PNG/TIFF label images)"
        )
