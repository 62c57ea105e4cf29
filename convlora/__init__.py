"""convlora: Conv-LoRA parameter-efficient fine-tuning for the Segment Anything Model, as a PEFT method.

>>> from transformers import SamModel
>>> from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss, tiny_sam_config
>>> model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
"""

from .config import ConvLoraConfig
from .export import load_merged, merged_extra_parameters, save_adapter, save_merged
from .layer import ConvLoraLinear, ConvLoraMergedLinear
from .model import ConvLoraModel
from .moe import ConvExpertMixture, moe_aux_loss
from .sam import (
    SAM_VARIANTS,
    TARGET_PRESETS,
    apply_conv_lora,
    count_parameters,
    load_sam,
    resize_sam,
    sam_config,
    tiny_sam_config,
)

__version__ = "0.1.0"

__all__ = [
    "SAM_VARIANTS",
    "TARGET_PRESETS",
    "ConvExpertMixture",
    "ConvLoraConfig",
    "ConvLoraLinear",
    "ConvLoraMergedLinear",
    "ConvLoraModel",
    "__version__",
    "apply_conv_lora",
    "count_parameters",
    "load_merged",
    "load_sam",
    "merged_extra_parameters",
    "moe_aux_loss",
    "resize_sam",
    "sam_config",
    "save_adapter",
    "save_merged",
    "tiny_sam_config",
]
