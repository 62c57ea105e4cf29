"""convlora: Conv-LoRA parameter-efficient fine-tuning for the Segment Anything Model, as a PEFT method.

>>> from transformers import SamModel
>>> from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss, tiny_sam_config
>>> model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
"""

import importlib
from typing import Any

from ._version import __version__

__all__ = [
    "SAM_VARIANTS",
    "TARGET_PRESETS",
    "ConvExpertMixture",
    "ConvLoraConfig",
    "ConvLoraLinear",
    "ConvLoraMergedLinear",
    "ConvLoraModel",
    "Segmenter",
    "TaskInfo",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "apply_conv_lora",
    "apply_lora",
    "count_parameters",
    "evaluate",
    "export_onnx",
    "install_class_decoder",
    "load_config",
    "load_config_given",
    "load_merged",
    "load_sam",
    "load_trained",
    "merge_model",
    "merged_extra_parameters",
    "moe_aux_loss",
    "predict_folder",
    "resize_sam",
    "sam_config",
    "save_adapter",
    "save_merged",
    "tiny_sam_config",
    "train",
]

# Every name loads its module on first use: `import convlora` (and with it the `convlora` command's help) costs
# nothing, using a trained model never loads the training engine (and Accelerate), and `from convlora import X`
# loads what X needs.
_WHERE = {
    "TaskInfo": "artifact",
    "load_trained": "artifact",
    "export_onnx": "deploy",
    "Segmenter": "inference",
    "evaluate": "inference",
    "merge_model": "inference",
    "predict_folder": "inference",
    **dict.fromkeys(
        [
            "SAM_VARIANTS",
            "apply_conv_lora",
            "apply_lora",
            "count_parameters",
            "install_class_decoder",
            "load_merged",
            "load_sam",
            "merged_extra_parameters",
            "resize_sam",
            "sam_config",
            "save_adapter",
            "save_merged",
            "tiny_sam_config",
        ],
        "models",
    ),
    **dict.fromkeys(
        [
            "TARGET_PRESETS",
            "ConvExpertMixture",
            "ConvLoraConfig",
            "ConvLoraLinear",
            "ConvLoraMergedLinear",
            "ConvLoraModel",
            "moe_aux_loss",
        ],
        "tuner",
    ),
    "TrainConfig": "training.config",
    "load_config": "training.config",
    "load_config_given": "training.config",
    "TrainResult": "training.engine",
    "train": "training.engine",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
