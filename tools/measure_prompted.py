"""Measure prompted inference and tiled inference on the embedded base (numbers for the docs and the closing note).

- prompts per second on one image with 64 boxes: the image encoder once for all boxes (what ``Segmenter``
  does) vs once per box (what calling SAM with ``pixel_values`` per prompt costs);
- sliding-window prediction of a 4096 x 4096 image: seconds and the peak resident memory while predicting
  (Linux ``VmHWM``, reset after loading, in a fresh subprocess so one measurement cannot inflate another),
  with the whole-image path for reference.

    python tools/measure_prompted.py --output prompted_measurements.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def prompts_per_second(model_name: str, count: int, device: str, repeats: int = 3) -> dict[str, Any]:
    """Prompts/s for ``count`` boxes on one image: one encoder call in all vs one per prompt."""
    from convlora.data.prompts import Prompts
    from convlora.inference import Segmenter

    segmenter = Segmenter.from_pretrained(model_name, device=device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(768, 1024, 3), dtype=np.uint8)
    corners = rng.uniform(0, 700, size=(count, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(20, 300, size=(count, 2))], axis=1).clip(0, 767)
    prompts = Prompts(boxes=boxes.astype(np.float32))

    def timed(run) -> float:
        run()  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    once = timed(lambda: segmenter.predict_prompted(image, prompts))
    per_prompt = timed(
        lambda: [segmenter.predict_prompted(image, Prompts(boxes=prompts.boxes[i : i + 1])) for i in range(count)]
    )
    return {
        "model": model_name,
        "image": list(image.shape[:2]),
        "prompts": count,
        "encoder_once_seconds": round(once, 4),
        "encoder_per_prompt_seconds": round(per_prompt, 4),
        "encoder_once_prompts_per_second": round(count / once, 1),
        "encoder_per_prompt_prompts_per_second": round(count / per_prompt, 1),
        "speedup": round(per_prompt / once, 1),
    }


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _tiling_child(model_name: str, size: int, tile: int | None, overlap: int, device: str) -> None:
    from convlora.inference import Segmenter

    segmenter = Segmenter.from_pretrained(model_name, device=device)
    image = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    before = _status_mib("VmRSS")
    # reset the peak resident size (VmHWM) so that loading the model does not count (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    mask = segmenter.predict(image, tile=tile, overlap=overlap)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    record = {
        "image": [size, size],
        "tile": tile,
        "overlap": overlap,
        "seconds": round(seconds, 2),
        "rss_before_predict_mib": round(before, 1),
        "peak_rss_during_predict_mib": round(peak, 1),
        "peak_added_by_predict_mib": round(peak - before, 1),
        "mask_shape": list(mask.shape),
    }
    if device.startswith("cuda"):
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(record))


def tiling(model_name: str, size: int, tile: int | None, overlap: int, device: str) -> dict[str, Any]:
    """Run one tiled (or whole-image, ``tile=None``) prediction in a fresh process; its time and peak memory."""
    command = [sys.executable, __file__, "--child", model_name, str(size), str(tile or 0), str(overlap), device]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convlora-tiny", help="SAM checkpoint or embedded name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096, help="side of the large image")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, size, tile, overlap, device = args.child
        _tiling_child(name, int(size), int(tile) or None, int(overlap), device)
        return 0
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "device": args.device,
        "prompts_per_second": prompts_per_second(args.model, args.prompts, args.device),
        "tiled": tiling(args.model, args.size, args.tile, args.overlap, args.device),
        "whole_image": tiling(args.model, args.size, None, 0, args.device),
    }
    print(json.dumps(results, indent=2))
    if args.output:
        from convlora._io import write_json

        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
