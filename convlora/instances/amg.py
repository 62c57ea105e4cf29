"""Automatic mask generation: every object of an image from a grid of point prompts, on any model convlora loads.

SAM's "segment everything" (Kirillov et al., 2023), written for convlora's prompt path so that it runs on
vanilla SAM, SAM-HQ, SAM 2 and the SAM 3 tracker, on an adapter (Conv-LoRA, LoRA) and on a merged model:

1. the image (or each crop of it) goes through the image encoder **once**;
2. a regular grid of single-point prompts is decoded in batches, three masks per point (a single point is
   ambiguous: part, object, whole);
3. masks are kept when the model's own IoU estimate and their stability (how little the mask changes when
   the logit threshold moves) are high enough;
4. duplicates are removed by non-maximum suppression on boxes (plain torch, no torchvision), within each crop
   and then across crops, preferring masks from smaller crops, which see small objects at a higher resolution;
5. optionally, small islands and holes are cleaned up and the survivors suppressed once more.

The parameters carry SAM's names (:class:`AmgConfig`). No code of segment-anything is used.

>>> from convlora.models import random_sam, tiny_sam_config
>>> found = generate_masks(random_sam(tiny_sam_config()), np.zeros((40, 50, 3), np.uint8), AmgConfig(points_per_side=2,
...                        pred_iou_thresh=0.0, stability_score_thresh=0.0), image_size=64)
>>> found.id_map().shape
(40, 50)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..data.prompts import Prompts
from ..models import family_of
from ..models.processing import ResizeInfo, postprocess_masks, preprocess
from ..prompting import decode_prompts, encode_images, prompt_tensors, to_input_frame


@dataclass
class AmgConfig:
    """Settings of :func:`generate_masks`, under the names SAM's automatic mask generator uses.

    Args:
        points_per_side: the point grid has ``points_per_side ** 2`` points over the whole image (and over each
            crop, divided by ``crop_n_points_downscale_factor`` per crop layer). More points find smaller
            objects and cost decoder time linearly; the image encoder runs once per crop regardless.
        points_per_batch: points decoded together; bounds memory (each gives three low-resolution masks).
        pred_iou_thresh: keep masks whose predicted IoU (the model's own quality estimate) is at least this.
        stability_score_thresh: keep masks whose stability score is at least this: the IoU between the mask
            thresholded at ``+stability_score_offset`` and at ``-stability_score_offset`` logits. Low for
            blurry, uncertain masks.
        stability_score_offset: the logit offset of the stability score.
        box_nms_thresh: within a crop, of two masks whose boxes overlap by more than this IoU, keep the one with
            the higher predicted IoU.
        crop_n_layers: 0 = the whole image only; ``n`` adds layers of 2x2, 4x4, ... overlapping crops, each
            encoded at the model's full input size, for small objects in large images.
        crop_nms_thresh: box IoU above which masks from different crops are duplicates (the one from the
            smaller crop is kept).
        crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the image's shorter side at layer 1.
        crop_n_points_downscale_factor: points per side are divided by this at every crop layer.
        min_mask_region_area: remove islands and fill holes smaller than this many pixels (0: off), then
            suppress duplicates again.
        multimask: three masks per point (SAM's choice for single points); ``False``: the single-mask output.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    multimask: bool = True

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("crop_n_layers", "min_mask_region_area"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio!r}")
        if self.stability_score_offset <= 0:
            raise ValueError(f"stability_score_offset must be positive, got {self.stability_score_offset!r}")


@dataclass
class GeneratedMasks:
    """The objects :func:`generate_masks` found in one image, best first.

    Args:
        masks: bool ``(n, h, w)``.
        scores: the model's predicted IoU of each ``(n,)``.
        stability: stability score of each ``(n,)``.
        boxes: ``(n, 4)`` ``x0, y0, x1, y1`` (inclusive pixel bounds).
        points: ``(n, 2)`` the ``(x, y)`` point prompt each came from.
        crop_boxes: ``(n, 4)`` the crop each was found in.
    """

    masks: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def id_map(self) -> np.ndarray:
        """One id per pixel (``0`` = no object): larger objects are painted first, so smaller ones stay visible.

        Ids are ``1..n`` in the order of :attr:`masks`; int32, so any number of objects fits.
        """
        height, width = self.masks.shape[1:]
        ids = np.zeros((height, width), dtype=np.int32)
        areas = self.masks.sum(axis=(1, 2))
        for index in np.argsort(-areas, kind="stable"):
            ids[self.masks[index]] = index + 1
        return ids


def point_grid(points_per_side: int) -> np.ndarray:
    """``(n * n, 2)`` points ``(x, y)`` in [0, 1], the centres of an ``n x n`` grid of cells.

    >>> point_grid(2).tolist()
    [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    """
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[tuple[int, ...], int]]:
    """The crops of an image: the whole image (layer 0), then ``2**k x 2**k`` overlapping crops per layer ``k``.

    Returns:
        ``[((x0, y0, x1, y1), layer), ...]`` with exclusive ends.

    >>> [box for box, layer in crop_boxes(100, 200, 1, 0.0)]
    [(0, 0, 200, 100), (0, 0, 100, 50), (100, 0, 200, 50), (0, 50, 100, 100), (100, 50, 200, 100)]
    """
    crops = [((0, 0, width, height), 0)]
    short = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        for row in range(per_side):
            for col in range(per_side):
                x0, y0 = (crop_w - overlap) * col, (crop_h - overlap) * row
                crops.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return crops


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU ``(n, m)`` of two sets of inclusive-bound boxes ``(x0, y0, x1, y1)``.

    >>> box_iou(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[0.0, 0, 9, 4], [20.0, 20, 29, 29]])).tolist()
    [[0.5, 0.0]]
    """
    area = lambda b: (b[:, 2] - b[:, 0] + 1).clamp(min=0) * (b[:, 3] - b[:, 1] + 1).clamp(min=0)
    top_left = torch.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    overlap = (bottom_right - top_left + 1).clamp(min=0).prod(dim=2)
    return overlap / (area(first)[:, None] + area(second)[None, :] - overlap).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the boxes kept, best score first.

    A box is dropped when its IoU with an already kept, better-scoring box exceeds ``threshold``.

    >>> nms(torch.tensor([[0.0, 0, 9, 9], [0.0, 0, 9, 8], [20.0, 20, 29, 29]]), torch.tensor([0.9, 0.8, 0.7]), 0.5)
    tensor([0, 2])
    """
    order = torch.argsort(scores, descending=True, stable=True)
    if order.numel() == 0:
        return order
    overlaps = box_iou(boxes[order], boxes[order]) > threshold
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    kept = []
    for position in range(order.numel()):
        if suppressed[position]:
            continue
        kept.append(position)
        suppressed |= overlaps[position]
    return order[torch.tensor(kept, dtype=torch.int64)]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive bounding boxes ``(n, 4)`` of bool masks ``(n, h, w)``; an empty mask gives ``[0, 0, 0, 0]``.

    >>> mask_boxes(torch.tensor([[[False, True, True], [False, False, True]]])).tolist()
    [[1, 0, 2, 1]]
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.int64)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (n, h), (n, w)

    def bounds(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(present.shape[1])
        first = torch.where(present, index, present.shape[1]).amin(dim=1)
        last = torch.where(present, index, -1).amax(dim=1)
        empty = ~present.any(dim=1)
        return first.masked_fill(empty, 0), last.masked_fill(empty, 0)

    x0, x1 = bounds(cols)
    y0, y1 = bounds(rows)
    return torch.stack([x0, y0, x1, y1], dim=1)


def stability_scores(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """IoU of each mask thresholded at ``+offset`` and at ``-offset`` logits (the first lies inside the second).

    >>> stability_scores(torch.tensor([[[3.0, 0.5, -3.0]]]), 1.0).tolist()
    [0.5]
    """
    inner = (logits > offset).flatten(1).sum(dim=1)
    outer = (logits > -offset).flatten(1).sum(dim=1)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float32))


