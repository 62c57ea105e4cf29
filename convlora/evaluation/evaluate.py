"""Exact evaluation of a model on a labelled split, at each image's original resolution, under any process count."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..models import segmentation_logits
from .metrics import build_metrics


def shard_loader(dataset: Any, model: nn.Module, accelerator: Any | None, batch_size: int) -> tuple[DataLoader, Any]:
    """A loader over this process's share of ``dataset`` (every ``world_size``-th image) and the device to use.

    Args:
        dataset: a split with ``__len__`` and items holding ``pixel_values`` and ``index``.
        model: the model evaluated (its device, without an accelerator).
        accelerator: Accelerate's accelerator under several processes, else ``None``.
        batch_size: images per forward pass.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    indices = list(range(rank, len(dataset), world))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=0), device


def reduced(metrics: Any, accelerator: Any | None, device: Any) -> dict[str, float]:
    """``metrics.compute()`` over every process's images: the metric sums of all processes are added first.

    Args:
        metrics: an accumulator with ``state()``, ``load_state()`` and ``compute()`` (``SumState``).
        accelerator: Accelerate's accelerator under several processes, else ``None``.
        device: where the sums are reduced.
    """
    if accelerator is not None and accelerator.num_processes > 1:
        state = {k: accelerator.reduce(v.to(device), reduction="sum").cpu() for k, v in metrics.state().items()}
        metrics.load_state(state)
    return metrics.compute()


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
    loader, device = shard_loader(dataset, model, accelerator, batch_size)
    extra = {"class_names": list(data.class_names)} if data.mode == "multiclass" else {}
    metrics = build_metrics(data.mode, data.num_classes, **extra)
    for batch in loader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            logits = segmentation_logits(model, batch["pixel_values"].to(device)).float()
        for i in range(logits.shape[0]):
            index = int(batch["index"][i])
            full = dataset.postprocess(logits[i : i + 1], index)  # (1, k, h, w) at the original size
            target = torch.as_tensor(dataset.original_mask(index)).long().unsqueeze(0)
            metrics.update(full.cpu(), target)
    scores = reduced(metrics, accelerator, device)
    model.train(was_training)
    return scores
