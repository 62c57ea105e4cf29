"""SAM 2 and SAM 2.1 (transformers' ``Sam2Model``, Hiera image encoder): configs, resizing, the family entry.

Hiera is a multi-scale ViT: four stages whose width doubles (and grid halves, by query pooling) at each
stage change. Every block has one fused ``attn.qkv`` ``nn.Linear`` fed a channels-last grid, windowed
``(b * windows, w, w, C)`` or global ``(b, h, w, C)``; Conv-LoRA's layer reads that grid from the tensor's
shape, so the per-stage widths and window sizes need nothing special. SAM 2.1 checkpoints have the same
architecture as SAM 2 (only the weights differ). Video checkpoints (``model_type: sam2_video``) load as the
image model ``Sam2Model``; their memory modules are not used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .base import ModelFamily, backbone_config, square_side
from .processing import IMAGENET_MEAN, IMAGENET_STD

# Hiera hyper-parameters of the released checkpoints (facebook/sam2{,.1}-hiera-{tiny,small,base-plus,large}).
SAM2_VARIANTS: dict[str, dict[str, Any]] = {
    "hiera-tiny": {"hidden_size": 96, "num_attention_heads": 1, "blocks_per_stage": [1, 2, 7, 2],
                   "embed_dim_per_stage": [96, 192, 384, 768], "num_attention_heads_per_stage": [1, 2, 4, 8],
                   "window_size_per_stage": [8, 4, 14, 7], "global_attention_blocks": [5, 7, 9],
                   "window_positional_embedding_background_size": [7, 7]},
    "hiera-small": {"hidden_size": 96, "num_attention_heads": 1, "blocks_per_stage": [1, 2, 11, 2],
                    "embed_dim_per_stage": [96, 192, 384, 768], "num_attention_heads_per_stage": [1, 2, 4, 8],
                    "window_size_per_stage": [8, 4, 14, 7], "global_attention_blocks": [7, 10, 13],
                    "window_positional_embedding_background_size": [7, 7]},
    "hiera-base-plus": {"hidden_size": 112, "num_attention_heads": 2, "blocks_per_stage": [2, 3, 16, 3],
                        "embed_dim_per_stage": [112, 224, 448, 896], "num_attention_heads_per_stage": [2, 4, 8, 16],
                        "window_size_per_stage": [8, 4, 14, 7], "global_attention_blocks": [12, 16, 20],
                        "window_positional_embedding_background_size": [14, 14]},
    "hiera-large": {"hidden_size": 144, "num_attention_heads": 2, "blocks_per_stage": [2, 6, 36, 4],
                    "embed_dim_per_stage": [144, 288, 576, 1152], "num_attention_heads_per_stage": [2, 4, 8, 16],
                    "window_size_per_stage": [8, 4, 16, 8], "global_attention_blocks": [23, 33, 43],
                    "window_positional_embedding_background_size": [7, 7]},
}  # fmt: skip


def _configs() -> Any:
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    return Sam2Config, Sam2VisionConfig, Sam2HieraDetConfig


def _feature_sizes(image_size: int, stride: int = 4) -> list[list[int]]:
    """The three feature-map sizes the neck hands to the decoder: strides 4, 8 and 16 of the input."""
    return [[image_size // (stride * 2**level)] * 2 for level in range(3)]


def sam2_config(variant: str = "hiera-base-plus", image_size: int = 1024) -> Any:
    """``Sam2Config`` of a released SAM 2 / 2.1 variant, built locally (no download).

    Args:
        variant: ``"hiera-tiny"``, ``"hiera-small"``, ``"hiera-base-plus"`` or ``"hiera-large"``.
        image_size: input side length; 1024 for the released checkpoints.

    >>> sam2_config("hiera-tiny").vision_config.backbone_config.blocks_per_stage
    [1, 2, 7, 2]
    """
    if variant not in SAM2_VARIANTS:
        raise ValueError(f"Unknown SAM 2 variant {variant!r}; choose one of {sorted(SAM2_VARIANTS)}")
    config_cls, vision_cls, hiera_cls = _configs()
    spec = SAM2_VARIANTS[variant]
    hiera = hiera_cls(**spec, image_size=[image_size, image_size])
    vision = vision_cls(
        backbone_config=hiera,
        backbone_channel_list=list(reversed(spec["embed_dim_per_stage"])),
        backbone_feature_sizes=_feature_sizes(image_size),
        fpn_hidden_size=256,
    )
    return config_cls(vision_config=vision, prompt_encoder_config={"hidden_size": 256, "image_size": image_size})


def tiny_sam2_config(image_size: int = 256, decoder_size: int = 32) -> Any:
    """A ~0.35M-parameter ``Sam2Config`` with Hiera's real structure (4 stages, windows, a global block).

    Args:
        image_size: input side length, a multiple of 32.
        decoder_size: width of the FPN neck, prompt encoder and mask decoder.

    >>> tiny_sam2_config().vision_config.backbone_feature_sizes
    [[64, 64], [32, 32], [16, 16]]
    """
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 for the tiny SAM 2 config, got {image_size}")
    config_cls, vision_cls, hiera_cls = _configs()
    hiera = hiera_cls(
        hidden_size=16,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[8, 4, 8, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
        image_size=[image_size, image_size],
    )
    vision = vision_cls(
        backbone_config=hiera,
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=_feature_sizes(image_size),
        fpn_hidden_size=decoder_size,
    )
    prompt = {"hidden_size": decoder_size, "image_size": image_size, "patch_size": 16}
    decoder = {"hidden_size": decoder_size, "mlp_dim": decoder_size * 4, "iou_head_hidden_dim": decoder_size}
    return config_cls(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The Hiera blocks of a SAM 2 image encoder (``vision_encoder.backbone.blocks``)."""
    return model.vision_encoder.backbone.blocks


