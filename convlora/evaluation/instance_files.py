"""Instance metrics of any way of finding objects, over a labelled folder's files, with its time per image.

``convlora evaluate --instances``, ``examples/nuclei.py`` and the instance benchmark score AIS, APG, AMG and the
connected components of a binary mask the same way: read each test image and its id map, call the way under
test on the image, match its ids against the true ones (:class:`~convlora.evaluation.InstanceMetrics`) and
time the call alone (reading and matching are not counted).

>>> found = score_instance_files(lambda image: ids_of(image), samples, reading)  # doctest: +SKIP
>>> found["msa"], found["seconds_per_image"]  # doctest: +SKIP
(0.38, 0.014)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data import check_dataset, read_image
from ..data.decode import read_mask
from ..data.prompts import IGNORE_INDEX
from .instances import InstanceMetrics


def read_true_ids(path: Any) -> tuple[np.ndarray, np.ndarray]:
    """A stored instance mask as ``(ids int64, ignore bool)``; in 8-bit masks 255 marks pixels to ignore.

    Args:
        path: the mask file (16-bit PNG/TIFF ids, or 8-bit with 255 = ignore).
    """
    stored = read_mask(path)
    ignore = stored == IGNORE_INDEX if stored.dtype == np.uint8 else np.zeros(stored.shape, bool)
    return np.where(ignore, 0, stored).astype(np.int64), ignore


def check_instance_masks(truths: Sequence[np.ndarray], where: Any) -> None:
    """Refuse masks that cannot be scored as instances: every one holds at most one object id.

    >>> check_instance_masks([np.array([[0, 1, 2]])], "data")
    """
    if truths and max(len(np.unique(truth[truth > 0])) for truth in truths) <= 1:
        raise ValueError(
            f"{where}: every mask holds at most one object id (binary masks?); instance metrics need masks with one "
            "id per object (16-bit PNG/TIFF label images); score binary masks without --instances"
        )


def held_out_samples(data: Any, reading: Any = None) -> tuple[list[Any], dict[str, Any]]:
    """The labelled samples of ``data``'s ``test`` split (of every split when it has none) and how images are read.

    Args:
        data: a labelled folder or CSV (instance-id masks; they are listed as binary masks, ids unchanged).
        reading: how images are read (a model's ``task.image_reading``); ``None``: inferred from the files.

    >>> samples, reading = held_out_samples("data/nuclei")  # doctest: +SKIP
    """
    report = check_dataset(data, mode="binary", num_classes=2, reading=reading)
    split = "test" if "test" in report.samples else None
    return [s for s in report.usable_samples(split) if s.mask is not None], report.image_reading


def score_instance_files(
    segment: Callable[[np.ndarray], np.ndarray], samples: Sequence[Any], reading: Any, *, where: Any = "data"
) -> dict[str, Any]:
    """Instance metrics of ``segment(image) -> ids`` over labelled samples, and seconds per image of the calls.

    Args:
        segment: the way under test: the image as :func:`~convlora.data.read_image` reads it -> ``(h, w)`` ids.
        samples: labelled samples (``.image`` and ``.mask`` paths), e.g. a dataset report's usable test samples.
        reading: how images are read (the model's ``task.image_reading``).
        where: the data's name in error messages.

    Returns:
        ``images``, every key of :meth:`InstanceMetrics.compute` and ``seconds_per_image``.
    """
    truths = [read_true_ids(sample.mask) for sample in samples]
    check_instance_masks([truth for truth, _ in truths], where)
    metrics, seconds = InstanceMetrics(), 0.0
    for sample, (truth, ignore) in zip(samples, truths, strict=True):
        image = read_image(sample.image, reading)
        started = time.perf_counter()
        ids = segment(image)
        seconds += time.perf_counter() - started
        metrics.update(truth, ids, ignore=ignore)
    return {"images": len(samples), **metrics.compute(), "seconds_per_image": seconds / max(1, len(samples))}
