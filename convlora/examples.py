"""The skeleton every ``examples/<domain>.py`` script shares: data, zero-shot baseline, fine-tuning, comparison.

With no arguments an example generates (or reuses) the synthetic data of its domain, measures the
embedded base zero-shot (prompt-free), fine-tunes it with Conv-LoRA and prints both, in a few minutes on a
2-core CPU. ``--data-dir`` switches to the real dataset's folder layout and the paper's settings for it,
``--model`` to a real SAM checkpoint.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import write_json
from .artifact import TaskInfo, apply_task_settings
from .artifact.methods import METHODS, build_task_model
from .data import build_datasets
from .evaluation.evaluate import evaluate_split
from .evaluation.prompted import evaluate_prompted
from .models import family_of, load_sam
from .recipes import recipe
from .synthetic import write_dataset
from .training.config import load_config_given
from .training.engine import train


def build_parser(domain: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line of the ``domain`` example."""
    spec = recipe(domain)
    parser = argparse.ArgumentParser(
        prog=f"examples/{domain}.py",
        description=description or f"Fine-tune SAM with Conv-LoRA on {spec.dataset} (or its synthetic stand-in).",
    )
    parser.add_argument("--data-dir", default=None, help=f"the real dataset ({spec.dataset}) in convlora's layout")
    parser.add_argument(
        "--model", default=None, help="SAM checkpoint (default: convlora-tiny, or SAM ViT-B with --data-dir)"
    )
    parser.add_argument("--method", default="conv_lora", choices=sorted(METHODS))
    parser.add_argument("--output-dir", default=None, help=f"run folder (default: runs/{domain})")
    parser.add_argument("--synthetic-dir", default=None, help=f"where generated data goes (default: data/{domain})")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the run")
    parser.add_argument("--quick", action="store_true", help="a tiny budget (tests, smoke runs): 8 images, 1 epoch")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint"
    )
    return parser


def run_example(domain: str, argv: Sequence[str] | None = None, description: str | None = None) -> dict[str, Any]:
    """Run the ``domain`` example (see the module docstring); returns zero-shot and fine-tuned metrics.

    Args:
        domain: a key of ``convlora.recipes.RECIPES``.
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
        description: the script's own description for ``--help``.

    >>> results = run_example("polyp", ["--quick"])  # doctest: +SKIP
    """
    args = build_parser(domain, description).parse_args(argv)
    spec = recipe(domain)
    real = args.data_dir is not None
    fields = spec.train_fields(real=real)
    if real:
        data = Path(args.data_dir)
        if not data.exists():
            raise SystemExit(f"--data-dir {data} does not exist")
    else:
        data = Path(args.synthetic_dir or f"data/{domain}")
        sizes = {"train": 8, "val": 4, "test": 4} if args.quick else spec.synthetic_sizes
        write_dataset(domain, data, seed=args.seed, **sizes)
    output = Path(args.output_dir or f"runs/{domain}")
    fields.update(data=str(data), output_dir=str(output), seed=args.seed, method=args.method)
    if args.model:
        fields["model"] = args.model
    if args.epochs is not None:
        fields["epochs"] = args.epochs
    if args.lr is not None:
        fields["lr"] = args.lr
    if args.quick:
        fields.update(epochs=1, batch_size=4, overlay_samples=2)
    if args.resume:
        fields["resume"] = "latest"
    config, given = load_config_given(**fields)

    started = time.time()
    zero_shot = zero_shot_metrics(config)
    result = train(config, given=given)
    comparison = {
        "domain": domain,
        "dataset": str(data),
        "model": config.model,
        "method": config.method,
        "metric": spec.metric,
        "zero_shot": zero_shot,
        "fine_tuned": result.test_metrics,
        "best_validation": {"value": result.best_value, "epoch": result.best_epoch},
        "trainable_parameters": result.trainable_parameters,
        "wall_time_seconds": round(time.time() - started, 1),
    }
    write_json(output / "comparison.json", comparison)
    print(format_comparison(comparison))
    return comparison


def zero_shot_metrics(config: Any) -> dict[str, float]:
    """Test metrics of the base model before any fine-tuning, prompt-free or under the run's prompts.

    Args:
        config: the run's ``TrainConfig`` (data, model, image size and prompt kind are read from it).

    Prompt-free, for a binary task this is SAM's own first mask; for a multi-class task the freshly
    initialised class decoder, whose classes all start alike, so the number shows what an untrained head
    gives. With a prompt kind (``config.prompt``) it is vanilla SAM under exactly the prompts the fine-tune
    is tested with (derived from the ground truth under the same fixed seed): the "vanilla vs fine-tuned"
    comparison.
    """
    data = build_datasets(config)
    base = load_sam(config.model, image_size=config.image_size)
    size = family_of(base).image_size(base)
    data.set_image_size(size, family_of(base).input_format)
    split = data.test if data.test is not None else data.val
    prompt = config.prompting
    task = TaskInfo(
        data.mode, data.num_classes, list(data.class_names), size, config.model, "decoder",
        image_reading=data.image_reading,
    )  # fmt: skip
    apply_task_settings(base, task)  # decoded as the fine-tune is (SAM 2 / 3: the single mask token)
    if prompt.prompted:
        return evaluate_prompted(base.eval(), split, prompt)
    model = build_task_model(base, task).eval()
    return evaluate_split(model, split, data, None, batch_size=config.batch_size)


def format_comparison(comparison: dict[str, Any]) -> str:
    """Zero-shot vs fine-tuned metrics as a small Markdown table."""
    zero, tuned = comparison["zero_shot"], comparison["fine_tuned"] or {}
    names = [comparison["metric"], *[k for k in zero if k != comparison["metric"] and "/" not in k][:6]]
    lines = [
        f"\n{comparison['domain']}: {comparison['method']} on {comparison['model']} "
        f"({comparison['trainable_parameters']:,} trainable parameters, {comparison['wall_time_seconds']} s)",
        "",
        "| metric | zero-shot | fine-tuned |",
        "|---|---:|---:|",
    ]
    for name in names:
        marker = " (main)" if name == comparison["metric"] else ""
        lines.append(f"| {name}{marker} | {zero.get(name, float('nan')):.4f} | {tuned.get(name, float('nan')):.4f} |")
    return "\n".join(lines)