def image_size(model: nn.Module) -> int:
    """The square input size a SAM 2 model takes."""
    return square_side(backbone_config(model).image_size)


def patch_size(model: nn.Module) -> int:
    """Stride of Hiera's patch embedding (4: the first stage works on a quarter-resolution grid)."""
    return square_side(backbone_config(model).patch_stride)


def size_multiple(model: nn.Module) -> int:
    """Inputs must tile the first stage's windows and survive every query-pooling stage (32 for SAM 2)."""
    hiera = backbone_config(model)
    stride = patch_size(model)
    pooled = stride * int(hiera.query_stride[0]) ** int(hiera.num_query_pool_stages)
    return math.lcm(stride * int(hiera.window_size_per_stage[0]), pooled, 16)


def resize_sam2(model: nn.Module, size: int) -> nn.Module:
    """A copy of a SAM 2 model that takes ``size x size`` inputs (same weights, new config).

    Hiera interpolates its background position embedding to the grid at run time and tiles the window
    embedding, so no weight changes: only the config's image size, the neck's feature sizes and the prompt
    encoder's size do. Masks come out at ``size / 4``.

    Args:
        model: a ``Sam2Model`` (not wrapped in PEFT: resize before injecting adapters).
        size: new input side length, a multiple of :func:`size_multiple` (32 for the released models).

    >>> from convlora.models.loading import random_sam
    >>> resize_sam2(random_sam(tiny_sam2_config()), 320).config.prompt_encoder_config.image_size
    320
    """
    if "vision_encoder" not in dict(model.named_children()):
        raise ValueError("resize_sam2 expects the SAM 2 model itself; resize before applying adapters")
    multiple = size_multiple(model)
    if not isinstance(size, int) or size <= 0 or size % multiple:
        raise ValueError(f"image_size must be a positive multiple of {multiple} for SAM 2, got {size!r}")
    if size == image_size(model):
        return model
    config_dict = model.config.to_dict()
    config_dict["vision_config"]["backbone_config"]["image_size"] = [size, size]
    config_dict["vision_config"]["backbone_feature_sizes"] = _feature_sizes(size, patch_size(model))
    config_dict["prompt_encoder_config"]["image_size"] = size
    new_model = type(model)(type(model.config).from_dict(config_dict))
    new_model.load_state_dict(model.state_dict(), strict=True)
    return new_model.to(next(model.parameters()).device).train(model.training)


