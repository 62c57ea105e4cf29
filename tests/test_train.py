"""The fine-tuning engine end to end on a tiny random SAM and tiny generated datasets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convlora import Segmenter
from convlora.artifact import TaskInfo, continue_from_export
from convlora.cli import main
from convlora.inference import evaluate
from convlora.models import load_sam, random_sam, tiny_sam_config
from convlora.synthetic import write_dataset
from convlora.training.config import load_config
from convlora.training.engine import epoch_order, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir) -> Path:
    root = tmp_path_factory.mktemp("train")
    (root / "sam").symlink_to(tiny_sam_dir)
    write_dataset("polyp", root / "polyp", train=16, val=6, test=6, size=64, seed=0)
    write_dataset("scene", root / "scene", train=12, val=4, test=4, size=64, seed=0)
    # square images: no ignored padding, so per-batch loss means do not depend on how a batch is split
    write_dataset("polyp", root / "square", train=16, val=6, test=0, size=64, seed=1, square=True)
    return root


def config(workspace: Path, out: str, *extra: str, data: str = "polyp"):
    args = ["--data", str(workspace / data), "--model", str(workspace / "sam"), "--output_dir", str(workspace / out)]
    args += ["--epochs", "3", "--batch_size", "4", "--lr", "3e-3", "--log_every_steps", "1", "--overlay_samples", "2"]
    return load_config(overrides=args + list(extra))


def test_training_lowers_the_loss_and_writes_every_output(workspace):
    result = train(config(workspace, "run"), show_progress=False)
    run = workspace / "run"
    losses = [entry["task"] for entry in json.loads((run / "metrics.json").read_text())["train_loss"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    for name in ["config.json", "metrics.json", "curves.png", "val_overlays.png"]:
        assert (run / name).is_file(), name
    assert {p.name for p in (run / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "convlora_task.json",
        "README.md",
    }
    assert any((run / "logs").rglob("events.out.tfevents.*"))
    assert result.best_value is not None and result.test_metrics is not None
    assert result.steps == 3 * 4
    card = (run / "adapter" / "README.md").read_text()
    assert "conv_lora" in card and "s_measure" in card


def test_evaluate_matches_a_direct_computation_and_merge_keeps_predictions(workspace):
    run = workspace / "run"
    if not (run / "adapter").is_dir():
        train(config(workspace, "run"), show_progress=False)
    scores = evaluate(run / "adapter", workspace / "polyp")
    # direct computation: the segmenter's masks at original size against the test masks
    from convlora.data import read_image, read_mask
    from convlora.evaluation.metrics import BinaryMetrics

    segmenter = Segmenter.from_pretrained(run / "adapter")
    direct = BinaryMetrics()
    for image_path in sorted((workspace / "polyp" / "test" / "images").iterdir()):
        logits = segmenter.predict_logits(read_image(image_path))
        truth = torch.as_tensor(
            (read_mask(workspace / "polyp" / "test" / "masks" / image_path.name) > 0).astype(np.int64)
        )
        direct.update(logits.unsqueeze(0), truth.unsqueeze(0))
    expected = direct.compute()
    for name in ("iou", "dice", "mae", "s_measure"):
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)

    images = workspace / "polyp" / "test" / "images"
    assert (
        main(["predict", "--model", str(run / "adapter"), "--images", str(images), "--output", str(workspace / "p1")])
        == 0
    )
    assert main(["merge", "--model", str(run / "adapter"), "--output", str(workspace / "merged")]) == 0
    assert (
        main(
            [
                "predict",
                "--model",
                str(workspace / "merged"),
                "--images",
                str(images),
                "--output",
                str(workspace / "p2"),
            ]
        )
        == 0
    )
    masks1 = sorted((workspace / "p1" / "masks").iterdir())
    assert len(masks1) == 6 and len(list((workspace / "p1" / "overlays").iterdir())) == 6
    from PIL import Image

    for path in masks1:
        before = np.asarray(Image.open(path))
        after = np.asarray(Image.open(workspace / "p2" / "masks" / path.name))
        original = Image.open(images / path.name)
        assert before.shape == (original.height, original.width)
        assert np.array_equal(before, after), path.name
    assert TaskInfo.read(workspace / "merged").merged


def test_multiclass_training_with_many_classes(workspace):
    result = train(config(workspace, "scene-run", "--epochs", "2", data="scene"), show_progress=False)
    assert result.task.mode == "multiclass" and result.task.num_classes == 9
    assert "miou" in result.history[-1]
    segmenter = Segmenter.from_pretrained(workspace / "scene-run" / "adapter")
    mask = segmenter.predict(workspace / "scene" / "test" / "images" / "00000.png")
    assert mask.max() < 9


@pytest.mark.parametrize("method", ["lora", "decoder", "full"])
def test_every_method_trains_with_the_same_engine_and_reloads_to_the_same_predictions(workspace, method):
    result = train(config(workspace, f"m-{method}", "--method", method, "--epochs", "1"), show_progress=False)
    assert result.task.method == method
    trained = {
        "lora": "adapter_model.safetensors",
        "decoder": "decoder_model.safetensors",
        "full": "model.safetensors",
    }[method]
    assert (result.adapter_dir / trained).is_file()
    # the reloaded model reproduces the engine's own test scores of the best model, and differs from the base
    scores = evaluate(result.adapter_dir, workspace / "polyp")
    for name, value in result.test_metrics.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    model = Segmenter.from_pretrained(result.adapter_dir).model
    base = random_sam(tiny_sam_config(), seed=0).eval()
    with torch.no_grad():
        ours = model(pixel_values=image, multimask_output=False).pred_masks
        theirs = base(pixel_values=image, multimask_output=False).pred_masks
    assert not torch.allclose(ours, theirs)


def test_two_processes_with_batch_two_equal_one_process_with_batch_four(workspace):
    """DDP averages gradients over processes; each process takes every second sample of the same shuffle."""
    common = ["--model", str(workspace / "sam"), "--data", str(workspace / "square"), "--epochs", "1", "--lr", "3e-3"]
    common += ["--conv_lora.noisy_gating", "false", "--no-progress", "--overlay_samples", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "convlora", "train"]
    two = subprocess.run(
        [*launch, *common, "--batch_size", "2", "--output_dir", str(workspace / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "convlora",
            "train",
            *common,
            "--batch_size",
            "4",
            "--output_dir",
            str(workspace / "single"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(workspace / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(workspace / "single" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Gradients agree to float rounding (summation order differs); Adam's first steps, lr * sign(g) for tiny g,
    # can grow that to ~1e-5 (measured). A sharding or averaging error differs by whole steps (lr = 3e-3).
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    # evaluation counts every validation image exactly once, whatever the process count
    ma = json.loads((workspace / "ddp" / "metrics.json").read_text())["history"][-1]
    mb = json.loads((workspace / "single" / "metrics.json").read_text())["history"][-1]
    assert ma["iou"] == pytest.approx(mb["iou"], abs=1e-4)


def test_a_new_run_refuses_a_folder_holding_another_run(workspace):
    train(config(workspace, "busy", "--epochs", "1"), show_progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(config(workspace, "busy", "--epochs", "1"), show_progress=False)


def test_epoch_order_shards_one_shuffle_between_processes():
    whole = epoch_order(10, seed=3, epoch=1)
    parts = [epoch_order(10, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert epoch_order(10, seed=3, epoch=2) != whole


def test_gradient_accumulation_of_two_batches_of_two_equals_one_batch_of_four(workspace):
    common = ["--data", str(workspace / "square"), "--epochs", "1", "--conv_lora.noisy_gating", "false"]
    common += ["--overlay_samples", "0"]
    a = train(config(workspace, "accum", *common, "--batch_size", "2", "--grad_accum", "2"), show_progress=False)
    b = train(config(workspace, "plain", *common, "--batch_size", "4"), show_progress=False)
    assert a.steps == b.steps == 4
    first = load_file(a.adapter_dir / "adapter_model.safetensors")
    second = load_file(b.adapter_dir / "adapter_model.safetensors")
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-4), key


def test_bf16_mixed_precision_trains_on_cpu(workspace):
    result = train(config(workspace, "bf16", "--mixed_precision", "bf16", "--epochs", "1"), show_progress=False)
    losses = json.loads((result.run_dir / "metrics.json").read_text())["train_loss"]
    assert all(np.isfinite(entry["loss"]) for entry in losses)
    assert result.best_value is not None and np.isfinite(result.best_value)


def test_fp16_without_a_gpu_is_refused_with_a_clear_error(workspace):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="fp16' needs a CUDA GPU"):
        train(config(workspace, "fp16", "--mixed_precision", "fp16"), show_progress=False)


def test_a_lora_run_continues_from_its_exported_adapter(workspace):
    """PEFT's LoRA adapter records peft_type "LORA"; str(PeftType.LORA) is "PeftType.LORA" and was refused."""
    first = train(config(workspace, "lora-a", "--epochs", "1", "--method", "lora"), show_progress=False)
    model = continue_from_export(load_sam(workspace / "sam"), first.task, first.adapter_dir)
    saved = load_file(first.adapter_dir / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert state and state.keys() <= saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in state.items())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # trained, not the initial zeros
