"""The ``convlora`` command: one entry point, one subcommand per job, each calling the Python API."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _add_params(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params",
        help="parameter counts of LoRA, Conv-LoRA or any training method on real SAM / SAM 2 / SAM 3 shapes "
        "(no weights needed)",
        description="Build the released variants of a model family (SAM ViT-B/L/H, SAM 2.1 Hiera, SAM 3) on the "
        "meta device (nothing is allocated or downloaded), prepare them for each method (LoRA and Conv-LoRA by "
        "default) with the given settings, and print their parameter counts as a Markdown table.",
    )
    parser.add_argument(
        "--family", default="sam", help="a model family with released variants: sam, sam2 or sam3 (default: sam)"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="variants (default: all of the family)")
    parser.add_argument("--preset", default=None, help="target preset of the family (default: qkv)")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank (default: ConvLoraConfig's)")
    parser.add_argument("--num-experts", type=int, default=None, help="conv experts (default: ConvLoraConfig's)")
    parser.add_argument("--expert-conv", choices=["full", "depthwise"], default=None, help="expert conv type")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="training methods to count, e.g. lora dora loha lokr ia3 boft vera ln_tuning bitfit (default: lora "
        "conv_lora); each with its defaults and the settings above",
    )
    parser.set_defaults(handler=_run_params)


def _run_params(args: argparse.Namespace) -> int:
    from .artifact.methods import get_method
    from .models import parameter_counts
    from .models.params import family_variants
    from .tuner.config import ConvLoraConfig

    overrides = {
        "r": args.r,
        "num_experts": args.num_experts,
        "expert_conv": args.expert_conv,
        "target_preset": args.preset,
        "family": args.family if args.preset else None,
    }
    config = ConvLoraConfig(**{k: v for k, v in overrides.items() if v is not None})
    known = family_variants()
    if args.family not in known:
        raise ValueError(
            f"--family must be one of {sorted(known)} (families with released variants), got {args.family!r}"
        )
    variants = args.variants or list(known[args.family])
    methods = [get_method(name) for name in (args.methods or ["lora", "conv_lora"])]
    print(
        f"Settings: r={config.r}, lora_alpha={config.lora_alpha}, {config.num_experts} experts "
        f"(scales {config.expert_scales}), {config.expert_conv} 3x3 convs, targets: "
        f"{config.target_preset or 'qkv'} of every encoder layer; the mask decoder is trained in full.\n"
    )
    print("| SAM | model params | method | adapter params | of which conv experts + gates | "
          "mask decoder | trainable | extra params after merge |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for variant in variants:
        for method in methods:
            c = parameter_counts(variant, copy.deepcopy(config), family=args.family, method=method)
            merged = "does not merge" if c["merged_extra"] is None else f"{c['merged_extra']:,}"
            print(
                f"| {variant} | {c['model']:,} | {method.label or method.name} | {c['adapter']:,} | "
                f"{c['conv_experts']:,} | {c['mask_decoder']:,} | {c['trainable']:,} | {merged} |"
            )
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from .training.config import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="fine-tune SAM on a dataset (Conv-LoRA, LoRA, decoder-only or full)",
        description="Fine-tune SAM with Accelerate. Settings come from an optional JSON/TOML config file (the keys "
        "below), then from --key value options, which win. Values are read as JSON where they parse (numbers, "
        "true/false, null, lists); nested settings take a dot: --conv_lora.r 4, --augment.hflip 0. Unset values "
        "are resolved at the start and printed. Run several processes with `accelerate launch -m convlora train`.",
        usage="%(prog)s [-h] [--config FILE] [--no-progress] [--KEY VALUE ...] [--NESTED.KEY VALUE ...]",
        allow_abbrev=False,  # --epoch must not silently mean --epochs
    )
    run = parser.add_argument_group("command")
    run.add_argument("--config", default=None, help="JSON or TOML config file holding any of the keys below")
    run.add_argument(
        "--no-progress", action="store_true", help="no progress output (bars on a terminal, plain lines otherwise)"
    )
    add_config_options(parser, TrainConfig)
    parser.set_defaults(handler=_run_train)


_OPTION_PREFIX = "config_field:"
_METAVARS = {str: "TEXT", int: "INT", float: "NUMBER", bool: "BOOL", dict: "JSON", list: "JSON", tuple: "JSON"}


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--FIELD VALUE`` option per field of a config dataclass, in argument groups by ``group`` metadata.

    Type, default and help come from the dataclass (see :func:`convlora.training.config.option`); the values
    are kept as typed text and parsed and validated by ``load_config``, so the options only describe them.

    Args:
        parser: the subcommand's parser.
        cls: the config dataclass (``TrainConfig``).

    >>> from convlora.training.config import TrainConfig
    >>> parser = argparse.ArgumentParser(allow_abbrev=False)
    >>> add_config_options(parser, TrainConfig)
    >>> config_overrides(parser.parse_args(["--lr", "3e-4"]))
    ['--lr', '3e-4']
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    order = getattr(sys.modules[cls.__module__], "GROUPS", ())
    for name in order:
        groups[name] = parser.add_argument_group(f"{name} settings")
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "other")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        action = groups[group_name].add_argument(
            f"--{f.name}",
            dest=_OPTION_PREFIX + f.name,
            default=argparse.SUPPRESS,
            metavar=_metavar(hints[f.name], f.metadata.get("choices")),
            help=f"{f.metadata.get('help', '')} ({_default_text(f)})".replace("%", "%%"),
        )
        # for the generated CLI reference, which has a column for each
        action.field_help, action.field_default = f.metadata.get("help", ""), _default_text(f)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--FIELD VALUE`` options given on the command line, as ``load_config`` overrides."""
    found = []
    for dest, value in vars(args).items():
        if dest.startswith(_OPTION_PREFIX):
            found += [f"--{dest.removeprefix(_OPTION_PREFIX)}", value]
    return found


