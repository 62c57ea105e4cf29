"""One adapted ViT-B ``qkv`` layer, Conv-LoRA vs LoRA: forward + backward time with each expert forced.

A trained gate sends windows to every expert, and the experts differ in cost (scale 1 is a plain 3x3
conv, scale 8 resizes the grid eightfold), so the layer is timed once per expert with every sample routed
to it, next to PEFT's LoRA layer on the same frozen linear layer (same rank and alpha), the two stepped in
turn so that the load of a shared machine hits both alike. Shapes are those of SAM ViT-B at 1024 px:
the windowed layers see 25 windows of 14 x 14 tokens, the global ones one 64 x 64 grid, 768 wide.
Writes ``benchmarks/results/layer_cost.json`` (median ratio per expert and shape, every round, the machine).
With ``--merged``, the layers after ``merge_and_unload`` instead (LoRA folded into a plain ``nn.Linear``,
Conv-LoRA's folded linear part plus its frozen side branch), forward only under ``no_grad``, as deployed:
``benchmarks/results/layer_cost_merged.json``.

    python tools/layer_cost.py                           # 2 threads, 15 rounds per expert
    python tools/layer_cost.py --merged --rounds 30      # merged layers, inference
    python tools/layer_cost.py --rounds 5 --output /tmp/layer_cost.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from convlora._io import write_json
from convlora.bench.environment import git_commit, load_average, machine, set_threads, versions
from convlora.tuner.config import ConvLoraConfig
from convlora.tuner.layer import ConvLoraLinear
from convlora.tuner.moe import ConvExpertMixture

SHAPES = {"windowed (25 windows of 14x14)": (25, 14, 14, 768), "global (64x64)": (1, 64, 64, 768)}


def layers(width: int, rank: int, alpha: int) -> tuple[nn.Module, ConvLoraLinear]:
    """PEFT's LoRA and convlora's Conv-LoRA layer around copies of one frozen ``Linear(width, 3 width)``."""
    torch.manual_seed(0)
    base = nn.Linear(width, 3 * width).requires_grad_(False)
    holder = nn.Module()
    holder.qkv = nn.Linear(width, 3 * width)
    holder.qkv.load_state_dict(base.state_dict())
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv"], init_lora_weights=False)
    lora = get_peft_model(holder, config).base_model.model.qkv  # PEFT's own LoRA layer, base frozen
    conv = ConvLoraLinear(
        nn.Linear(width, 3 * width), "default", ConvLoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False)
    )
    conv.base_layer.load_state_dict(base.state_dict())
    conv.base_layer.requires_grad_(False)
    return lora, conv


def merged_layers(lora: nn.Module, conv: ConvLoraLinear) -> tuple[nn.Module, nn.Module]:
    """Both layers as ``merge_and_unload`` leaves them: a plain ``nn.Linear``, a ``ConvLoraMergedLinear``."""
    lora_merged = copy.deepcopy(lora)
    lora_merged.merge()
    plain = nn.Linear(lora_merged.in_features, lora_merged.out_features)
    plain.load_state_dict(lora_merged.get_base_layer().state_dict())
    merged = copy.deepcopy(conv).unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    return plain.eval(), merged.eval()


def mixture_of(layer: nn.Module) -> ConvExpertMixture:
    """The expert mixture of a Conv-LoRA layer, adapter or merged."""
    return next(m for m in layer.modules() if isinstance(m, ConvExpertMixture))


def force_expert(layer: nn.Module, expert: int) -> None:
    """Route every sample of ``layer``'s mixture to ``expert`` (the gate's other work is kept)."""
    mixture = mixture_of(layer)
    route = type(mixture).route

    def forced(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top, combine, aux = route(mixture, z)
        return torch.full_like(top, expert), combine, aux

    mixture.route = forced


def step_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one forward + backward through ``layer`` (gradients to its trainable tensors and ``x``)."""
    start = time.perf_counter()
    layer(x).square().mean().backward()
    return time.perf_counter() - start


def forward_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one forward through ``layer`` under ``no_grad``."""
    with torch.no_grad():
        start = time.perf_counter()
        layer(x)
        return time.perf_counter() - start


def measure(rounds: int, warmup: int, rank: int, alpha: int, merged: bool = False) -> dict[str, Any]:
    """Per shape and forced expert: the median Conv-LoRA / LoRA time ratio over interleaved rounds."""
    results: dict[str, Any] = {}
    timed = forward_seconds if merged else step_seconds
    for name, shape in SHAPES.items():
        lora, conv = layers(shape[-1], rank, alpha)
        if merged:
            lora, conv = merged_layers(lora, conv)
        x = torch.randn(shape, requires_grad=not merged)
        per_expert = {}
        for expert in range(mixture_of(conv).num_experts):
            force_expert(conv, expert)
            times: dict[str, list[float]] = {"lora": [], "conv_lora": []}
            for index in range(warmup + rounds):
                order = [("lora", lora), ("conv_lora", conv)][:: 1 if index % 2 else -1]
                for key, layer in order:
                    elapsed = timed(layer, x)
                    if index >= warmup:
                        times[key].append(elapsed)
            ratios = [c / lo for c, lo in zip(times["conv_lora"], times["lora"], strict=True)]
            scale = mixture_of(conv).scales[expert]
            per_expert[f"expert {expert} (scale {scale:g})"] = {
                "ratio_median": statistics.median(ratios),
                "lora_seconds_median": statistics.median(times["lora"]),
                "conv_lora_seconds_median": statistics.median(times["conv_lora"]),
                "ratios": ratios,
            }
            print(f"{name} expert {expert}: Conv-LoRA / LoRA {statistics.median(ratios):.3f}", flush=True)
        results[name] = per_expert
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/layer_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per expert and shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--merged", action="store_true", help="merged layers, forward under no_grad")
    parser.add_argument("--output", help="where the JSON goes (default: benchmarks/results/layer_cost[_merged].json)")
    args = parser.parse_args(argv)
    output = args.output or f"benchmarks/results/layer_cost{'_merged' if args.merged else ''}.json"
    set_threads(args.threads)
    before = load_average()
    started = time.time()
    results = measure(args.rounds, args.warmup, rank=3, alpha=32, merged=args.merged)
    what = "forward under no_grad of one merged" if args.merged else "forward + backward of one"
    record = {
        "command": "python tools/layer_cost.py " + " ".join(argv),
        "what": f"{what} qkv layer (768 -> 2304), r=3, alpha=32, every sample forced to one expert",
        "results": results,
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "threads": args.threads,
        "wall_seconds": round(time.time() - started, 1),
        "load_before": before,
        "load_after": load_average(),
    }
    write_json(Path(output), record)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
