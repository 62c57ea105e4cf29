"""The fine-tuning engine: one Accelerate loop for every method, device and process count.

``train(config)`` runs on a laptop CPU, one GPU, or many (``accelerate launch -m convlora train ...``):
Accelerate places the model, wraps it for DDP and handles mixed precision; data order, augmentation,
gradient accumulation, checkpoints and evaluation are explicit here so that an interrupted run resumes
bitwise identically (on CPU) and evaluation is exact under any number of processes.

What a run writes to ``output_dir``: ``config.json`` (resolved settings), ``checkpoints/`` (resumable,
rotated), ``adapter/`` (the best model's artifact + model card), ``metrics.json``, ``logs/`` (TensorBoard),
``curves.png`` and ``val_overlays.png``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .._io import write_json
from ..models import count_parameters, find_sam, load_sam, segmentation_logits
from ..tuner.moe import moe_aux_loss
from .artifact import TaskInfo, export_trained
from .checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig
from .evaluate import evaluate_split
from .methods import METHODS, build_task_model


class TrainingError(RuntimeError):
    """Training stopped because it cannot go on (e.g. a non-finite loss)."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Args:
        run_dir: the run folder.
        adapter_dir: the exported best model (``run_dir / "adapter"``), loadable with ``load_trained``.
        task: what the model segments and how to rebuild it.
        metric: the validation metric that picked the best model.
        best_value: its best value (``None`` if no evaluation ran).
        best_epoch: the epoch of the best value.
        steps: optimiser steps taken.
        history: one dict of validation metrics per evaluation.
        test_metrics: metrics of the best model on the test set, if there is one.
        trainable_parameters: parameters that were trained.
        wall_time: seconds, resumed parts included.
        stopped_early: whether early stopping ended the run.
    """

    run_dir: Path
    adapter_dir: Path
    task: TaskInfo
    metric: str
    best_value: float | None
    best_epoch: int | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, float] | None = None
    trainable_parameters: int = 0
    wall_time: float = 0.0
    stopped_early: bool = False


class TrainStep(nn.Module):
    """The module Accelerate wraps: images and labels in, losses out.

    It returns the task loss and the Conv-LoRA auxiliary loss together because, under DDP, the auxiliary
    loss must come out of the wrapped forward; reading it from the layers afterwards breaks DDP's
    gradient bookkeeping.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss to back-propagate (task + MoE auxiliary, ``"loss"``) and its two parts, detached."""
        logits = segmentation_logits(self.model, pixel_values)  # (b, k, s/4, s/4)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        task = self.loss_fn(logits, labels)
        aux = moe_aux_loss(self.model)
        return {"loss": task + aux, "task": task.detach(), "aux": aux.detach()}


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's share of a seeded shuffle of the training set for one epoch.

    Every process draws the same permutation and takes every ``world_size``-th index, trimmed so all
    processes get the same count.

    >>> epoch_order(10, seed=0, epoch=0) == epoch_order(10, seed=0, epoch=0)
    True
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    per_process = num_samples // world_size
    return order[rank::world_size][:per_process]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    sam = find_sam(model)
    kwargs = {"use_reentrant": False}
    if hasattr(sam, "activation_checkpointing_enable"):
        sam.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        sam.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    _forget_previous_run_settings()
    return Accelerator(
        # Without a GPU, processes started by `accelerate launch` / torchrun train on CPU with gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # Top-1 routing leaves some experts without samples in a step; DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _forget_previous_run_settings() -> None:
    """Let one process run several trainings with different settings (examples, benchmarks, notebooks).

    Accelerate keeps its settings (mixed precision, ...) in a process-wide singleton and refuses to change
    them. In a single process nothing else depends on it, so it is cleared between runs; under
    `accelerate launch` it holds the process group and is left alone.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _rng_states(accelerator: Any) -> dict[str, torch.Tensor]:
    """Every process's torch (and CUDA) random state, gathered on all processes."""
    states = {}
    local = torch.get_rng_state().to(accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0)) if accelerator.num_processes > 1 else local.unsqueeze(0)
    for rank in range(gathered.shape[0]):
        states[f"torch.{rank}"] = gathered[rank].cpu()
    if torch.cuda.is_available():
        local_cuda = torch.cuda.get_rng_state().to(accelerator.device).unsqueeze(0)
        gathered_cuda = accelerator.gather(local_cuda) if accelerator.num_processes > 1 else local_cuda
        for rank in range(gathered_cuda.shape[0]):
            states[f"cuda.{rank}"] = gathered_cuda[rank].cpu()
    return states


