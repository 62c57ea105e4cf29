"""Exact evaluation of a model on a labelled split, at each image's original resolution, under any process count."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..models import segmentation_logits
from .metrics import build_metrics


@torch.no_grad()
def evaluate_split(
    model: nn.Module, dataset: Any, data: Any, accelerator: Any | None = None, batch_size: int = 4
) -> dict[str, float]:
    """Metrics of ``model`` on a labelled dataset, computed at each image's original resolution.

    Under several processes each one evaluates every ``world_size``-th image and the metric sums are
    added up, so every image counts exactly once.
    """
    was_training = model.training
    model.eval()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    indices = list(range(rank, len(dataset), world))
    extra = {"class_names": list(data.class_names)} if data.mode == "multiclass" else {}
    metrics = build_metrics(data.mode, data.num_classes, **extra)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=0)
    for batch in loader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            logits = segmentation_logits(model, batch["pixel_values"].to(device)).float()
        for i in range(logits.shape[0]):
            index = int(batch["index"][i])
            full = dataset.postprocess(logits[i : i + 1], index)  # (1, k, h, w) at the original size
            target = torch.as_tensor(dataset.original_mask(index)).long().unsqueeze(0)
            metrics.update(full.cpu(), target)
    state = metrics.state()
    if accelerator is not None and world > 1:
        state = {k: accelerator.reduce(v.to(device), reduction="sum").cpu() for k, v in state.items()}
        metrics.load_state(state)
    model.train(was_training)
    return metrics.compute()
