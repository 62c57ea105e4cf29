"""Automatic instance segmentation with the trained decoder ("AIS"): the head's maps at the image's size, then ids.

One pass of the image encoder and the instance head gives three maps (foreground, centre, boundary); the seeded
watershed of :func:`~convlora.instances.decoder.ids_from_maps` turns them into one id per object. No prompts
are decoded, which is why AIS costs a fraction of automatic mask generation's time. Large images are
segmented by blending the maps of overlapping windows (``Segmenter.predict_instances(..., tile=...)``) and
running the watershed once on the whole map, so an object crossing a window border stays one object.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..models.processing import SAM_INPUT, InputFormat, postprocess_masks, preprocess
from .amg import GeneratedMasks
from .decoder import ids_from_maps
from .model import InstanceSettings, instance_logits


@torch.no_grad()
def instance_map_logits(
    model: nn.Module,
    pixels: np.ndarray,
    image_size: int,
    input_format: InputFormat = SAM_INPUT,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The instance decoder's logits ``(3, h, w)`` of one image, at its original size (on the CPU).

    Args:
        model: a model with an instance decoder.
        pixels: uint8 ``(h, w, 3)`` RGB.
        image_size: the model's input size.
        input_format: the model family's normalisation and resizing.
        device: where to run (default: the model's).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.instances.model import InstanceSettings, install_instance_head
    >>> sam = random_sam(tiny_sam_config())
    >>> _ = install_instance_head(sam, InstanceSettings(hidden_channels=8))
    >>> instance_map_logits(sam, np.zeros((30, 50, 3), np.uint8), 64).shape
    torch.Size([3, 30, 50])
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pixel_values, info = preprocess(pixels, image_size, input_format)
    logits = instance_logits(model, pixel_values[None].to(device)).float().cpu()  # (1, 3, s, s)
    return postprocess_masks(logits, info)[0]


def objects_from_ids(
    ids: np.ndarray,
    scores: np.ndarray | None = None,
    points: np.ndarray | None = None,
    settings: dict | None = None,
) -> GeneratedMasks:
    """The objects of an id map as :class:`~convlora.instances.amg.GeneratedMasks`, in id order (row i - 1: id i).

    Args:
        ids: int ``(h, w)`` ids ``1..n`` (renumbered, no gaps), 0 = background.
        scores: ``(n,)`` confidence of each object (ones when ``None``).
        points: ``(n, 2)`` ``(x, y)`` point of each (its box centre when ``None``).
        settings: what made them (recorded with the result).

    >>> found = objects_from_ids(np.array([[0, 1, 1], [2, 0, 0]]))
    >>> len(found), found.boxes.tolist(), bool((found.id_map() == [[0, 1, 1], [2, 0, 0]]).all())
    (2, [[1, 0, 2, 0], [0, 1, 0, 1]], True)
    """
    ids = np.asarray(ids)
    count = int(ids.max()) if ids.size else 0
    height, width = ids.shape
    boxes = np.zeros((count, 4), np.int64)
    for index, box in enumerate(ndimage.find_objects(ids.astype(np.int64), max_label=count)):
        if box is not None:
            boxes[index] = [box[1].start, box[0].start, box[1].stop - 1, box[0].stop - 1]
    if points is None:
        points = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1).astype(np.float32)
    scores = np.ones(count, np.float32) if scores is None else np.asarray(scores, np.float32)
    masks = ids[None] == np.arange(1, count + 1)[:, None, None] if count else np.zeros((0, height, width), bool)
    return GeneratedMasks(
        masks=masks,
        scores=scores,
        stability=scores.copy(),
        boxes=boxes,
        points=np.asarray(points, np.float32).reshape(count, 2),
        crop_boxes=np.tile(np.array([[0, 0, width, height]], np.int64), (count, 1)),
        settings=dict(settings or {}),
    )


def ais_from_logits(
    logits: torch.Tensor, settings: InstanceSettings | None = None
) -> tuple[np.ndarray, GeneratedMasks]:
    """Ids and objects from the decoder's logits ``(3, h, w)`` at the image's size (whole or tiled).

    Each object's score is its mean foreground probability and its point the peak of the centre map inside
    it (the seed the watershed grew it from).

    Args:
        logits: ``(3, h, w)`` foreground, centre and boundary logits at the original size.
        settings: the watershed settings (defaults when ``None``).

    Returns:
        ``(ids, objects)``: int32 ``(h, w)`` ids 1..n and the objects in id order.

    >>> ids, found = ais_from_logits(torch.full((3, 20, 20), -5.0))
    >>> int(ids.max()), len(found)
    (0, 0)
    """
    settings = settings or InstanceSettings()
    maps = torch.sigmoid(logits.float()).numpy()
    ids = ids_from_maps(*maps, **settings.watershed())
    count = int(ids.max())
    index = np.arange(1, count + 1)
    scores = np.asarray(ndimage.mean(maps[0], ids, index), np.float32) if count else np.zeros(0, np.float32)
    peaks = ndimage.maximum_position(maps[1], ids, index) if count else []
    points = np.array([[x, y] for y, x in peaks], np.float32).reshape(count, 2)
    return ids, objects_from_ids(ids, scores, points, {"method": "ais", **settings.to_dict()})