def _restore_rng(states: dict[str, torch.Tensor], rank: int, world: int, source: Path) -> None:
    saved = sum(1 for key in states if key.startswith("torch."))
    if saved != world:
        raise ValueError(
            f"{source} was written by a run with {saved} process(es); resume it with the same number, not {world}"
        )
    key = f"torch.{rank}"
    torch.set_rng_state(states[key])
    if torch.cuda.is_available() and f"cuda.{rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{rank}"])


def train(config: TrainConfig, *, show_progress: bool = True) -> TrainResult:
    """Fine-tune SAM as ``config`` says; returns where everything went and the best metric.

    Args:
        config: the run's settings (see :class:`~convlora.training.config.TrainConfig`).
        show_progress: draw a progress bar on the main process.

    >>> from convlora.training.config import load_config
    >>> result = train(load_config(overrides=["--data", "data/polyp", "--epochs", "3"]))  # doctest: +SKIP
    """
    from accelerate.utils import set_seed

    from ..data import build_datasets
    from .losses import build_loss
    from .metrics import main_metric

    started = time.time()
    run_dir = Path(config.output_dir)
    accelerator = _make_accelerator(config, run_dir)
    is_main = accelerator.is_main_process
    resume_from = resolve_resume(run_dir, config.resume)
    if resume_from is None and config.resume is None and list_checkpoints(run_dir):
        raise ValueError(
            f"output_dir {run_dir} already holds checkpoints of a run; continue it with --resume latest, "
            "or choose another output_dir"
        )
    set_seed(config.seed)

    data = build_datasets(config)
    base = load_sam(config.model, image_size=config.image_size)
    image_size = int(base.config.vision_config.image_size)
    task = TaskInfo(
        mode=data.mode,
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        image_size=image_size,
        base_model=config.model,
        method=config.method,
    )
    data.set_image_size(image_size)
    adapter_config = config.adapter_config() if METHODS[config.method].uses_adapter else None
    model = build_task_model(base, task, adapter_config, freeze_iou_head=config.freeze_iou_head)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = count_parameters(model, trainable_only=True)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = len(data.train) // world
    if per_process == 0:
        raise ValueError(f"data: {len(data.train)} training samples cannot be shared by {world} processes")
    batches_per_epoch = math.ceil(per_process / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    metric = config.metric or main_metric(task.mode if task.mode == "multiclass" else data.task_family).name
    loss_fn = build_loss(config.loss, task.mode)

    progress: dict[str, Any] = {
        "epoch": 0,
        "batches_done": 0,
        "global_step": 0,
        "best": {"metric": metric, "value": None, "epoch": None, "step": None},
        "history": [],
        "evals_without_improvement": 0,
        "train_loss": [],
        "elapsed": 0.0,
    }
    rng_states = None
    if resume_from is not None:
        rng_states, progress = load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(progress.pop("scheduler"))
        if is_main:
            print(f"Resuming from {resume_from} (step {progress['global_step']}, epoch {progress['epoch']})")

    step_module = TrainStep(model, loss_fn)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config.to_dict())
        print(data.summary())
        print(
            f"model: {config.model} at {image_size}x{image_size}, method {config.method}, "
            f"{trainable_count:,} trainable parameters; {total_steps} optimizer steps on {world} process(es)"
        )
        accelerator.init_trackers("convlora", config=_scalar_config(config))
    if rng_states is not None:
        _restore_rng(rng_states, rank, world, resume_from)

    bar = None
    if show_progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=progress["global_step"], desc="train", unit="step", file=sys.stdout)
    adapter_dir = run_dir / "adapter"
    stopped_early = False
    window_start, window_images = time.time(), 0
    base_elapsed = float(progress.get("elapsed", 0.0))

    def last_good() -> str:
        last = list_checkpoints(run_dir)
        return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"

    def snapshot() -> None:
        step = progress["global_step"]
        if not all(bool(torch.isfinite(p).all()) for p in trainable):  # every process holds the same weights
            raise TrainingError(f"non-finite weights after step {step}; {last_good()}. Lower lr or enable grad_clip.")
        states = _rng_states(accelerator)
        if is_main:
            record = dict(progress, scheduler=scheduler.state_dict(), elapsed=base_elapsed + time.time() - started)
            try:
                save_checkpoint(
                    checkpoint_dir(run_dir, step),
                    accelerator.unwrap_model(step_module).model,
                    optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                    states,
                    record,
                )
            except OSError as error:
                raise TrainingError(
                    f"could not save the checkpoint of step {step}: {error}; {last_good()}. "
                    "Free space (or fix permissions) and continue with --resume latest."
                ) from error
            rotate_checkpoints(run_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    def evaluate_and_keep_best(epoch: int) -> None:
        nonlocal stopped_early
        unwrapped = accelerator.unwrap_model(step_module).model
        scores = evaluate_split(unwrapped, data.val, data, accelerator, batch_size=config.batch_size)
        entry = {"epoch": epoch, "step": progress["global_step"], **scores}
        progress["history"].append(entry)
        value = scores.get(metric)
        if value is None:
            raise ValueError(f"metric {metric!r} is not computed for this task; available: {sorted(scores)}")
        from .metrics import is_better

        best = progress["best"]
        if is_better(metric, value, best["value"]):
            best.update(value=value, epoch=epoch, step=progress["global_step"])
            progress["evals_without_improvement"] = 0
            if is_main:
                task.metrics = {"val": scores, "best_epoch": epoch}
                from .report import model_card

                try:
                    export_trained(unwrapped, task, adapter_dir, model_card(task, config, scores))
                except OSError as error:
                    raise TrainingError(
                        f"could not save the best model of epoch {epoch}: {error}; {last_good()}. "
                        "Free space (or fix permissions) and continue with --resume latest."
                    ) from error
        else:
            progress["evals_without_improvement"] += 1
        if is_main:
            accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=progress["global_step"])
            if bar is not None:
                bar.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        patience = config.early_stopping_patience
        if patience is not None and progress["evals_without_improvement"] >= patience:
            stopped_early = True
        accelerator.wait_for_everyone()

    done = progress["global_step"] >= total_steps
    while not done and progress["epoch"] < config.epochs:
        epoch = progress["epoch"]
        data.train.set_epoch(epoch)
        order = epoch_order(len(data.train), config.seed, epoch, rank, world)
        skip = progress["batches_done"]
        loader = DataLoader(
            data.train,
            batch_size=config.batch_size,
            sampler=order[skip * config.batch_size :],
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed + epoch),
            drop_last=False,
        )
        step_module.train()
        group: list[dict[str, Any]] = []
        remaining = batches_per_epoch - skip
        for batch in loader:
            group.append(batch)
            remaining -= 1
            if len(group) < config.grad_accum and remaining > 0:
                continue
            losses = _optimizer_step(accelerator, step_module, optimizer, group, config.grad_clip, trainable)
            if not math.isfinite(losses["loss"]):
                raise TrainingError(
                    f"non-finite loss ({losses['loss']}) at step {progress['global_step'] + 1} (epoch {epoch}); "
                    f"{last_good()}. Lower lr, enable grad_clip, or check the data."
                )
            scheduler.step()
            progress["global_step"] += 1
            progress["batches_done"] += len(group)
            window_images += sum(len(b["pixel_values"]) for b in group) * world
            group = []
            step = progress["global_step"]
            # logged losses are means over the steps since the last log (kept in progress, so resumes agree)
            window = progress.setdefault("loss_window", {"loss": 0.0, "task": 0.0, "aux": 0.0, "steps": 0})
            for key in ("loss", "task", "aux"):
                window[key] += losses[key]
            window["steps"] += 1
            if step % config.log_every_steps == 0 or step == total_steps:
                count = window.pop("steps")
                progress["train_loss"].append({"step": step, **{k: v / count for k, v in window.items()}})
                progress["loss_window"] = {"loss": 0.0, "task": 0.0, "aux": 0.0, "steps": 0}
            if is_main:
                lr = scheduler.get_last_lr()[0]
                if step % config.log_every_steps == 0:
                    accelerator.log({f"train/{k}": v for k, v in losses.items()} | {"train/lr": lr}, step=step)
                if bar is not None:
                    rate = window_images / max(1e-9, time.time() - window_start)
                    bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                    bar.update(1)
            if config.save_every_steps and step % config.save_every_steps == 0 and step < total_steps:
                snapshot()
            if step >= total_steps:
                done = True
                break
        epoch_finished = progress["batches_done"] >= batches_per_epoch or done
        if epoch_finished:
            if (epoch + 1) % config.eval_every_epochs == 0 or done or epoch + 1 == config.epochs:
                evaluate_and_keep_best(epoch)
            progress["epoch"] = epoch + 1
            progress["batches_done"] = 0
            snapshot()
            if stopped_early:
                if is_main and bar is not None:
                    bar.write(
                        f"early stopping: no improvement of {metric} in {config.early_stopping_patience} evaluations"
                    )
                break
    if bar is not None:
        bar.close()

    if progress["best"]["value"] is None:  # e.g. resumed after the last evaluation of a finished run
        evaluate_and_keep_best(progress["epoch"] - 1)
    accelerator.wait_for_everyone()
    result = _finish(config, data, task, progress, accelerator, trainable_count, started, base_elapsed, stopped_early)
    accelerator.end_training()
    return result


