"""SAM (transformers' ``SamModel``; also MedSAM and SlimSAM checkpoints): configs, resizing, the family entry.

SAM's image encoder is a ViT whose fused ``attn.qkv`` projections see a channels-last grid, windowed
``(b * windows, 14, 14, d)`` or global ``(b, 64, 64, d)`` at 1024 px; Conv-LoRA's layer reads the grid from
that shape. The registry of every family is :mod:`convlora.models.family`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import SamConfig, SamModel

from .base import ModelFamily

# Encoder hyper-parameters of the released SAM checkpoints (facebook/sam-vit-{base,large,huge}).
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "global_attn_indexes": [2, 5, 8, 11]},
    "vit-l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "global_attn_indexes": [5, 11, 17, 23]},
    "vit-h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
              "global_attn_indexes": [7, 15, 23, 31]},
}  # fmt: skip


def sam_config(variant: str = "vit-b", image_size: int = 1024) -> SamConfig:
    """``SamConfig`` of a released SAM variant, built locally (no download).

    Args:
        variant: ``"vit-b"``, ``"vit-l"`` or ``"vit-h"``.
        image_size: input side length; 1024 for the released checkpoints.

    >>> sam_config("vit-b").vision_config.hidden_size
    768
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}")
    vision = dict(SAM_VARIANTS[variant], image_size=image_size, patch_size=16, output_channels=256,
                  window_size=14, mlp_ratio=4.0, num_pos_feats=128)  # fmt: skip
    prompt = {"hidden_size": 256, "image_size": image_size, "patch_size": 16}
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config={"hidden_size": 256})


def tiny_sam_config(
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    window_size: int = 4,
    global_attn_indexes: Sequence[int] = (1,),
    decoder_size: int = 16,
    mlp_ratio: float = 2.0,
) -> SamConfig:
    """A small ``SamConfig`` with the real architecture (windowed and global attention, fused qkv).

    The defaults build a ~40k-parameter model for tests; the embedded base uses larger values.

    Args:
        image_size: input side length (a multiple of ``patch_size``).
        patch_size: patch side length.
        hidden_size: encoder width.
        num_hidden_layers: encoder depth.
        num_attention_heads: encoder heads.
        window_size: side of the attention windows in windowed layers.
        global_attn_indexes: layers with global attention.
        decoder_size: width of the prompt encoder and mask decoder (and of the encoder's output).
        mlp_ratio: encoder MLP width relative to ``hidden_size``.

    >>> cfg = tiny_sam_config()
    >>> cfg.vision_config.image_size, cfg.mask_decoder_config.hidden_size
    (64, 16)
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if decoder_size % 4:
        raise ValueError(f"decoder_size must be a multiple of 4, got {decoder_size}")
    vision = {
        "hidden_size": hidden_size,
        "output_channels": decoder_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "window_size": window_size,
        "global_attn_indexes": list(global_attn_indexes),
        "num_pos_feats": decoder_size // 2,
        "mlp_dim": int(hidden_size * mlp_ratio),
    }
    prompt = {
        "hidden_size": decoder_size,
        "image_size": image_size,
        "patch_size": patch_size,
        "mask_input_channels": 4,
    }
    decoder = {
        "hidden_size": decoder_size,
        "mlp_dim": decoder_size * 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": decoder_size * 2,
    }
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _interpolate_grid(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding ``(1, h, w, d)`` to ``(1, size, size, d)``."""
    grid = rearrange(table.float(), "one h w d -> one d h w")
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return rearrange(grid, "one d h w -> one h w d").to(table.dtype)


