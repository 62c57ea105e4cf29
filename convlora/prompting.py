"""Prompts in, one mask per prompt out: SAM's image encoder once per image, then its prompt decoder.

SAM's design is kept: the image encoder runs once per image, and every prompt of that image reuses its
embedding through the (cheap) prompt encoder and mask decoder. Prompts are laid out one per decoder
batch row, ``(n, 1, ...)``, so each can carry its own mask prompt (the previous round's low-resolution
logits) in iterative correction. Used at inference (:class:`~convlora.inference.Segmenter`, ``predict``),
by evaluation and by the prompted training step alike; it needs nothing of the training engine.

>>> from convlora.models import random_sam, tiny_sam_config
>>> model = random_sam(tiny_sam_config())
>>> embeddings = encode_images(model, torch.randn(1, 3, 64, 64))
>>> logits, scores = decode_prompts(model, embeddings, torch.tensor([0, 0]), boxes=torch.tensor([[4.0, 4, 30, 30],
...                                 [10, 10, 50, 40]]))
>>> logits.shape, scores.shape
(torch.Size([2, 1, 32, 32]), torch.Size([2, 1]))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.prompts import Prompts
from .models import family_of, find_sam
from .models.processing import ResizeInfo, postprocess_masks
from .models.semantic import class_decoder_classes

ImageEmbeddings = dict[str, Any]


def check_promptable(model: nn.Module) -> nn.Module:
    """The SAM inside ``model`` if its mask decoder answers prompts with one mask each, else a clear error.

    Args:
        model: a SAM model, PEFT-wrapped or not; a multi-class fine-tune (class-query decoder) is refused.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> type(check_promptable(random_sam(tiny_sam_config()))).__name__
    'SamModel'
    """
    sam = find_sam(model)
    if class_decoder_classes(sam) is not None:
        raise ValueError(
            "this model has a multi-class (class-query) mask decoder, which gives one mask per class, not per "
            "prompt; prompt a binary fine-tune or the base SAM (Segmenter.from_pretrained('convlora-tiny'))"
        )
    return sam


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> ImageEmbeddings:
    """Run the image encoder once on ``(b, 3, S, S)``: the keyword arguments that replace ``pixel_values``.

    Adapters (LoRA, Conv-LoRA) live inside the encoder's layers, so they take part; gradients flow
    (unlike transformers' ``get_image_embeddings``, which runs without them).

    Args:
        model: a SAM model, PEFT-wrapped or not.
        pixel_values: preprocessed images.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> encode_images(random_sam(tiny_sam_config()), torch.zeros(2, 3, 64, 64))["image_embeddings"].shape
    torch.Size([2, 16, 8, 8])
    """
    sam = check_promptable(model)
    return family_of(sam).encode_image(sam, pixel_values)


def coarsest(embeddings: ImageEmbeddings) -> torch.Tensor:
    """The embedding the masks are predicted from (the last map of a SAM 2 / SAM 3 pyramid)."""
    image = embeddings["image_embeddings"]
    return image[-1] if isinstance(image, list) else image


def _select(image: torch.Tensor | list[torch.Tensor], index: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    return (
        [level.index_select(0, index) for level in image] if isinstance(image, list) else image.index_select(0, index)
    )


def decode_prompts(
    model: nn.Module,
    embeddings: ImageEmbeddings,
    image_index: torch.Tensor,
    *,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
    multimask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits and IoU estimates of ``n`` prompts on already encoded images.

    Args:
        model: the model that made ``embeddings``.
        embeddings: :func:`encode_images` of ``b`` images.
        image_index: int64 ``(n,)``, the image of each prompt.
        boxes: float ``(n, 4)`` ``(x0, y0, x1, y1)`` in the model's input frame (pixels of the ``S x S`` input).
        points: float ``(n, k, 2)`` ``(x, y)`` in the input frame.
        point_labels: int64 ``(n, k)``: 1, 0, or ``PAD_LABEL`` (ignored).
        mask_inputs: float ``(n, 1, s, s)`` previous low-resolution logits, as a dense prompt.
        multimask: SAM's three masks per prompt instead of one.

    Returns:
        logits ``(n, m, s, s)`` (``s`` = 4x the embedding grid: S/4 for SAM's 16-px patches) and IoU estimates
        ``(n, m)``, ``m`` = 3 with ``multimask`` else 1.
    """
    sam = check_promptable(model)
    image_index = image_index.to(coarsest(embeddings).device)
    inputs: dict[str, Any] = {
        "image_embeddings": _select(embeddings["image_embeddings"], image_index),
        "multimask_output": multimask,
    }
    if "intermediate_embeddings" in embeddings:
        inputs["intermediate_embeddings"] = [
            e.index_select(0, image_index) for e in embeddings["intermediate_embeddings"]
        ]
    if boxes is not None:
        inputs["input_boxes"] = boxes.float()[:, None]  # (n, 1, 4)
    if points is not None:
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
        inputs["input_points"] = points.float()[:, None]  # (n, 1, k, 2)
        inputs["input_labels"] = point_labels.long()[:, None]  # (n, 1, k)
    if mask_inputs is not None:
        inputs["input_masks"] = mask_inputs.float()
    output = sam(**inputs)
    return output.pred_masks[:, 0], output.iou_scores[:, 0]


def to_input_frame(prompts: Prompts, info: ResizeInfo) -> Prompts:
    """Prompts in an image's original pixels mapped into the model's input frame (the resize of ``info``).

    >>> info = ResizeInfo.fit((100, 200), 64)
    >>> to_input_frame(Prompts(boxes=np.array([[0.0, 0, 100, 50]])), info).boxes.tolist()
    [[0.0, 0.0, 32.0, 16.0]]
    """
    (height, width), (new_height, new_width) = info.original_size, info.resized_size
    scale = np.array([new_width / width, new_height / height], dtype=np.float64)
    boxes = None if prompts.boxes is None else (prompts.boxes * np.tile(scale, 2)).astype(np.float32)
    points = None if prompts.points is None else (prompts.points * scale).astype(np.float32)
    return Prompts(boxes, points, prompts.point_labels)


def _tensor(array: np.ndarray | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def prompt_tensors(prompts: Prompts, device: torch.device) -> dict[str, torch.Tensor | None]:
    """``boxes`` / ``points`` / ``point_labels`` of :func:`decode_prompts` from :class:`Prompts`.

    Args:
        prompts: prompts in the model's input frame (see :func:`to_input_frame`).
        device: where the tensors go.

    >>> prompt_tensors(Prompts(boxes=np.zeros((2, 4))), torch.device("cpu"))["boxes"].shape
    torch.Size([2, 4])
    """
    return {
        "boxes": _tensor(prompts.boxes, device, torch.float32),
        "points": _tensor(prompts.points, device, torch.float32),
        "point_labels": _tensor(prompts.point_labels, device, torch.int64),
    }


@torch.no_grad()
def predict_prompts(
    model: nn.Module,
    pixel_values: torch.Tensor,
    info: ResizeInfo,
    prompts: Prompts,
    *,
    multimask: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, h, w)`` at the original size and scores ``(n,)`` of ``n`` prompts on one image.

    The image is encoded once. With ``multimask`` (by default: for prompts that are a single point) SAM's
    three masks are predicted and the one with the highest IoU estimate is kept. All ``n`` masks are held
    at the original size: for thousands of prompts, use :func:`iter_predict_prompts`.

    Args:
        model: a SAM model (binary fine-tune or base).
        pixel_values: ``(3, S, S)`` preprocessed image.
        info: its :class:`ResizeInfo`.
        prompts: prompts in the image's original pixels.
        multimask: force SAM's three-mask output on or off.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.models.processing import preprocess
    >>> pixel_values, info = preprocess(np.zeros((30, 40, 3), np.uint8), 64)
    >>> logits, scores = predict_prompts(random_sam(tiny_sam_config()), pixel_values, info,
    ...                                  Prompts(points=np.array([[[10.0, 12.0]]]), point_labels=np.array([[1]])))
    >>> logits.shape, scores.shape
    (torch.Size([1, 30, 40]), torch.Size([1]))
    """
    height, width = info.original_size
    chunks = list(iter_predict_prompts(model, pixel_values, info, prompts, multimask=multimask))
    if not chunks:
        return torch.zeros(0, height, width), torch.zeros(0)
    return torch.cat([logits for logits, _ in chunks]), torch.cat([scores for _, scores in chunks])


# Masks at the original size held at once while decoding prompts: about 256 MiB of float logits.
CHUNK_PIXELS = 2**26


@torch.no_grad()
def iter_predict_prompts(
    model: nn.Module,
    pixel_values: torch.Tensor,
    info: ResizeInfo,
    prompts: Prompts,
    *,
    multimask: bool | None = None,
    max_chunk: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`predict_prompts` in bounded chunks: yields ``(logits (c, h, w), scores (c,))`` in prompt order.

    The image is encoded once; the prompts are decoded at most ``max_chunk`` at a time, and fewer on large
    images, so that memory stays flat however many prompts there are (write each chunk's masks, then drop it).

    Args:
        model: a SAM model (binary fine-tune or base).
        pixel_values: ``(3, S, S)`` preprocessed image.
        info: its :class:`ResizeInfo`.
        prompts: prompts in the image's original pixels.
        multimask: see :func:`predict_prompts`.
        max_chunk: the most prompts decoded together.
    """
    count = len(prompts)
    if count == 0:
        return
    height, width = info.original_size
    device = pixel_values.device
    size = max(1, min(max_chunk, CHUNK_PIXELS // max(1, height * width)))
    embeddings = encode_images(model, pixel_values[None])
    side = coarsest(embeddings).shape[-1] * 4
    for start in range(0, count, size):
        part = slice_prompts(prompts, slice(start, min(count, start + size)))
        rows_count = len(part)
        framed = prompt_tensors(to_input_frame(part, info), device)
        index = torch.zeros(rows_count, dtype=torch.int64, device=device)
        ambiguous = torch.as_tensor(part.single_point, device=device)
        logits = torch.zeros(rows_count, side, side, device=device)
        scores = torch.zeros(rows_count, device=device)
        if multimask is None:
            groups = [(~ambiguous, False), (ambiguous, True)]
        else:
            groups = [(torch.ones(rows_count, dtype=torch.bool, device=device), multimask)]
        for rows, multi in groups:
            if not bool(rows.any()):
                continue
            selected = {k: v[rows] if v is not None else None for k, v in framed.items()}
            low, iou = decode_prompts(model, embeddings, index[rows], multimask=multi, **selected)
            best = iou.argmax(dim=1)  # (r,) the mask SAM rates best
            logits[rows] = low[torch.arange(low.shape[0], device=device), best].float()
            scores[rows] = iou.gather(1, best[:, None])[:, 0].float()
        full = postprocess_masks(logits[:, None].float().cpu(), info)[:, 0]  # (c, h, w)
        yield full, scores.float().cpu()


def slice_prompts(prompts: Prompts, rows: slice) -> Prompts:
    """The prompts ``rows`` of ``prompts`` (every field sliced alike).

    >>> len(slice_prompts(Prompts(boxes=np.zeros((5, 4))), slice(1, 3)))
    2
    """
    fields = (prompts.boxes, prompts.points, prompts.point_labels)
    return Prompts(*(None if value is None else value[rows] for value in fields))
