"""``torch.compile`` of LoRA and Conv-LoRA on the embedded base: capture time, then compiled vs eager step time.

For each method (PEFT's LoRA, Conv-LoRA with its defaults: rank 3, 8 experts, top-1), each backend
(``aot_eager``: Dynamo and AOT autograd without code generation; ``inductor``: the default, which also
generates and builds C++) and each mode (a training step: forward, BCE loss plus the MoE auxiliary loss,
backward, AdamW; an evaluation forward under ``no_grad``), the tool times the first call of a freshly
compiled model (graph capture, compilation and one run: what a user waits for), counts the graphs, graph
breaks and recompiles Dynamo made, and then times the step compiled and eager in alternation (so that the
load of a shared machine hits both alike) and keeps the medians. The base is ``convlora-tiny`` (128 px,
four ViT blocks: two with 8x8 windows, two on the 16x16 global grid); the adapters start random
(``init_lora_weights=False``), so that the Conv-LoRA gate spreads the batch over its experts. Eager CPU
runs route sparsely (``routing="auto"``), compiled ones through the static-shape path. Every case runs in its
own process with an empty Inductor cache, so that no capture reuses kernels another one built.

Writes ``benchmarks/results/compile_time.json``: records labelled ``--label`` (records of other labels in the
file are kept, so that a ``before`` and an ``after`` run sit side by side), every step's seconds, the machine
and the library versions.

    python tools/compile_time.py --label after                          # both backends, both methods
    python tools/compile_time.py --backends aot_eager --steps 5 --output /tmp/compile_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlora._io import write_json
from convlora.bench.environment import load_average, machine, set_threads, versions
from convlora.models import load_sam
from convlora.models.adapters import apply_conv_lora, apply_lora
from convlora.tuner.config import ConvLoraConfig
from convlora.tuner.moe import moe_aux_loss

METHODS = {"lora": apply_lora, "conv_lora": apply_conv_lora}
BACKENDS = ("aot_eager", "inductor")
MODES = ("train", "eval")
DEFAULT_OUTPUT = Path("benchmarks/results/compile_time.json")


def build(method: str) -> nn.Module:
    """``method``'s adapters on the embedded base, random from seed 0, every trainable part trainable."""
    torch.manual_seed(0)
    return METHODS[method](load_sam("convlora-tiny"), ConvLoraConfig(init_lora_weights=False))


def train_step(
    model: nn.Module, owner: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, masks: torch.Tensor
) -> None:
    """One optimiser step of ``model`` (compiled or not); ``owner`` holds the mixtures' auxiliary losses."""
    logits = model(pixel_values=images, multimask_output=False).pred_masks[:, 0]  # (b, 1, m, m)
    loss = F.binary_cross_entropy_with_logits(logits.float(), masks) + moe_aux_loss(owner)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def eval_forward(model: nn.Module, images: torch.Tensor) -> None:
    """One prompt-free forward under ``no_grad``."""
    with torch.no_grad():
        model(pixel_values=images, multimask_output=False)


def clear_counts() -> None:
    """Zero Dynamo's counters (``torch._dynamo.reset`` keeps them)."""
    from torch._dynamo.utils import counters

    counters.clear()


def dynamo_counts() -> dict[str, int]:
    """Graphs, graph breaks and frames Dynamo compiled since the last reset."""
    from torch._dynamo.utils import counters  # the counters live in Dynamo's utilities; read-only here

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_compiled": int(counters["frames"]["ok"]),
    }


def alternate(eager: Callable[[], None], compiled: Callable[[], None], steps: int) -> dict[str, Any]:
    """Median seconds of ``steps`` calls of each, the two called in turn."""
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for name, fn in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {f"{name}_s": round(statistics.median(values), 4) for name, values in times.items()}
    return {**medians, "compiled_over_eager": round(medians["compiled_s"] / medians["eager_s"], 3), "rounds": times}


