"""Automatic prompt generation ("APG"): the trained decoder's objects as prompts to SAM's own prompted decoder.

AIS (:mod:`convlora.instances.ais`) finds the objects; APG then asks SAM about each one: its bounding box and
its seed point (the peak of the centre map, where the watershed started it) go to the prompt encoder and mask
decoder, on the image embedding the decoder already computed (the image encoder runs once). SAM's mask then
replaces the watershed's outline. Masks of neighbouring objects may overlap; :func:`resolve_overlaps` gives
each pixel to the object with the higher predicted IoU. A refined mask is not trusted when it misses its own
seed point, covers another object's seed point (two objects merged) or is smaller than ``min_size``: that
object keeps its watershed outline. Every seed point is then held by its own object only, so every seed stays
one object.

SAM's mask decoder is used as the model has it: training with ``--mode instances`` does not train it (no loss
reaches it), so APG refines with the base SAM's decoder on the adapted encoder's embedding.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..data.prompts import Prompts
from ..models.processing import SAM_INPUT, InputFormat, ResizeInfo, postprocess_masks, preprocess
from ..prompting import coarsest, decode_prompts, encode_images, prompt_tensors, to_input_frame
from .ais import ais_from_logits, objects_from_ids
from .amg import GeneratedMasks
from .model import InstanceSettings, instance_head

PROMPT_KINDS = ("box", "point", "box_point")


def seed_prompts(objects: GeneratedMasks, kind: str = "box_point") -> Prompts:
    """Prompts of the objects found by the watershed, in the image's pixels: their boxes and/or seed points.

    Args:
        objects: the objects (:func:`~convlora.instances.ais.ais_from_logits`).
        kind: ``"box"``, ``"point"`` or ``"box_point"`` (both).

    >>> from convlora.instances.ais import objects_from_ids
    >>> prompts = seed_prompts(objects_from_ids(np.array([[0, 1, 1], [0, 1, 1]])))
    >>> prompts.boxes.tolist(), prompts.points.tolist()
    ([[1.0, 0.0, 3.0, 2.0]], [[[1.5, 0.5]]])
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {list(PROMPT_KINDS)}, got {kind!r}")
    count = len(objects)
    # the box spans the object's pixels: inclusive bounds (x0, y0, x1, y1) -> pixel edges (x0, y0, x1 + 1, y1 + 1)
    boxes = (objects.boxes + np.array([0, 0, 1, 1])).astype(np.float32) if kind != "point" else None
    points = labels = None
    if kind != "box":
        points = objects.points.reshape(count, 1, 2).astype(np.float32)
        labels = np.ones((count, 1), np.int64)
    return Prompts(boxes, points, labels)