def clean_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` without connected islands and with its holes of fewer than ``min_area`` pixels filled.

    >>> clean_regions(np.array([[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]], bool), 2).astype(int).tolist()
    [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    """
    cleaned = mask.copy()
    for target in (False, True):  # holes (background regions), then islands (foreground regions)
        labels, count = ndimage.label(cleaned == target)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = np.flatnonzero(sizes < min_area)
        small = small[small > 0]
        if target and len(small) == count:  # every island is small: keep the largest rather than nothing
            small = small[small != np.argmax(sizes[1:]) + 1]
        cleaned[np.isin(labels, small)] = not target
    return cleaned


@torch.no_grad()
def generate_masks(
    model: nn.Module,
    image: np.ndarray,
    config: AmgConfig | None = None,
    *,
    image_size: int | None = None,
    device: torch.device | str | None = None,
) -> GeneratedMasks:
    """Every object of ``image``: point-grid prompts, filtered by quality and stability, duplicates suppressed.

    Args:
        model: any promptable model convlora loads (vanilla SAM / SAM-HQ / SAM 2 / SAM 3 tracker, an adapter,
            a merged model); binary fine-tunes keep their prompt path.
        image: uint8 ``(h, w, 3)`` RGB.
        config: the settings; SAM's defaults when ``None``.
        image_size: the model's input size (default: the model family's own).
        device: where to run (default: the model's).

    Returns:
        The masks at the image's size, best predicted IoU first.

    >>> found = generate_masks(model, image, AmgConfig(points_per_side=16))  # doctest: +SKIP
    >>> found.id_map()  # (h, w) int32 object ids  # doctest: +SKIP
    """
    config = config or AmgConfig()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 (h, w, 3) RGB array, got dtype {image.dtype}, shape {image.shape}")
    family = family_of(model)
    size = image_size or family.image_size(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    height, width = image.shape[:2]
    found: list[dict[str, torch.Tensor]] = []
    for crop, layer in crop_boxes(height, width, config.crop_n_layers, config.crop_overlap_ratio):
        kept = _crop_masks(model, image, crop, layer, config, size, family.input_format, device)
        if kept["scores"].numel():
            found.append(kept)
    settings = {**asdict(config), "image_size": (height, width)}
    if not found:
        return _empty(height, width, settings)
    merged = {key: torch.cat([part[key] for part in found]) for key in found[0]}
    if config.crop_n_layers > 0:  # across crops: the mask from the smaller crop wins
        crop_area = (merged["crop_boxes"][:, 2] - merged["crop_boxes"][:, 0]) * (
            merged["crop_boxes"][:, 3] - merged["crop_boxes"][:, 1]
        )
        keep = nms(merged["boxes"].float(), 1.0 / crop_area.float(), config.crop_nms_thresh)
        merged = {key: value[keep] for key, value in merged.items()}
    masks = merged.pop("masks")
    if config.min_mask_region_area > 0:
        masks = torch.stack([torch.from_numpy(clean_regions(m.numpy(), config.min_mask_region_area)) for m in masks])
        merged["boxes"] = mask_boxes(masks)
        # cleaned masks are compared again, the more stable-looking (higher scored) first
        keep = nms(merged["boxes"].float(), merged["scores"], config.box_nms_thresh)
        merged, masks = {key: value[keep] for key, value in merged.items()}, masks[keep]
    order = torch.argsort(merged["scores"], descending=True, stable=True)
    return GeneratedMasks(
        masks=masks[order].numpy(),
        scores=merged["scores"][order].numpy(),
        stability=merged["stability"][order].numpy(),
        boxes=merged["boxes"][order].numpy(),
        points=merged["points"][order].numpy(),
        crop_boxes=merged["crop_boxes"][order].numpy(),
        settings=settings,
    )


def _crop_masks(
    model: nn.Module,
    image: np.ndarray,
    crop: tuple[int, ...],
    layer: int,
    config: AmgConfig,
    size: int,
    input_format: Any,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The masks of one crop that pass the filters and the crop's own suppression (masks at crop size)."""
    x0, y0, x1, y1 = crop
    pixels = image[y0:y1, x0:x1]
    pixel_values, info = preprocess(pixels, size, input_format)
    embeddings = encode_images(model, pixel_values[None].to(device))  # the encoder once per crop
    side = max(1, config.points_per_side // config.crop_n_points_downscale_factor**layer)
    crop_h, crop_w = pixels.shape[:2]
    grid = point_grid(side) * np.array([crop_w, crop_h])  # (p, 2) in the crop's pixels
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(grid), config.points_per_batch):
        points = grid[start : start + config.points_per_batch]
        parts.append(_decode_points(model, embeddings, points, info, config, device))
    kept = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    if kept["scores"].numel() == 0:
        return kept
    keep = nms(kept["boxes"].float(), kept["scores"], config.box_nms_thresh)
    kept = {key: value[keep] for key, value in kept.items()}
    offset = torch.tensor([x0, y0, x0, y0])
    kept["boxes"] = kept["boxes"] + offset
    kept["points"] = kept["points"] + offset[:2].float()
    kept["crop_boxes"] = torch.tensor(crop).repeat(len(keep), 1)
    height, width = image.shape[:2]
    if layer > 0:  # masks cut by the crop's edge (not the image's) are partial: other crops see them whole
        boxes = kept["boxes"]
        cut = ((boxes[:, 0] <= x0) & (x0 > 0)) | ((boxes[:, 1] <= y0) & (y0 > 0))
        cut |= ((boxes[:, 2] >= x1 - 1) & (x1 < width)) | ((boxes[:, 3] >= y1 - 1) & (y1 < height))
        kept = {key: value[~cut] for key, value in kept.items()}
    full = torch.zeros(len(kept["scores"]), height, width, dtype=torch.bool)
    full[:, y0:y1, x0:x1] = kept["masks"]
    kept["masks"] = full
    return kept


def _decode_points(
    model: nn.Module, embeddings: dict[str, Any], points: np.ndarray, info: ResizeInfo, config: AmgConfig, device: Any
) -> dict[str, torch.Tensor]:
    """One batch of single-point prompts: masks (at crop size) that pass the quality and stability filters."""
    count = len(points)
    prompts = Prompts(points=points[:, None].astype(np.float32), point_labels=np.ones((count, 1), np.int64))
    framed = prompt_tensors(to_input_frame(prompts, info), device)
    index = torch.zeros(count, dtype=torch.int64, device=device)
    low, iou = decode_prompts(model, embeddings, index, multimask=config.multimask, **framed)  # (p, m, s, s), (p, m)
    masks_per_point = low.shape[1]
    low, iou = low.flatten(0, 1).float().cpu(), iou.flatten().float().cpu()  # (p m, s, s), (p m)
    source = torch.as_tensor(points, dtype=torch.float32).repeat_interleave(masks_per_point, dim=0)
    keep = iou >= config.pred_iou_thresh
    if bool(keep.any()):
        logits = postprocess_masks(low[keep][:, None], info)[:, 0]  # (k, h, w) at the crop's size
    else:
        logits = torch.zeros(0, *info.original_size)
    stability = stability_scores(logits, config.stability_score_offset)
    stable = stability >= config.stability_score_thresh
    masks = logits[stable] > 0
    nonempty = masks.flatten(1).any(dim=1)
    masks = masks[nonempty]
    return {
        "masks": masks,
        "scores": iou[keep][stable][nonempty],
        "stability": stability[stable][nonempty],
        "boxes": mask_boxes(masks),
        "points": source[keep][stable][nonempty],
    }


def _empty(height: int, width: int, settings: dict[str, Any]) -> GeneratedMasks:
    nothing = np.zeros((0, 4), np.int64)
    return GeneratedMasks(
        masks=np.zeros((0, height, width), bool),
        scores=np.zeros(0, np.float32),
        stability=np.zeros(0, np.float32),
        boxes=nothing,
        points=np.zeros((0, 2), np.float32),
        crop_boxes=nothing,
        settings=settings,
    )
