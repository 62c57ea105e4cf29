"""Nuclei, one mask per object: AIS, APG, AMG and connected components of a binary fine-tune compared.

Touching nuclei are the point: a binary fine-tune finds the foreground well and still merges every cluster into
one object. The script fine-tunes the base twice on the synthetic nuclei (or your data), both with Conv-LoRA:
once with ``--mode instances`` (an instance decoder on the adapted encoder, trained jointly with the adapters)
and once as a binary foreground model. It then segments every test image four ways and scores each id map with
the instance metrics (mSA over IoU 0.5:0.95, F1 at 0.5, objects found), timing each:

- AIS: the instance decoder's maps and a seeded watershed (no prompts);
- APG: each AIS object's box and seed point as prompts to SAM's prompted decoder;
- AMG: SAM's automatic mask generation (a 32 x 32 grid of point prompts) on the base model;
- binary-CC: the connected components of the binary fine-tune's mask.

    python examples/nuclei.py                    # synthetic nuclei + embedded base, a few minutes on 2 CPU cores
    python examples/nuclei.py --quick            # a tiny smoke run
    python examples/nuclei.py --domain cells     # the synthetic phase-contrast cells instead (larger objects)
    python examples/nuclei.py --data-dir DATA --model facebook/sam-vit-base   # DATA: 16-bit instance-id masks

Outputs go to runs/<domain> (--output-dir): the two runs and comparison.json. Over seeds and methods
(decoder-only, LoRA, Conv-LoRA) on both synthetic instance domains: ``convlora benchmark run
benchmarks/configs/instances.json``.
"""

import argparse
import sys
from pathlib import Path

from convlora import Segmenter, load_config, train
from convlora._io import write_json
from convlora.evaluation import connected_components
from convlora.evaluation.instance_files import held_out_samples, score_instance_files
from convlora.instances import AmgConfig
from convlora.synthetic import write_dataset

# the embedded 747k-parameter base rates its own masks lower than SAM does: SAM's AMG thresholds would keep
# almost nothing (see docs/concepts/instances.md)
AMG = AmgConfig(points_per_side=32, pred_iou_thresh=0.7, stability_score_thresh=0.9)


def fine_tune(data: Path, output: Path, mode: str, lr: float | None, args: argparse.Namespace) -> Path:
    """One Conv-LoRA run on ``data`` in ``mode``; returns its exported model folder."""
    config = load_config(
        data=str(data), model=args.model, mode=mode, method="conv_lora", output_dir=str(output / mode),
        epochs=args.epochs, batch_size=4, lr=lr, augment={"hflip": 0.5, "vflip": 0.5}, overlay_samples=0,
        seed=args.seed,
    )  # fmt: skip
    return train(config, show_progress=False).adapter_dir


def score(name: str, segment, samples: list, reading: dict) -> dict:
    """Instance metrics and seconds per image of ``segment(image) -> ids`` over the labelled samples."""
    return {"method": name, **score_instance_files(segment, samples, reading)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="examples/nuclei.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="a dataset with instance-id masks in convlora's layout")
    parser.add_argument("--model", default="convlora-tiny", help="SAM checkpoint (default: the embedded base)")
    parser.add_argument(
        "--domain", choices=["nuclei", "cells"], default="nuclei", help="synthetic instance domain (without --data-dir)"
    )
    parser.add_argument("--output-dir", default=None, help="run folders and comparison.json (default: runs/<domain>)")
    parser.add_argument("--synthetic-dir", default=None, help="where generated data goes (default: data/<domain>)")
    parser.add_argument("--epochs", type=int, default=24, help="epochs of each fine-tune")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of the instance fine-tune")
    parser.add_argument(
        "--binary-lr", type=float, default=None, help="peak learning rate of the binary one (default: the base's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the runs")
    parser.add_argument("--quick", action="store_true", help="a tiny budget (tests, smoke runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
    if args.data_dir is not None:
        data = Path(args.data_dir)
    else:
        sizes = {"train": 8, "val": 2, "test": 2} if args.quick else {"train": 48, "val": 8, "test": 16}
        where = args.synthetic_dir or f"data/{args.domain}"
        data = write_dataset(args.domain, where, seed=args.seed, size=128, **sizes)
    output = Path(args.output_dir or f"runs/{args.domain}")

    instance_model = Segmenter.from_pretrained(fine_tune(data, output, "instances", args.lr, args))
    binary_model = Segmenter.from_pretrained(fine_tune(data, output, "binary", args.binary_lr, args))
    base = Segmenter.from_pretrained(args.model)
    samples, reading = held_out_samples(data, instance_model.task.image_reading)
    amg = AmgConfig(points_per_side=4) if args.quick else AMG
    methods = {
        "AIS (Conv-LoRA, instances)": lambda image: instance_model.predict_instances(image, "ais")[0],
        "APG (Conv-LoRA, instances)": lambda image: instance_model.predict_instances(image, "apg")[0],
        "AMG (base SAM, 32x32 points)": lambda image: base.predict_instances(image, "amg", amg)[0],
        "binary-CC (Conv-LoRA, binary)": lambda image: connected_components(binary_model.predict(image) > 0),
    }
    rows = [score(name, segment, samples, reading) for name, segment in methods.items()]
    comparison = {
        "data": str(data),
        "domain": None if args.data_dir else args.domain,
        "model": args.model,
        "epochs": args.epochs,
        "test_images": len(samples),
    }
    comparison["rows"] = rows
    write_json(output / "comparison.json", comparison)
    print("| method | mSA | F1@0.5 | objects found / true | seconds per image |\n|---|---:|---:|---:|---:|")
    for row in rows:
        found = f"{row['n_pred']} / {row['n_true']}"
        print(f"| {row['method']} | {row['msa']:.3f} | {row['f1_50']:.3f} | {found} | {row['seconds_per_image']:.3f} |")
    return comparison


if __name__ == "__main__":
    main(sys.argv[1:])
