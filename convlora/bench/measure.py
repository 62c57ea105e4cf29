"""One cost measurement, meant to run in a fresh process: ``python -m convlora.bench.measure SPEC OUT``.

A fresh process per measurement makes the peak memory that of this configuration alone. On CPU the
peak is the process's resident-set high-water mark (``VmHWM``) minus its resident set right after the
imports, less the library code paged in meanwhile (the growth of ``RssFile``: the first call of each
torch kernel maps its machine code, some 30 MiB over a first training step, more for a method that calls
more kinds of kernels), so it counts the model, gradients, optimiser state and activations, but not the
Python and library baseline; ``run_isolated`` fixes glibc's mmap threshold so that freed blocks leave
the resident set (the timing tasks instead keep freed memory for reuse: see ``convlora.bench.cost.ALLOCATOR``;
every timing records the page faults it took). The code pages are reported beside it (``code_pages_bytes``).
On CUDA it is ``torch.cuda.max_memory_allocated`` after a reset.

Three measurements:

- ``train``: build the model for a method as the engine does (``build_task_model``), then time full
  optimiser steps (forward, loss + MoE auxiliary loss, backward, gradient clipping, AdamW) on random
  images and masks; report the median of the timed steps after the warm-up steps, the peak memory, the
  trainable parameters and the size of the exported artifact.
- ``interleaved``: the same steps for several methods held in one process, one step of each in turn,
  so that the machine's load (a shared CPU) hits them alike; the step-time comparison comes from here.
- ``latency``: the base model, LoRA and Conv-LoRA merged into it (``merge_and_unload``; Conv-LoRA with
  sparse and with dense routing), and both unmerged, timed side by side in eval mode under ``no_grad``,
  interleaved run by run (the order rotating) so that changes in machine load hit every model alike;
  besides the medians, each model's median per-run ratio to LoRA merged. Conv-LoRA's gate gets random
  weights (``init_lora_weights=False``): a zero gate, as at initialisation, sends every window to the
  cheapest expert (scale 1), which would understate the cost of a trained, load-balanced gate.

>>> result = measure({"task": "train", "model": "random:tiny", "method": "lora", "image_size": 64,
...                   "batch_size": 1, "warmup_steps": 0, "timed_steps": 1})  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import write_json
from ..artifact.methods import METHODS
from ..models import count_parameters, family_of, load_sam, random_sam, sam_config, tiny_sam_config
from ..models.embedded import BASE_ARCHITECTURE
from .environment import load_average, pick_device, pick_dtype, set_threads

RANDOM_PREFIX = "random:"
DENSE = "conv_lora_merged_dense"


def build_base(model: str, image_size: int | None = None) -> nn.Module:
    """The base SAM of a cost measurement.

    Args:
        model: ``"random:vit-b"`` (or ``vit-l``, ``vit-h``), ``"random:convlora-tiny"`` (the embedded base's
            architecture), ``"random:tiny"`` (the test config), or anything ``convlora.load_sam`` accepts.
        image_size: input size; the model's own when ``None``.

    >>> build_base("random:tiny", 32).config.vision_config.image_size
    32
    """
    if model.startswith(RANDOM_PREFIX):
        variant = model[len(RANDOM_PREFIX) :]
        if variant == "tiny":
            return random_sam(tiny_sam_config(**({"image_size": image_size} if image_size else {})), seed=0)
        if variant == "convlora-tiny":
            arch = {**BASE_ARCHITECTURE, **({"image_size": image_size} if image_size else {})}
            return random_sam(tiny_sam_config(**arch), seed=0)
        return random_sam(sam_config(variant, image_size=image_size or 1024), seed=0)
    return load_sam(model, image_size=image_size)


def _rss_bytes(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process from ``/proc/self/status``, in bytes (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _peak_rss_bytes() -> int | None:
    peak = _rss_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return usage if sys.platform == "darwin" else usage * 1024
    except (ImportError, OSError):
        return None


def _page_faults() -> int | None:
    """Minor page faults of this process so far (memory first touched, zeroed by the kernel); ``None`` off Unix."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_between(before: int | None) -> int | None:
    after = _page_faults()
    return after - before if after is not None and before is not None else None


