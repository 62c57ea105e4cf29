"""The small interface every model family implements, so the rest of convlora never branches on a class.

A family is one kind of transformers model (SAM, SAM-HQ, ...): how to find its image-encoder blocks and mask
decoder, which image sizes it takes, how to resize it, and which transformers class loads it. The PEFT
method's target presets for each family are plain data in :mod:`convlora.tuner.presets`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """One model family and the calls convlora makes on it.

    Args:
        name: the family's name, also its key in ``convlora.tuner.presets.FAMILY_PRESETS``.
        model_types: the transformers ``model_type`` values (``config.json``) of the family.
        model_class: returns the transformers model class (imported lazily).
        encoder_layers: the image encoder's list of blocks of a model of this family.
        image_size: the square input size of a model of this family.
        resize: a copy of a model that takes another input size, or ``None`` if the family cannot resize.
        decoder: attribute name of the mask decoder (trained by every method).
        description: one line for error messages and docs.
    """

    name: str
    model_types: tuple[str, ...]
    model_class: Callable[[], type[nn.Module]]
    encoder_layers: Callable[[nn.Module], nn.ModuleList]
    image_size: Callable[[nn.Module], int]
    resize: Callable[[nn.Module, int], nn.Module] | None = None
    decoder: str = "mask_decoder"
    description: str = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a model of this family (by its config's ``model_type``)."""
        config: Any = getattr(module, "config", None)
        return getattr(config, "model_type", None) in self.model_types and hasattr(module, self.decoder)
