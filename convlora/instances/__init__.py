"""One mask per object: automatic mask generation on any promptable model, and a trained instance decoder.

Below the training engine: it needs a model and :mod:`convlora.prompting`, nothing of :mod:`convlora.training`.
"""

from .ais import ais_from_logits, instance_map_logits, objects_from_ids
from .amg import AmgConfig, GeneratedMasks, generate_masks, nms
from .apg import refine_objects, resolve_overlaps, seed_prompts
from .decoder import InstanceHead, ids_from_logits, ids_from_maps, instance_loss
from .model import InstanceSettings, has_instance_head, install_instance_head, instance_logits
from .targets import instance_targets, target_weight
from .tiles import stitch_instances

__all__ = [
    "AmgConfig",
    "GeneratedMasks",
    "InstanceHead",
    "InstanceSettings",
    "ais_from_logits",
    "generate_masks",
    "has_instance_head",
    "ids_from_logits",
    "ids_from_maps",
    "install_instance_head",
    "instance_logits",
    "instance_loss",
    "instance_map_logits",
    "instance_targets",
    "nms",
    "objects_from_ids",
    "refine_objects",
    "resolve_overlaps",
    "seed_prompts",
    "stitch_instances",
    "target_weight",
]
