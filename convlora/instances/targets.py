"""Training targets of the trained instance decoder: foreground, centre and boundary maps from an id map.

An instance map cannot be learned pixel by pixel (ids are arbitrary), so the decoder learns three maps
that do not depend on the numbering, and a seeded watershed turns them back into objects
(:func:`convlora.instances.decoder.ids_from_maps`). Per object, with ``edt`` the Euclidean distance of each of
its pixels to the nearest pixel outside it (``scipy.ndimage.distance_transform_edt``) and ``R`` its maximum
(the radius of the largest disc inside the object, in pixels):

- channel 0, **foreground**: 1 on every object pixel, 0 elsewhere;
- channel 1, **centre**: ``max(0, 1 - d / R)`` with ``d`` the distance to the object's deepest pixel (the
  maximum of ``edt``; among ties the one nearest their mean, so it always lies in the object). It is 1 at
  that pixel and reaches 0 at the nearest pixel outside, so its support is the largest disc inside the
  object: the centres of touching objects never touch, whatever their shapes;
- channel 2, **boundary**: ``(edt - 1) / (R - 1)``, 0 on the object's edge pixels (those with an outside
  4-neighbour), 1 on its deepest pixels; 0 everywhere for objects at most two pixels thick (``R = 1``).

Every object is measured on its own bounding box grown by one pixel, so a touching neighbour counts as
outside: the pixels along a shared edge are edge pixels (boundary 0) of **both** objects. The image border
is not a boundary (the object goes on beyond what is seen), so an object cut by the border keeps high values
there; an object covering the whole image has no boundary in view, and both its maps are 1. Outside every
object all three maps are 0. In 8-bit maps 255 marks ignored pixels (convlora's convention): they belong to
no object, all maps are 0 there and :func:`target_weight` gives them weight 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..models.processing import IGNORE_INDEX


def _ids(ids: np.ndarray) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 2:
        raise ValueError(f"ids has shape {array.shape}, expected an (h, w) instance-id map")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"ids has dtype {array.dtype}, expected integer object ids")
    if array.size and array.min() < 0:
        raise ValueError(f"ids holds negative values (minimum {array.min()}), expected 0 = background and ids > 0")
    return array


def _ignored(ids: np.ndarray) -> np.ndarray:
    if ids.dtype == np.uint8:
        return ids == IGNORE_INDEX
    return np.zeros(ids.shape, dtype=bool)


def target_weight(ids: np.ndarray) -> np.ndarray:
    """Loss weight ``(h, w)`` float32 of an id map: 0 on ignored pixels (255 in 8-bit maps), 1 elsewhere.

    Args:
        ids: ``(h, w)`` integer object ids, 0 = background.

    >>> target_weight(np.array([[0, 3, 255]], np.uint8)).tolist()
    [[1.0, 1.0, 0.0]]
    """
    return (~_ignored(_ids(ids))).astype(np.float32)


def instance_targets(ids: np.ndarray) -> np.ndarray:
    """The decoder's three target maps of an id map (defined in the module docstring).

    Args:
        ids: ``(h, w)`` integer object ids (numpy; any non-negative integer type), 0 = background; in uint8
            maps 255 = ignore.

    Returns:
        float32 ``(3, h, w)`` in [0, 1]: foreground, centre, boundary.

    >>> disc = (np.hypot(*np.mgrid[-3:4, -3:4]) < 3).astype(np.int64)  # radius-3 disc centred at (3, 3)
    >>> maps = instance_targets(disc)
    >>> maps[:, 3, 3].tolist(), maps[:, 3, 1].tolist()  # centre pixel; an edge pixel, 2 pixels left of it
    ([1.0, 1.0, 1.0], [1.0, 0.3333333432674408, 0.0])
    """
    array = _ids(ids)
    objects = np.where(_ignored(array), 0, array)
    height, width = objects.shape
    maps = np.zeros((3, height, width), dtype=np.float32)
    values, labels = np.unique(objects, return_inverse=True)
    labels = labels.reshape(objects.shape) + int(values.size == 0 or values[0] != 0)  # 1..n, 0 = background
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # one pixel beyond the box on each side the image allows: the ring is outside, so the exact distance
        # to the nearest outside pixel is found within the crop (the image border itself is no boundary)
        grown = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, size)) for s, size in zip(box, (height, width), strict=True)
        )
        inside = labels[grown] == index  # (y, x) of the crop
        maps[0][grown][inside] = 1.0
        if inside.all():  # the object covers the whole image
            maps[1][grown][inside] = maps[2][grown][inside] = 1.0
            continue
        depth = ndimage.distance_transform_edt(inside)
        radius = float(depth.max())
        deepest = np.argwhere(depth == radius)
        centre = deepest[np.argmin(((deepest - deepest.mean(axis=0)) ** 2).sum(axis=1))]
        rows, cols = np.ogrid[: inside.shape[0], : inside.shape[1]]
        distance = np.hypot(rows - centre[0], cols - centre[1])
        maps[1][grown][inside] = np.clip(1.0 - distance / radius, 0.0, 1.0)[inside]
        if radius > 1.0:
            maps[2][grown][inside] = ((depth - 1.0) / (radius - 1.0))[inside]
    return maps
