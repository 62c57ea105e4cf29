"""Images per second of `convlora predict` against the bare model (the embedded base, 512-px JPEGs).

    OMP_NUM_THREADS=2 python tools/predict_throughput.py --images 120 [--output results.json]

The floor is the model alone: pre-resized 128-px tensors through `segmentation_logits`, in batches of 8, no
reading, resizing or writing. `predict` is timed end to end (reading JPEGs, preprocessing, the model, resizing
masks back to 512 px, writing PNGs, the progress file), once without and once with overlays, each into a fresh
folder. Ratios are to the floor measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convlora import load_sam
from convlora.inference import predict_folder
from convlora.models import segmentation_logits


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` JPEGs of a bright disc on a noisy background."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        image = rng.normal(120, 20, (size, size, 3))
        (cy, cx), radius = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.1, 0.25) * size
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = (200, 80, 80)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def floor(count: int, batch: int = 8) -> float:
    model = load_sam("convlora-tiny").eval()
    pixels = torch.randn(count, 3, 128, 128)
    with torch.no_grad():
        segmentation_logits(model, pixels[:batch])
        started = time.perf_counter()
        for start in range(0, count, batch):
            segmentation_logits(model, pixels[start : start + batch])
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    write_images(root / "images", args.images, args.size)
    result = {"images": args.images, "size": args.size, "torch_threads": torch.get_num_threads()}
    result["floor_images_per_s"] = floor(args.images)
    for name, overlays in (("no_overlays", False), ("overlays", True)):
        predict_folder("convlora-tiny", root / "images", root / "warmup", overlays=overlays)  # imports, caches
        started = time.perf_counter()
        predict_folder("convlora-tiny", root / "images", root / name, overlays=overlays)
        rate = args.images / (time.perf_counter() - started)
        result[f"predict_{name}_images_per_s"] = rate
        result[f"ratio_{name}"] = rate / result["floor_images_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
