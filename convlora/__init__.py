"""convlora: Conv-LoRA parameter-efficient fine-tuning for the Segment Anything Model, as a PEFT method.

>>> from transformers import SamModel
>>> from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss, tiny_sam_config
>>> model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
"""

from .config import ConvLoraConfig
from .export import load_merged, merged_extra_parameters, save_adapter, save_merged
from .inference import Segmenter, evaluate, merge_model, predict_folder
from .layer import ConvLoraLinear, ConvLoraMergedLinear
from .methods import TaskInfo, load_trained
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
from .semantic import install_class_decoder
from .train import TrainResult, train
from .train_config import TrainConfig, load_config

__version__ = "0.1.0"

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
    "count_parameters",
    "evaluate",
    "install_class_decoder",
    "load_config",
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