def _metavar(annotation: object, choices: Any) -> str:
    import dataclasses
    import types
    import typing

    if choices:
        return "{" + ",".join(choices) + "}"
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    kinds = [dict if dataclasses.is_dataclass(a) else typing.get_origin(a) or a for a in options]  # nested: JSON
    names = [_METAVARS.get(kind, "VALUE") for kind in kinds]  # type: ignore[call-overload]
    return "|".join(dict.fromkeys(names))


def _default_text(f: object) -> str:
    import dataclasses

    assert isinstance(f, dataclasses.Field)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value == "" and f.name == "data":
        return "required"
    if value is None:
        return "default: unset"
    if isinstance(value, bool):
        return f"default: {str(value).lower()}"
    if dataclasses.is_dataclass(value):  # nested settings
        return f"default: {type(value).__name__}()"
    return f"default: {json.dumps(value) if isinstance(value, (dict, list)) else value}"


def _run_train(args: argparse.Namespace) -> int:
    from .training.config import load_config_given
    from .training.engine import train

    config, given = load_config_given(args.config, config_overrides(args) + args.overrides)
    try:
        train(config, show_progress=not args.no_progress, given=given)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group cleanly, or processes started by `accelerate launch` hang at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tile", type=int, default=None, metavar="SIZE",
        help="segment images in SIZE x SIZE windows of the original pixels (for images far larger than the "
        "model input); default: the whole image at once",
    )  # fmt: skip
    parser.add_argument("--overlap", type=int, default=0, metavar="PX", help="pixels shared by neighbouring windows")


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics of a trained model on a labelled dataset",
        description="Evaluate a trained model folder (RUN/adapter, or a merged model) on a labelled dataset "
        "folder or CSV, at every image's original resolution. Uses the test/ split when the data has one. "
        "With --prompt, every ground-truth object is prompted (prompts drawn under a fixed seed) and scored "
        "per object; --compare-base scores the base SAM under the same prompts.",
    )
    parser.add_argument("--model", required=True, help="trained model folder (e.g. runs/polyp/adapter)")
    parser.add_argument("--data", required=True, help="labelled dataset folder or CSV")
    parser.add_argument("--base-model", default=None, help="SAM checkpoint to use instead of the recorded one")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    _add_tile_arguments(parser)
    parser.add_argument(
        "--prompt", choices=["none", "box", "point", "box_point"], default="none",
        help="prompted evaluation: prompts derived from the ground truth (default: prompt-free)",
    )  # fmt: skip
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the derived prompts")
    parser.add_argument("--compare-base", action="store_true", help="also score the base SAM under the same prompts")
    _add_instance_arguments(
        parser, "score objects instead of pixels (mSA, F1@0.5, counts) against masks holding one id per object"
    )
    _add_strength_argument(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ._io import check_json_output, write_json
    from .inference import evaluate

    if args.output:
        check_json_output(args.output, option="--output")
    scores = evaluate(
        args.model,
        args.data,
        base_model=args.base_model,
        batch_size=args.batch_size,
        tile=args.tile,
        overlap=args.overlap,
        prompt=None if args.prompt == "none" else args.prompt,
        prompt_settings={"seed": args.prompt_seed},
        compare_base=args.compare_base,
        instances=args.instances,
        amg=_amg_config(args),
        strength=args.strength,
    )
    tables = scores if args.compare_base else {"": scores}
    for title, table in tables.items():
        prefix = f"{title}." if title else ""
        for name, value in table.items():
            print(f"{prefix}{name}: {value:.4f}")
    if args.output:
        write_json(args.output, scores)
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a folder of images (no ground truth needed), prompt-free or with box/point prompts",
        description="Write one mask PNG per image at the image's original size (binary: 0/255, multi-class: "
        "class ids) to OUTPUT/masks/, coloured overlays to OUTPUT/overlays/, and OUTPUT/predictions.json. "
        "With --prompts, one mask per prompt (OUTPUT/masks/<image>_<i>.png) and overlays with the prompts drawn; "
        "--model may then also be a SAM checkpoint or an embedded name (vanilla SAM).",
    )
    parser.add_argument("--model", required=True, help="trained model folder (e.g. runs/polyp/adapter)")
    parser.add_argument("--images", required=True, help="folder of images, or a CSV with an image column")
    parser.add_argument(
        "--output", required=True,
        help="output folder: new, empty, or an earlier prediction folder (continued with the same model and "
        "settings, replaced otherwise); never one holding anything else",
    )  # fmt: skip
    parser.add_argument("--base-model", default=None, help="SAM checkpoint to use instead of the recorded one")
    parser.add_argument("--no-overlays", action="store_true", help="write masks only")
    parser.add_argument("--batch-size", type=int, default=8, help="prompt-free images per forward pass (default: 8)")
    parser.add_argument(
        "--skip-bad", action="store_true",
        help="leave out images that cannot be read, list them at the end and exit with status 1 (default: stop "
        "at the first)",
    )  # fmt: skip
    parser.add_argument(
        "--prompts", default=None,
        help="JSON file mapping image file names to {boxes, points, point_labels}, or a COCO file with bbox entries",
    )  # fmt: skip
    _add_tile_arguments(parser)
    _add_instance_arguments(
        parser,
        "one mask per object: OUTPUT/instances/<image>.png (16-bit ids) and .json (COCO-style, RLE masks, scores)",
    )
    _add_strength_argument(parser)
    parser.set_defaults(handler=_run_predict)


