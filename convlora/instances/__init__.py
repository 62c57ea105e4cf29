"""One mask per object: automatic mask generation on any promptable model, and a trained instance decoder.

Below the training engine: it needs a model and :mod:`convlora.prompting`, nothing of :mod:`convlora.training`.
"""

from .amg import AmgConfig, GeneratedMasks, generate_masks, nms
from .decoder import InstanceHead, ids_from_logits, ids_from_maps, instance_loss
from .targets import instance_targets, target_weight

__all__ = [
    "AmgConfig",
    "GeneratedMasks",
    "InstanceHead",
    "generate_masks",
    "ids_from_logits",
    "ids_from_maps",
    "instance_loss",
    "instance_targets",
    "nms",
    "target_weight",
]
