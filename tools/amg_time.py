"""Time automatic mask generation on the embedded base (the drawn three-disc image of tests/test_amg.py).

    OMP_NUM_THREADS=2 python tools/amg_time.py

Prints, per setting, the seconds per image (median of 5 runs after one warm-up), the objects found and the
instance recall at IoU 0.5 against the three discs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_amg import drawn_discs

from convlora import load_sam
from convlora.evaluation import instance_scores
from convlora.instances import AmgConfig, generate_masks

RELAXED = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.9}  # for a 747k-parameter base
SETTINGS = {
    "8 x 8 points": AmgConfig(points_per_side=8, **RELAXED),
    "16 x 16 points": AmgConfig(points_per_side=16, **RELAXED),
    "32 x 32 points (SAM's default grid)": AmgConfig(points_per_side=32, **RELAXED),
    "16 x 16, one crop layer": AmgConfig(points_per_side=16, crop_n_layers=1, **RELAXED),
}


def main() -> None:
    model = load_sam("convlora-tiny").eval()
    image, truth = drawn_discs()
    print(f"image {image.shape[1]}x{image.shape[0]}, model convlora-tiny (128 px input)")
    print("| setting | seconds per image | objects | recall@0.5 |")
    print("|---|---:|---:|---:|")
    for name, config in SETTINGS.items():
        generate_masks(model, image, config)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            found = generate_masks(model, image, config)
            times.append(time.perf_counter() - started)
        recall = instance_scores(truth, found.id_map())["recall_50"]
        print(f"| {name} | {statistics.median(times):.3f} | {len(found)} | {recall:.2f} |")


if __name__ == "__main__":
    main()
