"""The registry of model families (a plain dict) and the generic calls built on it.

>>> from convlora.models.family import FAMILIES
>>> sorted(FAMILIES)
['sam', 'sam2', 'sam3', 'sam3_concept', 'sam_hq']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import checkpoint_block
from ..tuner.presets import ENCODER_LAYERS, FAMILY_PRESETS, MODEL_TYPE_FAMILIES, register_presets
from . import sam, sam2, sam3, sam_hq
from .base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a model family to the registry, and its target presets to the PEFT method's; returns it.

    Everything convlora knows about a family is its :class:`ModelFamily` entry: adding a family is one module
    defining it and one call of this function.

    Args:
        family: the family's entry.

    Raises:
        ValueError: a family of that name, or one claiming one of its ``model_types``, is already registered.
    """
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = {t for other in FAMILIES.values() for t in other.model_types} & set(family.model_types)
    if taken:
        raise ValueError(f"model types {sorted(taken)} of family {family.name!r} already belong to another family")
    if family.encoder_path:
        register_presets(family.preset_family, family.model_types, family.encoder_path, dict(family.target_presets))
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (tests, plugins); the built-in ones stay."""
    family = FAMILIES.pop(name)
    for model_type in family.model_types:
        MODEL_TYPE_FAMILIES.pop(model_type, None)
    if not any(other.preset_family == family.preset_family for other in FAMILIES.values()):
        ENCODER_LAYERS.pop(family.preset_family, None)
        FAMILY_PRESETS.pop(family.preset_family, None)


for _family in (sam.FAMILY, sam_hq.FAMILY, sam2.FAMILY, sam3.FAMILY, sam3.CONCEPT_FAMILY):
    register_family(_family)

# SAM relatives convlora knows but cannot adapt, with the reason (by transformers model_type).
UNSUPPORTED: dict[str, str] = {
    "edgetam": (
        "EdgeTAM's image encoder is a convolutional RepViT (timm) whose blocks have no attention or token-MLP "
        "nn.Linear layers fed a (b, h, w, c) token grid, so Conv-LoRA has nothing to adapt; use SAM 2.1 "
        "(e.g. facebook/sam2.1-hiera-tiny) for a small model"
    ),
}
UNSUPPORTED["edgetam_video"] = UNSUPPORTED["edgetam"]


def family_for_type(model_type: str | None, source: Any) -> ModelFamily:
    """The family whose transformers ``model_type`` is ``model_type``; ``source`` names where it was read.

    Args:
        model_type: a transformers ``model_type`` (``config.json``).
        source: what the type was read from, for the error message.

    Raises:
        ValueError: for model types convlora does not support (EdgeTAM says why).

    >>> family_for_type("sam2_video", "config.json").name
    'sam2'
    """
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type in UNSUPPORTED:
        raise ValueError(f"{source} describes model_type={model_type!r}: {UNSUPPORTED[model_type]}")
    known = ", ".join(repr(t) for family in FAMILIES.values() for t in family.model_types)
    raise ValueError(f"{source} describes model_type={model_type!r}; convlora supports {known}")


def model_class(model_type: str | None, source: Any) -> type[nn.Module]:
    """The transformers class that loads ``model_type`` (see :func:`family_for_type`)."""
    return family_for_type(model_type, source).model_class()


def family_of(model: nn.Module) -> ModelFamily:
    """The family of the SAM inside ``model`` (see :func:`find_sam`).

    Args:
        model: a SAM model of any family, or a module containing one (a ``PeftModel``, a task wrapper).
    """
    sam_model = find_sam(model)
    return family_for_type(sam_model.config.model_type, type(sam_model).__name__)


def prepare_model(model: nn.Module) -> nn.Module:
    """Apply convlora's single-mask-token task setting to the SAM inside ``model`` (in place); returns ``model``.

    SAM 2 and SAM 3 get their eval-time multimask fallback (``dynamic_multimask_via_stability``) turned off,
    so that evaluation uses the mask token training used (the family's ``prepare``; nothing for SAM and
    SAM-HQ). It changes the model's behaviour, so loading and adapting never call it: the training engine
    and ``load_trained`` do, when the task file's ``single_mask_token`` says so. Call it on a model loaded
    with stock transformers / PEFT to reproduce convlora's evaluation.

    Args:
        model: a SAM model of any family, or a module containing one (a ``PeftModel``).

    >>> from convlora.models import random_sam, tiny_sam2_config
    >>> prepare_model(random_sam(tiny_sam2_config())).mask_decoder.dynamic_multimask_via_stability
    False
    """
    family = family_of(model)
    if family.prepare is not None:
        family.prepare(find_sam(model))
    return model


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute the image encoder's blocks in the backward pass instead of storing their activations.

    Works for every family, including SAM 3, whose transformers classes refuse
    ``gradient_checkpointing_enable``: each of the encoder's ``GradientCheckpointingLayer`` blocks is switched
    on directly, with non-reentrant checkpointing (gradients still reach adapters inside the blocks).

    Args:
        model: a SAM model of any family, or a module containing one (a ``PeftModel``).

    Returns:
        The number of blocks that now checkpoint.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    sam = find_sam(model)
    blocks = [m for m in sam.vision_encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        checkpoint_block(block)
    return len(blocks)


def find_sam(model: nn.Module) -> nn.Module:
    """The SAM model inside ``model`` (itself, or inside a ``PeftModel`` or a task wrapper).

    Args:
        model: any module.

    Raises:
        ValueError: if no model of a known family is found (EdgeTAM gets the reason it cannot be adapted).
    """
    for module in model.modules():
        if any(family.matches(module) for family in FAMILIES.values()):
            return module
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in UNSUPPORTED:
            raise ValueError(f"{type(module).__name__} (model_type={model_type!r}): {UNSUPPORTED[model_type]}")
    raise ValueError(
        f"{type(model).__name__} is not a SAM model: expected a model with an image `vision_encoder` and a "
        "`mask_decoder`, such as transformers' SamModel, SamHQModel, Sam2Model or Sam3TrackerModel"
    )


def _checked_promptable(model: nn.Module) -> None:
    family = family_of(model)
    if not family.prompt_free:
        raise ValueError(
            f"{family.description.split(':')[0]} segments from text or exemplar prompts and has "
            "no prompt-free or SAM-style prompted mask call; train, evaluate and predict with Sam3TrackerModel "
            "(e.g. facebook/sam3 via convlora.load_sam)"
        )


def segmentation_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Prompt-free mask logits ``(b, k, m, m)``: ``k = 1`` (binary) or one map per class.

    ``m`` is four times the encoder's final grid: ``s / 4`` for SAM and SAM 2 (256 at 1024 px), 288 for
    SAM 3 at 1008 px.

    Every promptable family (SAM, SAM-HQ, SAM 2, SAM 3) takes ``model(pixel_values=x, multimask_output=False)``
    without any prompt and returns one mask per image.

    Args:
        model: a SAM model of any promptable family, or a module containing one.
        pixel_values: ``(b, 3, s, s)`` normalised images at the model's input size.
    """
    _checked_promptable(model)
    return model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0]


def prompted_logits(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    input_boxes: torch.Tensor | None = None,
    input_points: torch.Tensor | None = None,
    input_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompted mask logits ``(b, p, m, m)``: one mask per box (or per point set) of each image.

    The prompt tensors follow transformers' SAM convention, in input-pixel coordinates, for every family.

    Args:
        model: a SAM model of any promptable family, or a module containing one.
        pixel_values: ``(b, 3, s, s)`` normalised images at the model's input size.
        input_boxes: ``(b, p, 4)`` boxes ``x0, y0, x1, y1``.
        input_points: ``(b, p, n, 2)`` points ``x, y``.
        input_labels: ``(b, p, n)`` point labels (1 foreground, 0 background).
    """
    _checked_promptable(model)
    if input_boxes is None and input_points is None:
        raise ValueError("prompted_logits needs input_boxes or input_points; use segmentation_logits without prompts")
    output = model(
        pixel_values=pixel_values,
        input_boxes=input_boxes,
        input_points=input_points,
        input_labels=input_labels,
        multimask_output=False,
    )
    return output.pred_masks[:, :, 0]
