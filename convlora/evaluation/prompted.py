"""Prompted evaluation: every ground-truth object prompted (prompts derived under a fixed seed), scored per object.

The base model scored with the same settings sees exactly the same prompts, which makes "vanilla vs
fine-tuned" comparisons fair. Prompts are decoded by :mod:`convlora.prompting`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.prompts import (
    IGNORE_INDEX,
    Objects,
    PromptConfig,
    Prompts,
    derive_prompts,
    find_objects,
)
from ..prompting import predict_prompts
from .metrics import build_metrics


def evaluation_prompts(
    labels: np.ndarray, config: PromptConfig, index: int, kind: str | None = None, object_kind: str = "binary"
) -> tuple[Objects, Prompts]:
    """The objects of one ground-truth label map (original resolution) and their evaluation prompts.

    Drawn from ``(config.seed, index)``: every model evaluated with the same settings gets the same prompts,
    which is what makes the base-vs-fine-tuned comparison fair. ``mixed`` evaluates boxes.

    Args:
        labels: ``(h, w)`` ground truth at the original resolution (255 = ignore).
        config: the prompt settings (``seed``, ``min_area``, points ...).
        index: the image's position in its dataset (part of the seed).
        kind: the prompt kind, if not ``config.kind``.
        object_kind: see :func:`~convlora.data.prompts.find_objects`.

    >>> labels = np.zeros((20, 20), np.int64)
    >>> labels[2:9, 3:15] = 1
    >>> evaluation_prompts(labels, PromptConfig(kind="box"), index=0)[1].boxes.tolist()
    [[3.0, 2.0, 14.0, 8.0]]
    """
    kind = kind or config.kind
    kind = "box" if kind == "mixed" else kind
    rng = np.random.default_rng([config.seed, int(index)])
    objects = find_objects(labels, object_kind, min_area=config.min_area, ignore_index=IGNORE_INDEX)
    if len(objects) == 0:
        return objects, Prompts()
    return objects, derive_prompts(objects, kind, config, rng, training=False, valid=labels != IGNORE_INDEX)


@torch.no_grad()
def evaluate_prompted(
    model: nn.Module,
    dataset: Any,
    config: PromptConfig,
    *,
    kind: str | None = None,
    object_kind: str = "binary",
    accelerator: Any | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Per-object IoU and Dice of a model prompted with prompts derived from the ground truth (fixed seed).

    Each labelled image is encoded once; its objects (every one, at the original resolution, at least
    ``config.min_area`` pixels) are prompted in the original pixel frame and scored at the original size.
    The base model scored with the same ``config`` sees exactly the same prompts. The task's own metrics
    (``iou``, ``dice``, ... or ``miou`` ...) score the union of the prompted masks against the whole ground
    truth (a pixel takes the class of its most confident object). Under several processes each evaluates
    every ``world_size``-th image and the sums are added up (every object counts once).

    Args:
        model: a binary fine-tune or a base SAM.
        dataset: a labelled ``SegmentationDataset`` (no augmentation).
        config: prompt settings (``seed``, ``min_area``, ``num_points``, ``num_negative`` ...).
        kind: the prompt kind, if not ``config.kind`` (``mixed`` evaluates boxes).
        object_kind: ``"binary"``, ``"instances"`` or ``"classes"``.
        accelerator: an ``accelerate.Accelerator`` when run under several processes.
        device: where to run (the accelerator's, else the model's device, by default).

    Returns:
        the task's metrics, ``object_iou``, ``object_dice`` (means over objects), ``objects`` and
        ``skipped_images`` (images without any object).

    >>> evaluate_prompted(model, test_dataset, PromptConfig(kind="box"))  # doctest: +SKIP
    {'object_iou': 0.73, 'object_dice': 0.84, 'objects': 18.0, 'skipped_images': 0.0}
    """
    was_training = model.training
    model.eval()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    device = torch.device(device)

    mode = getattr(dataset, "mode", None) or "binary"
    num_classes = int(getattr(dataset, "num_classes", 2))
    extra = {"class_names": list(dataset.class_names)} if mode == "multiclass" and dataset.class_names else {}
    metrics = build_metrics(mode, num_classes, **extra)
    sums = torch.zeros(4, dtype=torch.float64)  # iou sum, dice sum, objects, skipped images
    for index in range(rank, len(dataset), world):
        labels = dataset.original_mask(index)
        objects, prompts = evaluation_prompts(labels, config, index, kind, object_kind)
        if len(objects) == 0:
            sums[3] += 1
            empty = torch.zeros(0, *labels.shape)
            metrics.update(_image_logits(empty, objects.class_ids, mode, num_classes), torch.as_tensor(labels)[None])
            continue
        item = dataset[index]
        logits, _ = predict_prompts(model, item["pixel_values"].to(device), dataset.resize_info(index), prompts)
        metrics.update(_image_logits(logits, objects.class_ids, mode, num_classes), torch.as_tensor(labels)[None])
        valid = labels != IGNORE_INDEX
        for mask, target in zip((logits > 0).numpy(), objects.masks, strict=True):
            mask, target = mask & valid, target & valid
            inter, total = float((mask & target).sum()), float(mask.sum() + target.sum())
            union = total - inter
            sums[0] += inter / union if union else 1.0
            sums[1] += 2 * inter / total if total else 1.0
            sums[2] += 1
    state = metrics.state()
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        state = {k: accelerator.reduce(v.to(accelerator.device), reduction="sum").cpu() for k, v in state.items()}
        metrics.load_state(state)
    model.train(was_training)
    count = float(sums[2])
    return {
        **metrics.compute(),
        "object_iou": float(sums[0]) / count if count else float("nan"),
        "object_dice": float(sums[1]) / count if count else float("nan"),
        "objects": count,
        "skipped_images": float(sums[3]),
    }


# Logit of pixels no prompted mask claims: clearly background after the sigmoid or the arg-max.
_NOTHING = -20.0


def _image_logits(logits: torch.Tensor, class_ids: np.ndarray, mode: str, num_classes: int) -> torch.Tensor:
    """The task's logits ``(1, k, h, w)`` of one image from its prompted masks ``(n, h, w)``.

    Binary: the most confident mask at each pixel. Multi-class: class ``c`` holds the most confident mask of
    its objects, the background 0 (a pixel is background unless some mask says foreground).
    """
    height, width = logits.shape[-2:]
    if mode == "binary":
        best = logits.amax(dim=0) if logits.shape[0] else torch.full((height, width), _NOTHING)
        return best[None, None]
    channels = torch.full((num_classes, height, width), _NOTHING)
    channels[0] = 0.0
    for class_id in np.unique(class_ids):
        rows = torch.as_tensor(class_ids == class_id)
        channels[int(class_id)] = logits[rows].amax(dim=0)
    return channels[None]
