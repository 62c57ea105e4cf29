"""ONNX Runtime vs PyTorch latency of merged models on this machine: base SAM, LoRA merged, Conv-LoRA merged.

Each model is exported prompt-free (``convlora.deploy.export_model``), then timed at batch 1 in
onnxruntime (CPU execution provider) and in PyTorch eager under ``no_grad`` (Conv-LoRA with both its
sparse and its dense routing), all runs interleaved so that the load of a shared machine hits every
variant alike. Conv-LoRA's gate gets random weights so that windows spread over the experts, as after
training. Writes ``benchmarks/results/onnx_latency.json`` (medians, quartiles, every run, the machine).

    python tools/onnx_latency.py                       # convlora-tiny 128 px and ViT-B 224 px, 1 thread
    python tools/onnx_latency.py --models tiny --runs 10 --output /tmp/onnx_latency.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from convlora._io import write_json
from convlora.artifact import TaskInfo
from convlora.bench.environment import load_average, machine, set_threads, versions
from convlora.bench.measure import build_base
from convlora.deploy import export_model, exportable
from convlora.models import apply_conv_lora, segmentation_logits
from convlora.tuner.config import ConvLoraConfig
from convlora.tuner.moe import set_routing

MODELS = {"tiny": ("random:convlora-tiny", 128), "vitb224": ("random:vit-b", 224)}


def variants(model: str, size: int) -> dict[str, torch.nn.Module]:
    """The base model and the merged LoRA / Conv-LoRA models (random adapter weights)."""
    torch.manual_seed(0)
    base = build_base(model, size).eval()
    config = {"init_lora_weights": False}
    lora = apply_conv_lora(copy.deepcopy(base), ConvLoraConfig(**config), plain_lora=True)
    conv = apply_conv_lora(copy.deepcopy(base), ConvLoraConfig(**config))
    return {"base": base, "lora_merged": exportable(lora), "conv_lora_merged": exportable(conv)}


def quartiles(values: list[float]) -> list[float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def measure(model: str, size: int, runs: int, warmup: int, threads: int) -> dict[str, Any]:
    """Median latency of every variant in onnxruntime and PyTorch, interleaved run by run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    runners: dict[str, Any] = {}
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in variants(model, size).items():
            task = TaskInfo("binary", 2, ["background", "object"], size, model, "conv_lora")
            info = export_model(module, task, Path(tmp) / name, prompted=False, check=True)
            session = onnxruntime.InferenceSession(
                str(Path(tmp) / name / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            feed = {"pixel_values": pixels.numpy()}
            runners[f"{name}/onnxruntime"] = lambda s=session, f=feed: s.run(None, f)
            if name == "conv_lora_merged":
                sparse = copy.deepcopy(module)
                set_routing(sparse, "sparse")
                runners[f"{name}/torch_sparse"] = lambda m=sparse: segmentation_logits(m, pixels)
                runners[f"{name}/torch_dense"] = lambda m=module: segmentation_logits(m, pixels)
            else:
                runners[f"{name}/torch"] = lambda m=module: segmentation_logits(m, pixels)
            runners[f"{name}/max_abs_diff"] = info["check"]["model.onnx"]
        diffs = {k.split("/")[0]: runners.pop(k) for k in list(runners) if k.endswith("/max_abs_diff")}
        load_before = load_average()
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for index in range(warmup + runs):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    if index >= warmup:
                        times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "model": model,
        "image_size": size,
        "batch_size": 1,
        "seconds": seconds,
        "quartiles": {name: quartiles(values) for name, values in times.items()},
        "seconds_all": times,
        "vs_lora_merged_same_runtime": {
            "onnxruntime": seconds["conv_lora_merged/onnxruntime"] / seconds["lora_merged/onnxruntime"],
            "torch_sparse": seconds["conv_lora_merged/torch_sparse"] / seconds["lora_merged/torch"],
            "torch_dense": seconds["conv_lora_merged/torch_dense"] / seconds["lora_merged/torch"],
        },
        "onnx_max_abs_diff": diffs,
        "load_before": load_before,
        "load_after": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen models and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb224"])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and onnxruntime")
    parser.add_argument("--output", default="benchmarks/results/onnx_latency.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    results = {}
    for key in args.models:
        model, size = MODELS[key]
        results[key] = measure(model, size, args.runs, args.warmup, args.threads)
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in results[key]["vs_lora_merged_same_runtime"].items())
        print(f"{key}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results[key]["seconds"].items()))
        print(f"  Conv-LoRA merged / LoRA merged: {ratios}")
    command = "python tools/onnx_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {"machine": machine(), "versions": versions(), "threads": args.threads, "device": "cpu"}
    write_json(args.output, {"command": command.strip(), "environment": env, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
