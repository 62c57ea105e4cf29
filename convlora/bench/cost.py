"""Cost runs: each measurement in a fresh process, results as absolute values and as ratios to LoRA.

The reference point measures every method (trainable parameters, artifact bytes, step time, peak
memory), each in its own process; then the step times again with all methods in one process, stepped
in turn so that the load of a shared machine hits them alike (``step_seconds`` and the ratios come from
that run, ``step_seconds_isolated`` keeps the first); and, in one more process, the inference latency
of the base model and of LoRA / Conv-LoRA merged into it, side by side. Sweeps repeat the train-step
measurements (isolated and interleaved) of a few methods over image sizes and batch sizes.
Measurements are cached in the work folder by their full specification, so an interrupted run
resumes; ``fresh=True`` measures everything again (timings from another day and load
should not be mixed into one table).

>>> ratios({"lora": {"x": 2.0}, "conv_lora": {"x": 3.0}}, ["x"])["conv_lora"]["x"]
1.5
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .._io import write_json
from ..artifact.methods import METHODS
from .experiments import CostExperiment

TRAIN_KEYS = ("trainable_parameters", "adapter_parameters", "artifact_bytes", "step_seconds", "peak_memory_bytes")


# glibc malloc settings of each measurement's process, by what it measures (other C libraries ignore them).
# "memory" (the ``train`` task's peak): a fixed mmap threshold, so that freed large blocks leave the resident
# set and the peak follows the memory in use (two runs of one measurement differed by 15 % without it, by under
# 1 % with it). "timing" (``interleaved`` and ``latency``): freed memory stays in the process for reuse, as
# jemalloc and tcmalloc keep it. Under the fixed threshold every block over 64 KiB came fresh from the kernel,
# zeroed page by page on first touch: 2.9 million page faults per ViT-B forward at 1024 px, half its time, whose
# run-to-run spread (±10 %) hid the differences between the methods.
# "system" (glibc's own defaults, as a user's process runs) is there for ``tools/allocator_cost.py``.
ALLOCATOR = {
    "memory": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "timing": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**46)},
    "system": {},
}


def allocator_of(task: str) -> str:
    """Which of :data:`ALLOCATOR`'s settings a measurement task runs under.

    >>> allocator_of("train"), allocator_of("latency")
    ('memory', 'timing')
    """
    return "memory" if task in ("train", "inference", "prompted") else "timing"


def run_isolated(spec: dict[str, Any], threads: int, allocator: str | None = None) -> dict[str, Any]:
    """Run ``convlora.bench.measure`` on ``spec`` in a fresh Python process with ``threads`` threads.

    The process gets the allocator settings of its task (:data:`ALLOCATOR`; ``allocator`` names others),
    recorded in the result as ``allocator``; ``MALLOC_*`` variables of the calling environment are not
    passed on.

    Raises:
        RuntimeError: with the end of the child's error output when the measurement fails.
    """
    allocator = allocator or allocator_of(spec["task"])
    if allocator not in ALLOCATOR:
        raise ValueError(f"allocator must be one of {sorted(ALLOCATOR)}, got {allocator!r}")
    with tempfile.TemporaryDirectory(prefix="convlora-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        write_json(spec_file, {**spec, "threads": threads})
        env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
        env.update(ALLOCATOR[allocator], OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        done = subprocess.run(
            [sys.executable, "-m", "convlora.bench.measure", str(spec_file), str(out_file)],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not out_file.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"measurement {spec} failed (exit {done.returncode}):\n{tail}")
        return {**json.loads(out_file.read_text()), "allocator": {"kind": allocator, **ALLOCATOR[allocator]}}


def cached(spec: dict[str, Any], threads: int, cache_dir: Path, fresh: bool) -> dict[str, Any]:
    """A measurement from ``cache_dir`` when the same spec was measured before (under the same allocator
    settings), else a new one (saved)."""
    allocator = ALLOCATOR[allocator_of(spec["task"])]
    key = json.dumps({**spec, "threads": threads, "allocator": allocator}, sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir / f"{spec['task']}-{spec.get('method', 'all')}-s{spec.get('image_size')}-{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    result = run_isolated(spec, threads)
    write_json(path, result)
    return result


def ratios(rows: dict[str, dict[str, Any]], keys: list[str] | tuple[str, ...], reference: str = "lora") -> dict:
    """Each row's values divided by the ``reference`` row's, key by key (``None`` where undefined).

    Args:
        rows: ``{name: {key: value}}``.
        keys: which values to divide.
        reference: the row to divide by.
    """
    if reference not in rows:
        return {}
    base = rows[reference]
    out: dict[str, dict[str, float | None]] = {}
    for name, row in rows.items():
        out[name] = {}
        for key in keys:
            value, ref = row.get(key), base.get(key)
            out[name][key] = value / ref if value is not None and ref not in (None, 0) else None
    return out


def run_cost(
    experiment: CostExperiment,
    work_dir: Path,
    *,
    model: str | None = None,
    device: str | None = None,
    fresh: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Measure a cost experiment.

    Args:
        experiment: the experiment.
        work_dir: working folder; measurements are cached under ``work_dir/cost/<name>/``.
        model: base SAM instead of the experiment's.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` instead of the experiment's.
        fresh: ignore cached measurements.
        log: where progress lines go.

    Returns:
        ``{"reference": {...}, "latency": {...}, "sweeps": {...}}`` with absolute values and ratios to LoRA.
    """
    cache_dir = work_dir / "cost" / experiment.name
    common = {
        "model": model or experiment.model,
        "conv_lora": dict(experiment.conv_lora),
        "device": device or experiment.device,
        "precision": experiment.precision,
        "warmup_steps": experiment.warmup_steps,
        "timed_steps": experiment.timed_steps,
    }

    def train_point(method: str, image_size: int | None, batch_size: int) -> dict[str, Any]:
        spec = {**common, "task": "train", "method": method, "image_size": image_size, "batch_size": batch_size}
        result = cached(spec, experiment.threads, cache_dir, fresh)
        log(
            f"  {method} at {result['image_size']} px, batch {batch_size}: "
            f"{result['step_seconds'] * 1000:.1f} ms/step, "
            f"peak {_mib(result['peak_memory_bytes'])} MiB, {result['trainable_parameters']:,} trainable"
        )
        return result

    def interleave(methods: list[str], image_size: int | None, batch_size: int, rows: dict[str, Any]) -> dict:
        """Step times of ``methods`` measured in turn in one process; they replace the isolated ones."""
        spec = {**common, "task": "interleaved", "methods": list(methods), "image_size": image_size,
                "batch_size": batch_size}  # fmt: skip
        result = cached(spec, experiment.threads, cache_dir, fresh)
        for method, timing in result["methods"].items():
            rows[method]["step_seconds_isolated"] = rows[method]["step_seconds"]
            rows[method].update(timing)
        paired = result["paired_step_ratios_to_lora"]
        steps = ", ".join(f"{m} {t['step_seconds'] * 1000:.1f} ms" for m, t in result["methods"].items())
        per_round = f"; conv_lora / lora per round {paired['conv_lora']:.3f}" if "conv_lora" in paired else ""
        log(f"  interleaved: {steps}{per_round}")
        return {"paired_step_ratios_to_lora": paired, "load_before": result["load_before"],
                "load_after": result["load_after"], "allocator": result.get("allocator")}  # fmt: skip

    log(f"{experiment.name}: reference point")
    rows = {m: train_point(m, experiment.image_size, experiment.batch_size) for m in experiment.methods}
    timing = interleave(list(experiment.methods), experiment.image_size, experiment.batch_size, rows)
    latency = None
    if experiment.latency_runs > 0:
        spec = {
            **common,
            "task": "latency",
            "image_size": experiment.image_size,
            "latency_batch_size": experiment.latency_batch_size,
            "latency_runs": experiment.latency_runs,
            "latency_warmup": experiment.latency_warmup,
        }
        latency = cached(spec, experiment.threads, cache_dir, fresh)
        seconds = latency["seconds"]
        latency["vs_base"] = {name: value / seconds["base"] for name, value in seconds.items()}
        if "lora_merged" in seconds:
            latency["vs_lora_merged"] = {name: value / seconds["lora_merged"] for name, value in seconds.items()}
            dense = latency.get("dense_routing_seconds", {})
            latency["dense_routing_vs_lora_merged"] = {k: v / seconds["lora_merged"] for k, v in dense.items()}
        paired = latency.get("paired_ratios_to_lora_merged", {})
        per_run = f"; conv_lora_merged / lora_merged per run {paired['conv_lora_merged']:.3f}" if paired else ""
        log("  latency: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in seconds.items()) + per_run)
        for method, row in rows.items():
            row["merged_latency_seconds"] = seconds[METHODS[method].merged_model]
    keys = [*TRAIN_KEYS, "merged_latency_seconds"] if latency else list(TRAIN_KEYS)
    reference = {"image_size": experiment.image_size, "batch_size": experiment.batch_size, "methods": rows}
    reference["ratios_to_lora"] = ratios(rows, keys)
    reference["interleaved_timing"] = timing

    def predict_point(task: str, method: str, image_size: int | None, **values: int) -> dict[str, Any]:
        runs = {"latency_runs": experiment.latency_runs, "latency_warmup": experiment.latency_warmup}
        spec = {**common, "task": task, "method": method, "image_size": image_size, **runs, **values}
        result = cached(spec, experiment.threads, cache_dir, fresh)
        what = f"{values['prompts']} prompts" if task == "prompted" else f"batch {values['batch_size']}"
        log(
            f"  {method} merged, {task} at {result['image_size']} px, {what}: "
            f"{result['seconds_per_image'] * 1000:.1f} ms/image, peak {_mib(result['peak_memory_bytes'])} MiB"
        )
        return result

    sweeps: dict[str, Any] = {}
    for axis, values in experiment.sweeps.items():
        log(f"{experiment.name}: sweep over {axis}")
        points = []
        for value in values:
            if axis == "prompts":
                rows_p = {m: predict_point("prompted", m, experiment.image_size, prompts=value)
                          for m in experiment.sweep_methods}  # fmt: skip
                points.append({axis: value, "prompted": rows_p})
                continue
            size = value if axis == "image_size" else experiment.image_size
            batch = value if axis == "batch_size" else experiment.batch_size
            point_rows = {m: train_point(m, size, batch) for m in experiment.sweep_methods}
            point_timing = interleave(list(experiment.sweep_methods), size, batch, point_rows)
            point_ratios = ratios(point_rows, ("step_seconds", "peak_memory_bytes"))
            point = {axis: value, "methods": point_rows, "ratios_to_lora": point_ratios,
                     "interleaved_timing": point_timing}  # fmt: skip
            if experiment.sweep_predict:
                point["predict"] = {
                    m: predict_point("inference", m, size, batch_size=batch) for m in experiment.sweep_methods
                }
            points.append(point)
        sweeps[axis] = points
    return {"reference": reference, "latency": latency, "sweeps": sweeps}


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f}"
