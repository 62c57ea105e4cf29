"""``ConvLoraModel``: the PEFT tuner that injects :class:`~convlora.tuner.layer.ConvLoraLinear` layers.

Importing ``convlora.tuner`` registers it as the ``CONV_LORA`` method with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``save_pretrained`` and ``merge_and_unload`` work with a
:class:`~convlora.ConvLoraConfig`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import ConvLoraConfig
from .layer import ConvLoraLayer, ConvLoraLinear
from .merged import ConvLoraMergedLinear, guard_save_pretrained


def _adapter_names(layer: BaseTunerLayer) -> list[str]:
    """The adapter names a tuner layer (of any PEFT method) holds."""
    return sorted(layer._get_available_adapters())


def tuner_layer_method(layer: BaseTunerLayer) -> str:
    """The PEFT method of a tuner layer, for messages: ``"Conv-LoRA"``, ``"LORA"``, ...

    Args:
        layer: a PEFT tuner layer.

    >>> tuner_layer_method(ConvLoraLinear(nn.Linear(8, 8), "default", ConvLoraConfig(r=2, num_experts=2)))
    'Conv-LoRA'
    """
    if isinstance(layer, ConvLoraLayer):
        return "Conv-LoRA"
    parts = type(layer).__module__.split(".")  # peft.tuners.lora.layer -> "LORA"
    return parts[-2].upper() if len(parts) > 1 else type(layer).__name__


def _stacking_error(key: str, layer: BaseTunerLayer) -> ValueError:
    return ValueError(
        f"{key!r} already has a {tuner_layer_method(layer)} adapter ({', '.join(_adapter_names(layer))}); Conv-LoRA "
        "cannot be stacked on another PEFT method's layer. Apply Conv-LoRA to the model without that adapter "
        "(merge_and_unload() or unload() it first)"
    )


def refuse_existing_adapter(model: nn.Module, adapter_name: str, *, new_tuner: bool = False) -> None:
    """Refuse an injection that would reset a trained adapter or build on another method's layers.

    PEFT would call ``update_layer`` on Conv-LoRA layers that already hold ``adapter_name``, which
    re-initialises the trained adapter to identity. A new tuner (``get_peft_model``) also writes its config
    into the ``peft_config`` dict a model adapted by another method shares, so it is refused up front too.

    Args:
        model: the model about to be adapted.
        adapter_name: the new adapter's name.
        new_tuner: a new ``ConvLoraModel`` is being built on ``model`` (not ``add_adapter``).

    Raises:
        ValueError: naming the adapter and a module that holds it.

    >>> refuse_existing_adapter(nn.Linear(2, 2), "default")  # nothing adapted yet: no error
    """
    holders = []
    for key, module in model.named_modules():
        if isinstance(module, ConvLoraLayer):
            if adapter_name in module._get_available_adapters():
                holders.append(key)
        elif isinstance(module, BaseTunerLayer) and new_tuner:
            raise _stacking_error(key, module)
    if holders:
        raise ValueError(
            f"{type(model).__name__} already has a Conv-LoRA adapter named {adapter_name!r} (on {len(holders)} "
            f"modules, e.g. {holders[0]}); adding it again would reset it to identity. Add a second adapter with "
            "peft_model.add_adapter(name, config) under another name"
        )


class ConvLoraModel(BaseTuner):
    """Creates a Conv-LoRA model from a pretrained model (use ``get_peft_model`` or ``apply_conv_lora``).

    Args:
        model (torch.nn.Module): the model to adapt.
        peft_config (ConvLoraConfig | dict[str, ConvLoraConfig]): the adapter configuration(s).
        adapter_name (str): name of the adapter.
        low_cpu_mem_usage (bool): accepted for PEFT compatibility; adapters are small and always materialised.
        state_dict (dict | None): passed to PEFT (adapted modules found from a state dict's keys).

    >>> import peft
    >>> from transformers import SamModel
    >>> from convlora import ConvLoraConfig, tiny_sam_config
    >>> model = peft.get_peft_model(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
    >>> type(model.base_model).__name__
    'ConvLoraModel'
    """

    prefix: str = "conv_lora_"
    tuner_layer_cls = ConvLoraLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config: Any,
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        # before BaseTuner.__init__, which already writes the new config into a peft_config dict the model shares
        refuse_existing_adapter(model, adapter_name, new_tuner=True)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """PEFT's injection, refusing an adapter name that Conv-LoRA layers of ``model`` already hold."""
        refuse_existing_adapter(model, adapter_name)
        super().inject_adapter(model, adapter_name, **kwargs)

    def _prepare_adapter_config(self, peft_config: ConvLoraConfig, model_config: dict) -> ConvLoraConfig:
        # A preset names different modules in each model family: resolve it for this model's model_type (and
        # refuse an adapter saved for another family) before PEFT matches target_modules.
        peft_config.resolve_targets(model_config.get("model_type"), type(self.model).__name__)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: ConvLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, ConvLoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise _stacking_error(current_key, target)
        if not isinstance(target, nn.Linear):
            kind = f"{type(target).__module__}.{type(target).__qualname__}"
            raise ValueError(f"Conv-LoRA can only adapt nn.Linear layers, but target {current_key!r} is a {kind}")
        new_module = ConvLoraLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Unlike BaseTuner._replace_module this never copies `child.weight` onto the new module: on unload the
        # new module is a merged layer (or the trained mask decoder) that already owns its weights.
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = getattr(child, "weight", None)
        if weight is None or weight.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(weight.device)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        if merge and any(isinstance(module, ConvLoraMergedLinear) for module in model.modules()):
            guard_save_pretrained(model)  # transformers' format would silently drop the conv side branches
        return model

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not defined for Conv-LoRA: refused with the reason and what to do instead.

        LoRA's weighted combination works because each adapter is linear (``B A``); a Conv-LoRA adapter adds
        ``B MoE(A x)``, a gated, non-linear function of ``A x``, so no single adapter equals a weighted sum of
        several (and an approximate one would silently give other masks).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "add_weighted_adapter is not defined for Conv-LoRA: its conv experts are a gated, non-linear function "
            "of A x, so no single adapter equals a weighted combination of several. Use the adapters one at a "
            "time (peft_model.set_adapter(name)), or train one adapter on the combined data"
        )

    def _check_new_adapter_config(self, config: ConvLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, ConvLoraConfig):
            raise TypeError(f"Expected a ConvLoraConfig, got {type(config).__name__}")
