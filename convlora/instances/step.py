"""The training step of the instance decoder: id labels in, the decoder's loss (and Conv-LoRA's auxiliary loss) out.

The training engine wraps :class:`InstanceStep` as it wraps its other steps; it lives here, below the engine,
because it needs only the model, the targets and the loss. Targets are made per sample **after** augmentation,
from the augmented id map at the model's input size: the distance maps of a resized or cropped object are not
the resized maps of the whole one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.processing import IGNORE_INDEX
from ..tuner.moe import moe_aux_loss
from .decoder import instance_loss
from .model import instance_logits
from .targets import instance_targets


def batch_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's targets ``(b, 3, S, S)`` and loss weights ``(b, S, S)`` of a batch of id labels.

    Args:
        labels: int64 ``(b, S, S)`` object ids, 0 = background, 255 = ignored (padding, or ignored in the mask),
            as :class:`~convlora.data.SegmentationDataset` gives them in ``mode="instances"``.

    >>> labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    >>> labels[0, 1:3, 1:3], labels[0, 3] = 7, 255
    >>> targets, weight = batch_targets(labels)
    >>> targets[0, 0].sum().item(), weight[0].sum().item()
    (4.0, 12.0)
    """
    if labels.ndim != 3:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected (b, S, S) object ids")
    array = labels.detach().cpu().numpy()
    ignored = array == IGNORE_INDEX
    maps = np.stack([instance_targets(np.where(skip, 0, ids)) for ids, skip in zip(array, ignored, strict=True)])
    return torch.from_numpy(maps), torch.from_numpy((~ignored).astype(np.float32))


class InstanceStep(nn.Module):
    """The module the engine wraps for ``mode="instances"``: images and id labels in, losses out.

    Returns the instance loss (:func:`~convlora.instances.decoder.instance_loss`) plus the Conv-LoRA auxiliary
    loss as ``"loss"``, and both parts detached, like the engine's other steps (under DDP the auxiliary loss
    must come out of the wrapped forward).

    Args:
        model: the task model with an instance decoder (see :func:`~convlora.instances.model.install_instance_head`).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.instances.model import InstanceSettings, install_instance_head
    >>> sam = random_sam(tiny_sam_config())
    >>> _ = install_instance_head(sam, InstanceSettings(hidden_channels=8))
    >>> out = InstanceStep(sam)(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.int64))
    >>> sorted(out)
    ['aux', 'loss', 'task']
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss to back-propagate (``"loss"``) and its two parts, detached (``"task"``, ``"aux"``)."""
        targets, weight = batch_targets(labels)
        logits = instance_logits(self.model, pixel_values).float()  # (b, 3, S/4, S/4)
        task = instance_loss(logits, targets.to(logits.device), weight.to(logits.device))
        aux = moe_aux_loss(self.model)
        return {"loss": task + aux, "task": task.detach(), "aux": aux.detach()}
