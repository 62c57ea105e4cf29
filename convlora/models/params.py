"""Parameter counts: of any module, and of released SAM variants with adapters (on the meta device)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import SamModel

from ..tuner import ConvLoraConfig
from .adapters import apply_conv_lora
from .merged_io import merged_extra_parameters
from .sam import sam_config


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters, optionally only those with ``requires_grad``.

    Args:
        model: any module; shared (tied) parameters count once.
        trainable_only: count only parameters with ``requires_grad``.

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_counts(variant: str = "vit-b", config: Any = None, *, plain_lora: bool = False) -> dict[str, Any]:
    """Parameter counts of a released SAM variant with adapters, built on the meta device (no weights).

    Args:
        variant: ``"vit-b"``, ``"vit-l"`` or ``"vit-h"``.
        config: the adapter configuration (defaults when ``None``).
        plain_lora: count PEFT's LoRA with the same targets instead of Conv-LoRA.

    Returns:
        A dict with ``model`` (base parameters), ``adapter`` (LoRA or Conv-LoRA tensors),
        ``conv_experts`` (the expert mixtures' share of ``adapter``), ``mask_decoder`` (trained in full),
        ``trainable`` (adapter + mask decoder) and ``merged_extra`` (what a merged model keeps on top of the
        base architecture).

    >>> parameter_counts("vit-b")["model"]
    93735728
    """
    config = ConvLoraConfig() if config is None else config
    with torch.device("meta"):
        model = SamModel(sam_config(variant))
    base_total = count_parameters(model)
    decoder = count_parameters(model.mask_decoder)
    peft_model = apply_conv_lora(model, config, plain_lora=plain_lora)
    adapter = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    experts = sum(p.numel() for n, p in peft_model.named_parameters() if "conv_lora_experts" in n)
    trainable = count_parameters(peft_model, trainable_only=True)
    merged = peft_model.merge_and_unload()
    return {
        "variant": variant,
        "method": "lora" if plain_lora else "conv_lora",
        "model": base_total,
        "adapter": adapter,
        "conv_experts": experts,
        "mask_decoder": decoder,
        "trainable": trainable,
        "merged_extra": merged_extra_parameters(merged),
    }