def _median_or_none(values: list[int | None]) -> float | None:
    return statistics.median(values) if values and None not in values else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _inputs(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 2, (batch, size, size), generator=generator)
    return pixels.to(device), labels.to(device)


def _directory_bytes(directory: Path) -> int:
    """Bytes of an exported artifact: weights and configs, not the human-readable model card."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != "README.md")


def training_run(spec: dict[str, Any], method: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build ``method``'s model as the engine does, and a function timing one optimiser step of it.

    Returns a dict: ``model``, ``task``, ``trainable`` (the tensors the optimiser steps), ``size`` (the
    input size), ``step`` (a function running one step and returning its wall time in seconds), and
    ``faults`` / ``losses``, which each call of ``step`` appends its page faults and loss to.

    >>> run = training_run({"model": "random:tiny", "image_size": 64, "batch_size": 1}, "lora",
    ...                    torch.device("cpu"), torch.float32)  # doctest: +SKIP
    >>> seconds = run["step"]()  # doctest: +SKIP
    """
    from ..artifact import TaskInfo
    from ..artifact.methods import build_task_model
    from ..training.engine import TrainStep
    from ..training.losses import build_loss
    from ..tuner.config import ConvLoraConfig

    torch.manual_seed(0)
    base = build_base(spec["model"], spec.get("image_size"))
    size = family_of(base).image_size(base)
    task = TaskInfo("binary", 2, ["background", "foreground"], size, spec["model"], method)
    adapter = ConvLoraConfig(**spec.get("conv_lora", {})) if METHODS[method].uses_adapter else None
    model = build_task_model(base, task, adapter, freeze_iou_head=True).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, build_loss(None, "binary"))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    pixels, labels = _inputs(int(spec["batch_size"]), size, device)

    faults: list[int | None] = []
    losses: list[float] = []

    def timed_step() -> float:
        _sync(device)
        before = _page_faults()
        start = time.perf_counter()
        with _autocast(device, dtype):
            loss = step(pixels, labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - start
        faults.append(_faults_between(before))
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {float(loss)} while timing {method}")
        return elapsed

    return {
        "model": model,
        "task": task,
        "trainable": trainable,
        "size": size,
        "step": timed_step,
        "faults": faults,
        "losses": losses,
    }


def _memory_baselines(device: torch.device) -> tuple[int | None, int | None]:
    """``VmRSS`` and ``RssFile`` now (CUDA: the peak statistics reset), for :func:`_peak_since`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _rss_bytes("VmRSS"), _rss_bytes("RssFile")


def _peak_since(
    baseline: int | None, baseline_code: int | None, device: torch.device
) -> tuple[int | None, str, int | None]:
    """Peak memory since :func:`_memory_baselines`, how it was measured, and the library code paged in meanwhile.

    On the CPU the peak is ``VmHWM`` less ``VmRSS`` at the baseline, less the growth of ``RssFile`` (library code
    paged in by the first calls: not the measured work's memory), which is returned as the third value.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated", None
    hwm, code_now = _peak_rss_bytes(), _rss_bytes("RssFile")
    peak = hwm - baseline if hwm is not None and baseline is not None else None
    if peak is None or code_now is None or baseline_code is None:
        return peak, "VmHWM - VmRSS after imports", None
    code = code_now - baseline_code
    return peak - code, "VmHWM - VmRSS after imports - code paged in (RssFile growth)", code


def measure_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Time optimiser steps of one method and report step time, peak memory, parameters and artifact size.

    Args:
        spec: ``model``, ``method``, ``conv_lora`` (dict), ``image_size``, ``batch_size``, ``warmup_steps``,
            ``timed_steps``, ``device``, ``precision``.
    """
    from ..artifact import export_trained

    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(spec.get("precision", "auto"), device)
    baseline, baseline_code = _memory_baselines(device)
    load_before = load_average()
    method = spec["method"]
    run = training_run(spec, method, device, dtype)
    model, task, size = run["model"], run["task"], run["size"]
    times = [run["step"]() for _ in range(int(spec["warmup_steps"]) + int(spec["timed_steps"]))]
    times = times[int(spec["warmup_steps"]) :]

    peak, memory_source, code = _peak_since(baseline, baseline_code, device)
    load_after = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_trained(model.eval(), task, Path(tmp) / "artifact")
        artifact_bytes = _directory_bytes(artifact)
    return {
        "task": "train",
        "method": method,
        "image_size": size,
        "batch_size": int(spec["batch_size"]),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        # the LoRA / Conv-LoRA tensors alone, without the mask decoder that both methods also train
        "adapter_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) or None
        if METHODS[method].uses_adapter
        else None,
        "total_parameters": count_parameters(model),
        "artifact_bytes": artifact_bytes,
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "page_faults_per_step": _median_or_none(run["faults"][int(spec["warmup_steps"]) :]),
        "peak_memory_bytes": peak,
        "code_pages_bytes": code,
        "memory_source": memory_source,
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_after,
    }


def _rotated(names: list[str], index: int) -> list[str]:
    """``names`` rotated by ``index``: round after round, no one always runs right after the same neighbour."""
    return names[index % len(names) :] + names[: index % len(names)]


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def measure_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times of several methods built in this one process and stepped in turn, round after round.

    Changes in machine load (other processes on a shared CPU) then hit every method alike: the median
    of the per-round ratios to LoRA is the robust comparison. Peak memory is not measured here (one
    process holds every model); the isolated ``train`` measurement gives it.

    Args:
        spec: as for :func:`measure_training`, with ``methods`` (a list) instead of ``method``.
    """
    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(spec.get("precision", "auto"), device)
    load_before = load_average()
    methods = list(spec["methods"])
    runs = {method: training_run(spec, method, device, dtype) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    warmup = int(spec["warmup_steps"])
    for index in range(warmup + int(spec["timed_steps"])):
        for method in _rotated(methods, index):
            elapsed = runs[method]["step"]()
            if index >= warmup:
                times[method].append(elapsed)
    paired = {}
    if "lora" in times:
        paired = {
            method: statistics.median(a / b for a, b in zip(values, times["lora"], strict=True))
            for method, values in times.items()
        }
    return {
        "task": "interleaved",
        "image_size": runs[methods[0]]["size"],
        "batch_size": int(spec["batch_size"]),
        "methods": {
            method: {
                "step_seconds": statistics.median(values),
                "step_seconds_quartiles": _quartiles(values),
                "step_seconds_all": values,
                "page_faults_per_step": _median_or_none(runs[method]["faults"][warmup:]),
            }
            for method, values in times.items()
        },
        "paired_step_ratios_to_lora": paired,
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
    }


@torch.no_grad()
def measure_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Median forward time of the base model and of LoRA / Conv-LoRA, merged and unmerged, side by side.

    Args:
        spec: ``model``, ``conv_lora`` (dict), ``image_size``, ``latency_batch_size``, ``latency_runs``,
            ``latency_warmup``, ``device``, ``precision``.
    """
    from ..models import apply_conv_lora, segmentation_logits
    from ..models.merged_io import merged_extra_parameters
    from ..tuner.config import ConvLoraConfig
    from ..tuner.moe import set_routing

    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(spec.get("precision", "auto"), device)
    load_before = load_average()
    torch.manual_seed(0)
    base = build_base(spec["model"], spec.get("image_size"))
    size = family_of(base).image_size(base)
    settings = {**spec.get("conv_lora", {}), "init_lora_weights": False}

    def adapted(plain: bool) -> nn.Module:
        return apply_conv_lora(copy.deepcopy(base), ConvLoraConfig(**settings), plain_lora=plain)

    models: dict[str, nn.Module] = {"base": base}
    models["lora_adapter"] = adapted(True)
    models["conv_lora_adapter"] = adapted(False)
    models["lora_merged"] = adapted(True).merge_and_unload()
    models["conv_lora_merged"] = adapted(False).merge_and_unload()
    # the traceable dispatch that ONNX export and torch.compile use (eager CPU runs default to the sparse one)
    models[DENSE] = copy.deepcopy(models["conv_lora_merged"])
    set_routing(models[DENSE], "dense")
    set_routing(models["conv_lora_merged"], "sparse")
    extra = {name: merged_extra_parameters(m) for name, m in models.items() if name.endswith("_merged")}
    for model in models.values():
        model.to(device).eval()
    pixels, _ = _inputs(int(spec["latency_batch_size"]), size, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    faults: dict[str, list[int | None]] = {name: [] for name in models}
    for index in range(int(spec["latency_warmup"]) + int(spec["latency_runs"])):
        for name in _rotated(list(models), index):
            model = models[name]
            _sync(device)
            before = _page_faults()
            start = time.perf_counter()
            with _autocast(device, dtype):
                segmentation_logits(model, pixels)
            _sync(device)
            if index >= int(spec["latency_warmup"]):
                times[name].append(time.perf_counter() - start)
                faults[name].append(_faults_between(before))
    return {
        "task": "latency",
        "image_size": size,
        "batch_size": int(spec["latency_batch_size"]),
        "seconds": {name: statistics.median(values) for name, values in times.items() if name != DENSE},
        "seconds_all": {name: values for name, values in times.items() if name != DENSE},
        # Conv-LoRA merged again, with the dense routing that exports and compiles
        "dense_routing_seconds": {"conv_lora_merged": statistics.median(times[DENSE])},
        "dense_routing_seconds_all": {"conv_lora_merged": times[DENSE]},
        # the median over runs of each model's time over LoRA merged's in the same run: robust to load that
        # changes from run to run, which a ratio of medians is not when there are few runs
        "paired_ratios_to_lora_merged": {
            name: statistics.median(a / b for a, b in zip(values, times["lora_merged"], strict=True))
            for name, values in times.items()
        },
        "page_faults_per_run": {name: _median_or_none(values) for name, values in faults.items()},
        "merged_extra_parameters": extra,
        "base_parameters": count_parameters(base),
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
    }


def _inference_model(spec: dict[str, Any], device: torch.device) -> tuple[nn.Module, int]:
    """The model a prediction of ``spec["method"]`` runs: the base, or LoRA / Conv-LoRA merged into it."""
    from ..models import apply_conv_lora
    from ..tuner.config import ConvLoraConfig

    torch.manual_seed(0)
    model = build_base(spec["model"], spec.get("image_size"))
    size = family_of(model).image_size(model)
    method = spec["method"]
    if method in ("lora", "conv_lora"):
        settings = ConvLoraConfig(**{**spec.get("conv_lora", {}), "init_lora_weights": False})
        model = apply_conv_lora(model, settings, plain_lora=method == "lora").merge_and_unload()
    elif method != "base":
        raise ValueError(f"inference measurements take method base, lora or conv_lora, got {method!r}")
    return model.to(device).eval(), size


def _prediction_start(spec: dict[str, Any]) -> dict[str, Any]:
    """Device, precision, memory baselines and the model of a prediction measurement, in that order."""
    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(spec.get("precision", "auto"), device)
    baseline, baseline_code = _memory_baselines(device)
    load_before = load_average()
    model, size = _inference_model(spec, device)
    return {"device": device, "dtype": dtype, "baseline": baseline, "baseline_code": baseline_code,
            "load_before": load_before, "model": model, "size": size}  # fmt: skip


def _prediction_record(start: dict[str, Any], spec: dict[str, Any], **values: Any) -> dict[str, Any]:
    """The result of a prediction measurement: ``values`` plus peak memory, machine settings and load."""
    device = start["device"]
    peak, source, _ = _peak_since(start["baseline"], start["baseline_code"], device)
    return {
        "task": values.pop("task"),
        "method": spec["method"],
        "image_size": start["size"],
        **values,
        "peak_memory_bytes": peak,
        "memory_source": source,
        "device": device.type,
        "dtype": str(start["dtype"]).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_before": start["load_before"],
        "load_after": load_average(),
    }


def _timed(run: Any, device: torch.device, warmup: int, runs: int) -> list[float]:
    times = []
    for index in range(warmup + runs):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure_inference(spec: dict[str, Any]) -> dict[str, Any]:
    """Prompt-free prediction: forward time per image and peak memory of one merged model (eval, no_grad).

    Args:
        spec: ``model``, ``method`` (``base``, ``lora`` or ``conv_lora``, merged), ``conv_lora``, ``image_size``,
            ``batch_size``, ``latency_runs``, ``latency_warmup``, ``device``, ``precision``.
    """
    from ..models import segmentation_logits

    start = _prediction_start(spec)
    device, dtype, model, size = start["device"], start["dtype"], start["model"], start["size"]
    batch = int(spec["batch_size"])
    pixels, _ = _inputs(batch, size, device)

    def forward() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            segmentation_logits(model, pixels)

    times = _timed(forward, device, int(spec["latency_warmup"]), int(spec["latency_runs"]))
    return _prediction_record(start, spec, task="inference", batch_size=batch,
                              seconds_per_image=statistics.median(times) / batch, seconds_all=times)  # fmt: skip


def measure_prompted(spec: dict[str, Any]) -> dict[str, Any]:
    """Prompted prediction of one image: the encoder once, then ``prompts`` boxes decoded 64 at a time.

    What ``Segmenter.predict(image, prompts=...)`` and ``convlora predict --prompts`` do; the time splits
    into the encoder's (once per image, whatever the number of prompts) and the prompt decoder's.

    Args:
        spec: ``model``, ``method`` (``base``, ``lora`` or ``conv_lora``, merged), ``conv_lora``, ``image_size``,
            ``prompts``, ``latency_runs``, ``latency_warmup``, ``device``, ``precision``.
    """
    from ..prompting import decode_prompts, encode_images

    start = _prediction_start(spec)
    device, dtype, model, size = start["device"], start["dtype"], start["model"], start["size"]
    pixels, _ = _inputs(1, size, device)
    count = int(spec["prompts"])
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(count, 2, generator=generator) * size * 0.7
    side = (torch.rand(count, 2, generator=generator) * 0.25 + 0.05) * size
    boxes = torch.cat([corner, corner + side], dim=1).to(device)
    chunk = 64
    encoded: dict[str, Any] = {}

    def encode() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            encoded["embeddings"] = encode_images(model, pixels)

    def decode() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            for start in range(0, count, chunk):
                part = boxes[start : start + chunk]
                index = torch.zeros(len(part), dtype=torch.long, device=device)
                decode_prompts(model, encoded["embeddings"], index, boxes=part)

    warmup, runs = int(spec["latency_warmup"]), int(spec["latency_runs"])
    encode_times = _timed(encode, device, warmup, runs)
    decode_times = _timed(decode, device, warmup, runs)
    encoder, decoder = statistics.median(encode_times), statistics.median(decode_times)
    return _prediction_record(start, spec, task="prompted", prompts=count, encoder_seconds=encoder,
                              decoder_seconds=decoder, seconds_per_image=encoder + decoder,
                              decoder_seconds_per_prompt=decoder / count)  # fmt: skip


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement ``spec["task"]`` (train, interleaved, latency, inference or prompted) in this process."""
    set_threads(int(spec.get("threads", 1)))
    if spec.get("task") == "train":
        return measure_training(spec)
    if spec.get("task") == "interleaved":
        return measure_interleaved(spec)
    if spec.get("task") == "latency":
        return measure_latency(spec)
    if spec.get("task") == "inference":
        return measure_inference(spec)
    if spec.get("task") == "prompted":
        return measure_prompted(spec)
    raise ValueError(
        "measurement task must be 'train', 'interleaved', 'latency', 'inference' or 'prompted', "
        f"got {spec.get('task')!r}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m convlora.bench.measure SPEC.json OUT.json``: measure and write the result."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m convlora.bench.measure SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    write_json(argv[1], measure(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
