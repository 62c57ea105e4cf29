"""Epoch time of decoder-only training with and without the embedding cache (embedded base, random ViT-B at 224 px).

    python tools/embedding_cache_time.py [--epochs 3] [--output benchmarks/results/embedding_cache.json]

Each setting trains method ``decoder`` (augmentation off, so training images may be cached) on a small generated
polyp set with ``embedding_cache`` off, memory and disk, one after the other in this process on one CPU thread.
Epoch times are the engine's own (``metrics.json`` ``epoch_seconds``: training steps, validation pass and
checkpoint), after a two-epoch warm-up run per setting. The speed-up is the uncached run's mean epoch time after
the first over the cached run's; the first-epoch ratio is what filling the cache costs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from convlora._io import write_json
from convlora.bench.environment import environment, load_average, set_threads
from convlora.models import random_sam, sam_config
from convlora.synthetic import write_dataset
from convlora.training.config import load_config
from convlora.training.engine import train

# name -> (model: an embedded name, or "vit-b" for a random ViT-B at `size`), input size, training images
SETTINGS: dict[str, tuple[str, int, int]] = {
    "convlora-tiny, 128 px": ("convlora-tiny", 128, 16),
    "random ViT-B, 224 px": ("vit-b", 224, 8),
}
VAL_IMAGES = 4
BATCH_SIZE = 4
MODES = ("off", "memory", "disk")


def one_run(root: Path, name: str, model: str, data: Path, mode: str, epochs: int) -> dict[str, Any]:
    """Train once; returns the epoch times, the cache's summary and the line the run printed about the cache."""
    out = root / "runs" / name / mode
    config = load_config(
        data=str(data),
        model=model,
        output_dir=str(out),
        method="decoder",
        epochs=epochs,
        batch_size=BATCH_SIZE,
        augment={"hflip": 0.0},
        embedding_cache=mode,
        overlay_samples=0,
        log_every_steps=1000,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config, show_progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = [entry["seconds"] for entry in metrics["epoch_seconds"]]
    line = next((x for x in printed.getvalue().splitlines() if x.startswith("embedding cache:")), "")
    return {
        "epoch_seconds": seconds,
        "first_epoch_seconds": seconds[0],
        "later_epoch_seconds": statistics.mean(seconds[1:]),
        "cache": metrics["embedding_cache"],
        "printed": line.replace(str(root), "TMP"),
    }


def measure(root: Path, name: str, model: str, size: int, train_images: int, epochs: int) -> dict[str, Any]:
    data = write_dataset("polyp", root / f"data-{size}", train=train_images, val=VAL_IMAGES, test=0, size=size, seed=0)
    label = model
    if model == "vit-b":
        label = "random_sam(sam_config('vit-b', image_size=224), seed=0)"
        model = str(root / "vit-b")
        random_sam(sam_config("vit-b", image_size=size), seed=0).save_pretrained(model)
    one_run(root, f"{name}-warm-up", model, Path(data), "off", 2)  # one-time costs (kernels, caches) off the clock
    runs = {mode: one_run(root, name, model, Path(data), mode, epochs) for mode in MODES}
    plain = runs["off"]
    result: dict[str, Any] = {
        "model": label,
        "image_size": size,
        "train_images": train_images,
        "val_images": VAL_IMAGES,
        "batch_size": BATCH_SIZE,
        "runs": runs,
    }
    for mode in ("memory", "disk"):
        result[f"speedup_after_first_{mode}"] = plain["later_epoch_seconds"] / runs[mode]["later_epoch_seconds"]
        result[f"first_epoch_ratio_{mode}"] = runs[mode]["first_epoch_seconds"] / plain["first_epoch_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    set_threads(1)
    result: dict[str, Any] = {
        "command": " ".join(["python", "tools/embedding_cache_time.py", *sys.argv[1:]]),
        "environment": environment(threads=1, device="cpu"),
        "load_average_before": load_average(),
        "epochs": args.epochs,
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, size, images) in SETTINGS.items():
            found = measure(Path(folder), name, model, size, images, args.epochs)
            result["settings"][name] = found
            print(f"{name}: epoch seconds off {found['runs']['off']['epoch_seconds']}")
            for mode in ("memory", "disk"):
                run = found["runs"][mode]
                print(
                    f"  {mode}: {run['epoch_seconds']}; after the first {found[f'speedup_after_first_{mode}']:.1f}x "
                    f"faster; first epoch {found[f'first_epoch_ratio_{mode}']:.2f}x; {run['printed']}"
                )
    result["load_average_after"] = load_average()
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
