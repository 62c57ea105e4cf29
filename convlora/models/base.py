"""The small interface every model family implements, so the rest of convlora never branches on a class.

A family is one kind of transformers model (SAM, SAM-HQ, SAM 2, SAM 3): how to find its image-encoder blocks
and mask decoder, which image sizes it takes, how to resize it, which transformers class loads it, and how
its images are normalised. The PEFT method's target presets for each family are plain data in
:mod:`convlora.tuner.presets`; the generic calls built on this interface (prompt-free and prompted masks)
live in :mod:`convlora.models.family`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .processing import IMAGENET_MEAN, IMAGENET_STD, InputFormat


def square_side(value: int | list[int] | tuple[int, ...]) -> int:
    """One side of a square size that a transformers config gives as an int or as a pair.

    >>> square_side([1024, 1024]), square_side(14)
    (1024, 14)
    """
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def backbone_config(model: Any) -> Any:
    """``config.vision_config.backbone_config`` of a model whose encoder is a backbone plus a neck (SAM 2, SAM 3)."""
    return model.config.vision_config.backbone_config


def vision_patch_size(model: Any) -> int:
    """``config.vision_config.patch_size`` of a SAM-1-style model (SAM, SAM-HQ)."""
    return int(model.config.vision_config.patch_size)


@dataclass(frozen=True)
class ModelFamily:
    """One model family and the calls convlora makes on it.

    Args:
        name: the family's name (``"sam"``, ``"sam2"``, ...).
        model_types: the transformers ``model_type`` values (``config.json``) of the family.
        model_class: returns the transformers model class (imported lazily).
        encoder_layers: the image encoder's list of blocks of a model of this family.
        image_size: the square input size of a model of this family.
        patch_size: side of one token of the encoder's first grid, in pixels.
        size_multiple: the input side must be a multiple of this (patching, pooling stages).
        resize: a copy of a model that takes another input size, or ``None`` if the family cannot resize.
        decoder: attribute name of the mask decoder (trained by every method).
        encoder_path: regex of the module path of the encoder's list of blocks, for PEFT's ``target_modules``.
        target_presets: the family's named target sets (preset name -> regex of modules inside one block).
        presets: key of the family's target presets in ``convlora.tuner.presets.FAMILY_PRESETS``
            (the family's name when empty): a family reusing another's presets names it here.
        encode_image: ``(sam, pixel_values) -> {...}``: the image encoder once, as the keyword arguments that
            replace ``pixel_values`` in the prompted mask call (SAM: ``image_embeddings``; SAM 2 / SAM 3: the
            feature pyramid), with gradients.
        export_split: the ONNX image-encoder / prompt-decoder split its models export with (a key of
            ``convlora.deploy.SPLITS``), or ``None``: the prompt-free model only.
        variants: the released variants (name -> config builder, nothing downloaded), for ``convlora params``.
        multiclass: whether convlora's class-query decoder (``convlora.models.semantic``) fits this family.
        prompt_free: whether ``model(pixel_values=x, multimask_output=False)`` gives masks without prompts.
        image_mean: per-channel mean of the official preprocessing.
        image_std: per-channel standard deviation of the official preprocessing.
        pad_to_square: the official preprocessing resizes the longest side and pads (SAM) rather than
            resizing to the square input (SAM 2, SAM 3).
        prepare: puts a model of the family in the state fine-tuning expects (in place), or ``None``.
        description: one line for error messages and docs.

    >>> from convlora.models.family import FAMILIES
    >>> FAMILIES["sam2"].preset_family, FAMILIES["sam3"].pad_to_square
    ('sam2', False)
    """

    name: str
    model_types: tuple[str, ...]
    model_class: Callable[[], type[nn.Module]]
    encoder_layers: Callable[[nn.Module], nn.ModuleList]
    image_size: Callable[[nn.Module], int]
    patch_size: Callable[[nn.Module], int] = vision_patch_size
    size_multiple: Callable[[nn.Module], int] = vision_patch_size
    resize: Callable[[nn.Module, int], nn.Module] | None = None
    decoder: str = "mask_decoder"
    encoder_path: str = ""
    target_presets: Mapping[str, str] = field(default_factory=dict)
    presets: str = ""
    encode_image: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    export_split: str | None = None
    variants: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    multiclass: bool = False
    prompt_free: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    pad_to_square: bool = True
    prepare: Callable[[nn.Module], None] | None = None
    description: str = ""

    @property
    def input_format(self) -> InputFormat:
        """The normalisation and resizing of this family's own processor, for convlora's preprocessing."""
        return InputFormat(self.image_mean, self.image_std, self.pad_to_square)

    @property
    def preset_family(self) -> str:
        """The key of this family's presets in ``convlora.tuner.presets.FAMILY_PRESETS``."""
        return self.presets or self.name

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a model of this family (by its config's ``model_type``)."""
        config: Any = getattr(module, "config", None)
        return getattr(config, "model_type", None) in self.model_types and hasattr(module, self.decoder)
