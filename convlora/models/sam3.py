"""SAM 3 (transformers' ``Sam3TrackerModel``, its promptable image model): configs, resizing, the family entries.

SAM 3's image encoder is a plain ViT (patch 14, 1008 px, 72 x 72 tokens) with 2-D rotary position encoding,
windowed attention (24 x 24 windows, zero-padded at the border) and four global layers. Each layer has
separate ``attention.{q_proj,k_proj,v_proj,o_proj}`` and ``mlp.{fc1,fc2}`` ``nn.Linear`` modules, all fed
a channels-last grid, windowed ``(b * windows, 24, 24, C)`` or global ``(b, 72, 72, C)``: Conv-LoRA's
layer reads that grid from the tensor's shape.

``Sam3Model`` (concept segmentation from text or exemplar prompts) shares that image encoder, so Conv-LoRA
adapts its image path with the same presets (family ``sam3_concept``); it has no prompt-free mask call,
so convlora's trainer, evaluation and prediction refuse it and point to ``Sam3TrackerModel``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelFamily, backbone_config, square_side
from .sam2 import encode_pyramid, single_token_masks

# SAM 3's image encoder as released (facebook/sam3); transformers' defaults describe it.
SAM3_VIT: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4736, "num_hidden_layers": 32, "num_attention_heads": 16,
    "patch_size": 14, "window_size": 24, "global_attn_indexes": [7, 15, 23, 31], "pretrain_image_size": 336,
}  # fmt: skip
SAM3_MEAN = (0.5, 0.5, 0.5)
SAM3_STD = (0.5, 0.5, 0.5)


def _configs() -> Any:
    from transformers import Sam3TrackerConfig
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig

    return Sam3TrackerConfig, Sam3VisionConfig, Sam3ViTConfig


def _feature_sizes(grid: int) -> list[list[int]]:
    """The three feature-map sizes the neck hands to the decoder: 4x, 2x and 1x the token grid."""
    return [[grid * 4] * 2, [grid * 2] * 2, [grid] * 2]


def sam3_config(image_size: int = 1008) -> Any:
    """``Sam3TrackerConfig`` of the released SAM 3 image model, built locally (no download).

    Args:
        image_size: input side length; 1008 (72 patches of 14) for the released checkpoint.

    >>> sam3_config().vision_config.backbone_config.num_hidden_layers
    32
    """
    config_cls, vision_cls, vit_cls = _configs()
    if image_size % SAM3_VIT["patch_size"]:
        raise ValueError(f"image_size must be a multiple of {SAM3_VIT['patch_size']} for SAM 3, got {image_size}")
    vit = vit_cls(**SAM3_VIT, image_size=image_size)
    vision = vision_cls(
        backbone_config=vit, fpn_hidden_size=256, backbone_feature_sizes=_feature_sizes(image_size // 14)
    )
    prompt = {"hidden_size": 256, "image_size": image_size, "patch_size": 14}
    return config_cls(vision_config=vision, prompt_encoder_config=prompt)


def tiny_sam3_config(image_size: int = 224, decoder_size: int = 32) -> Any:
    """A ~0.5M-parameter ``Sam3TrackerConfig`` with SAM 3's real structure (RoPE, windows, global layers).

    Args:
        image_size: input side length, a multiple of 14.
        decoder_size: width of the FPN neck, prompt encoder and mask decoder.

    >>> tiny_sam3_config().vision_config.backbone_feature_sizes
    [[64, 64], [32, 32], [16, 16]]
    """
    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of 14 for SAM 3, got {image_size}")
    config_cls, vision_cls, vit_cls = _configs()
    vit = vit_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        window_size=8,
        global_attn_indexes=[1, 3],
        pretrain_image_size=112,
    )
    vision = vision_cls(
        backbone_config=vit, fpn_hidden_size=decoder_size, backbone_feature_sizes=_feature_sizes(image_size // 14)
    )
    prompt = {"hidden_size": decoder_size, "image_size": image_size, "patch_size": 14}
    decoder = {"hidden_size": decoder_size, "mlp_dim": decoder_size * 4, "iou_head_hidden_dim": decoder_size}
    return config_cls(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ViT layers of a SAM 3 image encoder (``vision_encoder.backbone.layers``)."""
    return model.vision_encoder.backbone.layers