def single_token_masks(model: nn.Module) -> None:
    """Make the single-mask output always come from mask token 0, in training and evaluation alike (in place).

    In eval mode SAM 2's (and SAM 3's) decoder replaces an "unstable" token-0 mask by the best of the three
    multimask outputs (``dynamic_multimask_via_stability``), meant for interactive clicks. A model fine-tuned
    on token 0 would then be evaluated on other, untrained tokens; convlora turns the fallback off.

    This is convlora's task setting (``TaskInfo.single_mask_token``), not the model's: loading and adapting
    leave the fallback on, as transformers has it. To reproduce convlora's evaluation with stock PEFT, call
    this (or set ``dynamic_multimask_via_stability = False`` on the mask decoder) after loading.

    Args:
        model: a ``Sam2Model`` or ``Sam3TrackerModel`` (or a module containing one, e.g. a ``PeftModel``).
    """
    for module in model.modules():
        if hasattr(module, "dynamic_multimask_via_stability"):
            module.dynamic_multimask_via_stability = False
        decoder_config = getattr(getattr(module, "config", None), "mask_decoder_config", None)
        if decoder_config is not None and hasattr(decoder_config, "dynamic_multimask_via_stability"):
            decoder_config.dynamic_multimask_via_stability = False


def _model_class() -> type[nn.Module]:
    from transformers import Sam2Model

    return Sam2Model


def encode_pyramid(sam: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
    """SAM 2's (and SAM 3's) image embeddings as their ``get_image_embeddings`` builds them, but with gradients.

    The decoder reads a pyramid of feature maps; the last (coarsest) gets the "no memory" embedding a single
    image is decoded with; every map comes back as ``(b, c, h, w)``.
    """
    maps = list(sam.get_image_features(pixel_values, return_dict=True).fpn_hidden_states)  # each ((h w), b, c)
    maps[-1] = maps[-1] + sam.no_memory_embedding
    pyramid = [
        rearrange(feature, "(h w) b c -> b c h w", h=size[0], w=size[1])
        # SAM 3's encoder gives one map more than its decoder reads; zip keeps the ones it reads, as transformers does
        for feature, size in zip(maps, sam.backbone_feature_sizes, strict=False)
    ]
    return {"image_embeddings": pyramid}


# Hiera: one fused qkv per block; `blocks.N.proj` (the skip projection at stage changes) is never a target.
PRESETS: dict[str, str] = {
    "qkv": r"attn\.qkv",
    "qkv_proj": r"attn\.(?:qkv|proj)",
    "attention_mlp": r"(?:attn\.(?:qkv|proj)|mlp\.(?:proj_in|proj_out))",
}


FAMILY = ModelFamily(
    name="sam2",
    model_types=("sam2", "sam2_video"),
    model_class=_model_class,
    encoder_layers=encoder_layers,
    image_size=image_size,
    patch_size=patch_size,
    size_multiple=size_multiple,
    resize=resize_sam2,
    image_mean=IMAGENET_MEAN,
    image_std=IMAGENET_STD,
    pad_to_square=False,
    prepare=single_token_masks,
    encoder_path=r"vision_encoder\.backbone\.blocks",
    target_presets=PRESETS,
    encode_image=encode_pyramid,
    export_split="pyramid",
    variants={name: (lambda name=name: sam2_config(name)) for name in SAM2_VARIANTS},
    multiclass=True,
    description="SAM 2 / 2.1 (Sam2Model): Hiera image encoder with fused attn.qkv in every block",
)
