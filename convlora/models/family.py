"""The registry of model families (a plain dict) and the generic calls built on it.

>>> from convlora.models.family import FAMILIES
>>> sorted(FAMILIES)
['sam', 'sam_hq']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import sam, sam_hq
from .base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (sam.FAMILY, sam_hq.FAMILY)}


def family_for_type(model_type: str | None, source: Any) -> ModelFamily:
    """The family whose transformers ``model_type`` is ``model_type``; ``source`` names where it was read."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(repr(t) for family in FAMILIES.values() for t in family.model_types)
    raise ValueError(f"{source} describes model_type={model_type!r}; convlora supports {known}")


def model_class(model_type: str | None, source: Any) -> type[nn.Module]:
    """The transformers class that loads ``model_type`` (see :func:`family_for_type`)."""
    return family_for_type(model_type, source).model_class()


def family_of(model: nn.Module) -> ModelFamily:
    """The family of the SAM inside ``model`` (see :func:`find_sam`)."""
    sam_model = find_sam(model)
    return family_for_type(sam_model.config.model_type, type(sam_model).__name__)


def find_sam(model: nn.Module) -> nn.Module:
    """The SAM model inside ``model`` (itself, or inside a ``PeftModel`` or a task wrapper).

    Args:
        model: any module.

    Raises:
        ValueError: if no module with a ViT ``vision_encoder`` and a ``mask_decoder`` is found.
    """
    for module in model.modules():
        if any(family.matches(module) for family in FAMILIES.values()):
            return module
    raise ValueError(
        f"{type(model).__name__} is not a SAM model: expected a module with a ViT `vision_encoder` (with `layers`) "
        "and a `mask_decoder`, such as transformers' SamModel or SamHQModel"
    )


def segmentation_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Prompt-free mask logits ``(b, k, s/4, s/4)``: ``k = 1`` (binary) or one map per class."""
    return model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0]
