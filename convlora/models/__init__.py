"""Model families (SAM, SAM-HQ, SAM 2, SAM 3) behind one small interface, plus what every family shares.

``family`` is the registry; ``sam`` / ``sam_hq`` / ``sam2`` / ``sam3`` are the families; ``adapters`` puts
Conv-LoRA or LoRA on a model; ``loading`` gets a model by name; ``semantic`` is the class-query decoder for
multi-class tasks; ``processing`` is SAM's pre- and post-processing; ``merged_io`` saves and loads merged
models; ``embedded`` holds the bases shipped inside the package; ``adapter_check`` refuses adapters that do not
fit a base.
"""

from .adapters import apply_conv_lora, apply_lora, describe_targets
from .base import ModelFamily
from .family import FAMILIES, family_for_type, family_of, find_sam, prompted_logits, segmentation_logits
from .loading import load_sam, random_sam, resize_model
from .merged_io import load_merged, merged_extra_parameters, save_adapter, save_merged
from .params import count_parameters, parameter_counts
from .sam import SAM_VARIANTS, resize_sam, sam_config, tiny_sam_config
from .sam2 import SAM2_VARIANTS, sam2_config, tiny_sam2_config
from .sam3 import sam3_config, tiny_sam3_config
from .semantic import install_class_decoder

__all__ = [
    "FAMILIES",
    "SAM2_VARIANTS",
    "SAM_VARIANTS",
    "ModelFamily",
    "apply_conv_lora",
    "apply_lora",
    "count_parameters",
    "describe_targets",
    "family_for_type",
    "family_of",
    "find_sam",
    "install_class_decoder",
    "load_merged",
    "load_sam",
    "merged_extra_parameters",
    "parameter_counts",
    "prompted_logits",
    "random_sam",
    "resize_model",
    "resize_sam",
    "sam2_config",
    "sam3_config",
    "sam_config",
    "save_adapter",
    "save_merged",
    "segmentation_logits",
    "tiny_sam2_config",
    "tiny_sam3_config",
    "tiny_sam_config",
]
