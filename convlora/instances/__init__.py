"""One mask per object: automatic mask generation on any promptable model (and, to come, trained instance decoders).

Below the training engine: it needs a model and :mod:`convlora.prompting`, nothing of :mod:`convlora.training`.
"""

from .amg import AmgConfig, GeneratedMasks, generate_masks, nms

__all__ = ["AmgConfig", "GeneratedMasks", "generate_masks", "nms"]