def _add_strength_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strength", type=float, default=None, metavar="A",
        help="a LoRA / Conv-LoRA fine-tune at strength A in [0, 1]: the adapter's branch scaled by A and the mask "
        "decoder interpolated toward SAM's (0: SAM's own model, 1: as trained; default: as trained)",
    )  # fmt: skip


def _add_instance_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--instances`` and the automatic mask generation settings (predict and evaluate take the same)."""
    parser.add_argument(
        "--instances", choices=["auto", "amg", "ais", "apg"], default=None,
        help=f"{what}; amg = automatic mask generation from a grid of point prompts (any model); ais = the trained "
        "instance decoder and its watershed, apg = its objects refined by SAM's prompted decoder (models trained "
        "with --mode instances); auto = ais where the model has an instance decoder, else amg. Takes --tile",
    )  # fmt: skip
    amg = parser.add_argument_group("automatic mask generation (--instances amg), under SAM's names")
    for name, (kind, default, text) in AMG_OPTIONS.items():
        amg.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: {default})")


# AmgConfig's fields as options (kept here, not read from the dataclass, so that --help imports no torch)
AMG_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "points_per_side": (int, 32, "points per side of the prompt grid"),
    "points_per_batch": (int, 64, "points decoded together"),
    "pred_iou_thresh": (float, 0.88, "keep masks whose predicted IoU is at least this"),
    "stability_score_thresh": (float, 0.95, "keep masks whose stability score is at least this"),
    "box_nms_thresh": (float, 0.7, "box IoU above which the lower-scored of two masks is dropped"),
    "crop_n_layers": (int, 0, "layers of overlapping crops for small objects in large images"),
    "min_mask_region_area": (int, 0, "remove islands and fill holes smaller than this (pixels)"),
}


def _run_predict(args: argparse.Namespace) -> int:
    from .inference import predict_folder

    done = predict_folder(
        args.model,
        args.images,
        args.output,
        base_model=args.base_model,
        overlays=not args.no_overlays,
        prompts=args.prompts,
        tile=args.tile,
        overlap=args.overlap,
        skip_bad=args.skip_bad,
        instances=args.instances,
        amg=_amg_config(args),
        batch_size=args.batch_size,
        strength=args.strength,
    )
    what = f"the prompted masks of {done['count']} images" if args.prompts else f"{done['count']} masks"
    if args.instances:
        what = f"the objects of {done['count']} images"
    again = f" ({done['reused']} done by an earlier run)" if done["reused"] else ""
    print(f"Wrote {what} to {done['output_dir']}{again}")
    if done["bad"]:
        print(f"convlora predict: {len(done['bad'])} images were left out:", file=sys.stderr)
        for entry in done["bad"]:
            print(f"  {entry['image']}: {entry['error']}", file=sys.stderr)
        return 1
    return 0


def _amg_config(args: argparse.Namespace) -> Any:
    given = {name: getattr(args, name) for name in AMG_OPTIONS if getattr(args, name) is not None}
    if given and args.instances is None:
        raise ValueError(f"--{next(iter(given))} sets automatic mask generation; add --instances amg")
    from .instances import AmgConfig

    return AmgConfig(**given)


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold a trained adapter into its base model (one self-contained checkpoint)",
        description="Merge a LoRA or Conv-LoRA adapter into the base SAM. LoRA folds in exactly; Conv-LoRA's "
        "conv experts are non-linear and stay as a small frozen side branch, whose size is printed.",
    )
    parser.add_argument("--model", required=True, help="trained adapter folder (e.g. runs/polyp/adapter)")
    parser.add_argument(
        "--output", required=True,
        help="output folder: new, empty, or a model folder convlora wrote (replaced atomically); never the run or "
        "the adapter itself",
    )  # fmt: skip
    parser.add_argument("--base-model", default=None, help="SAM checkpoint to use instead of the recorded one")
    parser.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .inference import merge_model

    done = merge_model(args.model, args.output, base_model=args.base_model)
    print(
        f"Merged {done['method']} adapter into {done['output_dir']}; "
        f"extra parameters kept beside the base architecture: {done['extra_parameters']:,}"
    )
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX (prompt-free model, SAM-style image encoder + prompt decoder)",
        description="Merge a trained model (adapter or merged folder) and export it for ONNX Runtime: "
        "OUTPUT/model.onnx (pixel_values -> mask logits), OUTPUT/image_encoder.onnx and "
        "OUTPUT/prompt_decoder.onnx (points and boxes -> masks + IoU scores, binary tasks) and OUTPUT/deploy.json "
        "(input size, normalisation, classes, post-processing). Each file is checked against PyTorch in "
        "onnxruntime unless --no-check.",
    )
    parser.add_argument("--model", required=True, help="trained model folder (e.g. runs/polyp/adapter)")
    parser.add_argument(
        "--format", choices=["onnx", "adapter"], default="onnx",
        help="onnx, or adapter: a regular adapter folder with --strength folded into its weights",
    )  # fmt: skip
    parser.add_argument(
        "--output", required=True, help="output folder: new, empty, or an ONNX export convlora wrote (replaced whole)"
    )
    parser.add_argument("--base-model", default=None, help="SAM checkpoint to use instead of the recorded one")
    parser.add_argument("--no-prompted", action="store_true", help="write the prompt-free model.onnx only")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or later)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    _add_strength_argument(parser)
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.format == "adapter":
        from .inference import export_at_strength

        if args.strength is None:
            raise ValueError("--format adapter writes the adapter at a strength: give --strength A (0..1)")
        done = export_at_strength(args.model, args.output, args.strength, base_model=args.base_model)
        print(f"Wrote the {done['method']} adapter at strength {args.strength} to {args.output}")
        return 0
    if args.strength is not None:
        raise ValueError("--strength with --format onnx: export the adapter at a strength first (--format adapter)")
    from .deploy import export_onnx

    info = export_onnx(
        args.model,
        args.output,
        base_model=args.base_model,
        prompted=not args.no_prompted,
        opset=args.opset,
        check=not args.no_check,
    )
    print(f"Wrote {', '.join(info['files'].values())} and deploy.json to {args.output}")
    for name, diff in (info.get("check") or {}).items():
        print(f"  {name}: max |onnxruntime - PyTorch| = {diff:.2e}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="check a dataset and report what was found, before training",
        description="Scan a dataset folder or CSV: counts per split, image sizes, mask values, mode and classes, "
        "and every problem found (all at once). Exits with status 1 when there are problems.",
    )
    parser.add_argument("data", help="dataset folder or CSV")
    parser.add_argument("--mode", choices=["auto", "binary", "multiclass"], default="auto", help="task mode")
    parser.add_argument("--num-classes", type=int, default=None, help="classes including the background")
    parser.add_argument(
        "--intensity",
        choices=["percentile", "minmax", "fixed", "none"],
        default="percentile",
        help="how images of more than 8 bits are mapped to 0..255 (as train's --intensity)",
    )
    parser.add_argument("--intensity-range", default=None, help="LOW,HIGH for --intensity fixed, e.g. 0,4095")
    parser.add_argument("--channels", default=None, help="channel indices to keep, e.g. 0,2 (images of 4+ channels)")
    parser.add_argument(
        "--mask-reading",
        choices=["auto", "instances", "classes"],
        default="auto",
        help="how integer masks are read (as train's --mask_reading)",
    )
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from ._io import check_json_output, write_json
    from .data import inspect_dataset

    if args.json:
        check_json_output(args.json, option="--json")
    mode = None if args.mode == "auto" else args.mode
    reading = {
        "intensity": args.intensity,
        "intensity_range": _number_list(args.intensity_range, "--intensity-range", float),
        "channels": _number_list(args.channels, "--channels", int),
    }
    report = inspect_dataset(
        args.data, mode=mode, num_classes=args.num_classes, reading=reading, mask_reading=args.mask_reading
    )
    print(report.format())
    if args.json:
        write_json(args.json, report.to_dict())
    return 1 if report.problems else 0


def _number_list(text: str | None, option: str, kind: type) -> list | None:
    """``"0,2"`` -> ``[0, 2]``; a clear error naming the option otherwise."""
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, e.g. 0,2; got {text!r}") from None


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job on the embedded default: synthetic polyps, zero-shot vs Conv-LoRA fine-tuned",
        description="Generate the synthetic polyp data (data/polyp), measure the embedded base SAM zero-shot, "
        "fine-tune it with Conv-LoRA and print both; the run (adapter, metrics, plots) goes to runs/demo. "
        "Any other domain: --domain skin|camouflage|shadow|leaf|road|scene.",
    )
    parser.add_argument("--domain", default="polyp", help="synthetic domain (default: polyp)")
    parser.add_argument("--output-dir", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget, for a smoke run")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .examples import run_example

    argv = ["--output-dir", args.output_dir] + (["--quick"] if args.quick else [])
    if args.output_dir and (Path(args.output_dir) / "checkpoints").is_dir():
        argv.append("--resume")
    run_example(args.domain, argv)
    return 0


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    from .synthetic import DOMAINS

    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic domain dataset in convlora's folder layout",
        description="Generate a deterministic synthetic dataset (train/val/test with images/ and masks/) that "
        "imitates one of the paper's domains. Domains: " + ", ".join(sorted(DOMAINS)),
    )
    parser.add_argument("domain", choices=sorted(DOMAINS), help="which domain")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--test", type=int, default=100, help="test images")
    parser.add_argument("--size", type=int, default=128, help="typical image side (sides vary by up to 20%%)")
    parser.add_argument("--square", action="store_true", help="exactly size x size images")
    parser.add_argument("--seed", type=int, default=0, help="seed (the same seed writes the same files)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset in the folder")
    parser.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset

    path = write_dataset(
        args.domain,
        args.output,
        train=args.train,
        val=args.val,
        test=args.test,
        size=args.size,
        seed=args.seed,
        square=args.square,
        overwrite=args.overwrite,
    )
    print(f"{args.domain}: {args.train} train, {args.val} val, {args.test} test images in {path}")
    return 0


def _add_tradeoff(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tradeoff",
        help="a fine-tune's target metric against how much of SAM's promptable skill it keeps, strength by strength",
        description="Put a LoRA / Conv-LoRA adapter at each strength (0: SAM's own model, 1: as trained), score the "
        "target metric on --data (its val split when it has one) and the retention on a keep set: the model's "
        "prompted mean per-object IoU (one box, one centre point, three correction clicks per object) divided by "
        "the base's. Writes OUTPUT/tradeoff.json, OUTPUT/tradeoff.md (a table) and OUTPUT/tradeoff.png (metric "
        "against retention, points labelled with their strength).",
    )
    parser.add_argument("--model", required=True, help="trained adapter folder (e.g. runs/polyp/adapter)")
    parser.add_argument("--data", required=True, help="labelled target data, folder or CSV (e.g. data/polyp)")
    parser.add_argument(
        "--keep_data", "--keep-data", dest="keep_data", default=None, metavar="KEEP",
        help="labelled folder of objects the base should keep segmenting (binary masks: connected components; "
        "instance masks: one object per id); default: the generic keep set when the base is convlora-tiny, "
        "required otherwise",
    )  # fmt: skip
    parser.add_argument(
        "--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="A",
        help="strengths in [0, 1] (default: 0 0.25 0.5 0.75 1)",
    )  # fmt: skip
    parser.add_argument(
        "--output", required=True,
        help="output folder: new, empty, or a trade-off folder convlora wrote (replaced whole)",
    )  # fmt: skip
    parser.add_argument("--base-model", default=None, help="SAM checkpoint to use instead of the recorded one")
    parser.add_argument("--metric", default=None, help="target metric (default: the task's main metric)")
    parser.add_argument(
        "--split", default="auto", help="split of --data: auto (val, else test, else every sample) or a split name"
    )
    parser.add_argument(
        "--min-retention", type=float, default=0.95,
        help="the selection rule names the best strength whose retention reaches this (default: 0.95)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-images", type=int, default=None, metavar="N",
        help="at most N keep images (default: 32 for the generic keep set, every image of --keep_data)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass on --data")
    parser.set_defaults(handler=_run_tradeoff)


def _run_tradeoff(args: argparse.Namespace) -> int:
    from .tradeoff import tradeoff

    result = tradeoff(
        args.model,
        args.data,
        args.output,
        keep_data=args.keep_data,
        strengths=args.strengths,
        base_model=args.base_model,
        metric=args.metric,
        split=args.split,
        min_retention=args.min_retention,
        keep_images=args.keep_images,
        batch_size=args.batch_size,
    )
    print(f"Wrote tradeoff.json, tradeoff.md and tradeoff.png to {args.output}")
    print(f"Chosen: {result['choice']['reason']}")
    return 0


def _add_benchmark(subparsers: argparse._SubParsersAction) -> None:
    from .bench.runner import DESCRIPTION, add_arguments

    # main() hands every argument after `benchmark` to convlora.bench's own entry point; this parser
    # describes the same arguments for `convlora --help` and the CLI reference
    parser = subparsers.add_parser(
        "benchmark",
        help="quality and cost benchmarks of full, decoder-only, LoRA and Conv-LoRA fine-tuning (run, report)",
        description=DESCRIPTION,
    )
    add_arguments(parser)


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "demo": _add_demo,
    "synth": _add_synth,
    "train": _add_train,
    "evaluate": _add_evaluate,
    "predict": _add_predict,
    "merge": _add_merge,
    "export": _add_export,
    "tradeoff": _add_tradeoff,
    "inspect": _add_inspect,
    "params": _add_params,
    "benchmark": _add_benchmark,
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


# subcommands that take --KEY VALUE settings beyond their declared options (nested config keys)
_TAKES_OVERRIDES = ("train",)


def _check_shape(argv: list[str]) -> int | None:
    """Parse ``argv`` with the parser's snapshot: help and usage errors end here, before torch loads.

    Returns the exit status when the command line asks for nothing to run (no subcommand), else ``None``.
    """
    from ._cli_spec import quick_parser

    parser = quick_parser()
    args, extra = parser.parse_known_args(argv)  # prints help or a usage error and exits
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command not in _TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convlora`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    status = _check_shape(argv)
    if status is not None:
        return status
    if argv[:1] == ["benchmark"]:  # its own parser: `convlora benchmark run|report ...`
        from .bench import main as benchmark_main

        return benchmark_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from .training.engine import TrainingError
    from .training.progress import quiet_library_bars

    quiet_library_bars()  # no "Loading weights" bar redraws in logs, CI and nohup files
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as error:  # bad input
        print(f"convlora {args.command}: error: {error_text(error)}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as error:  # a run that cannot go on, a disk full, a permission denied
        print(f"convlora {args.command}: error: {error_text(error)}", file=sys.stderr)
        return 1


def error_text(error: BaseException) -> str:
    """An error's message, without the traceback PyTorch's DataLoader adds when a worker process raised it.

    A worker's exception reaches the main process as the same type with the message ``Caught ValueError in
    DataLoader worker process 0. Original Traceback (most recent call last): ...``; the user needs its last
    line, the message the worker raised, as without workers.

    >>> error_text(ValueError("Caught ValueError in DataLoader worker process 1.\\nOriginal Traceback (most "
    ...                       "recent call last):\\n  File ...\\nValueError: a.png is truncated"))
    'a.png is truncated'
    """
    text = str(error)
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(error).__name__
    for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    head, _, rest = last.partition(": ")
    return rest if rest and head.replace(".", "").replace("_", "").isalnum() else last


if __name__ == "__main__":
    sys.exit(main())
