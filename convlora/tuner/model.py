"""``ConvLoraModel``: the PEFT tuner that injects :class:`~convlora.tuner.layer.ConvLoraLinear` layers.

Importing ``convlora.tuner`` registers it as the ``CONV_LORA`` method with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``save_pretrained`` and ``merge_and_unload`` work with a
:class:`~convlora.ConvLoraConfig`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import ConvLoraConfig
from .layer import ConvLoraLayer, ConvLoraLinear


class ConvLoraModel(BaseTuner):
    """Creates a Conv-LoRA model from a pretrained model (use ``get_peft_model`` or ``apply_conv_lora``).

    Args:
        model (torch.nn.Module): the model to adapt.
        peft_config (ConvLoraConfig | dict[str, ConvLoraConfig]): the adapter configuration(s).
        adapter_name (str): name of the adapter.
        low_cpu_mem_usage (bool): accepted for PEFT compatibility; adapters are small and always materialised.

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
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"Conv-LoRA can only adapt nn.Linear layers, but target {current_key!r} is a {type(target).__name__}"
            )
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

    def _check_new_adapter_config(self, config: ConvLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, ConvLoraConfig):
            raise TypeError(f"Expected a ConvLoraConfig, got {type(config).__name__}")
