"""Instance metrics of a model's trained decoder on a labelled split, at each image's original resolution.

The training engine validates ``mode="instances"`` runs with it (model selection by ``msa`` by default);
under several processes each one scores every ``world_size``-th image and the metric sums are added up.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluation import InstanceMetrics
from ..evaluation.evaluate import reduced, shard_loader
from ..models.processing import IGNORE_INDEX
from .decoder import ids_from_logits
from .model import InstanceSettings, instance_logits


@torch.no_grad()
def evaluate_instance_split(
    model: nn.Module,
    dataset: Any,
    settings: InstanceSettings | None = None,
    accelerator: Any | None = None,
    batch_size: int = 4,
) -> dict[str, float]:
    """Instance metrics (:class:`~convlora.evaluation.InstanceMetrics`) of the model's decoder on ``dataset``.

    Each image's decoder maps are brought to its original size and split into objects by the watershed
    (:func:`~convlora.instances.decoder.ids_from_logits`), then matched with its true ids; pixels ignored in
    the mask (255 in 8-bit maps) are left out of everything.

    Args:
        model: a model with an instance decoder.
        dataset: a :class:`~convlora.data.SegmentationDataset` in ``mode="instances"`` (not augmented).
        settings: the watershed settings (the defaults when ``None``).
        accelerator: Accelerate's accelerator when evaluating under several processes, else ``None``.
        batch_size: images per forward pass.

    >>> evaluate_instance_split(model, data.val)["msa"]  # doctest: +SKIP
    """
    settings = settings or InstanceSettings()
    was_training = model.training
    model.eval()
    loader, device = shard_loader(dataset, model, accelerator, batch_size)
    metrics = InstanceMetrics()
    for batch in loader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            logits = instance_logits(model, batch["pixel_values"].to(device)).float().cpu()
        for i in range(logits.shape[0]):
            index = int(batch["index"][i])
            predicted = ids_from_logits(logits[i], dataset.resize_info(index), **settings.watershed())
            truth = dataset.original_mask(index)
            ignore = truth == IGNORE_INDEX
            metrics.update(np.where(ignore, 0, truth), predicted, ignore=ignore)
    scores = reduced(metrics, accelerator, device)
    model.train(was_training)
    return scores