def resolve_overlaps(
    masks: Iterable[np.ndarray], scores: np.ndarray, shape: tuple[int, int], min_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One id map from overlapping masks: each pixel goes to the covering mask with the higher score.

    Args:
        masks: bool ``(h, w)`` masks in the order of ``scores`` (an iterable, so they need not all be in memory).
        scores: ``(n,)`` score of each mask (SAM's predicted IoU).
        shape: ``(h, w)``.
        min_size: objects left with fewer pixels after the overlaps are resolved are dropped.

    Returns:
        ``(ids, kept)``: int32 ids ``1..m`` and the index of the mask behind each id ``(m,)``.

    >>> first, second = np.zeros((1, 4), bool), np.zeros((1, 4), bool)
    >>> first[0, :3], second[0, 2:] = True, True
    >>> ids, kept = resolve_overlaps([first, second], np.array([0.9, 0.5]), (1, 4))
    >>> ids.tolist(), kept.tolist()
    ([[1, 1, 1, 2]], [0, 1])
    """
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="stable")  # ascending: the best is painted last and wins
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    owner = np.full(shape, -1, np.int64)  # the index of the mask that holds each pixel
    best = np.full(shape, -1, np.int64)  # the rank of that mask
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, bool)
        take = mask & (best < rank[index])
        owner[take], best[take] = index, rank[index]
    counts = np.bincount(owner[owner >= 0].ravel(), minlength=len(scores))
    kept = np.flatnonzero(counts >= min_size)
    lookup = np.zeros(len(scores) + 1, np.int32)
    lookup[kept + 1] = np.arange(1, len(kept) + 1)
    return lookup[owner + 1], kept


@torch.no_grad()
def refine_objects(
    model: nn.Module,
    embeddings: dict,
    info: ResizeInfo,
    objects: GeneratedMasks,
    *,
    kind: str = "box_point",
    min_size: int = 1,
    chunk: int = 64,
) -> tuple[np.ndarray, GeneratedMasks]:
    """SAM's prompted mask of each object (its box and seed point as prompts), overlaps resolved by predicted IoU.

    Args:
        model: the model whose mask decoder refines (and which made ``embeddings``).
        embeddings: :func:`~convlora.prompting.encode_images` of the image (one image).
        info: the image's :class:`~convlora.models.processing.ResizeInfo`.
        objects: the objects to refine (in the image's pixels), e.g. the watershed's.
        kind: the prompts, see :func:`seed_prompts`.
        min_size: a refined mask smaller than this (or missing its own seed point, or covering another's) is
            replaced by the object's own mask; objects left smaller after overlaps are resolved are dropped.
        chunk: prompts decoded together.

    Returns:
        ``(ids, refined)``: int32 ``(h, w)`` ids and the objects in id order, scored by SAM's predicted IoU.
    """
    count = len(objects)
    height, width = info.original_size
    if count == 0:
        return np.zeros((height, width), np.int32), objects_from_ids(np.zeros((height, width), np.int32))
    prompts = seed_prompts(objects, kind)
    device = coarsest(embeddings).device
    low_parts, score_parts = [], []
    for start in range(0, count, chunk):
        rows = slice(start, min(count, start + chunk))
        part = Prompts(*(None if v is None else v[rows] for v in (prompts.boxes, prompts.points, prompts.point_labels)))
        framed = prompt_tensors(to_input_frame(part, info), device)
        index = torch.zeros(len(part), dtype=torch.int64, device=device)
        low, iou = decode_prompts(model, embeddings, index, multimask=False, **framed)  # (c, 1, s, s), (c, 1)
        low_parts.append(low.float().cpu())
        score_parts.append(iou[:, 0].float().cpu())
    low, scores = torch.cat(low_parts), torch.cat(score_parts).numpy()
    seeds = np.clip(np.rint(objects.points).astype(np.int64), 0, [width - 1, height - 1])

    def masks() -> Iterable[np.ndarray]:
        for start in range(0, count, chunk):
            full = postprocess_masks(low[start : start + chunk], info)[:, 0] > 0  # (c, h, w)
            for offset, mask in enumerate(full.numpy()):
                index = start + offset
                covered = mask[seeds[:, 1], seeds[:, 0]]  # which objects' seed points the mask covers
                trusted = covered[index] and covered.sum() == 1 and mask.sum() >= min_size
                yield mask if trusted else objects.masks[index]

    ids, kept = resolve_overlaps(masks(), scores, (height, width), min_size)
    refined = objects_from_ids(ids, scores[kept], objects.points[kept], {**objects.settings, "method": "apg"})
    return ids, refined


@torch.no_grad()
def apg(
    model: nn.Module,
    pixels: np.ndarray,
    image_size: int,
    settings: InstanceSettings | None = None,
    *,
    input_format: InputFormat = SAM_INPUT,
    device: torch.device | str | None = None,
    kind: str = "box_point",
) -> tuple[np.ndarray, GeneratedMasks]:
    """APG on one image: the decoder's objects, each refined by SAM's prompted decoder (see the module docstring).

    Args:
        model: a model with an instance decoder.
        pixels: uint8 ``(h, w, 3)`` RGB.
        image_size: the model's input size.
        settings: the watershed settings (defaults when ``None``).
        input_format: the model family's normalisation and resizing.
        device: where to run (default: the model's).
        kind: the prompts, see :func:`seed_prompts`.

    Returns:
        ``(ids, objects)``: int32 ``(h, w)`` ids and the objects in id order.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.instances.model import install_instance_head
    >>> sam = random_sam(tiny_sam_config())
    >>> settings = install_instance_head(sam, InstanceSettings(hidden_channels=8))
    >>> apg(sam, np.zeros((30, 40, 3), np.uint8), 64, settings)[0].shape
    (30, 40)
    """
    settings = settings or InstanceSettings()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pixel_values, info = preprocess(pixels, image_size, input_format)
    embeddings = encode_images(model, pixel_values[None].to(device))  # once, for the head and every prompt
    logits = instance_head(model)(coarsest(embeddings), pixel_values[None].to(device)).float().cpu()
    _, objects = ais_from_logits(postprocess_masks(logits, info)[0], settings)
    return refine_objects(model, embeddings, info, objects, kind=kind, min_size=settings.min_size)
