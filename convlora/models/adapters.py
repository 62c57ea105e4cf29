"""``apply_conv_lora``: Conv-LoRA (or PEFT's LoRA, the baseline) on a SAM model's image encoder."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._compat import quiet_peft_deprecations
from ..tuner import ConvLoraConfig
from ..tuner.model import tuner_layer_method
from .family import family_of, find_sam


def existing_adapters(model: nn.Module) -> dict[str, list[str]]:
    """The adapters already in ``model``: adapter names by method (``"Conv-LoRA"``, ``"LORA"``, ...).

    Args:
        model: any module (a ``PeftModel``, a model ``load_adapter`` gave adapters, a plain SAM).

    >>> existing_adapters(nn.Linear(2, 2))
    {}
    """
    found: dict[str, set[str]] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            found.setdefault(tuner_layer_method(module), set()).update(module._get_available_adapters())
    return {kind: sorted(names) for kind, names in found.items()}


def _refuse_adapted(model: nn.Module, function: str, method: str) -> None:
    # get_peft_model over existing adapter layers would re-initialise them (same name) or fail on them (other method)
    found = existing_adapters(model)
    if not found:
        return
    listed = "; ".join(f"{kind} adapter {', '.join(repr(n) for n in names)}" for kind, names in found.items())
    if set(found) == {method}:
        hint = "add a second adapter with peft_model.add_adapter(name, config) instead"
    else:
        hint = "adapters of different methods do not stack: merge_and_unload() or unload() the existing one first"
    raise ValueError(
        f"{function}: {type(model).__name__} already has a {listed}; refusing to apply another over it (that would "
        f"reset or break the trained one); {hint}, or start from a model without adapters"
    )


def _checked_config(model: nn.Module, config: Any, lora: bool = False) -> ConvLoraConfig:
    config = ConvLoraConfig() if config is None else config
    if not isinstance(config, ConvLoraConfig):
        raise TypeError(f"config must be a ConvLoraConfig, got {type(config).__name__}")
    _refuse_adapted(model, *(("apply_lora", "LORA") if lora else ("apply_conv_lora", "Conv-LoRA")))
    sam = find_sam(model)
    config.resolve_targets(sam.config.model_type, type(sam).__name__)
    depth = len(family_of(sam).encoder_layers(sam))
    if config.layers is not None and max(config.layers) >= depth:
        raise ValueError(f"layers {config.layers} out of range: the image encoder has {depth} layers (0..{depth - 1})")
    return config


def apply_conv_lora(
    model: nn.Module,
    config: ConvLoraConfig | None = None,
    *,
    adapter_name: str = "default",
    plain_lora: bool = False,
) -> Any:
    """Inject Conv-LoRA into SAM's image encoder and return a ``peft.PeftModel``.

    Only the adapters and the modules in ``config.modules_to_save`` (the mask decoder by default) are
    trainable afterwards. The base model's behaviour is untouched (a fresh adapter gives its outputs exactly);
    a model that already carries adapters is refused, never reset.

    Args:
        model: a ``SamModel``, ``SamHQModel``, ``Sam2Model``, ``Sam3TrackerModel`` (or ``Sam3Model``), or a
            module containing one.
        config: a :class:`~convlora.ConvLoraConfig`; the defaults when ``None``. Its target preset is resolved
            for the model's family (in place).
        adapter_name: name of the adapter in the returned ``PeftModel``.
        plain_lora: kept for code written against convlora 0.1; the same as :func:`apply_lora`.

    >>> from transformers import SamModel
    >>> from convlora import ConvLoraConfig, tiny_sam_config
    >>> peft_model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
    >>> type(peft_model).__name__
    'PeftModel'
    """
    if plain_lora:
        return apply_lora(model, config, adapter_name=adapter_name)
    config = _checked_config(model, config)
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    outside = [name for name in describe_targets(peft_model) if ".vision_encoder." not in f".{name}"]
    if outside:
        raise ValueError(
            f"Conv-LoRA's conv experts need the token grid of SAM's image encoder, but target_modules also "
            f"matched {outside[:3]}; restrict target_modules to vision_encoder layers"
        )
    return peft_model


def apply_lora(model: nn.Module, config: ConvLoraConfig | None = None, *, adapter_name: str = "default") -> Any:
    """PEFT's own LoRA with a Conv-LoRA config's targets, rank, alpha, dropout and ``modules_to_save``.

    The baseline Conv-LoRA is measured against; it merges into a vanilla ``SamModel``.

    Args:
        model: a ``SamModel``, ``SamHQModel`` or a module containing one.
        config: a :class:`~convlora.ConvLoraConfig` (its expert settings are ignored); defaults when ``None``.
        adapter_name: name of the adapter in the returned ``PeftModel``.

    >>> from convlora import tiny_sam_config
    >>> from convlora.models import random_sam
    >>> type(apply_lora(random_sam(tiny_sam_config())).peft_config["default"]).__name__
    'LoraConfig'
    """
    config = _checked_config(model, config, lora=True)
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        init_lora_weights=config.init_lora_weights,
    )
    with quiet_peft_deprecations():
        return get_peft_model(model, lora_config, adapter_name=adapter_name)


def describe_targets(model: nn.Module) -> list[str]:
    """Names of the modules that carry adapters in a PEFT-wrapped model (for logs and tests).

    Args:
        model: a PEFT-wrapped model.
    """
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
