"""Pretraining of the embedded base SAM on the generic objects corpus (``convlora.synthetic.objects``).

SAM's own objectives, through ``SamModel``'s own prompt inputs, on images sampled on the fly:

- prompt-free foreground: no prompt at all, one mask (``multimask_output=False``), target = the union of
  all objects. This is how convlora fine-tunes SAM, so the base must be good at it;
- one point inside an object: three masks (``multimask_output=True``), only the best one is penalised,
  as SAM does for ambiguous prompts;
- several points (positive inside the object, negative around it): one mask;
- a box around the object, jittered: one mask.

Each mask loss is ``dice + bce_weight * BCE + focal_weight * focal`` on logits upsampled to the input
size, plus the mean squared error of the IoU head against the IoU the mask really reaches. SAM weighs
focal 20 : dice 1; from scratch at this scale that kept every mask empty for hundreds of steps, while
dice + BCE left the plateau within ~200 steps, so it is the default. All parameters are trained with
AdamW, linear warm-up and cosine decay, from ``convlora.models.loading.random_sam`` weights (with SAM's scale for
the random Fourier features of positions, see :func:`initial_model`).

Everything random derives from the seed: weights from ``seed``, training image ``i`` of step ``s`` from
``(TRAIN_STREAM, seed, s, i)``, prompts from ``(PROMPT_STREAM, seed, s)``. A checkpoint every few hundred
steps (safetensors + JSON) lets an interrupted run resume exactly where it stopped. The held-out images
come from ``(HELD_OUT_STREAM, i)``, a stream training never draws from.

Run ``python tools/pretrain_base.py --out runs/base --minutes 60`` from the repository root. This script is
not part of the installed package: it only rebuilds the shipped asset ``convlora/assets/convlora-tiny``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from convlora._io import OUTPUT_MARKER, atomic_dir, write_json
from convlora.bench.environment import machine, versions
from convlora.models import count_parameters, find_sam, random_sam, tiny_sam_config
from convlora.models.embedded import BASE_ARCHITECTURE
from convlora.models.processing import IMAGENET_MEAN, IMAGENET_STD, normalize
from convlora.synthetic import objects
from convlora.training.checkpoint import load_checkpoint, save_checkpoint
from convlora.training.losses import per_mask_losses

TRAIN_STREAM, PROMPT_STREAM, HELD_OUT_STREAM = 1, 2, 3


@dataclass
class PretrainConfig:
    """Settings of a pretraining run.

    Args:
        architecture: keyword arguments of ``convlora.models.sam.tiny_sam_config``.
        steps: optimiser steps; when ``None``, ``minutes`` sets them from the measured speed.
        minutes: wall-time budget used to choose ``steps`` after a few timed steps.
        batch_size: images per step.
        prompts_per_image: objects prompted per image and prompt type.
        max_objects: most objects in a training image.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only; norms, biases and position tables are exempt).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: gradient-norm clipping.
        focal_weight: weight of the focal term (gamma 2; dice has weight 1).
        bce_weight: weight of the binary cross-entropy term.
        iou_weight: weight of the IoU-head regression.
        box_jitter: standard deviation of box-corner noise, relative to the box side.
        seed: seed of the weights, the data and the prompts.
        checkpoint_every: steps between checkpoints.
        eval_every: steps between held-out evaluations (0: only at the end).
        eval_images: held-out images of the intermediate evaluations.
        final_eval_images: held-out images of the final evaluation.
        log_every: steps between log lines.

    >>> PretrainConfig(steps=10).batch_size
    8
    """

    architecture: dict[str, Any] = field(default_factory=lambda: dict(BASE_ARCHITECTURE))
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 8
    prompts_per_image: int = 2
    max_objects: int = 5
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 300
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    focal_weight: float = 0.0
    bce_weight: float = 1.0
    iou_weight: float = 1.0
    box_jitter: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    eval_every: int = 1000
    eval_images: int = 48
    final_eval_images: int = 200
    log_every: int = 25

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of steps and minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        for name in ("batch_size", "prompts_per_image", "max_objects", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_images", "final_eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be positive and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ValueError(f"warmup_steps and eval_every must be >= 0, got {self.warmup_steps}, {self.eval_every}")
        tiny_sam_config(**self.architecture)  # validates the architecture


def pixel_values(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """SAM's input normalisation (the library's): uint8 ``(b, h, w, 3)`` images to ``(b, 3, h, w)`` floats.

    Args:
        images: a batch of RGB images, uint8.

    >>> pixel_values(np.zeros((2, 8, 8, 3), np.uint8)).shape
    torch.Size([2, 3, 8, 8])
    """
    x = torch.as_tensor(np.asarray(images)).float() / 255.0
    return normalize(rearrange(x, "b h w c -> b c h w"))


def lr_factor(step: int, total: int, config: PretrainConfig) -> float:
    """Learning-rate factor of ``step``: transformers' warm-up + cosine decay to ``min_lr_ratio``.

    The total is known only after a few timed steps when a minutes budget is given, so the factor is read
    from the library's schedule at each step instead of keeping one scheduler object.

    >>> round(lr_factor(0, 100, PretrainConfig(steps=100, warmup_steps=0, min_lr_ratio=0.1)), 3)
    1.0
    """
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        probe, config.warmup_steps, total, min_lr_rate=config.min_lr_ratio
    )
    return float(schedule.lr_lambdas[0](step))


def training_images(seed: int, step: int, batch_size: int, size: int, max_objects: int) -> list[tuple]:
    """The ``(image, masks)`` pairs of one training step (a pure function of its arguments)."""
    return [objects.sample((TRAIN_STREAM, seed, step, i), size, max_objects) for i in range(batch_size)]


def held_out_images(num_images: int, size: int = 128, max_objects: int = 5) -> list[tuple]:
    """The first ``num_images`` held-out ``(image, masks)`` pairs (never used for training).

    >>> len(held_out_images(2, size=32))
    2
    """
    return [objects.sample((HELD_OUT_STREAM, i), size, max_objects) for i in range(num_images)]


# ----------------------------------------------------------------------------------------------------------
# Prompts


def _eligible(masks: np.ndarray) -> np.ndarray:
    """Indices of the objects worth prompting: not reduced to a few pixels by occlusion or the border."""
    areas = masks.reshape(len(masks), -1).sum(1)
    keep = np.flatnonzero(areas >= max(4, 0.001 * masks[0].size))
    return keep if len(keep) else np.array([int(np.argmax(areas))])


def _box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``(x1, y1, x2, y2)`` of a mask, in pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _prompt_batch(rng: np.random.Generator, samples: Sequence[tuple], k: int, jitter: float) -> dict[str, torch.Tensor]:
    """Prompts for ``k`` objects per image: one point, several points and a box per object, and the targets."""
    size = samples[0][0].shape[0]
    targets, single, multi, labels, boxes = [], [], [], [], []
    for _, masks in samples:
        eligible = _eligible(masks)
        chosen = rng.choice(eligible, size=k, replace=len(eligible) < k)
        for index in chosen:
            mask = masks[index]
            ys, xs = np.nonzero(mask)
            pick = rng.integers(len(ys))
            single.append([[xs[pick], ys[pick]]])
            # 1-3 positive and 0-2 negative points, padded to 5 with SAM's padding label -10
            n_pos, n_neg = int(rng.integers(1, 4)), int(rng.integers(0, 3))
            pos = rng.integers(len(ys), size=n_pos)
            points = [[xs[i], ys[i]] for i in pos]
            box = _box(mask)
            margin = 0.25 * (box[2:] - box[:2]) + 2
            low, high = np.maximum(box[:2] - margin, 0), np.minimum(box[2:] + margin, size - 1)
            around = np.zeros_like(mask)
            around[int(low[1]) : int(high[1]) + 1, int(low[0]) : int(high[0]) + 1] = True
            ny, nx = np.nonzero(around & ~mask)
            if len(ny) == 0:
                ny, nx = np.nonzero(~mask)
            n_neg = min(n_neg, len(ny))
            points += [[nx[i], ny[i]] for i in rng.integers(len(ny), size=n_neg)] if n_neg else []
            point_labels = [1] * n_pos + [0] * n_neg
            points += [[0, 0]] * (5 - len(points))
            point_labels += [-10] * (5 - len(point_labels))
            multi.append(points)
            labels.append(point_labels)
            side = np.tile(np.maximum(box[2:] - box[:2], 1.0), 2)  # (w, h, w, h)
            noise = np.clip(rng.normal(0, jitter, 4), -2 * jitter, 2 * jitter) * side
            boxes.append(np.clip(box + noise, 0, size - 1))
            targets.append(mask)
    b = len(samples)
    return {
        "targets": rearrange(torch.from_numpy(np.stack(targets)).float(), "(b k) h w -> b k h w", b=b),
        "single": rearrange(torch.tensor(np.array(single), dtype=torch.float32), "(b k) n c -> b k n c", b=b),
        "multi": rearrange(torch.tensor(np.array(multi), dtype=torch.float32), "(b k) n c -> b k n c", b=b),
        "labels": rearrange(torch.tensor(labels, dtype=torch.long), "(b k) n -> b k n", b=b),
        "boxes": rearrange(torch.tensor(np.array(boxes), dtype=torch.float32), "(b k) c -> b k c", b=b),
    }


# ----------------------------------------------------------------------------------------------------------
# Losses


def _upsample(pred_masks: torch.Tensor, size: int) -> torch.Tensor:
    """SAM's low-resolution mask logits ``(b, k, m, h', w')`` bilinearly resized to ``(b, k, m, size, size)``."""
    b, k = pred_masks.shape[:2]
    flat = rearrange(pred_masks, "b k m h w -> (b k) m h w")
    flat = F.interpolate(flat.float(), size=(size, size), mode="bilinear", align_corners=False)
    return rearrange(flat, "(b k) m h w -> b k m h w", b=b, k=k)


