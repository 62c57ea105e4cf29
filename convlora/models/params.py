"""Parameter counts: of any module, and of released SAM / SAM 2 / SAM 3 variants with adapters (meta device)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tuner import ConvLoraConfig
from .adapters import apply_conv_lora
from .family import FAMILIES
from .merged_io import merged_extra_parameters


def family_variants() -> dict[str, dict[str, Any]]:
    """The released variants of each family that lists some (``ModelFamily.variants``): name -> config builder."""
    return {name: dict(family.variants) for name, family in FAMILIES.items() if family.variants}


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


def parameter_counts(
    variant: str = "vit-b", config: Any = None, *, plain_lora: bool = False, family: str = "sam", method: Any = None
) -> dict[str, Any]:
    """Parameter counts of a released model variant with adapters, built on the meta device (no weights).

    Args:
        variant: a key of ``family_variants()[family]``: ``"vit-b"``, ``"vit-l"``, ``"vit-h"`` (SAM);
            ``"hiera-tiny"``, ``"hiera-small"``, ``"hiera-base-plus"``, ``"hiera-large"`` (SAM 2 / 2.1);
            ``"sam3"`` (SAM 3).
        config: the adapter configuration (defaults when ``None``).
        plain_lora: count PEFT's LoRA with the same targets instead of Conv-LoRA.
        family: ``"sam"``, ``"sam2"`` or ``"sam3"``.
        method: count this training method instead (a ``convlora.artifact.Method``: its ``name``, ``build``
            and ``mergeable`` are read), e.g. ``METHODS["loha"]``.

    Returns:
        A dict with ``model`` (base parameters), ``adapter`` (the trained tensors outside the mask decoder:
        LoRA or Conv-LoRA tensors, a PEFT method's, BitFit's encoder biases), ``conv_experts`` (the expert
        mixtures' share of ``adapter``), ``mask_decoder`` (trained in full), ``trainable`` (adapter + mask
        decoder) and ``merged_extra`` (what a merged model keeps on top of the base architecture; ``None``
        for a method that does not merge).

    >>> parameter_counts("vit-b")["model"]
    93735728
    """
    config = ConvLoraConfig() if config is None else config
    variants = family_variants()
    if family not in variants:
        raise ValueError(f"family must be one of {sorted(variants)}, got {family!r}")
    if variant not in variants[family]:
        raise ValueError(f"Unknown {family} variant {variant!r}; choose one of {sorted(variants[family])}")
    model_config = variants[family][variant]()
    model_cls = next(f for f in FAMILIES.values() if model_config.model_type in f.model_types).model_class()
    with torch.device("meta"):
        model = model_cls(model_config)
    base_total = count_parameters(model)
    decoder = count_parameters(model.mask_decoder)
    if method is None:
        name, mergeable = ("lora" if plain_lora else "conv_lora"), True
        peft_model = apply_conv_lora(model, config, plain_lora=plain_lora)
    else:
        name, mergeable = method.name, method.mergeable
        peft_model = method.build(model, config)
    trainable = count_parameters(peft_model, trainable_only=True)
    # named_parameters() lists a shared parameter once
    adapter = sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".mask_decoder." not in f".{n}"
    )
    experts = sum(p.numel() for n, p in peft_model.named_parameters() if "conv_lora_experts" in n)
    merged = peft_model.merge_and_unload() if mergeable else None
    return {
        "family": family,
        "variant": variant,
        "method": name,
        "model": base_total,
        "adapter": adapter,
        "conv_experts": experts,
        "mask_decoder": decoder,
        "trainable": trainable,
        "merged_extra": None if merged is None else merged_extra_parameters(merged),
    }
