"""The ``convlora`` command: one entry point, one subcommand per job, each calling the Python API."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_params(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params",
        help="parameter counts of LoRA and Conv-LoRA on real SAM ViT-B/L/H shapes (no weights needed)",
        description="Build SAM ViT-B/L/H on the meta device (nothing is allocated or downloaded), inject LoRA and "
        "Conv-LoRA with the given settings, and print their parameter counts as a Markdown table.",
    )
    parser.add_argument("--variants", nargs="+", default=["vit-b", "vit-l", "vit-h"], help="SAM variants")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank (default: ConvLoraConfig's)")
    parser.add_argument("--num-experts", type=int, default=None, help="conv experts (default: ConvLoraConfig's)")
    parser.add_argument("--expert-conv", choices=["full", "depthwise"], default=None, help="expert conv type")
    parser.set_defaults(handler=_run_params)


def _run_params(args: argparse.Namespace) -> int:
    from .config import ConvLoraConfig
    from .sam import parameter_counts

    overrides = {"r": args.r, "num_experts": args.num_experts, "expert_conv": args.expert_conv}
    config = ConvLoraConfig(**{k: v for k, v in overrides.items() if v is not None})
    print(
        f"Settings: r={config.r}, lora_alpha={config.lora_alpha}, {config.num_experts} experts "
        f"(scales {config.expert_scales}), {config.expert_conv} 3x3 convs, targets: qkv of every encoder layer; "
        "the mask decoder is trained in full.\n"
    )
    print("| SAM | model params | method | adapter params | of which conv experts + gates | "
          "mask decoder | trainable | extra params after merge |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        for plain in (True, False):
            c = parameter_counts(variant, copy.deepcopy(config), plain_lora=plain)
            method = "LoRA" if plain else "Conv-LoRA"
            print(
                f"| {variant} | {c['model']:,} | {method} | {c['adapter']:,} | {c['conv_experts']:,} | "
                f"{c['mask_decoder']:,} | {c['trainable']:,} | {c['merged_extra']:,} |"
            )
    return 0


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "params": _add_params,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``convlora`` command."""
    parser = argparse.ArgumentParser(
        prog="convlora",
        description="Conv-LoRA fine-tuning of the Segment Anything Model (SAM).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convlora`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"convlora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