def _interpolate_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a relative position table ``(L, head_dim)`` to ``(length, head_dim)``.

    This is the interpolation SAM applies at run time when the grid differs from the table, so resizing
    the stored table up front leaves the outputs of the global-attention layers unchanged.
    """
    resized = F.interpolate(rearrange(table.float(), "l c -> 1 c l"), size=length, mode="linear")
    return rearrange(resized, "1 c l -> l c").to(table.dtype)


def resize_sam(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of a SAM model that takes ``image_size x image_size`` inputs.

    Builds the model anew from a config with the new size, interpolates the absolute position embedding
    (bicubic) and the relative position tables of the global-attention layers (linear, as SAM does at run
    time), and copies every other weight. Mask outputs are ``image_size / 4`` on a side. Cost grows with
    the square of the size: 512 costs about a quarter of 1024 per image.

    Args:
        model: a ``SamModel`` or ``SamHQModel`` (not wrapped in PEFT: resize before injecting adapters).
        image_size: new input side length, a multiple of the patch size.

    >>> from transformers import SamModel
    >>> small = resize_sam(SamModel(tiny_sam_config(image_size=64)), 96)
    >>> small.config.vision_config.image_size
    96
    """
    if "vision_encoder" not in dict(model.named_children()):
        raise ValueError("resize_sam expects the SAM model itself; resize before applying adapters")
    vision = model.config.vision_config
    patch = vision.patch_size
    if not isinstance(image_size, int) or image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    if image_size == vision.image_size:
        return model
    config_dict = model.config.to_dict()
    config_dict["vision_config"]["image_size"] = image_size
    config_dict["prompt_encoder_config"]["image_size"] = image_size
    # Derived field that to_dict() carries; the new config recomputes it from the new image size.
    config_dict["prompt_encoder_config"].pop("image_embedding_size", None)
    new_config = type(model.config).from_dict(config_dict)
    grid = image_size // patch
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("vision_encoder.pos_embed"):
            state[key] = _interpolate_grid(value, grid)
    for index in range(vision.num_hidden_layers):
        if index in vision.global_attn_indexes or vision.window_size == 0:
            for axis in ("rel_pos_h", "rel_pos_w"):
                key = f"vision_encoder.layers.{index}.attn.{axis}"
                if key in state:
                    state[key] = _interpolate_rel_pos(state[key], 2 * grid - 1)
    new_model = type(model)(new_config)
    new_model.load_state_dict(state, strict=True)
    return new_model.to(next(model.parameters()).device).train(model.training)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ViT blocks of a SAM's image encoder (``vision_encoder.layers``)."""
    return model.vision_encoder.layers


def image_size(model: nn.Module) -> int:
    """The square input size a SAM model takes."""
    return int(model.config.vision_config.image_size)


def encode_image(sam: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
    """SAM's (and SAM-HQ's) image encoder once: the embeddings its mask decoder reads, with gradients.

    Adapters inside the encoder's layers take part (transformers' ``get_image_embeddings`` runs without
    gradients). SAM-HQ's decoder also reads early encoder features (``intermediate_embeddings``).
    """
    output = sam.vision_encoder(pixel_values)
    embeddings: dict[str, Any] = {"image_embeddings": output.last_hidden_state}  # (b, c, S/16, S/16)
    intermediate = getattr(output, "intermediate_embeddings", None)
    if intermediate is not None:
        embeddings["intermediate_embeddings"] = intermediate
    return embeddings


# Named target sets inside one ViT block (``vision_encoder.layers.N``).
PRESETS: dict[str, str] = {
    "qkv": r"attn\.qkv",
    "qkv_proj": r"attn\.(?:qkv|proj)",
    "attention_mlp": r"(?:attn\.(?:qkv|proj)|mlp\.(?:lin1|lin2))",
}
ENCODER_PATH = r"vision_encoder\.layers"

FAMILY = ModelFamily(
    name="sam",
    model_types=("sam",),
    model_class=lambda: SamModel,
    encoder_layers=encoder_layers,
    image_size=image_size,
    resize=resize_sam,
    encoder_path=ENCODER_PATH,
    target_presets=PRESETS,
    encode_image=encode_image,
    export_split="vit",
    variants={name: (lambda name=name: sam_config(name)) for name in SAM_VARIANTS},
    multiclass=True,
    description="SAM (SamModel; MedSAM, SlimSAM): ViT image encoder with fused attn.qkv",
)