def _optimizer_step(
    accelerator: Any,
    step_module: nn.Module,
    optimizer: Any,
    group: list[dict[str, Any]],
    grad_clip: float,
    parameters: list[torch.nn.Parameter],
) -> dict[str, float]:
    """Accumulate gradients over the micro-batches of ``group`` and take one optimiser step."""
    totals = {"loss": 0.0, "task": 0.0, "aux": 0.0}
    for index, batch in enumerate(group):
        pixel_values = batch["pixel_values"].to(accelerator.device)
        labels = batch["labels"].to(accelerator.device)
        last = index == len(group) - 1
        context = accelerator.no_sync(step_module) if not last else contextlib.nullcontext()
        with context, accelerator.autocast():
            out = step_module(pixel_values, labels)
            accelerator.backward(out["loss"] / len(group))
        for key in totals:
            totals[key] += float(out[key].detach()) / len(group)
    # every process must agree, or one would step while another stops
    broken = torch.tensor([0.0 if math.isfinite(totals["loss"]) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        broken = accelerator.reduce(broken, reduction="sum")
    if broken.item() > 0:
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float("nan"), "task": totals["task"], "aux": totals["aux"]}
    if grad_clip > 0:
        accelerator.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        reduced = accelerator.reduce(torch.tensor(list(totals.values()), device=accelerator.device), "mean")
        totals = dict(zip(totals, reduced.tolist(), strict=True))
    return totals


def _scalar_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def _finish(
    config: TrainConfig,
    data: Any,
    task: TaskInfo,
    progress: dict[str, Any],
    accelerator: Any,
    trainable_count: int,
    started: float,
    base_elapsed: float,
    stopped_early: bool,
) -> TrainResult:
    """Test evaluation with the best model, metrics.json, plots and the closing summary."""
    from .artifact import load_trained
    from .report import plot_curves, save_overlay_grid

    run_dir = Path(config.output_dir)
    adapter_dir = run_dir / "adapter"
    best = progress["best"]
    test_metrics = None
    if data.test is not None or accelerator.is_main_process:
        best_model, _ = load_trained(adapter_dir)
        best_model.to(accelerator.device)
        if data.test is not None:
            test_metrics = evaluate_split(best_model, data.test, data, accelerator, batch_size=config.batch_size)
        if accelerator.is_main_process and config.overlay_samples:
            save_overlay_grid(best_model, data.val, run_dir / "val_overlays.png", config.overlay_samples)
    wall = base_elapsed + time.time() - started
    result = TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        task=task,
        metric=best["metric"],
        best_value=best["value"],
        best_epoch=best["epoch"],
        steps=progress["global_step"],
        history=progress["history"],
        test_metrics=test_metrics,
        trainable_parameters=trainable_count,
        wall_time=wall,
        stopped_early=stopped_early,
    )
    if accelerator.is_main_process:
        write_json(
            run_dir / "metrics.json",
            {
                "best": best,
                "history": progress["history"],
                "test": test_metrics,
                "train_loss": progress["train_loss"],
                "steps": progress["global_step"],
                "trainable_parameters": trainable_count,
                "wall_time_seconds": round(wall, 1),
                "stopped_early": stopped_early,
                "task": task.to_dict(),
            },
        )
        plot_curves(progress, run_dir / "curves.png")
        print(summary(result))
    return result


def summary(result: TrainResult) -> str:
    """The closing lines a run prints."""
    lines = [
        f"Finished {result.steps} steps in {result.wall_time / 60:.1f} min "
        f"({result.trainable_parameters:,} trainable parameters, method {result.task.method}).",
        f"Best {result.metric}: {result.best_value:.4f} (epoch {result.best_epoch})"
        if result.best_value is not None
        else "No evaluation was run.",
    ]
    if result.test_metrics:
        lines.append("Test: " + ", ".join(f"{k}={v:.4f}" for k, v in result.test_metrics.items()))
    lines.append(f"Model: {result.adapter_dir}  (load it with convlora.load_trained)")
    lines.append(f"Run folder: {result.run_dir} (metrics.json, curves.png, val_overlays.png, logs/)")
    return "\n".join(lines)
