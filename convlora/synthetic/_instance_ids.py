"""Instance-id maps shared by the instance domains (nuclei, cells): each id one 4-connected region, numbered 1..n."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def tidy_ids(ids: np.ndarray, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Make each id one 4-connected region of at least ``min_area`` pixels, renumbered 1..n in drawing order.

    A stray piece (an id cut in two by an object on top of it, a sliver left at the border) joins the
    neighbouring id it touches most, or the background when it touches none.

    Args:
        ids: integer ``(h, w)`` map, 0 = background, objects by the order they were drawn.
        min_area: pixels an id needs to keep its own region.

    Returns:
        The new uint16 ids and the uint16 lookup from old ids to new ones (0: gone; ids above the
        largest one kept lie past its end).

    >>> ids, lookup = tidy_ids(np.array([[0, 5, 5], [7, 0, 5]]), min_area=2)  # id 7 is too small
    >>> ids.tolist(), int(lookup[5]), lookup.size
    ([[0, 1, 1], [0, 0, 1]], 1, 6)
    """
    ids = ids.copy()
    for attempt in range(4):
        changed = False
        for index, box in enumerate(ndimage.find_objects(ids), start=1):
            if box is None:
                continue
            box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
            part = ids[box]  # a view: edits land in ids
            pieces, count = ndimage.label(part == index)
            sizes = np.bincount(pieces.ravel())[1:]
            keep = int(sizes.argmax()) + 1 if sizes.max() >= min_area else 0
            for piece_id in range(1, count + 1):
                if piece_id == keep:
                    continue
                piece = pieces == piece_id
                around = part[ndimage.binary_dilation(piece) & ~piece]
                around = around[(around != 0) & (around != index)]
                last = attempt == 3  # a piece bounced between neighbours: give it to the background
                part[piece] = np.bincount(around).argmax() if around.size and not last else 0
                changed = True
        if not changed:
            break
    present = np.unique(ids)[1:]
    lookup = np.zeros(int(ids.max()) + 1, np.uint16)
    lookup[present] = np.arange(1, present.size + 1)
    return lookup[ids], lookup
