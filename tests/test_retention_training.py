"""Retention during training: measured at every evaluation, the checkpoint rule that weighs it, and joint
prompted + prompt-free training, end to end on a tiny random SAM and tiny generated data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from convlora.artifact import load_trained
from convlora.evaluation.retention import PROTOCOLS, keep_set_from_folder, prompted_quality, retention
from convlora.models import load_sam, random_sam, tiny_sam_config
from convlora.synthetic import write_dataset
from convlora.training.config import TrainConfig, load_config
from convlora.training.engine import train
from convlora.training.prompted import joint_prompted_step
from convlora.training.retention_monitor import plan_keep_set, select_checkpoint

pytestmark = pytest.mark.slow

KEYS = [f"{key}{suffix}" for key in ("retention", "retention_val") for suffix in ["", *(f"/{p}" for p in PROTOCOLS)]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir, keep_folder) -> Path:
    root = tmp_path_factory.mktemp("retention_training")
    (root / "sam").symlink_to(tiny_sam_dir)
    write_dataset("polyp", root / "polyp", train=4, val=2, test=2, size=64, seed=0)
    (root / "keep").symlink_to(keep_folder)
    return root


def config(workspace: Path, out: str, *extra: str) -> TrainConfig:
    args = ["--data", str(workspace / "polyp"), "--model", str(workspace / "sam"), "--output_dir", str(workspace / out)]
    args += ["--epochs", "2", "--batch_size", "2", "--lr", "3e-3", "--log_every_steps", "1", "--overlay_samples", "0"]
    return load_config(overrides=args + list(extra))


def metrics(workspace: Path, out: str) -> dict:
    return json.loads((workspace / out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def best_run(workspace):
    """select best (today's rule), retention measured on the keep folder."""
    result = train(config(workspace, "best", "--keep_data", str(workspace / "keep")), show_progress=False)
    return result, metrics(workspace, "best")


def test_retention_is_in_every_evaluation_and_equals_a_direct_measurement_of_the_exported_model(workspace, best_run):
    result, recorded = best_run
    assert len(recorded["history"]) == 2
    for entry in recorded["history"]:
        for key in KEYS:
            assert math.isfinite(entry[key]) and entry[key] >= 0, (key, entry[key])
    assert recorded["retention"]["keep_set"]["objects"] == 4
    assert recorded["retention"]["val_keep_set"]["images"] == 2
    # the exported model's retention, measured from scratch against a freshly loaded base
    keep = keep_set_from_folder(workspace / "keep")
    base_scores = prompted_quality(load_sam(str(workspace / "sam")), keep)
    assert base_scores == pytest.approx({k: v for k, v in recorded["retention"]["base_scores"].items()}, abs=1e-9)
    model, _ = load_trained(result.adapter_dir)
    direct = retention(model, base_scores, keep)
    chosen = next(e for e in recorded["history"] if e["epoch"] == result.best_epoch)
    assert direct["mean"] == pytest.approx(chosen["retention"], abs=1e-6)
    for protocol in PROTOCOLS:
        assert direct[protocol] == pytest.approx(chosen[f"retention/{protocol}"], abs=1e-6)
    # and on the run's own validation objects
    val = keep_set_from_folder(workspace / "polyp", split="val")
    direct_val = retention(model, prompted_quality(load_sam(str(workspace / "sam")), val), val)
    assert direct_val["mean"] == pytest.approx(chosen["retention_val"], abs=1e-6)
    # reported in the selection, the model card and TensorBoard as well
    assert recorded["selection"]["rule"] == "best" and recorded["selection"]["epoch"] == result.best_epoch
    assert recorded["selection"]["retention"] == chosen["retention"]
    card = (result.adapter_dir / "README.md").read_text()
    assert "## Retention of SAM's prompted skill" in card and f"{chosen['retention']:.4f}" in card
    events = list((workspace / "best" / "logs").rglob("events.out.tfevents.*"))
    assert any(b"val/retention/clicks" in path.read_bytes() for path in events)
    assert recorded["step_kinds"] == {}


def test_measuring_retention_changes_nothing_of_the_training(workspace, best_run):
    result, recorded = best_run
    plain = train(config(workspace, "plain", "--retention", "off"), show_progress=False)
    unmeasured = metrics(workspace, "plain")
    strip = [{k: v for k, v in entry.items() if not k.startswith("retention")} for entry in recorded["history"]]
    assert unmeasured["history"] == strip and "retention" not in unmeasured["history"][0]
    assert unmeasured["train_loss"] == recorded["train_loss"]
    name = "adapter_model.safetensors"
    ours, theirs = load_file(plain.adapter_dir / name), load_file(result.adapter_dir / name)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_select_retention_with_bound_zero_keeps_the_checkpoint_select_best_keeps(workspace, best_run):
    result, recorded = best_run
    out = "bound0"
    chosen = train(
        config(workspace, out, "--keep_data", str(workspace / "keep"), "--select", "retention", "--min_retention", "0"),
        show_progress=False,
    )
    again = metrics(workspace, out)
    assert again["history"] == recorded["history"]  # the rule does not change training
    assert chosen.best_epoch == result.best_epoch
    assert again["selection"]["met_bound"] is True and "retention >= 0" in again["selection"]["reason"]
    name = "adapter_model.safetensors"
    assert load_file(chosen.adapter_dir / name).keys() == load_file(result.adapter_dir / name).keys()
    for key, value in load_file(chosen.adapter_dir / name).items():
        assert torch.equal(value, load_file(result.adapter_dir / name)[key]), key


def test_select_retention_above_every_value_keeps_the_highest_retention_and_exports_that_epochs_model(
    workspace, capsys
):
    out = "bound10"
    capsys.readouterr()
    keep = ["--keep_data", str(workspace / "keep")]
    result = train(config(workspace, out, *keep, "--select", "retention", "--min_retention", "10"), show_progress=False)
    recorded = metrics(workspace, out)
    history = recorded["history"]
    highest = max(range(len(history)), key=lambda i: (history[i]["retention"], -i))
    assert result.best_epoch == history[highest]["epoch"]
    selection = recorded["selection"]
    assert selection["met_bound"] is False and selection["epoch"] == history[highest]["epoch"]
    assert "none of which has retention >= 10" in selection["reason"]
    assert f"Kept (select retention): {selection['reason']}" in capsys.readouterr().out
    # the exported weights are those of the chosen evaluation (each epoch ends with a checkpoint)
    model, _ = load_trained(result.adapter_dir)
    params = dict(model.named_parameters())
    step = history[highest]["step"]
    saved = load_file(workspace / out / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")
    assert all(torch.equal(params[name], value) for name, value in saved.items())


def test_joint_training_runs_both_step_kinds_trains_the_prompted_decoder_and_repeats_with_its_seed(workspace):
    runs = [train(config(workspace, f"joint{i}", "--joint_prompted", "0.5"), show_progress=False) for i in range(2)]
    first, second = (metrics(workspace, f"joint{i}") for i in range(2))
    expected = sum(joint_prompted_step(step, 0.5, seed=0) for step in range(1, runs[0].steps + 1))
    assert first["step_kinds"] == {"prompted": expected, "prompt_free": runs[0].steps - expected}
    assert 0 < expected < runs[0].steps
    assert first["history"] == second["history"] and first["train_loss"] == second["train_loss"]
    # the IoU head, frozen in prompt-free training, learns in the prompted steps; the export stays prompt-free
    model, task = load_trained(runs[0].adapter_dir)
    assert task.prompt == "none"
    base = random_sam(tiny_sam_config(), seed=0)
    trained = dict(model.named_parameters())
    iou_head = [n for n in trained if "modules_to_save" in n and "iou_prediction_head" in n]
    assert iou_head
    original = {n: base.get_parameter("mask_decoder." + n.split("default.", 1)[1]) for n in iou_head}
    changed = [n for n in iou_head if not torch.equal(trained[n], original[n])]
    assert changed, "the IoU head did not train"


def test_a_joint_run_selecting_by_retention_resumes_to_the_same_history_and_adapter(workspace, monkeypatch):
    import convlora.training.engine as engine

    extra = ["--keep_data", str(workspace / "keep"), "--joint_prompted", "0.5", "--select", "retention"]
    reference = train(config(workspace, "joint-whole", *extra), show_progress=False)
    real = engine.save_checkpoint

    def save_then_die(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        raise KeyboardInterrupt  # right after the checkpoint of the first epoch

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(workspace, "joint-resumed", *extra), show_progress=False)
    monkeypatch.undo()
    resumed = train(config(workspace, "joint-resumed", *extra, "--resume", "latest"), show_progress=False)
    whole, again = metrics(workspace, "joint-whole"), metrics(workspace, "joint-resumed")
    for key in ("history", "train_loss", "step_kinds", "selection", "retention"):
        assert whole[key] == again[key], key
    name = "adapter_model.safetensors"
    first, second = load_file(reference.adapter_dir / name), load_file(resumed.adapter_dir / name)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_joint_prompted_steps_are_a_seeded_share_of_the_steps():
    steps = range(1, 101)
    for fraction in (0.0, 0.25, 0.5, 1.0):
        count = sum(joint_prompted_step(s, fraction, seed=3) for s in steps)
        assert abs(count - 100 * fraction) <= 1
    seeds = {tuple(joint_prompted_step(s, 0.25, seed=seed) for s in steps) for seed in range(6)}
    assert len(seeds) > 1  # the seed moves the steps
    assert len({tuple(joint_prompted_step(s, 0.25, seed=2) for s in steps) for _ in range(2)}) == 1


def test_a_keep_data_folder_that_does_not_exist_is_refused_before_training(workspace):
    missing = workspace / "no-such-keep"
    with pytest.raises(ValueError, match=r"keep_data: .*no-such-keep does not exist"):
        train(config(workspace, "missing", "--keep_data", str(missing)), show_progress=False)
    assert not (workspace / "missing" / "metrics.json").exists()


def test_retention_on_a_multiclass_run_is_skipped_with_the_reason():
    settings = SimpleNamespace(retention="on", select="best", keep_data=None, model="convlora-tiny", keep_images=2)
    keep, reason = plan_keep_set(settings, "multiclass")
    assert keep is None
    assert reason.startswith("retention: skipped: a multiclass run's model") and "one mask per class" in reason
    with pytest.raises(ValueError, match="select='retention' needs retention"):
        plan_keep_set(SimpleNamespace(**{**vars(settings), "select": "retention"}), "multiclass")


def test_retention_on_without_a_keep_set_is_refused_and_auto_is_off():
    settings = SimpleNamespace(retention="on", select="best", keep_data=None, model="my/sam", keep_images=2)
    with pytest.raises(ValueError, match="retention 'on' needs keep_data"):
        plan_keep_set(settings, "binary")
    keep, reason = plan_keep_set(SimpleNamespace(**{**vars(settings), "retention": "auto"}), "binary")
    assert keep is None and reason.startswith("retention: off: no keep set")
    keep, _ = plan_keep_set(SimpleNamespace(**{**vars(settings), "model": "convlora-tiny"}), "binary")
    assert keep is not None and keep.name == "generic" and len(keep) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"joint_prompted": 1.5}, "joint_prompted must be in"),
        ({"joint_prompted": 0.25, "prompt": "box"}, "every step is prompted already"),
        ({"joint_prompted": 0.25, "mode": "multiclass"}, "no promptable model"),
        ({"retention": "off", "keep_data": "keep"}, "keep_data is measured only"),
        ({"retention": "off", "select": "weighted"}, "weighs retention"),
        ({"select": "median"}, "select must be one of"),
        ({"min_retention": -0.1}, "min_retention must be >= 0"),
        ({"retention_weight": 2.0}, "retention_weight must be in"),
        ({"keep_images": 0}, "keep_images must be >= 1"),
    ],
)
def test_retention_settings_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d", **fields)


def test_select_best_keeps_the_earliest_of_equal_metrics_and_skips_nan():
    history = [
        {"epoch": 0, "iou": float("nan")},
        {"epoch": 1, "iou": 0.5},
        {"epoch": 2, "iou": 0.5},
        {"epoch": 3, "iou": 0.4},
    ]
    choice = select_checkpoint(history, "iou", "best")
    assert choice.index == 1 and choice.reason == "epoch 1: iou 0.5 (the best of the 4 evaluations)"
    assert select_checkpoint(history[:1], "iou", "best") is None
    weighted = [{"epoch": 0, "iou": 0.5, "retention": 1.0}, {"epoch": 1, "iou": 0.8, "retention": 0.6}]
    assert select_checkpoint(weighted, "iou", "weighted", retention_weight=0.9).index == 0
    assert select_checkpoint(weighted, "iou", "weighted", retention_weight=0.1).index == 1