def image_size(model: nn.Module) -> int:
    """The square input size a SAM 3 model takes (1008 for the released one)."""
    return square_side(backbone_config(model).image_size)


def patch_size(model: nn.Module) -> int:
    """SAM 3's patch size (14)."""
    return square_side(backbone_config(model).patch_size)


def resize_sam3(model: nn.Module, size: int) -> nn.Module:
    """A copy of a SAM 3 image model that takes ``size x size`` inputs (same weights, new config).

    SAM 3 tiles its absolute position embedding to any grid, pads the attention windows, and its global
    layers' rotary positions are normalised to the window size: a new grid only changes the config (image
    size, the neck's feature sizes, the prompt encoder's size). Masks come out at ``size / 14 * 4``.

    Args:
        model: a ``Sam3TrackerModel`` (not wrapped in PEFT: resize before injecting adapters).
        size: new input side length, a multiple of 14 (e.g. 518 or 1008).

    >>> from convlora.models.loading import random_sam
    >>> resize_sam3(random_sam(tiny_sam3_config()), 280).config.prompt_encoder_config.image_size
    280
    """
    if "vision_encoder" not in dict(model.named_children()):
        raise ValueError("resize_sam3 expects the SAM 3 model itself; resize before applying adapters")
    patch = patch_size(model)
    if not isinstance(size, int) or size <= 0 or size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch} for SAM 3, got {size!r}")
    if size == image_size(model):
        return model
    config_dict = model.config.to_dict()
    config_dict["vision_config"]["backbone_config"]["image_size"] = size
    config_dict["vision_config"]["backbone_feature_sizes"] = _feature_sizes(size // patch)
    config_dict["prompt_encoder_config"]["image_size"] = size
    new_model = type(model)(type(model.config).from_dict(config_dict))
    new_model.load_state_dict(model.state_dict(), strict=True)
    return new_model.to(next(model.parameters()).device).train(model.training)


def _tracker_class() -> type[nn.Module]:
    from transformers import Sam3TrackerModel

    return Sam3TrackerModel


def _concept_class() -> type[nn.Module]:
    from transformers import Sam3Model

    return Sam3Model


# SAM 3's ViT has separate projections; "qv" is LoRA's usual choice.
PRESETS: dict[str, str] = {
    "qv": r"attention\.(?:q_proj|v_proj)",
    "qkv": r"attention\.(?:q_proj|k_proj|v_proj)",
    "attention": r"attention\.(?:q_proj|k_proj|v_proj|o_proj)",
    "attention_mlp": r"(?:attention\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:fc1|fc2))",
}
ENCODER_PATH = r"vision_encoder\.backbone\.layers"

FAMILY = ModelFamily(
    name="sam3",
    model_types=("sam3_tracker", "sam3_video", "sam3_tracker_video"),
    model_class=_tracker_class,
    encoder_layers=encoder_layers,
    image_size=image_size,
    patch_size=patch_size,
    size_multiple=patch_size,
    resize=resize_sam3,
    image_mean=SAM3_MEAN,
    image_std=SAM3_STD,
    pad_to_square=False,
    prepare=single_token_masks,
    encoder_path=ENCODER_PATH,
    target_presets=PRESETS,
    encode_image=encode_pyramid,
    export_split="pyramid",
    variants={"sam3": sam3_config},
    multiclass=True,
    description="SAM 3 (Sam3TrackerModel): ViT image encoder with RoPE and separate q/k/v/o projections",
)

CONCEPT_FAMILY = ModelFamily(
    name="sam3_concept",
    model_types=("sam3",),
    model_class=_concept_class,
    encoder_layers=encoder_layers,
    image_size=image_size,
    patch_size=patch_size,
    size_multiple=patch_size,
    encoder_path=ENCODER_PATH,
    target_presets=PRESETS,
    presets="sam3",
    prompt_free=False,
    image_mean=SAM3_MEAN,
    image_std=SAM3_STD,
    pad_to_square=False,
    description="SAM 3 concept model (Sam3Model): SAM 3's image encoder under text/exemplar prompts",
)