def _objective(
    out: Any, target: torch.Tensor, size: int, config: PretrainConfig, best_of: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask loss (best mask only when ``best_of``) plus IoU-head regression; returns ``(loss, iou)``."""
    logits = _upsample(out.pred_masks, size)
    parts = per_mask_losses(logits, target)
    per_mask = config.focal_weight * parts["focal"] + config.bce_weight * parts["bce"] + parts["dice"]  # (b, k, m)
    if best_of:
        best = per_mask.argmin(-1, keepdim=True)
        mask_loss = per_mask.gather(-1, best).mean()
        iou = parts["iou"].gather(-1, best).mean()
    else:
        mask_loss, iou = per_mask.mean(), parts["iou"].mean()
    iou_loss = F.mse_loss(out.iou_scores.float(), parts["iou"])
    return mask_loss + config.iou_weight * iou_loss, iou


def training_step_losses(
    model: nn.Module, samples: Sequence[tuple], rng: np.random.Generator, config: PretrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch over the four objectives, and per-objective IoUs for the log.

    Args:
        model: a ``SamModel``.
        samples: ``(image, masks)`` pairs of the batch.
        rng: source of the prompts.
        config: loss weights and prompt settings.
    """
    size = samples[0][0].shape[0]
    x = pixel_values(np.stack([image for image, _ in samples]))
    prompts = _prompt_batch(rng, samples, config.prompts_per_image, config.box_jitter)
    union = torch.from_numpy(np.stack([objects.foreground(m) for _, m in samples])).float().unsqueeze(1)
    embeddings = model.vision_encoder(x).last_hidden_state
    results = {
        "free": _objective(model(image_embeddings=embeddings, multimask_output=False), union, size, config, False),
        "point": _objective(
            model(image_embeddings=embeddings, input_points=prompts["single"],
                  input_labels=torch.ones(prompts["single"].shape[:3], dtype=torch.long), multimask_output=True),
            prompts["targets"], size, config, True,
        ),
        "points": _objective(
            model(image_embeddings=embeddings, input_points=prompts["multi"], input_labels=prompts["labels"],
                  multimask_output=False),
            prompts["targets"], size, config, False,
        ),
        "box": _objective(
            model(image_embeddings=embeddings, input_boxes=prompts["boxes"], multimask_output=False),
            prompts["targets"], size, config, False,
        ),
    }  # fmt: skip
    loss = sum(value[0] for value in results.values())
    return loss, {f"iou_{name}": float(value[1]) for name, value in results.items()}


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, num_images: int = 64, *, batch_size: int = 16, max_objects: int = 5) -> dict[str, float]:
    """Held-out IoUs of a SAM model on the objects corpus (fixed images, so runs are comparable).

    - ``foreground_iou``: prompt-free, one mask, against the union of the objects (mean over images);
    - ``point_iou``: one point at the deepest inside pixel of each object, the mask the IoU head ranks first;
    - ``box_iou``: the tight box of each object, one mask (mean over objects).

    Args:
        model: a ``SamModel`` (or a module containing one); its input size sets the image size.
        num_images: held-out images to use.
        batch_size: images per forward pass.
        max_objects: most objects per image (keep the corpus default to compare with the shipped numbers).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> sorted(evaluate(random_sam(tiny_sam_config(), 0), num_images=2))
    ['box_iou', 'foreground_iou', 'point_iou']
    """
    from scipy import ndimage

    sam = find_sam(model)
    size = sam.config.vision_config.image_size
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {"foreground_iou": [], "point_iou": [], "box_iou": []}
    samples = held_out_images(num_images, size, max_objects)
    for start in range(0, num_images, batch_size):
        chunk = samples[start : start + batch_size]
        embeddings = sam.vision_encoder(pixel_values(np.stack([im for im, _ in chunk]))).last_hidden_state
        free = _upsample(sam(image_embeddings=embeddings, multimask_output=False).pred_masks, size)
        union = torch.from_numpy(np.stack([objects.foreground(m) for _, m in chunk])).float()
        scores["foreground_iou"] += per_mask_losses(free[:, 0], union)["iou"][:, 0].tolist()
        for index, (_, masks) in enumerate(chunk):
            keep = _eligible(masks)
            target = torch.from_numpy(masks[keep]).float().unsqueeze(0)  # (1, k, h, w)
            deepest = [np.unravel_index(np.argmax(ndimage.distance_transform_edt(m)), m.shape) for m in masks[keep]]
            points = torch.tensor([[[[x, y]] for y, x in deepest]], dtype=torch.float32)
            boxes = torch.tensor(np.array([_box(m) for m in masks[keep]]), dtype=torch.float32).unsqueeze(0)
            emb = embeddings[index : index + 1]
            out = sam(image_embeddings=emb, input_points=points, input_labels=torch.ones(points.shape[:3]).long())
            ranked = out.iou_scores.argmax(-1)  # (1, k)
            ious = per_mask_losses(_upsample(out.pred_masks, size), target)["iou"]  # (1, k, 3)
            scores["point_iou"] += ious.gather(-1, ranked.unsqueeze(-1))[0, :, 0].tolist()
            out = sam(image_embeddings=emb, input_boxes=boxes, multimask_output=False)
            scores["box_iou"] += per_mask_losses(_upsample(out.pred_masks, size), target)["iou"][0, :, 0].tolist()
    model.train(was_training)
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items()}


