"""Time a training step of the engine (``convlora train``) against a bare PyTorch loop doing the same work.

    python tools/engine_overhead.py [--steps 8] [--profile] [--output benchmarks/results/engine_overhead.json]

Both sides build the same model (``build_task_model``, method ``conv_lora``), loss (``build_loss``), optimiser
(AdamW, the engine's cosine schedule, gradient clipping at the engine's default) and images (the same dataset,
its default augmentation included). The bare loop runs forward, loss, backward, clip, step, taking each batch
from a ``DataLoader`` over the dataset (``loader``, as any training script must) or from tensors already in
memory (``preloaded``: the model's work alone). The engine's step is the time from one optimiser step's start to
the next one's inside an epoch: reading the batch, Accelerate's wrappers, the finite-loss checks, the schedule,
logging and the progress bar included (evaluation and checkpoints, once per epoch, are not). Medians after one
warm-up step, one CPU thread; ``ratio`` is engine over the bare loop with its loader (goal: at most 1.10).
``--profile`` trains once more under cProfile and prints the engine steps' costliest functions.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import itertools
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from convlora._io import write_json
from convlora.artifact import TaskInfo, apply_task_settings
from convlora.artifact.methods import build_task_model
from convlora.bench.environment import environment, load_average, set_threads
from convlora.data import build_datasets
from convlora.models import family_of, load_sam, random_sam, sam_config, segmentation_logits
from convlora.synthetic import write_dataset
from convlora.training import engine
from convlora.training.config import load_config, resolve_defaults
from convlora.training.losses import build_loss
from convlora.tuner.moe import moe_aux_loss

# name -> (model: an embedded name, or "vit-b" for a random ViT-B at `size`), input size, batch size
SETTINGS: dict[str, tuple[str, int, int]] = {
    "convlora-tiny, 128 px, batch 8": ("convlora-tiny", 128, 8),
    "random ViT-B, 224 px, batch 2": ("vit-b", 224, 2),
}
METHOD = "conv_lora"


def engine_steps(config: Any, steps: int, profile: bool) -> tuple[list[float], str | None]:
    """Seconds between the starts of the ``steps + 1`` optimiser steps of one epoch of ``train(config)``."""
    starts: list[float] = []
    real = engine._optimizer_step
    profiler = cProfile.Profile() if profile else None

    def timed(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.perf_counter())
        if profiler is not None and len(starts) == 2:  # after the warm-up step
            profiler.enable()
        if profiler is not None and len(starts) == steps + 1:  # the last step: nothing follows it to time
            profiler.disable()
        return real(*args, **kwargs)

    engine._optimizer_step = timed
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train(config, show_progress=False)
    finally:
        engine._optimizer_step = real
    report = None
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        report = text.getvalue()
    return [b - a for a, b in itertools.pairwise(starts)], report


def bare_steps(config: Any, steps: int) -> dict[str, list[float]]:
    """Seconds of each step of plain loops over the same model, loss, optimiser and images.

    ``preloaded``: the batches are tensors in memory already (the model's work alone); ``loader``: each step also
    reads its batch through a ``DataLoader`` over the same dataset, as any training script must.
    """
    data = build_datasets(config)
    base = load_sam(config.model)
    config, _ = resolve_defaults(config, base)
    family = family_of(base)
    size = family.image_size(base)
    task = TaskInfo(data.mode, data.num_classes, list(data.class_names), size, config.model, METHOD)
    apply_task_settings(base, task)
    data.set_image_size(size, family.input_format)
    data.train.set_epoch(0)
    model = build_task_model(base, task, config.conv_lora.build(), freeze_iou_head=True).train()
    loss_fn = build_loss(config.loss, task.mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    total = steps + 1
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * 2 * total), 2 * total)
    loader = DataLoader(data.train, batch_size=config.batch_size, num_workers=0)
    preloaded = list(loader)

    def step(batch: dict[str, Any]) -> None:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        logits = segmentation_logits(model, pixel_values)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss_fn(logits, labels) + moe_aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        float(loss.detach())

    times: dict[str, list[float]] = {"preloaded": [], "loader": []}
    for batch in preloaded:
        started = time.perf_counter()
        step(batch)
        times["preloaded"].append(time.perf_counter() - started)
    batches = iter(loader)
    for _ in range(total):
        started = time.perf_counter()
        step(next(batches))
        times["loader"].append(time.perf_counter() - started)
    return times


def measure(root: Path, name: str, model: str, size: int, batch: int, steps: int, profile: bool) -> dict[str, Any]:
    images = (steps + 1) * batch
    data = write_dataset("polyp", root / f"data-{name}", train=images, val=2, test=0, size=size, seed=0, square=True)
    label = model
    if model == "vit-b":
        label = f"random_sam(sam_config('vit-b', image_size={size}), seed=0)"
        model = str(root / "vit-b")
        random_sam(sam_config("vit-b", image_size=size), seed=0).save_pretrained(model)
    config = load_config(
        data=str(data),
        model=model,
        output_dir=str(root / "runs" / name),
        method=METHOD,
        epochs=1,
        batch_size=batch,
        overlay_samples=0,
        log_every_steps=1,
    )
    bare = {name: times[1:] for name, times in bare_steps(config, steps).items()}
    ours = engine_steps(config, steps, profile=False)[0][1:]
    report = None
    if profile:  # a run of its own: the profiler's overhead must not reach the timed steps
        report = engine_steps(dataclasses.replace(config, output_dir=config.output_dir + "-profiled"), steps, True)[1]
    result: dict[str, Any] = {
        "model": label,
        "image_size": size,
        "batch_size": batch,
        "method": METHOD,
        "steps_timed": len(ours),
        "engine_step_seconds": statistics.median(ours),
        "bare_loader_step_seconds": statistics.median(bare["loader"]),
        "bare_preloaded_step_seconds": statistics.median(bare["preloaded"]),
        "engine_steps": ours,
        "bare_loader_steps": bare["loader"],
        "bare_preloaded_steps": bare["preloaded"],
    }
    result["ratio"] = result["engine_step_seconds"] / result["bare_loader_step_seconds"]
    result["ratio_to_preloaded"] = result["engine_step_seconds"] / result["bare_preloaded_step_seconds"]
    if report is not None:
        result["profile"] = report.replace(str(root), "TMP")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps timed per side (after one warm-up step)")
    parser.add_argument("--profile", action="store_true", help="also profile the engine's steps (cProfile)")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    set_threads(1)
    result: dict[str, Any] = {
        "command": " ".join(["python", "tools/engine_overhead.py", *sys.argv[1:]]),
        "environment": environment(threads=1, device="cpu"),
        "load_average_before": load_average(),
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, size, batch) in SETTINGS.items():
            found = measure(Path(folder), name, model, size, batch, args.steps, args.profile)
            result["settings"][name] = found
            print(
                f"{name}: engine {found['engine_step_seconds']:.4f} s/step; bare loop reading its batches "
                f"{found['bare_loader_step_seconds']:.4f} (engine / bare {found['ratio']:.3f}), with batches in "
                f"memory {found['bare_preloaded_step_seconds']:.4f} ({found['ratio_to_preloaded']:.3f})"
            )
            if "profile" in found:
                print(found["profile"])
    result["load_average_after"] = load_average()
    if not all(math.isfinite(s["ratio"]) for s in result["settings"].values()):
        raise SystemExit("a ratio is not finite")
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
