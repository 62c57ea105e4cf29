"""The instance decoder on a SAM: installing it, calling it, and keeping it through export, load and merge.

The head (:class:`~convlora.instances.decoder.InstanceHead`) lives on the SAM module itself as
``instance_head``, beside ``vision_encoder`` and ``mask_decoder``, so that PEFT's ``modules_to_save`` trains
and saves it with an adapter (it is listed there like the mask decoder), and ``merge_and_unload`` keeps it.
It reads the embedding of the (adapted) image encoder, the same embedding SAM's own mask decoder reads.

Writers that know only SAM's architecture (transformers' ``save_pretrained``, convlora's merged checkpoint,
the decoder-only and BitFit exports) must not see it: :func:`head_apart` takes it off for the write, and
:func:`save_head` writes it beside them as ``instance_head.safetensors``, which :func:`load_head` reads back.
Its shape and the watershed settings are recorded in the task file (:class:`InstanceSettings`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..models import find_sam
from ..models.adapter_check import read_safetensors_shapes
from ..prompting import coarsest, encode_images
from .decoder import InstanceHead

HEAD_ATTRIBUTE = "instance_head"
HEAD_WEIGHTS = "instance_head.safetensors"


@dataclass(frozen=True)
class InstanceSettings:
    """The instance decoder's shape and the watershed settings that turn its maps into ids.

    Recorded in ``convlora_task.json`` (``TaskInfo.instance_head``) so that a loaded model rebuilds the same
    head and predicts with the settings it was validated with.

    Args:
        in_channels: channels of the image embedding the head reads (SAM ViT-B: 256); 0 = the model's own.
        hidden_channels: the head's width (:class:`~convlora.instances.decoder.InstanceHead`), a multiple of 4.
        image_channels: width of the head's image stem (it reads the image too and gives its maps at half the
            input size); 0: the embedding only, maps at a quarter of the input size.
        foreground_threshold: foreground probability above which a pixel belongs to an object.
        seed_threshold: centre-map value above which a pixel seeds an object.
        min_size: smallest object kept, in pixels of the original image.

    >>> InstanceSettings(hidden_channels=8).to_dict()["hidden_channels"]
    8
    """

    in_channels: int = 0
    hidden_channels: int = 64
    image_channels: int = 16
    foreground_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_size: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.in_channels, int) or self.in_channels < 0:
            raise ValueError(f"in_channels must be a non-negative integer, got {self.in_channels!r}")
        if not isinstance(self.hidden_channels, int) or self.hidden_channels < 4 or self.hidden_channels % 4:
            raise ValueError(f"hidden_channels must be a positive multiple of 4, got {self.hidden_channels!r}")
        if not isinstance(self.image_channels, int) or self.image_channels < 0:
            raise ValueError(f"image_channels must be a non-negative integer, got {self.image_channels!r}")
        for name in ("foreground_threshold", "seed_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if not isinstance(self.min_size, int) or self.min_size < 1:
            raise ValueError(f"min_size must be a positive integer, got {self.min_size!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (``TaskInfo.instance_head``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InstanceSettings:
        """Settings from ``TaskInfo.instance_head`` (``None``: the defaults); unknown keys are refused."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"instance_head: unknown keys {unknown}; known keys: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def watershed(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~convlora.instances.decoder.ids_from_logits`."""
        return {
            "foreground_threshold": self.foreground_threshold,
            "seed_threshold": self.seed_threshold,
            "min_size": self.min_size,
        }


def embedding_channels(model: nn.Module) -> int:
    """Channels of the embedding SAM's mask decoder reads (the instance head's input), from the config.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> embedding_channels(random_sam(tiny_sam_config()))
    16
    """
    return int(find_sam(model).config.mask_decoder_config.hidden_size)


def install_instance_head(model: nn.Module, settings: InstanceSettings | None = None) -> InstanceSettings:
    """Put a fresh :class:`~convlora.instances.decoder.InstanceHead` on the SAM inside ``model`` (in place).

    Call it on the base model before adapters are applied or loaded, as for the class decoder. The head is
    created on the SAM's device and dtype, in the SAM's training mode; a model that already has one is refused.

    Args:
        model: a ``SamModel``, ``SamHQModel``, ``Sam2Model`` or ``Sam3TrackerModel`` (not wrapped in PEFT).
        settings: the head's width and watershed settings; ``in_channels`` 0 takes the model's own.

    Returns:
        The settings with ``in_channels`` filled in.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> sam = random_sam(tiny_sam_config())
    >>> install_instance_head(sam, InstanceSettings(hidden_channels=8)).in_channels, has_instance_head(sam)
    (16, True)
    """
    sam = find_sam(model)
    if has_instance_head(sam):
        raise ValueError("this model already has an instance decoder (instance_head)")
    settings = settings or InstanceSettings()
    channels = embedding_channels(sam)
    if settings.in_channels not in (0, channels):
        raise ValueError(
            f"instance_head.in_channels is {settings.in_channels} but this model's image embedding has {channels} "
            "channels; the head was trained on a different base model"
        )
    settings = InstanceSettings(**{**settings.to_dict(), "in_channels": channels})
    reference = next(sam.parameters())
    head = InstanceHead(channels, settings.hidden_channels, settings.image_channels)
    head = head.to(device=reference.device, dtype=reference.dtype)
    setattr(sam, HEAD_ATTRIBUTE, head.train(sam.training))
    return settings


def has_instance_head(model: nn.Module) -> bool:
    """Whether the SAM inside ``model`` carries an instance decoder.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> has_instance_head(random_sam(tiny_sam_config()))
    False
    """
    return isinstance(getattr(find_sam(model), HEAD_ATTRIBUTE, None), nn.Module)


def instance_head(model: nn.Module) -> nn.Module:
    """The instance decoder of ``model`` (under PEFT: its ``modules_to_save`` wrapper, which runs the trained copy).

    Raises:
        ValueError: the model has none, naming ``amg`` as the method that needs none.
    """
    head = getattr(find_sam(model), HEAD_ATTRIBUTE, None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            "this model has no instance decoder (train one with convlora train --mode instances); use 'amg' "
            "(automatic mask generation from point prompts) instead"
        )
    return head


def instance_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The instance decoder's logits ``(b, 3, m, m)`` (foreground, centre, boundary; ``m`` = S / 2 with the image
    stem, 4x the grid without).

    The image encoder runs with its adapters (with gradients), then the head reads its embedding (and the image).

    Args:
        model: a model with an instance decoder (PEFT-wrapped or not).
        pixel_values: ``(b, 3, S, S)`` preprocessed images.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> sam = random_sam(tiny_sam_config())
    >>> _ = install_instance_head(sam, InstanceSettings(hidden_channels=8))
    >>> instance_logits(sam, torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 3, 32, 32])
    """
    head = instance_head(model)
    return head(coarsest(encode_images(model, pixel_values)), pixel_values)


def trained_head(model: nn.Module) -> nn.Module:
    """The head's trained module itself (the active copy inside PEFT's ``modules_to_save`` wrapper, if any)."""
    head = instance_head(model)
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and copies:
        active = getattr(head, "active_adapters", None) or list(copies)
        name = active[0] if isinstance(active, (list, tuple)) else active
        return copies[name]
    return head


@contextlib.contextmanager
def head_apart(model: nn.Module) -> Iterator[nn.Module | None]:
    """Take the instance decoder off the SAM inside ``model`` for the block (yielding it), then put it back.

    For writers that know only SAM's architecture; ``None`` is yielded for a model without a head.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> sam = random_sam(tiny_sam_config())
    >>> _ = install_instance_head(sam, InstanceSettings(hidden_channels=8))
    >>> with head_apart(sam) as head:
    ...     inside = has_instance_head(sam)
    >>> inside, has_instance_head(sam), type(head).__name__
    (False, True, 'InstanceHead')
    """
    sam = find_sam(model)
    head = getattr(sam, HEAD_ATTRIBUTE, None)
    if not isinstance(head, nn.Module):
        yield None
        return
    delattr(sam, HEAD_ATTRIBUTE)
    try:
        yield head
    finally:
        setattr(sam, HEAD_ATTRIBUTE, head)


def save_head(model: nn.Module, folder: str | Path) -> Path:
    """Write the trained instance decoder of ``model`` to ``folder / instance_head.safetensors``.

    Args:
        model: a model with an instance decoder.
        folder: an existing (temporary) folder.
    """
    path = Path(folder) / HEAD_WEIGHTS
    tensors = {name: t.detach().contiguous().clone() for name, t in trained_head(model).state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_head(model: nn.Module, folder: str | Path) -> None:
    """Load ``folder / instance_head.safetensors`` into the instance decoder of ``model`` (installed already).

    Raises:
        ValueError: the file is missing or its tensors do not fit the head (naming the first difference).
    """
    path = Path(folder) / HEAD_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{folder} holds an instance model but no {HEAD_WEIGHTS}")
    head = trained_head(model)
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    found = read_safetensors_shapes(path)
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [n for n in expected if found.get(n) != expected[n]]
        raise ValueError(
            f"{path} does not fit the instance decoder recorded in the task file (first difference: {differ[0]}); "
            "it was written for another head or base model"
        )
    head.load_state_dict(safetensors.torch.load_file(str(path)))