# ----------------------------------------------------------------------------------------------------------
# Training


def initial_model(architecture: dict[str, Any], seed: int) -> nn.Module:
    """The untrained SAM a pretraining run starts from: ``random_sam`` with SAM's prompt position code.

    Args:
        architecture: keyword arguments of ``convlora.models.sam.tiny_sam_config``.
        seed: seed of the weights.

    >>> initial_model({"image_size": 32}, seed=0).shared_image_embedding.positional_embedding.std() < 3
    tensor(True)
    """
    model = random_sam(tiny_sam_config(**architecture), seed=seed)
    # transformers draws the random Fourier features of point, box and image positions with a standard
    # deviation of hidden_size / 2 (harmless when real weights are loaded over them); at that frequency
    # neighbouring pixels get unrelated codes and prompts cannot be localised. SAM itself uses 1.
    # The prompt encoder's copy is tied to this parameter.
    table = model.shared_image_embedding.positional_embedding
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=generator))
    return model.train()


def _optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim < 2 or name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")) or "embed" in name
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


def pretrain(config: PretrainConfig, out: str | Path, *, command: str | None = None) -> dict[str, Any]:
    """Pretrain a small SAM on the objects corpus; resumes from ``out/checkpoint`` if one is there.

    Writes ``out/config.json`` + ``out/model.safetensors`` (load with ``SamModel.from_pretrained``) and
    ``out/pretraining.json`` (command, seed, machine, versions, steps, wall time, held-out metrics).

    Args:
        config: the run's settings.
        out: output folder.
        command: the command line to record (the current one when ``None``).

    Returns:
        The content of ``pretraining.json``.

    >>> record = pretrain(PretrainConfig(steps=2, batch_size=1, architecture=dict(image_size=32),
    ...                                  final_eval_images=1), "/tmp/convlora-doc-pretrain")  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(config.architecture.get("image_size", 64))
    model = initial_model(config.architecture, config.seed)
    optimizer = _optimizer(model, config)
    checkpoint = out / "checkpoint"
    progress: dict[str, Any] = {"step": 0, "total_steps": config.steps, "elapsed_s": 0.0, "images": 0, "log": []}
    if (checkpoint / "progress.json").is_file():
        _, progress = load_checkpoint(checkpoint, model, optimizer)
        saved = progress["config"]
        mine = asdict(config)
        differing = sorted(k for k in mine if saved.get(k) != mine[k])
        if differing:
            raise ValueError(
                f"{checkpoint} was written with other settings ({differing}); rerun the same command to resume, "
                "or use another --out"
            )
        print(f"resuming from {checkpoint} at step {progress['step']}", flush=True)
    progress["config"] = asdict(config)
    total = progress["total_steps"]
    run_start = time.perf_counter() - progress["elapsed_s"]
    calibration_start: tuple[int, float] | None = None
    recent: list[float] = []
    step = progress["step"]
    while total is None or step < total:
        if total is None:  # budget in minutes: time the warm-up steps (the schedule needs no total until then)
            if calibration_start is None and step >= 3:
                calibration_start = (step, time.perf_counter())
            elif calibration_start is not None and step >= max(calibration_start[0] + 20, config.warmup_steps):
                per_step = (time.perf_counter() - calibration_start[1]) / (step - calibration_start[0])
                remaining = config.minutes * 60 - (time.perf_counter() - run_start)
                total = step + max(1, int(0.93 * remaining / per_step))
                progress["total_steps"] = total
                print(f"{per_step:.3f} s/step measured: {total} steps fit in {config.minutes} min", flush=True)
        lr = config.lr * lr_factor(step, total or 10**9, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        samples = training_images(config.seed, step, config.batch_size, size, config.max_objects)
        rng = np.random.default_rng((PROMPT_STREAM, config.seed, step))
        loss, ious = training_step_losses(model, samples, rng, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        progress["images"] += config.batch_size
        recent.append(float(loss.detach()))
        if step % config.log_every == 0 or step == total:
            elapsed = time.perf_counter() - run_start
            entry = {"step": step, "loss": round(float(np.mean(recent)), 4), "lr": lr, "elapsed_s": round(elapsed, 1)}
            entry.update({k: round(v, 3) for k, v in ious.items()})
            progress["log"].append(entry)
            recent = []
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()), flush=True
            )
        if config.eval_every and step % config.eval_every == 0 and step != total:
            metrics = evaluate(model, config.eval_images, max_objects=config.max_objects)
            progress.setdefault("evals", []).append({"step": step, **metrics})
            print(f"eval step={step} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        if step % config.checkpoint_every == 0 or step == total:
            progress.update(step=step, elapsed_s=time.perf_counter() - run_start)
            save_checkpoint(checkpoint, model, optimizer, {"torch": torch.get_rng_state()}, progress)
    train_seconds = time.perf_counter() - run_start
    metrics = evaluate(model, config.final_eval_images, max_objects=config.max_objects)
    print("final " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    record = {
        "model": "convlora-tiny" if config.architecture == BASE_ARCHITECTURE else "custom",
        "command": command if command is not None else shlex.join([Path(sys.executable).name, *sys.argv]),
        "seed": config.seed,
        "steps": step,
        "images_seen": progress["images"],
        "wall_time_s": round(train_seconds, 1),
        "wall_time_note": "training time including intermediate evaluations and checkpoints, summed over resumes",
        "machine": {**machine(), "torch_threads": torch.get_num_threads(), **versions()},
        "parameters": count_parameters(model),
        "architecture": config.architecture,
        "preprocessing": {"scale": "1/255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "layout": "b 3 h w"},
        "corpus": "convlora.synthetic.objects (generic shapes; none of the fine-tuning domains)",
        "held_out": {"images": config.final_eval_images, "stream": HELD_OUT_STREAM, **metrics},
        "evals": progress.get("evals", []),
        "config": asdict(config),
        "loss_log": progress["log"],
    }
    with atomic_dir(out / ".final", "merged") as tmp:
        model.eval().save_pretrained(tmp)
        write_json(tmp / "pretraining.json", record)
    for name in ("config.json", "model.safetensors", "pretraining.json"):
        os.replace(out / ".final" / name, out / name)
    (out / ".final" / OUTPUT_MARKER).unlink()
    (out / ".final").rmdir()
    return record


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python tools/pretrain_base.py``."""
    parser = argparse.ArgumentParser(
        prog="python tools/pretrain_base.py",
        description="Pretrain a small SAM on the generic objects corpus (the embedded convlora-tiny base).",
    )
    parser.add_argument("--out", required=True, help="output folder (also holds the checkpoint to resume from)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="time budget setting the step count (default 60)")
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and prompts")
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=PretrainConfig.warmup_steps, help="warm-up steps")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default 128)")
    parser.add_argument("--hidden-size", type=int, default=None, help="encoder width")
    parser.add_argument("--depth", type=int, default=None, help="encoder layers")
    parser.add_argument("--heads", type=int, default=None, help="encoder attention heads")
    parser.add_argument("--window-size", type=int, default=None, help="attention window side")
    parser.add_argument("--global-layers", type=int, nargs="+", default=None, help="global-attention layers")
    parser.add_argument("--decoder-size", type=int, default=None, help="prompt encoder / mask decoder width")
    parser.add_argument("--max-objects", type=int, default=PretrainConfig.max_objects, help="objects per image")
    parser.add_argument("--checkpoint-every", type=int, default=PretrainConfig.checkpoint_every, help="steps")
    parser.add_argument("--eval-every", type=int, default=PretrainConfig.eval_every, help="steps (0: at the end)")
    parser.add_argument("--eval-images", type=int, default=PretrainConfig.eval_images, help="intermediate evals")
    parser.add_argument("--final-eval-images", type=int, default=PretrainConfig.final_eval_images, help="final")
    parser.add_argument("--log-every", type=int, default=PretrainConfig.log_every, help="steps between log lines")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Pretrain with parsed command-line arguments (see :func:`build_parser`); returns the exit status."""
    if args.minutes is None and args.steps is None:
        args.minutes = 60.0
    torch.set_num_threads(args.threads)
    architecture = dict(BASE_ARCHITECTURE)
    overrides = {
        "image_size": args.image_size, "hidden_size": args.hidden_size, "num_hidden_layers": args.depth,
        "num_attention_heads": args.heads, "window_size": args.window_size,
        "global_attn_indexes": args.global_layers, "decoder_size": args.decoder_size,
    }  # fmt: skip
    architecture.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = PretrainConfig(
            architecture=architecture, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
            lr=args.lr, warmup_steps=args.warmup_steps, max_objects=args.max_objects, seed=args.seed,
            checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_images=args.eval_images,
            final_eval_images=args.final_eval_images, log_every=args.log_every,
        )  # fmt: skip
        pretrain(config, args.out, command=shlex.join([Path(sys.executable).name, *sys.argv]))
    except ValueError as error:
        print(f"pretrain_base: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
