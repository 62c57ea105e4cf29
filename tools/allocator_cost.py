"""Inference latency under three settings of glibc's allocator: why the benchmark's timings keep freed memory.

PyTorch on CPU takes every tensor from the C allocator. glibc serves blocks above its mmap threshold
(dynamic by default, at most 32 MiB; fixed at 64 KiB in the benchmark's memory measurements) straight
from the kernel and hands them back when freed, so the next forward pass faults them in again, page by
page, each page zeroed by the kernel. ViT-B's global attention at 1024 px allocates blocks of hundreds of
MiB, so a forward pass spends much of its time there, and that time varies with the machine's state. This
tool runs the benchmark's latency measurement (the base model, LoRA and Conv-LoRA merged and unmerged,
run in turn) in a fresh process per setting:

- ``system``: glibc's defaults, as a user's process runs;
- ``memory``: the fixed 64 KiB threshold of the benchmark's memory measurements;
- ``timing``: freed memory kept for reuse (no mmap, no trimming), as the benchmark's timings run;

and writes each setting's medians, page faults per forward pass and Conv-LoRA / LoRA merged ratio to
``benchmarks/results/allocator_latency.json``.

    python tools/allocator_cost.py                                  # ViT-B at 1024 px, 3 runs per model
    python tools/allocator_cost.py --model random:convlora-tiny --image-size 128 --threads 1 --runs 20 \
        --output benchmarks/results/allocator_latency_tiny.json
"""

from __future__ import annotations

import argparse
import sys

from convlora._io import write_json
from convlora.bench.cost import ALLOCATOR, run_isolated
from convlora.bench.environment import git_commit, machine, versions

SETTINGS = ("system", "memory", "timing")


def main(argv: list[str] | None = None) -> int:
    """Measure each allocator setting and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:vit-b", help="as in a cost config (default: random ViT-B)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model and setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/allocator_latency.json")
    args = parser.parse_args(argv)
    spec = {"task": "latency", "model": args.model, "conv_lora": {}, "device": "cpu", "precision": "auto",
            "image_size": args.image_size, "latency_batch_size": 1, "latency_runs": args.runs,
            "latency_warmup": args.warmup}  # fmt: skip
    results = {}
    for setting in SETTINGS:
        result = run_isolated(spec, args.threads, allocator=setting)
        seconds, faults = result["seconds"], result["page_faults_per_run"]
        results[setting] = {
            "environment_variables": ALLOCATOR[setting],
            "seconds": seconds,
            "seconds_all": result["seconds_all"],
            "page_faults_per_run": faults,
            "paired_ratios_to_lora_merged": result["paired_ratios_to_lora_merged"],
            "load_before": result["load_before"],
            "load_after": result["load_after"],
        }
        ratio = result["paired_ratios_to_lora_merged"]["conv_lora_merged"]
        print(
            f"{setting}: LoRA merged {seconds['lora_merged']:.3f} s ({faults['lora_merged']} page faults), "
            f"Conv-LoRA merged {seconds['conv_lora_merged']:.3f} s ({faults['conv_lora_merged']}), "
            f"per-run ratio {ratio:.3f}",
            flush=True,
        )
    command = "python tools/allocator_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {"machine": machine(), "versions": versions(), "commit": git_commit(), "threads": args.threads}
    write_json(args.output, {"command": command.strip(), "environment": env, "spec": spec, "settings": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
