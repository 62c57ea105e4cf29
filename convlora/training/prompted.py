"""Prompted SAM: boxes and points in, one mask per prompt out; the prompted training step and evaluation.

SAM's design is kept: the image encoder runs once per image, and every prompt of that image reuses its
embedding through the (cheap) prompt encoder and mask decoder. Prompts are laid out one per decoder
batch row, ``(n, 1, ...)``, so each can carry its own mask prompt (the previous round's low-resolution
logits) in iterative correction.

Training (:class:`PromptedStep`) follows SAM, MedSAM and micro-sam (see ``docs/guides/prompted.md``):
prompts are drawn from the ground truth (:mod:`convlora.data.prompts`), a single point predicts SAM's
three masks and only the best one is trained, the IoU head learns the real IoU of each mask (MSE), the
prompt encoder stays frozen by default, and optional correction rounds add a click from the error
region with the previous logits as a mask prompt.

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
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..data.prompts import (
    IGNORE_INDEX,
    MIXED_KINDS,
    PAD_LABEL,
    Objects,
    PromptConfig,
    Prompts,
    correction_points,
    derive_prompts,
    find_objects,
    sample_objects,
)
from ..models import find_sam
from ..models.processing import ResizeInfo, postprocess_masks
from ..models.semantic import class_decoder_classes
from ..tuner.moe import moe_aux_loss
from .losses import per_mask_losses

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
    if hasattr(sam, "no_memory_embedding"):  # SAM 2 / SAM 3: the decoder reads a pyramid of feature maps
        return {"image_embeddings": _feature_pyramid(sam, pixel_values)}
    output = sam.vision_encoder(pixel_values)
    embeddings: ImageEmbeddings = {"image_embeddings": output.last_hidden_state}  # (b, c, S/16, S/16)
    intermediate = getattr(output, "intermediate_embeddings", None)
    if intermediate is not None:  # SAM-HQ's decoder also reads early encoder features
        embeddings["intermediate_embeddings"] = intermediate
    return embeddings


def _feature_pyramid(sam: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """SAM 2 / SAM 3 image embeddings as their ``get_image_embeddings`` builds them, but with gradients.

    The last (coarsest) map gets the "no memory" embedding a single image is decoded with; every map comes
    back as ``(b, c, h, w)``.
    """
    maps = list(sam.get_image_features(pixel_values, return_dict=True).fpn_hidden_states)  # each ((h w), b, c)
    maps[-1] = maps[-1] + sam.no_memory_embedding
    return [
        rearrange(feature, "(h w) b c -> b c h w", h=size[0], w=size[1])
        # SAM 3's encoder gives one map more than its decoder reads; zip keeps the ones it reads, as transformers does
        for feature, size in zip(maps, sam.backbone_feature_sizes, strict=False)
    ]


def _coarsest(embeddings: ImageEmbeddings) -> torch.Tensor:
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
    image_index = image_index.to(_coarsest(embeddings).device)
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
    side = _coarsest(embeddings).shape[-1] * 4
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


def prepare_prompted_model(model: nn.Module, config: PromptConfig) -> list[str]:
    """Set which SAM prompt-path parts train for prompted fine-tuning; returns the names it froze.

    Every part of the trained mask decoder trains (the IoU head and all mask tokens included: prompted
    training uses them), also where the method's build froze them (``freeze_iou_head``); under PEFT only the
    trained copy (``modules_to_save``) is touched. The prompt encoder is frozen unless
    ``config.train_prompt_encoder``, which only method ``full`` can honour (the other methods' exports do not
    hold the prompt encoder). Call it after the method's ``build``.

    Args:
        model: the task model, built by a training method.
        config: the prompt settings.

    Raises:
        ValueError: ``train_prompt_encoder`` with a method that keeps the prompt encoder frozen.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> len(prepare_prompted_model(random_sam(tiny_sam_config()), PromptConfig(kind="box"))) > 0
    True
    """
    named = list(model.named_parameters())
    decoder = [(n, p) for n, p in named if "mask_decoder." in n and ".original_module." not in n]
    if any(p.requires_grad for _, p in decoder):
        for _, param in decoder:
            param.requires_grad_(True)
    # the prompt encoder's own view, so that the positional code it shares with the image side is included
    prompt_encoder = list(find_sam(model).prompt_encoder.named_parameters(prefix="prompt_encoder"))
    if config.train_prompt_encoder:
        if not all(p.requires_grad for _, p in prompt_encoder):
            raise ValueError(
                "train_prompt_encoder needs method 'full': the other methods keep the prompt encoder frozen and "
                "their exports do not hold it"
            )
        return []
    frozen = []
    for name, param in prompt_encoder:
        if param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def draw_objects(
    labels: np.ndarray, config: PromptConfig, rng: np.random.Generator, object_kind: str = "binary"
) -> Objects:
    """The (sampled) objects of one label map for a prompted step.

    Args:
        labels: ``(h, w)`` label map (255 = ignore).
        config: ``min_area`` and ``max_objects`` are read.
        rng: the step's random generator.
        object_kind: see :func:`~convlora.data.prompts.find_objects`.

    >>> len(draw_objects(np.eye(16, dtype=np.int64), PromptConfig(min_area=4), np.random.default_rng(0)))
    1
    """
    objects = find_objects(labels, object_kind, min_area=config.min_area, ignore_index=IGNORE_INDEX)
    return sample_objects(objects, config.max_objects, rng)


class PromptedStep(nn.Module):
    """The prompted training step Accelerate wraps: images and label maps in, losses out.

    Like the engine's prompt-free ``TrainStep`` it returns the task loss together with the Conv-LoRA
    auxiliary loss (under DDP that loss must come out of the wrapped forward). Objects come from the
    labels (``(b, S, S)``, 255 = ignore, in the input frame, after augmentation); images without any
    object are skipped and counted in ``"skipped"``.

    Args:
        model: the task model (any method; a binary SAM decoder).
        config: the prompt settings (``kind`` other than ``"none"``).
        object_kind: how objects are read from the labels: ``"binary"`` (components) or ``"classes"``.
        seed: seed of the prompts. Each call draws from ``(seed, step)`` when ``forward`` gets ``step``, else
            from ``(seed, a number drawn from torch's global generator)``: the engine seeds, saves and restores
            that generator, so runs (and resumed runs) repeat their prompts exactly.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> step = PromptedStep(random_sam(tiny_sam_config()), PromptConfig(kind="box"))
    >>> labels = torch.zeros(1, 64, 64, dtype=torch.long)
    >>> labels[0, 10:30, 12:40] = 1
    >>> sorted(step(torch.randn(1, 3, 64, 64), labels))
    ['aux', 'iou', 'loss', 'objects', 'skipped', 'task']
    """

    def __init__(self, model: nn.Module, config: PromptConfig, object_kind: str = "binary", seed: int = 0) -> None:
        super().__init__()
        if not config.prompted:
            raise ValueError("PromptedStep needs a prompt kind (box, point, box_point or mixed), got 'none'")
        self.model = model
        self.config = config
        self.object_kind = object_kind
        self.seed = seed

    def _rng(self, step: int | None) -> np.random.Generator:
        if step is None:
            step = int(torch.randint(0, 2**62, (1,)).item())
        return np.random.default_rng([self.seed, int(step)])

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, step: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one prompted step: ``loss`` (to back-propagate), ``task``, ``aux``, ``iou`` (mean real
        IoU of the trained masks), ``objects`` (prompts trained) and ``skipped`` (images without objects)."""
        config = self.config
        rng = self._rng(step)
        kind = config.kind if config.kind != "mixed" else str(rng.choice(MIXED_KINDS))
        embeddings = encode_images(self.model, pixel_values)  # the encoder runs once for every prompt
        aux = moe_aux_loss(self.model)
        device = pixel_values.device
        label_maps = labels.detach().cpu().numpy()
        masks, valids, index, prompt_sets = [], [], [], []
        skipped = 0
        for i, label_map in enumerate(label_maps):
            objects = draw_objects(label_map, config, rng, self.object_kind)
            if len(objects) == 0:
                skipped += 1
                continue
            valid = label_map != IGNORE_INDEX
            prompt_sets.append(derive_prompts(objects, kind, config, rng, training=True, valid=valid))
            masks.append(objects.masks)
            valids.append(np.broadcast_to(valid, objects.masks.shape))
            index += [i] * len(objects)
        if not index:  # nothing to prompt: a zero loss that still reaches the encoder's graph
            zero = _coarsest(embeddings).float().sum() * 0.0
            return self._result(zero, aux, torch.zeros((), device=device), 0, skipped, device)
        prompts = _concat(prompt_sets)
        object_masks = np.concatenate(masks)
        targets = torch.as_tensor(object_masks, device=device)
        valid = torch.as_tensor(np.concatenate(valids), device=device)
        image_index = torch.as_tensor(index, dtype=torch.int64, device=device)
        multimask = config.multimask_single_point and bool(prompts.single_point.all())
        size = labels.shape[-2:]
        total = torch.zeros((), device=device)
        mask_inputs = None
        for round_index in range(config.correction_rounds + 1):
            low, iou_pred = decode_prompts(
                self.model,
                embeddings,
                image_index,
                mask_inputs=mask_inputs,
                multimask=multimask and round_index == 0,
                **prompt_tensors(prompts, device),
            )
            full = F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)  # (n, m, S, S)
            parts = per_mask_losses(full, targets, valid)
            loss, iou = parts["bce"] + parts["dice"], parts["iou"]
            best = loss.detach().argmin(dim=1)  # the best of SAM's three masks (only one without multimask)
            rows = torch.arange(loss.shape[0], device=device)
            iou_loss = F.mse_loss(iou_pred.float(), iou)  # every predicted mask's IoU estimate, as SAM trains it
            total = total + loss[rows, best].mean() + config.iou_loss_weight * iou_loss
            if round_index == config.correction_rounds:
                break
            previous = (full[rows, best] > 0).detach().cpu().numpy()
            points, point_labels = correction_points(previous, object_masks, rng=rng, valid=np.concatenate(valids))
            prompts = prompts.add_points(points, point_labels)
            mask_inputs = low[rows, best][:, None].detach()
        task = total / (config.correction_rounds + 1)
        return self._result(task, aux, iou[rows, best].mean(), len(index), skipped, device)

    @staticmethod
    def _result(
        task: torch.Tensor, aux: torch.Tensor, iou: torch.Tensor, objects: int, skipped: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            "loss": task + aux,
            "task": task.detach(),
            "aux": aux.detach(),
            "iou": iou.detach(),
            "objects": torch.tensor(float(objects), device=device),
            "skipped": torch.tensor(float(skipped), device=device),
        }


def _concat(prompt_sets: list[Prompts]) -> Prompts:
    """The prompts of several images as one set (all drawn with the same settings, so the shapes agree)."""

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(p, name) for p in prompt_sets]
        return None if parts[0] is None else np.concatenate(parts)

    return Prompts(cat("boxes"), cat("points"), cat("point_labels"))


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
    from .metrics import build_metrics

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


__all__ = [
    "PAD_LABEL",
    "PromptedStep",
    "check_promptable",
    "decode_prompts",
    "encode_images",
    "evaluate_prompted",
    "evaluation_prompts",
    "predict_prompts",
    "prepare_prompted_model",
    "prompt_tensors",
    "to_input_frame",
]
