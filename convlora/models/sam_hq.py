"""SAM-HQ (transformers' ``SamHQModel``): SAM's ViT encoder and prompt encoder with a high-quality mask decoder.

Its encoder is SAM's, so Conv-LoRA's targets, resizing and parameter counts are SAM's own.
"""

from __future__ import annotations

from torch import nn

from . import sam
from .base import ModelFamily


def _model_class() -> type[nn.Module]:
    from transformers import SamHQModel

    return SamHQModel


FAMILY = ModelFamily(
    name="sam_hq",
    model_types=("sam_hq",),
    model_class=_model_class,
    encoder_layers=sam.encoder_layers,
    image_size=sam.image_size,
    resize=sam.resize_sam,
    encoder_path=sam.ENCODER_PATH,
    target_presets=sam.PRESETS,
    encode_image=sam.encode_image,
    export_split="vit_hq",
    description="SAM-HQ (SamHQModel): SAM's ViT encoder with an HQ mask decoder",
)
