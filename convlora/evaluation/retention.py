"""Retention: how much of SAM's own promptable skill a fine-tune keeps, and a checkpoint rule that weighs it.

A fine-tune is scored on a *keep set* (objects it was not tuned for) under three prompt protocols, each
prompt derived from the ground truth without any randomness:

- ``box``: one box per object, its exact extent;
- ``point``: one positive point per object, the object's pixel farthest from its border
  (:func:`~convlora.data.prompts.interior_point`), SAM's three masks and the best-rated one kept;
- ``clicks``: SAM's interactive protocol, three clicks: one positive point as above, then twice a click at
  the centre of the largest error region of the previous mask (positive in missed foreground, negative in
  a false alarm), the previous low-resolution logits fed back as the mask prompt when the family takes one
  and the base was trained with mask prompts (:func:`default_mask_input`), else the accumulated points alone.

The quality of a protocol is the mean per-object IoU (ignored pixels left out). *Retention* is the
fine-tune's quality divided by the base model's on the same keep set: 1 means nothing was forgotten. At
strength 0 (:func:`~convlora.artifact.strength.set_strength`) the fine-tune is SAM's own model, so its
retention is exactly 1.

Keep sets: :func:`keep_set_from_folder` (any labelled folder: binary masks give their connected
components, instance maps one object per id, class maps the components of each class; pass the target
data's ``val`` split for its own validation objects), :func:`keep_set_from_dataset` (a loaded dataset, objects
by its mode) and :func:`generic_keep_set` (images of the corpus the embedded ``convlora-tiny`` base was
pretrained on, from seeds its pretraining never drew).

>>> choose_checkpoint([{"epoch": 1, "iou": 0.7, "retention": 0.99}, {"epoch": 2, "iou": 0.8, "retention": 0.9}],
...                   "iou").reason
'epoch 1: iou 0.7 with retention 0.99 (best of the 1 evaluations with retention >= 0.95)'
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..data import ImageReading, SegmentationDataset, check_dataset
from ..data.decode import read_mask
from ..data.prompts import (
    IGNORE_INDEX,
    PAD_LABEL,
    Objects,
    Prompts,
    boxes_from_masks,
    find_objects,
    interior_point,
    points_from_masks,
)
from ..models import family_of
from ..models.processing import ResizeInfo, postprocess_masks, preprocess
from ..prompting import check_promptable, decode_prompts, encode_images, prompt_tensors, to_input_frame
from ..synthetic import objects as generic_objects
from .metrics import higher_is_better as metric_direction

PROTOCOLS = ("box", "point", "clicks")
DEFAULT_CLICKS = 3
DEFAULT_MIN_RETENTION = 0.95
# Bases pretrained without mask prompts (tools/pretrain_base.py feeds none): clicks go without them.
NO_MASK_PROMPT_BASES = ("convlora-tiny",)

# Seeds of convlora-tiny's pretraining (tools/pretrain_base.py): training images (1, seed, step, i), prompts
# (2, seed, step), the held-out evaluation that its pretraining.json reports (3, i). The generic keep set draws
# image i from (GENERIC_KEEP_STREAM, i), a stream none of those ever used.
PRETRAINING_STREAMS = {"train": 1, "prompts": 2, "held_out": 3}
GENERIC_KEEP_STREAM = 4
# Objects decoded together: bounds the (n, h, w) logits held at the original size.
_CHUNK = 64
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------------------------------------- keep sets


@dataclass(frozen=True)
class KeepImage:
    """One image of a keep set and its objects, at the image's own resolution.

    Args:
        image: uint8 ``(h, w, 3)`` RGB.
        objects: the objects to prompt (masks ``(m, h, w)``).
        valid: bool ``(h, w)``: pixels that count (``False`` where the ground truth says ignore).
    """

    image: np.ndarray
    objects: Objects
    valid: np.ndarray


@dataclass(frozen=True)
class KeepSet:
    """Images read one at a time (nothing but the loader is kept), each with the objects to prompt.

    Args:
        name: short name for tables (``"generic"``, the folder's name ...).
        description: one line saying what it is and where it came from.
        size: number of images.
        load: image index -> :class:`KeepImage` (a pure function: the same index always gives the same image).

    >>> keep = generic_keep_set(2, size=32)
    >>> len(keep), keep[0].image.shape
    (2, (32, 32, 3))
    """

    name: str
    description: str
    size: int
    load: Callable[[int], KeepImage]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> KeepImage:
        if not 0 <= index < self.size:
            raise IndexError(f"keep set {self.name!r} has {self.size} images; got index {index}")
        return self.load(index)

    def __iter__(self) -> Iterator[KeepImage]:
        return (self.load(index) for index in range(self.size))

    def summary(self) -> dict[str, Any]:
        """``name``, ``description`` and ``images`` (for reports)."""
        return {"name": self.name, "description": self.description, "images": self.size}


def generic_keep_set(
    num_images: int = 32, size: int = 128, *, max_objects: int = 5, min_area: int = 10, first: int = 0
) -> KeepSet:
    """Images of the generic objects corpus (``convlora.synthetic.objects``) that ``convlora-tiny`` never saw.

    Image ``i`` comes from the seed ``(GENERIC_KEEP_STREAM, first + i)`` = ``(4, first + i)``; the base's
    pretraining drew its training images from ``(1, 0, step, i)``, its prompts from ``(2, 0, step)`` and its
    held-out evaluation from ``(3, i)`` (``tools/pretrain_base.py``), so the keep set shares no image with
    them. Every visible object (its instance mask) with at least ``min_area`` pixels is prompted.

    Args:
        num_images: images in the set (32 by default: about a hundred objects).
        size: their side length (128: convlora-tiny's input size).
        max_objects: most objects in one image (5, as in pretraining).
        min_area: smaller objects (occluded remnants) are not prompted.
        first: index of the first image (another slice of the same held-out stream).

    >>> keep = generic_keep_set(1, size=32)
    >>> bool(keep[0].objects.masks.any(axis=(1, 2)).all()), bool(keep[0].valid.all())
    (True, True)
    """
    for name, value, low in (("num_images", num_images, 1), ("size", size, 8), ("max_objects", max_objects, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def load(index: int) -> KeepImage:
        image, masks = generic_objects.sample((GENERIC_KEEP_STREAM, first + index), size, max_objects)
        keep = masks.reshape(len(masks), -1).sum(axis=1) >= max(1, min_area)
        found = Objects(masks[keep], np.arange(1, len(masks) + 1, dtype=np.int64)[keep])
        return KeepImage(image, found, np.ones(image.shape[:2], dtype=bool))

    description = (
        f"{num_images} generic-object images of {size} px (convlora.synthetic.objects, seeds "
        f"({GENERIC_KEEP_STREAM}, {first})..({GENERIC_KEEP_STREAM}, {first + num_images - 1}), a stream the "
        "base's pretraining never drew)"
    )
    return KeepSet("generic", description, num_images, load)


def pick_split(report: Any, split: str | None = "auto") -> str | None:
    """The split a measurement uses: ``"auto"`` takes ``val``, else ``test``, else every sample (``None``).

    Args:
        report: the dataset's :class:`~convlora.data.DatasetReport`.
        split: ``"auto"``, a split name, or ``None`` (every sample).

    >>> from types import SimpleNamespace
    >>> pick_split(SimpleNamespace(samples={"train": [], "test": []}))
    'test'
    """
    if split is None:
        return None
    if split == "auto":
        return next((name for name in ("val", "test") if name in report.samples), None)
    if split not in report.samples:
        raise ValueError(f"{report.source} has no {split!r} split; it has {sorted(report.samples)}")
    return split


def keep_set_from_folder(
    path: str | Path,
    *,
    split: str | None = "auto",
    max_images: int | None = None,
    min_area: int = 10,
    reading: ImageReading | Mapping[str, Any] | None = None,
    mask_reading: str = "auto",
    name: str | None = None,
) -> KeepSet:
    """A keep set from any labelled dataset folder or CSV, read by convlora's dataset readers.

    The objects are the connected components of binary masks, one per id of instance maps (recognised by
    their shape, or ``mask_reading="instances"``) and the components of each class of multi-class maps.
    For the target domain's own validation objects, pass its folder with ``split="val"``.

    Args:
        path: the labelled folder or CSV.
        split: ``"auto"`` (``val``, else ``test``, else every sample), a split name, or ``None`` (every sample).
        max_images: keep only the first images (in the dataset's sorted order).
        min_area: objects with fewer pixels (original resolution) are not prompted.
        reading: how images are read (a fine-tune's ``task.image_reading``); the inspection's by default.
        mask_reading: ``"auto"``, ``"instances"`` or ``"classes"`` (see :func:`~convlora.data.inspect_dataset`).
        name: the set's name in tables (the folder's name by default).

    >>> keep = keep_set_from_folder("data/polyp", split="val")  # doctest: +SKIP
    """
    report = check_dataset(path, reading=reading, mask_reading=mask_reading)
    chosen = pick_split(report, split)
    dataset = SegmentationDataset.from_report(report, chosen, reading=reading)
    samples = [i for i, sample in enumerate(dataset.samples) if sample.mask is not None]
    if max_images is not None:
        samples = samples[:max_images]
    if not samples:
        raise ValueError(f"{path}: no labelled images{f' in its {chosen!r} split' if chosen else ''} for a keep set")
    instances = report.mask_encoding == "instances"
    kind = "classes" if report.mode == "multiclass" else "binary"

    def load(position: int) -> KeepImage:
        index = samples[position]
        image = dataset.original_image(index)
        if instances:
            stored = read_mask(dataset.samples[index].mask, dataset.class_colors)
            ignore = stored == IGNORE_INDEX if stored.dtype == np.uint8 else np.zeros(stored.shape, bool)
            ids = np.where(ignore, 0, stored).astype(np.int64)
            found = find_objects(ids, "instances", min_area=min_area, ignore_index=-1)
            return KeepImage(image, found, ~ignore)
        labels = dataset.original_mask(index)
        found = find_objects(labels, kind, min_area=min_area, ignore_index=IGNORE_INDEX)
        return KeepImage(image, found, labels != IGNORE_INDEX)

    what = "instance ids" if instances else ("class components" if kind == "classes" else "connected components")
    where = f"{chosen} split of " if chosen else ""
    description = f"{len(samples)} images of the {where}{path} (objects: {what} of at least {min_area} px)"
    return KeepSet(name or Path(path).name, description, len(samples), load)


def object_kind_of(mode: str | None) -> str:
    """How a dataset of ``mode`` is split into objects to prompt (a ``kind`` of :func:`~convlora.data.find_objects`).

    Binary masks give their connected components, instance maps one object per id (touching objects stay
    apart), class maps the components of each class.

    Args:
        mode: the dataset's or task's mode: ``"binary"``, ``"instances"`` or ``"multiclass"`` (``None``: binary).

    >>> object_kind_of("instances"), object_kind_of("multiclass"), object_kind_of("binary")
    ('instances', 'classes', 'binary')
    """
    kinds = {None: "binary", "binary": "binary", "instances": "instances", "multiclass": "classes"}
    if mode not in kinds:
        raise ValueError(f"mode must be one of ['binary', 'instances', 'multiclass'], got {mode!r}")
    return kinds[mode]


_OBJECT_WORDS = {"binary": "connected components", "instances": "instance ids", "classes": "class components"}


def keep_set_from_dataset(
    dataset: SegmentationDataset,
    name: str,
    *,
    max_images: int | None = None,
    min_area: int = 10,
    object_kind: str | None = None,
) -> KeepSet:
    """A keep set from a loaded dataset's labelled images (a run's validation split, for instance).

    The objects are those of the dataset's mode (:func:`object_kind_of`): the connected components of binary
    label maps, one object per id of an instance dataset (its labels are the ids renumbered 1..n, 255 skipped,
    see :func:`~convlora.data.instances.instance_labels`; two touching nuclei are two objects), or the
    components of each class. Ignored pixels (255) belong to no object and do not count.

    Args:
        dataset: the dataset; only its original images and label maps are read.
        name: the set's name in tables (``"val"``).
        max_images: keep only the first labelled images.
        min_area: objects with fewer pixels (original resolution) are not prompted.
        object_kind: ``"binary"``, ``"instances"`` or ``"classes"`` (see
            :func:`~convlora.data.prompts.find_objects`); ``None``: by the dataset's mode.

    >>> keep = keep_set_from_dataset(run_data.val, "val", max_images=32)  # doctest: +SKIP
    """
    kind = object_kind_of(dataset.mode) if object_kind is None else object_kind
    if kind not in _OBJECT_WORDS:
        raise ValueError(f"object_kind must be one of {list(_OBJECT_WORDS)} or None, got {object_kind!r}")
    samples = [i for i, sample in enumerate(dataset.samples) if sample.mask is not None][:max_images]
    if not samples:
        raise ValueError(f"keep set {name!r}: the dataset has no labelled image")

    def load(position: int) -> KeepImage:
        labels = dataset.original_mask(samples[position])
        found = find_objects(labels, kind, min_area=min_area, ignore_index=IGNORE_INDEX)
        return KeepImage(dataset.original_image(samples[position]), found, labels != IGNORE_INDEX)

    what = _OBJECT_WORDS[kind]
    description = f"{len(samples)} labelled images of the {name} data (objects: {what} of at least {min_area} px)"
    return KeepSet(name, description, len(samples), load)


# ------------------------------------------------------------------------------------------- the protocols


def error_click(prediction: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The next click of SAM's interactive protocol: the centre of the largest error region of a mask.

    The error regions are the 8-connected components of the missed object pixels and of the false alarms;
    the largest one (a missed one on a tie) gets the click, at its pixel farthest from its border. Unlike
    :func:`~convlora.data.prompts.correction_points` (training), which compares the two error sets as a
    whole, this picks one region, so that a click never lands between two scattered pieces of error.

    Args:
        prediction: bool ``(h, w)`` the previous mask.
        target: bool ``(h, w)`` the object.
        valid: bool ``(h, w)`` pixels that count (ignored pixels never hold a click).

    Returns:
        ``(x, y)`` float32 and the label: 1 (missed foreground), 0 (false alarm), or ``PAD_LABEL`` when the
        mask has no error.

    >>> target = np.zeros((8, 8), bool)
    >>> target[1:7, 1:7] = True
    >>> prediction = target.copy()
    >>> prediction[1:7, 4:7] = False
    >>> point, label = error_click(prediction, target)
    >>> point.tolist(), label
    ([5.0, 3.0], 1)
    """
    allowed = np.ones(target.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    best_area, best_region, best_label = 0, None, PAD_LABEL
    for region, label in ((target & ~prediction & allowed, 1), (prediction & ~target & allowed, 0)):
        if not region.any():
            continue
        components, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(areas))  # the first of equally large ones
        if areas[largest] > best_area:
            best_area, best_region, best_label = int(areas[largest]), components == largest + 1, label
    if best_region is None:
        return np.zeros(2, dtype=np.float32), PAD_LABEL
    return interior_point(best_region), best_label


# decode(prompts, mask_inputs or None, multimask) -> (low-res logits (n, 1, s, s), logits (n, h, w) at the image)
Decode = Callable[[Prompts, torch.Tensor | None, bool], tuple[torch.Tensor, torch.Tensor]]


def interactive_clicks(
    decode: Decode,
    targets: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    num_clicks: int = DEFAULT_CLICKS,
    mask_input: bool = True,
) -> tuple[np.ndarray, Prompts]:
    """SAM's interactive protocol: one centre point per object, then ``num_clicks - 1`` error clicks.

    The first click is each object's deepest pixel (SAM's three masks, the best-rated kept); each next click
    is :func:`error_click` of the previous mask, added to the object's points, with the previous
    low-resolution logits as the mask prompt when ``mask_input`` (one mask out from the second click on).

    Args:
        decode: ``(prompts, mask_inputs, multimask) -> (low (n, 1, s, s), logits (n, h, w))`` on one image.
        targets: bool ``(n, h, w)`` the objects.
        valid: bool ``(h, w)`` pixels that count.
        num_clicks: clicks per object (1 is the ``point`` protocol).
        mask_input: feed the previous logits back (families whose prompt encoder takes a mask).

    Returns:
        the final masks, bool ``(n, h, w)``, and the prompts of the last round (every click, in order).
    """
    if isinstance(num_clicks, bool) or not isinstance(num_clicks, int) or num_clicks < 1:
        raise ValueError(f"num_clicks must be an integer >= 1, got {num_clicks!r}")
    points, labels = points_from_masks(targets)
    prompts = Prompts(points=points, point_labels=labels)
    low, logits = decode(prompts, None, True)
    masks = (logits > 0).cpu().numpy()
    for _ in range(num_clicks - 1):
        clicks = [error_click(mask, target, valid) for mask, target in zip(masks, targets, strict=True)]
        prompts = prompts.add_points(np.stack([c[0] for c in clicks]), np.array([c[1] for c in clicks]))
        low, logits = decode(prompts, low if mask_input else None, False)
        masks = (logits > 0).cpu().numpy()
    return masks, prompts


def takes_mask_input(model: nn.Module) -> bool:
    """Whether the SAM inside ``model`` takes a mask prompt (``input_masks``), as SAM, SAM-HQ, SAM 2 and SAM 3 do.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> takes_mask_input(random_sam(tiny_sam_config()))
    True
    >>> from convlora.models import apply_conv_lora
    >>> takes_mask_input(apply_conv_lora(random_sam(tiny_sam_config())))
    True
    """
    sam = check_promptable(model)
    sam = sam.get_base_model() if hasattr(sam, "get_base_model") else sam  # a PeftModel's forward takes **kwargs
    return "input_masks" in inspect.signature(type(sam).forward).parameters


def default_mask_input(base_model: str | None) -> bool | None:
    """Whether the ``clicks`` protocol should feed mask prompts to fine-tunes of ``base_model``.

    ``False`` for bases whose pretraining never fed a mask prompt (the embedded ``convlora-tiny``: its
    decoder never learnt to read one, and the fed-back logits make its masks worse than the clicks alone);
    ``None`` (the family decides) for SAM's own checkpoints, which were trained with them.

    >>> default_mask_input("convlora-tiny"), default_mask_input("facebook/sam-vit-base")
    (False, None)
    """
    return False if base_model in NO_MASK_PROMPT_BASES else None


def _decoder(model: nn.Module, embeddings: dict[str, Any], info: ResizeInfo, device: torch.device) -> Decode:
    """The :data:`Decode` of one encoded image (prompts in its original pixels)."""

    def decode(prompts: Prompts, mask_inputs: torch.Tensor | None, multimask: bool) -> tuple[torch.Tensor, ...]:
        count = len(prompts)
        framed = prompt_tensors(to_input_frame(prompts, info), device)
        index = torch.zeros(count, dtype=torch.int64, device=device)
        low, iou = decode_prompts(model, embeddings, index, mask_inputs=mask_inputs, multimask=multimask, **framed)
        best = iou.argmax(dim=1)  # (n,) the mask SAM rates best (the only one without multimask)
        low = low[torch.arange(count, device=device), best][:, None].float()  # (n, 1, s, s)
        return low, postprocess_masks(low.cpu(), info)[:, 0]

    return decode


def object_ious(masks: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-object IoU ``(n,)`` of predicted masks against their objects, ignored pixels left out (empty: 1).

    >>> target = np.zeros((1, 4, 4), bool)
    >>> target[0, :2] = True
    >>> object_ious(np.ones((1, 4, 4), bool), target, np.ones((4, 4), bool)).tolist()
    [0.5]
    """
    masks, targets = masks & valid, targets & valid
    inter = (masks & targets).sum(axis=(1, 2)).astype(np.float64)
    union = (masks | targets).sum(axis=(1, 2)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@torch.no_grad()
def prompted_quality(
    model: nn.Module,
    keep_set: Sequence[KeepImage] | KeepSet,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    num_clicks: int = DEFAULT_CLICKS,
    mask_input: bool | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean per-object IoU of ``model`` on a keep set under each prompt protocol (deterministic).

    Each image is encoded once for every protocol; prompts come from the ground truth alone (no seed).

    Args:
        model: a base SAM or a binary or instance fine-tune (PEFT-wrapped or not): SAM's own prompt encoder and
            mask decoder answer, on the (adapted) image encoder; an instance decoder takes no part, and a
            class-query decoder is refused.
        keep_set: a :class:`KeepSet` (or any sequence of :class:`KeepImage`).
        protocols: some of ``"box"``, ``"point"``, ``"clicks"``.
        num_clicks: clicks of the ``clicks`` protocol.
        mask_input: feed each click round the previous low-resolution logits as a mask prompt; ``None``:
            when the family takes one. A base never trained with mask prompts (see
            :func:`default_mask_input`) is better measured without.
        device: where to run (the model's device by default).

    Returns:
        one mean IoU per protocol, ``objects`` (prompted objects) and ``images`` (images with any).

    >>> prompted_quality(base, generic_keep_set(8))  # doctest: +SKIP
    {'box': 0.78, 'point': 0.69, 'clicks': 0.74, 'objects': 21.0, 'images': 8.0}
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols must be some of {list(PROTOCOLS)}, got {list(protocols)}")
    sam = check_promptable(model)
    family = family_of(sam)
    size, input_format = family.image_size(sam), family.input_format
    mask_input = takes_mask_input(sam) if mask_input is None else bool(mask_input) and takes_mask_input(sam)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(protocols, 0.0)
    objects = images = 0
    try:
        for item in keep_set:
            if len(item.objects) == 0:
                continue
            pixel_values, info = preprocess(item.image, size, input_format)
            embeddings = encode_images(model, pixel_values[None].to(device))
            decode = _decoder(model, embeddings, info, device)
            for start in range(0, len(item.objects), _CHUNK):
                targets = item.objects.masks[start : start + _CHUNK]
                for protocol in protocols:
                    masks = _protocol_masks(protocol, decode, targets, item.valid, num_clicks, mask_input)
                    sums[protocol] += float(object_ious(masks, targets, item.valid).sum())
            objects += len(item.objects)
            images += 1
    finally:
        model.train(was_training)
    if objects == 0:
        raise ValueError("the keep set holds no object to prompt (every mask empty or below min_area)")
    return {**{p: sums[p] / objects for p in protocols}, "objects": float(objects), "images": float(images)}


def _protocol_masks(
    protocol: str, decode: Decode, targets: np.ndarray, valid: np.ndarray, num_clicks: int, mask_input: bool
) -> np.ndarray:
    if protocol == "box":
        _, logits = decode(Prompts(boxes=boxes_from_masks(targets)), None, False)
        return (logits > 0).numpy()
    if protocol == "point":
        points, labels = points_from_masks(targets)
        _, logits = decode(Prompts(points=points, point_labels=labels), None, True)
        return (logits > 0).numpy()
    masks, _ = interactive_clicks(decode, targets, valid=valid, num_clicks=num_clicks, mask_input=mask_input)
    return masks


def _ratio(value: float, base: float) -> float:
    if value == base:
        return 1.0
    return value / base if base > 0 else math.nan


def retention(
    model: nn.Module,
    base: nn.Module | Mapping[str, float],
    keep_set: Sequence[KeepImage] | KeepSet,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    num_clicks: int = DEFAULT_CLICKS,
    mask_input: bool | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The fine-tune's prompted quality on a keep set divided by the base model's, per protocol and on average.

    Give the base's scores (:func:`prompted_quality` of the base on the same keep set, computed once per run)
    or the base model itself. At strength 0 a LoRA / Conv-LoRA fine-tune gives SAM's outputs bit for bit, so
    its retention is exactly 1.0. A base scoring 0 on a protocol gives a NaN ratio there.

    Args:
        model: the fine-tuned model (binary or instances; see :func:`prompted_quality`).
        base: the base model, or its :func:`prompted_quality` scores.
        keep_set: the objects to keep.
        protocols: see :func:`prompted_quality`.
        num_clicks: see :func:`prompted_quality`.
        mask_input: see :func:`prompted_quality` (the base's scores must have been measured alike).
        device: see :func:`prompted_quality`.

    Returns:
        one ratio per protocol, ``mean`` (their mean), and ``model`` / ``base``: the two
        :func:`prompted_quality` results.

    >>> base_scores = prompted_quality(base, keep)  # doctest: +SKIP
    >>> retention(fine_tuned, base_scores, keep)["mean"]  # doctest: +SKIP
    0.97
    """
    options = {"protocols": protocols, "num_clicks": num_clicks, "mask_input": mask_input, "device": device}
    if isinstance(base, Mapping):
        missing = [p for p in protocols if p not in base]
        if missing:
            raise ValueError(f"base scores lack the protocols {missing}; they have {sorted(base)}")
        base_scores = dict(base)
    else:
        base_scores = prompted_quality(base, keep_set, **options)
    scores = prompted_quality(model, keep_set, **options)
    if "objects" in base_scores and base_scores["objects"] != scores["objects"]:
        raise ValueError(
            f"base scores were measured on {base_scores['objects']:.0f} objects, this keep set has "
            f"{scores['objects']:.0f}: score the base on the same keep set"
        )
    ratios = {p: _ratio(scores[p], base_scores[p]) for p in protocols}
    return {**ratios, "mean": sum(ratios.values()) / len(ratios), "model": scores, "base": base_scores}


# -------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Choice:
    """The entry a selection rule chose.

    Args:
        index: its position in the history.
        entry: the entry itself.
        reason: one line saying why.
        met_bound: whether it reached the retention bound (``False``: the fallback was taken).
    """

    index: int
    entry: Mapping[str, Any]
    reason: str
    met_bound: bool = True


def _label(entry: Mapping[str, Any], index: int) -> str:
    for key in ("epoch", "step", "strength"):
        if entry.get(key) is not None:
            return f"{key} {entry[key]:g}" if isinstance(entry[key], float) else f"{key} {entry[key]}"
    return f"evaluation {index + 1}"


def _value(entry: Mapping[str, Any], key: str, index: int) -> float:
    value = entry.get(key)
    if isinstance(value, Mapping):  # a retention() result
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"history entry {index} has no number {key!r} (got {value!r}); keys: {sorted(entry)}")
    return float(value)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def choose_checkpoint(
    history: Sequence[Mapping[str, Any]],
    metric: str,
    higher_is_better: bool | None = None,
    min_retention: float = DEFAULT_MIN_RETENTION,
    *,
    retention_key: str = "retention",
    what: str = "evaluations",
) -> Choice:
    """The best entry by ``metric`` among those whose retention reaches ``min_retention``.

    Each entry holds the metric and its retention (a number, or a :func:`retention` result whose ``mean``
    counts). Ties on the metric go to the higher retention, then to the earlier entry; NaN never wins. When
    no entry reaches the bound, the entry with the highest retention is chosen (the one that forgot least;
    ties go to the better metric, then the earlier entry) and the reason says that the bound was missed.

    Args:
        history: one mapping per evaluation, e.g. ``{"epoch": 7, "s_measure": 0.81, "retention": 0.96}``.
        metric: the target metric's key.
        higher_is_better: its direction (by default from :data:`~convlora.evaluation.metrics.HIGHER_IS_BETTER`).
        min_retention: the least retention an entry needs.
        retention_key: where each entry holds its retention.
        what: how the reason names the entries (``"evaluations"``, ``"strengths"``).

    >>> history = [{"epoch": 1, "iou": 0.6, "retention": 0.9}, {"epoch": 2, "iou": 0.7, "retention": 0.8}]
    >>> choose_checkpoint(history, "iou").reason
    'epoch 1: retention 0.9 is the highest of the 2 evaluations, none of which has retention >= 0.95 (iou 0.6)'
    """
    if not history:
        raise ValueError("the history is empty: nothing to choose from")
    if isinstance(min_retention, bool) or not isinstance(min_retention, (int, float)) or not min_retention >= 0:
        raise ValueError(f"min_retention must be a number >= 0, got {min_retention!r}")
    higher = metric_direction(metric) if higher_is_better is None else bool(higher_is_better)
    sign = 1.0 if higher else -1.0
    rows = [(i, _value(e, metric, i), _value(e, retention_key, i)) for i, e in enumerate(history)]
    eligible = [r for r in rows if r[2] >= min_retention and not math.isnan(r[1])]
    if eligible:
        index, value, kept = max(eligible, key=lambda r: (sign * r[1], r[2], -r[0]))
        reason = (
            f"{_label(history[index], index)}: {metric} {_fmt(value)} with retention {_fmt(kept)} (best of the "
            f"{len(eligible)} {what} with retention >= {min_retention:g})"
        )
        return Choice(index, history[index], reason, True)
    finite = [r for r in rows if not math.isnan(r[2])] or rows
    index, value, kept = max(finite, key=lambda r: (r[2], -math.inf if math.isnan(r[1]) else sign * r[1], -r[0]))
    reason = (
        f"{_label(history[index], index)}: retention {_fmt(kept)} is the highest of the {len(rows)} {what}, none of "
        f"which has retention >= {min_retention:g} ({metric} {_fmt(value)})"
    )
    return Choice(index, history[index], reason, False)


def choose_weighted(
    history: Sequence[Mapping[str, Any]],
    metric: str,
    retention_weight: float = 0.5,
    higher_is_better: bool | None = None,
    *,
    retention_key: str = "retention",
    what: str = "evaluations",
) -> Choice:
    """The entry with the best weighted sum ``(1 - w) * metric + w * retention`` (a lower-is-better metric negated).

    Meant for metrics on retention's scale (IoU, Dice, S-measure in [0, 1]); ties go to the earlier entry and
    NaN never wins.

    Args:
        history: see :func:`choose_checkpoint`.
        metric: the target metric's key.
        retention_weight: ``w`` in [0, 1]: 0 picks by the metric alone, 1 by retention alone.
        higher_is_better: the metric's direction (by default from ``HIGHER_IS_BETTER``).
        retention_key: where each entry holds its retention.
        what: how the reason names the entries.

    >>> history = [{"epoch": 1, "iou": 0.6, "retention": 1.0}, {"epoch": 2, "iou": 0.8, "retention": 0.9}]
    >>> choose_weighted(history, "iou", 0.5).reason
    'epoch 2: 0.5 x iou 0.8 + 0.5 x retention 0.9 = 0.85, the best of the 2 evaluations'
    """
    if not history:
        raise ValueError("the history is empty: nothing to choose from")
    if isinstance(retention_weight, bool) or not 0.0 <= retention_weight <= 1.0:
        raise ValueError(f"retention_weight must be a number in [0, 1], got {retention_weight!r}")
    higher = metric_direction(metric) if higher_is_better is None else bool(higher_is_better)
    sign = 1.0 if higher else -1.0
    weight = float(retention_weight)
    scored = []
    for i, entry in enumerate(history):
        value, kept = _value(entry, metric, i), _value(entry, retention_key, i)
        score = (1 - weight) * sign * value + weight * kept
        scored.append((-math.inf if math.isnan(score) else score, -i, value, kept))
    score, negative_index, value, kept = max(scored)
    index = -negative_index
    signed = metric if higher else f"(-{metric})"
    reason = (
        f"{_label(history[index], index)}: {_fmt(1 - weight)} x {signed} {_fmt(value)} + {_fmt(weight)} x retention "
        f"{_fmt(kept)} = {_fmt(score)}, the best of the {len(history)} {what}"
    )
    return Choice(index, history[index], reason, True)
