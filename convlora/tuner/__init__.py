"""The Conv-LoRA PEFT method: config, conv-expert mixture, tuner layer, merged layer and tuner model.

This room knows PEFT and torch, never SAM: targets come as module-name patterns (``presets``) and the
grid a layer runs its experts on comes from the tensor's shape. Importing it registers ``CONV_LORA`` with
PEFT, as PEFT's own methods register themselves in their package ``__init__``.
"""

from .._compat import register_peft_method
from .config import FORMAT_VERSION, PEFT_TYPE, ConvLoraConfig
from .layer import ConvLoraLayer, ConvLoraLinear
from .merged import ConvLoraMergedLinear, ConvLoraSideBranch
from .model import ConvLoraModel
from .moe import ConvExpertMixture, moe_aux_loss
from .presets import FAMILY_PRESETS, TARGET_PRESETS, target_modules_pattern

register_peft_method(PEFT_TYPE, ConvLoraConfig, ConvLoraModel, ConvLoraModel.prefix)

__all__ = [
    "FAMILY_PRESETS",
    "FORMAT_VERSION",
    "PEFT_TYPE",
    "TARGET_PRESETS",
    "ConvExpertMixture",
    "ConvLoraConfig",
    "ConvLoraLayer",
    "ConvLoraLinear",
    "ConvLoraMergedLinear",
    "ConvLoraModel",
    "ConvLoraSideBranch",
    "moe_aux_loss",
    "target_modules_pattern",
]
