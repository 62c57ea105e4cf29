"""The GPU cost check: full fine-tuning, LoRA and Conv-LoRA (sparse and dense routing) on CUDA with bf16.

The one script to run when a GPU is lent. For each batch size it builds each variant as the trainer does
(``convlora.bench.measure.training_run``: ViT-B with random weights, binary task, AdamW on the trainable
tensors), one variant at a time so that ``torch.cuda.max_memory_allocated`` (reset before the model is
built) is that variant's alone: weights, gradients, optimiser state and activations. It times full
optimiser steps (``torch.cuda.synchronize`` around each) under bf16 autocast, then the merged models'
forward pass (``convlora.bench.measure.measure_latency``: base, LoRA and Conv-LoRA merged, Conv-LoRA with
sparse and dense routing, interleaved). Conv-LoRA's sparse routing syncs with the host once per expert
and layer; the dense one never does, which is what this measures on a GPU. Writes one JSON with the
machine, the versions, every step time and the ratios to LoRA.

On the lent machine. Its python3 holds CUDA torch, accelerate, einops, safetensors and huggingface_hub
that convlora accepts, but an older transformers (5.17 when last read) and maybe no peft, so both travel as
pure-Python wheels. Here, once, in the repo's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps -d .whl transformers==5.24.0 peft==0.21.2

then one device run, carrying ``.whl`` (ViT-B at 1024 px, batch 1 and 4; not yet run on a GPU, a few minutes expected):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 tools/gpu_cost.py --output $OUT/gpu_vitb_1024.json

and commit the JSON that comes back as ``benchmarks/results/gpu_vitb_1024.json``.

Here, on the CPU, a seconds-long rehearsal of the same code (what ``tests/test_bench.py`` runs):

    python tools/gpu_cost.py --device cpu --model random:convlora-tiny --image-size 64 --batch-sizes 1 2 \\
        --warmup 0 --steps 1 --latency-runs 1 --output /tmp/gpu_cost.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from typing import Any

import torch

from convlora._io import write_json
from convlora.bench.cost import ratios
from convlora.bench.environment import git_commit, machine, pick_device, pick_dtype, set_threads, versions
from convlora.bench.measure import measure_latency, training_run
from convlora.models import count_parameters
from convlora.tuner.moe import set_routing

# variant -> (training method, routing of its expert mixtures or None)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "full": ("full", None),
    "lora": ("lora", None),
    "conv_lora_sparse": ("conv_lora", "sparse"),
    "conv_lora_dense": ("conv_lora", "dense"),
}
RATIO_KEYS = ("step_seconds", "peak_memory_bytes")


def _free(device: torch.device) -> None:
    """Release what earlier variants left and start a fresh peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_variant(spec: dict[str, Any], variant: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Step time and peak GPU memory of one variant at ``spec["batch_size"]``, its model built afresh."""
    method, routing = VARIANTS[variant]
    _free(device)
    run = training_run(spec, method, device, dtype)
    if routing is not None:
        set_routing(run["model"], routing)
    warmup, steps = int(spec["warmup_steps"]), int(spec["timed_steps"])
    times = [run["step"]() for _ in range(warmup + steps)][warmup:]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {
        "method": method,
        "routing": routing,
        "trainable_parameters": count_parameters(run["model"], trainable_only=True),
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "peak_memory_bytes": peak,
        # the same seed, data and weights for every variant: sparse and dense routing give the same loss
        "first_loss": run["losses"][0],
    }
    del run  # the next variant's _free then releases its memory before building
    return result


def measure_batch(args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every variant's training cost and the merged models' latency at one batch size."""
    spec = {"model": args.model, "conv_lora": {}, "image_size": args.image_size, "batch_size": batch,
            "warmup_steps": args.warmup, "timed_steps": args.steps}  # fmt: skip
    training = {}
    for variant in VARIANTS:
        training[variant] = measure_variant(spec, variant, device, dtype)
        row = training[variant]
        memory = "" if row["peak_memory_bytes"] is None else f", peak {row['peak_memory_bytes'] / 2**30:.2f} GiB"
        print(f"batch {batch} {variant}: step {row['step_seconds'] * 1e3:.1f} ms{memory}", flush=True)
    latency = measure_latency(
        {
            "model": args.model,
            "conv_lora": {},
            "device": device.type,
            "precision": args.precision,
            "image_size": args.image_size,
            "latency_batch_size": batch,
            "latency_runs": args.latency_runs,
            "latency_warmup": args.warmup,
        }
    )
    merged, dense = latency["seconds"], latency["dense_routing_seconds"]["conv_lora_merged"]
    print(
        f"batch {batch} merged forward: LoRA {merged['lora_merged'] * 1e3:.1f} ms, Conv-LoRA sparse "
        f"{merged['conv_lora_merged'] * 1e3:.1f} ms, dense {dense * 1e3:.1f} ms",
        flush=True,
    )
    return {"training": training, "ratios_to_lora": ratios(training, RATIO_KEYS), "latency": latency}


def main(argv: list[str] | None = None) -> int:
    """Measure every batch size and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:vit-b", help="as in a cost config (default: random ViT-B)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (and forward passes) first")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per variant")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed forward passes per merged model")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--output", default="benchmarks/results/gpu_vitb_1024.json")
    args = parser.parse_args(argv)
    for name in ("steps", "latency_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    set_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's bf16 run gets for its fp32 remainder
    batches = {str(batch): measure_batch(args, batch, device, dtype) for batch in args.batch_sizes}
    command = "python tools/gpu_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    environment = {
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": args.threads,
    }
    settings = {"model": args.model, "image_size": args.image_size, "warmup": args.warmup, "steps": args.steps,
                "latency_runs": args.latency_runs}  # fmt: skip
    write_json(args.output, {"command": command.strip(), "environment": environment, "settings": settings,
                             "batch_sizes": batches})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
