"""Memory soak: train the tiny setup for many epochs and record the process's resident memory after each.

A long run must not grow per epoch (nothing accumulates: data, metrics, logs, checkpoints), and the data
pipeline must not hold the dataset in memory. This trains a random tiny SAM with Conv-LoRA on a
synthetic polyp set, evaluating and checkpointing every epoch, reads ``VmRSS`` from ``/proc/self/status``
at the start of every epoch, and reports the first and last values, the peak and the least-squares slope
after a short warm-up. Linux only.

    OMP_NUM_THREADS=1 python tools/memory_soak.py --epochs 40 --output memory.json

Any other ``--key value`` pairs are passed to the training config (e.g. ``--conv_lora.noisy_gating false``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def rss_mib() -> float:
    """Resident set size of this process in MiB, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status (this tool needs Linux)")


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (MiB per epoch)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    covariance = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return covariance / sum((i - mean_x) ** 2 for i in range(n))


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), so RSS counts live memory only."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def soak(
    workdir: Path,
    epochs: int,
    train: int = 8,
    val: int = 4,
    size: int = 64,
    warmup: int = 3,
    trim: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs in this process and return the RSS record.

    Args:
        workdir: where the base model, data and run folder go.
        epochs: epochs to train (one evaluation and one checkpoint each).
        train: training images.
        val: validation images.
        size: typical image side of the synthetic data.
        warmup: epochs left out of the slope (allocator and import warm-up).
        trim: call ``malloc_trim`` before each reading (separates live memory from allocator caching).
        overrides: more ``--key value`` training settings.
    """
    import convlora
    from convlora.data import SegmentationDataset
    from convlora.models import random_sam, tiny_sam_config
    from convlora.synthetic import write_dataset

    random_sam(tiny_sam_config(), seed=0).save_pretrained(workdir / "sam")
    write_dataset("polyp", workdir / "data", train=train, val=val, test=0, size=size, seed=0)
    samples: list[float] = []
    original = SegmentationDataset.set_epoch

    def record(self: SegmentationDataset, epoch: int) -> None:
        if trim:
            trim_heap()
        samples.append(rss_mib())
        original(self, epoch)

    SegmentationDataset.set_epoch = record  # called once per epoch on the training set
    started = time.time()
    try:
        config = convlora.load_config(
            overrides=[
                "--data", str(workdir / "data"), "--model", str(workdir / "sam"),
                "--output_dir", str(workdir / "run"), "--epochs", str(epochs), "--batch_size", "4",
                "--overlay_samples", "0", "--log_every_steps", "1", *(overrides or []),
            ]
        )  # fmt: skip
        convlora.train(config, show_progress=False)
    finally:
        SegmentationDataset.set_epoch = original
    if trim:
        trim_heap()
    samples.append(rss_mib())  # after the run (test evaluation, plots, metrics.json)
    steady = samples[warmup:-1]
    return {
        "epochs": epochs,
        "train_images": train,
        "image_size": size,
        "rss_mib_per_epoch": [round(v, 2) for v in samples[:-1]],
        "rss_mib_after_run": round(samples[-1], 2),
        "first_mib": round(samples[0], 2),
        "last_mib": round(samples[-2], 2),
        "peak_mib": round(max(samples), 2),
        "warmup_epochs": warmup,
        "malloc_trim": trim,
        "overrides": overrides or [],
        "growth_after_warmup_mib": round(steady[-1] - steady[0], 2) if steady else 0.0,
        "slope_mib_per_epoch": round(slope(steady), 4),
        "wall_seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="epochs to train (default 40)")
    parser.add_argument("--train", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--size", type=int, default=64, help="typical image side of the data (default 64)")
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each reading (glibc)")
    parser.add_argument("--output", default=None, help="write the record to this JSON file")
    args, overrides = parser.parse_known_args()
    import torch

    from convlora._io import write_json

    with tempfile.TemporaryDirectory() as workdir:
        record = soak(Path(workdir), args.epochs, train=args.train, size=args.size, trim=args.trim, overrides=overrides)
    record["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(
        f"RSS over {record['epochs']} epochs ({record['train_images']} training images of ~{record['image_size']} px): "
        f"first {record['first_mib']} MiB, last {record['last_mib']} MiB, peak {record['peak_mib']} MiB; "
        f"after {record['warmup_epochs']} warm-up epochs: growth {record['growth_after_warmup_mib']} MiB, "
        f"slope {record['slope_mib_per_epoch']} MiB/epoch ({record['wall_seconds']} s)"
    )
    if args.output:
        write_json(args.output, record)


if __name__ == "__main__":
    main()
