"""convlora: Conv-LoRA parameter-efficient fine-tuning for the Segment Anything Model, as a PEFT method.

>>> from transformers import SamModel
>>> from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss, tiny_sam_config
>>> model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
"""

from typing import Any

from ._version import __version__
from .artifact import TaskInfo, load_trained
from .deploy import export_onnx
from .inference import Segmenter, evaluate, merge_model, predict_folder
from .models import (
    SAM_VARIANTS,
    apply_conv_lora,
    apply_lora,
    count_parameters,
    install_class_decoder,
    load_merged,
    load_sam,
    merged_extra_parameters,
    resize_sam,
    sam_config,
    save_adapter,
    save_merged,
    tiny_sam_config,
)
from .tuner import (
    TARGET_PRESETS,
    ConvExpertMixture,
    ConvLoraConfig,
    ConvLoraLinear,
    ConvLoraMergedLinear,
    ConvLoraModel,
    moe_aux_loss,
)

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

# The training engine (and Accelerate with it) loads on first use, so that using a trained model never does.
_TRAINING = {
    "TrainConfig": "config",
    "load_config": "config",
    "load_config_given": "config",
    "TrainResult": "engine",
    "train": "engine",
}


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(f".training.{_TRAINING[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