def measure(method: str, backend: str, mode: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """First call of a fresh ``torch.compile`` of ``method``'s model, then the steady state against eager."""
    torch._dynamo.reset()
    clear_counts()
    model = build(method).train(mode == "train")
    compiled = torch.compile(model, backend=backend)
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision_config.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    with torch.no_grad():  # the masks' shape: the decoder's output, four times the encoder's grid
        shape = model(pixel_values=images[:1], multimask_output=False).pred_masks[:, 0].shape[1:]
    masks = (torch.rand(batch, *shape, generator=generator) > 0.5).float()
    if mode == "train":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run(target: nn.Module) -> Callable[[], None]:
            return lambda: train_step(target, model, optimizer, images, masks)
    else:

        def run(target: nn.Module) -> Callable[[], None]:
            return lambda: eval_forward(target, images)

    start = time.perf_counter()
    run(compiled)()
    first = time.perf_counter() - start
    counts = dynamo_counts()
    for _ in range(warmup):
        run(model)()
        run(compiled)()
    steady = alternate(run(model), run(compiled), steps)
    counts_after = dynamo_counts()
    record = {"method": method, "backend": backend, "mode": mode, "first_call_s": round(first, 2), **counts}
    record["recompiles_in_steady_state"] = counts_after["frames_compiled"] - counts["frames_compiled"]
    record["load_average"] = load_average()
    print(
        f"{method:9s} {backend:9s} {mode:5s} first call {first:7.1f} s  graphs {counts['graphs']} "
        f"breaks {counts['graph_breaks']}  eager {steady['eager_s'] * 1e3:6.0f} ms  "
        f"compiled {steady['compiled_s'] * 1e3:6.0f} ms",
        flush=True,
    )
    return {**record, **steady}


def run_case(case: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One (method, backend, mode) in a fresh process with an empty Inductor cache: every capture starts cold."""
    with tempfile.TemporaryDirectory(prefix="compile_time_") as scratch:
        record = Path(scratch) / "record.json"
        command = [sys.executable, __file__, "--case", *case, "--record", str(record)]
        command += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--threads", str(args.threads)]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / "inductor")}
        subprocess.run(command, check=True, env=env)
        return json.loads(record.read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/compile_time.py", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each, eager and compiled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--label", default="latest", help="names this run's records (others' are kept)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON file (others' labels kept)")
    parser.add_argument("--case", nargs=3, metavar=("METHOD", "BACKEND", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.case:  # the child process of run_case
        method, backend, mode = args.case
        write_json(args.record, measure(method, backend, mode, args.batch, args.steps, args.warmup))
        return 0
    results = [
        {"label": args.label, **run_case([method, backend, mode], args)}
        for backend in args.backends
        for method in args.methods
        for mode in args.modes
    ]
    write_json(args.output, merged(args.output, args.label, results, "python tools/compile_time.py " + " ".join(argv)))
    print(f"wrote {args.output} ({args.label})")
    return 0


def merged(path: Path, label: str, results: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """The result file with ``label``'s records replaced by ``results`` (other labels kept, in their order)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    kept = [r for r in data.get("results", []) if r.get("label") != label]
    steps = {k: v for k, v in data.get("step_seconds", {}).items() if not k.startswith(f"{label}/")}
    for record in results:  # every step's seconds, kept apart so that the table shows the medians only
        key = f"{label}/{record['method']}/{record['backend']}/{record['mode']}"
        steps[key] = record.pop("rounds")
    commands = {**data.get("commands", {}), label: command}
    notes = data.get("notes", {})  # how a label's run differs from this tool's, written by hand
    return {
        "name": "compile_time",
        "description": (
            "torch.compile of LoRA and Conv-LoRA on the embedded base (convlora-tiny, 128 px, batch 8): seconds "
            "of the first call of a fresh compile (capture, compilation, one step), Dynamo's graphs and breaks, "
            "then median seconds per step, eager and compiled in alternation. A train step is forward, loss, "
            "backward and AdamW; eval is a forward under no_grad."
        ),
        "command": command,
        "commands": commands,
        "notes": notes,
        "environment": {"machine": machine(), "versions": versions(), "threads": torch.get_num_threads()},
        "results": kept + results,
        "step_seconds": steps,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
