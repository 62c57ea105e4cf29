"""Cost of Conv-LoRA vs LoRA on SAM 2.1 and SAM 3 at their real sizes (random weights), as committed JSON.

One fresh process per (model, method) arm, so that each peak memory is that arm's alone (``VmHWM`` minus the
resident set after the imports, as ``convlora.bench.measure`` does for SAM ViT-B). Each arm builds the model
as the trainer does (``build_task_model``: binary task, unused decoder parts frozen), then times full AdamW
steps (forward, loss + MoE auxiliary loss, backward, clipping) on one random image. Cost does not depend on
the weights, so nothing is downloaded. On a 2-core CPU a step takes minutes: keep ``--steps`` small.

    python tools/family_cost.py --out benchmarks/results/cost_families.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name -> how to build the base, its input size, and whether the arm needs gradient checkpointing to fit in
# the 24 GB of the machine the committed numbers come from.
MODELS: dict[str, dict[str, Any]] = {
    "sam2.1-hiera-base-plus": {"family": "sam2", "variant": "hiera-base-plus", "image_size": 1024},
    "sam3": {"family": "sam3", "variant": "sam3", "image_size": 1008},
    # 48 x 48 tokens: exactly 2 x 2 of SAM 3's 24 x 24 windows, for when 1008 px does not fit in memory
    "sam3-672": {"family": "sam3", "variant": "sam3", "image_size": 672},
    # smoke tests of this script (seconds)
    "tiny-sam2": {"family": "sam2", "variant": "tiny", "image_size": 256},
    "tiny-sam3": {"family": "sam3", "variant": "tiny", "image_size": 224},
}
REAL_MODELS = ["sam2.1-hiera-base-plus", "sam3"]
METHODS = ("lora", "conv_lora")


def _build(spec: dict[str, Any]) -> Any:
    from convlora.models import random_sam, sam2_config, sam3_config, tiny_sam2_config, tiny_sam3_config

    if spec["variant"] == "tiny":
        return random_sam({"sam2": tiny_sam2_config, "sam3": tiny_sam3_config}[spec["family"]](), seed=0)
    if spec["family"] == "sam2":
        return random_sam(sam2_config(spec["variant"], image_size=spec["image_size"]), seed=0)
    return random_sam(sam3_config(image_size=spec["image_size"]), seed=0)


def measure_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec["steps"]`` training steps of one method on one model (run in a fresh process)."""
    import torch

    from convlora.artifact import TaskInfo
    from convlora.artifact.methods import build_task_model
    from convlora.bench.environment import load_average, set_threads
    from convlora.bench.measure import _peak_rss_bytes, _rss_bytes
    from convlora.models import count_parameters, family_of
    from convlora.models.family import enable_gradient_checkpointing
    from convlora.training.engine import TrainStep
    from convlora.training.losses import build_loss
    from convlora.tuner.config import ConvLoraConfig

    set_threads(int(spec["threads"]))
    baseline = _rss_bytes("VmRSS")
    load_before = load_average()
    torch.manual_seed(0)
    base = _build(spec)
    size = family_of(base).image_size(base)
    task = TaskInfo("binary", 2, ["background", "foreground"], size, spec["model"], spec["method"])
    model = build_task_model(base, task, ConvLoraConfig(), freeze_iou_head=True).train()
    if spec["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, build_loss(None, "binary"))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=generator)
    labels = torch.randint(0, 2, (1, size, size), generator=generator)
    times = []
    for _ in range(int(spec["steps"])):
        start = time.perf_counter()
        loss = step(pixels, labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {float(loss)} in {spec['model']} / {spec['method']}")
    hwm = _peak_rss_bytes()
    timed = times[int(spec["warmup_steps"]) :] or times
    return {
        "model": spec["model"],
        "family": spec["family"],
        "method": spec["method"],
        "image_size": size,
        "batch_size": 1,
        "gradient_checkpointing": bool(spec["gradient_checkpointing"]),
        "total_parameters": count_parameters(model),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "adapter_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "step_seconds": statistics.median(timed),
        "step_seconds_all": times,
        "warmup_steps": int(spec["warmup_steps"]),
        "peak_memory_bytes": hwm - baseline if hwm is not None and baseline is not None else None,
        "memory_source": "VmHWM - VmRSS after imports",
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
    }


def _environment(threads: int) -> dict[str, Any]:
    from convlora.bench.environment import machine, versions

    return {"machine": machine(), "versions": versions(), "threads": threads, "device": "cpu"}


def main(argv: list[str] | None = None) -> int:
    """Run every arm in a fresh process and write (and rewrite after each arm) the result JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost_families.json"))
    parser.add_argument("--models", nargs="+", default=REAL_MODELS, choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="steps per arm, the first ones warm-up")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--checkpointing", nargs="*", default=["sam3", "sam3-672"], help="models trained with gradient checkpointing"
    )
    parser.add_argument("--append", action="store_true", help="add the arms to the results already in --out")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: one arm as JSON
    args = parser.parse_args(argv)
    if args.arm is not None:
        print(json.dumps(measure_arm(json.loads(args.arm))))
        return 0

    from convlora._io import write_json

    result: dict[str, Any] = {
        # not the benchmark runner's schema: the docs render this file with their generic table
        "schema": "convlora-family-cost/1",
        "name": "cost_families",
        "kind": "family_cost",
        "description": (
            "Train-step cost of LoRA vs Conv-LoRA (defaults: r=3, 8 experts, qkv of every encoder block, mask decoder "
            "trained) on SAM 2.1 hiera-base-plus at 1024 px and SAM 3 at 1008 px, random weights, batch 1, fp32 on "
            "CPU. Few steps per arm (the first is warm-up); machine shared with other jobs (see load averages)."
        ),
        "command": "python " + " ".join(["tools/family_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": _environment(args.threads),
        "results": [],
    }
    if args.append and args.out.is_file():
        previous = json.loads(args.out.read_text())
        result["results"] = previous["results"]
        result["command"] = previous["command"] + " && " + result["command"]
    for name in args.models:
        for method in args.methods:
            spec = {
                **MODELS[name],
                "model": name,
                "method": method,
                "steps": args.steps,
                "warmup_steps": args.warmup_steps,
                "threads": args.threads,
                "gradient_checkpointing": name in args.checkpointing,
            }
            print(f"{name} / {method} ...", flush=True)
            done = subprocess.run(
                [sys.executable, __file__, "--arm", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
                if done.returncode == -9:
                    reason = ["killed by SIGKILL (on Linux usually the kernel's out-of-memory killer)"]
                arm = {"model": name, "method": method, "image_size": MODELS[name]["image_size"], "error": reason[0]}
            else:
                arm = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(arm), flush=True)
            result["results"].append(arm)
            write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
