"""Joint prompted steps in instance runs (``--mode instances --joint_prompted F``): SAM's prompted mask decoder
trains on the training images' instances beside the instance decoder, and comes back with the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import convlora.training.engine as ENGINE
from convlora import Segmenter
from convlora.artifact import load_trained
from convlora.data.prompts import PromptConfig
from convlora.instances import instance_logits
from convlora.instances.model import InstanceSettings, install_instance_head, trained_head
from convlora.models import find_sam, random_sam, tiny_sam_config
from convlora.synthetic import write_dataset
from convlora.training.config import load_config
from convlora.training.engine import train
from convlora.training.prompted import JointStep, PromptedStep, draw_objects, joint_prompted_step

pytestmark = pytest.mark.slow

PREFIX = "base_model.model."  # how PEFT names the SAM's modules in adapter_model.safetensors


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir, nuclei_dir) -> Path:
    root = tmp_path_factory.mktemp("instance_joint")
    (root / "sam").symlink_to(tiny_sam_dir)
    (root / "nuclei").symlink_to(nuclei_dir)
    return root


def run_args(workspace: Path, out: str, *extra: str) -> list[str]:
    """Two epochs of three steps, evaluated once at the end: the exported model is the final one."""
    args = ["--data", str(workspace / "nuclei"), "--model", str(workspace / "sam"), "--mode", "instances"]
    args += ["--output_dir", str(workspace / out), "--epochs", "2", "--eval_every_epochs", "2", "--batch_size", "2"]
    return [*args, "--lr", "1e-2", "--instance_channels", "8", "--overlay_samples", "0", "--retention", "off", *extra]


def traced_run(workspace: Path, out: str, *extra: str) -> dict[str, Any]:
    """Train one run, keeping its trainable weights before the first step, its step module and its final model."""
    seen: dict[str, Any] = {}
    real_start, real_finish = ENGINE._start, ENGINE._finish

    def start(*args: Any, **kwargs: Any) -> Any:
        run = real_start(*args, **kwargs)
        seen["initial"] = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        seen["trainable"] = sorted(seen["initial"])
        seen["step"] = run.accelerator.unwrap_model(run.step_module)
        names = {id(p): n for n, p in run.model.named_parameters()}
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
        seen["groups"] = [
            (g.get("name"), g["initial_lr"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups
        ]
        return run

    def finish(run: Any) -> Any:
        seen["final"] = run.model  # nothing trains it after this
        return real_finish(run)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ENGINE, "_start", start)
        patch.setattr(ENGINE, "_finish", finish)
        seen["result"] = train(load_config(overrides=run_args(workspace, out, *extra)), show_progress=False)
    seen["metrics"] = json.loads((workspace / out / "metrics.json").read_text())
    seen["config"] = json.loads((workspace / out / "config.json").read_text())
    seen["saved"] = load_file(workspace / out / "adapter" / "adapter_model.safetensors")
    return seen


@pytest.fixture(scope="module")
def joint(workspace) -> dict[str, Any]:
    return traced_run(workspace, "joint", "--joint_prompted", "0.5")


@pytest.fixture(scope="module")
def plain(workspace) -> dict[str, Any]:
    return traced_run(workspace, "plain")


def base_decoder() -> dict[str, torch.Tensor]:
    """The mask decoder of the tiny base every run starts from (``tiny_sam_dir``), by its name in an adapter."""
    decoder = random_sam(tiny_sam_config(), seed=0).mask_decoder.state_dict()
    return {f"{PREFIX}mask_decoder.{name}": tensor for name, tensor in decoder.items()}


def changed(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in expected.items() if not torch.equal(found[name], tensor)]


def two_touching_ids(first: int = 256, second: int = 300) -> np.ndarray:
    """Two discs of radius 12.5 touching along x = 32 (one connected component), 255 = ignored in one corner."""
    yy, xx = np.mgrid[:64, :64]
    left, right = np.hypot(yy - 32, xx - 20), np.hypot(yy - 32, xx - 44)
    labels = np.where(np.minimum(left, right) < 12.5, np.where(left < right, first, second), 0).astype(np.int64)
    labels[:4, :4] = 255
    return labels


# ---------------------------------------------------------------- which weights train, and what the export holds


def test_a_joint_instance_run_trains_sams_mask_decoder_and_the_instance_head(joint):
    assert isinstance(joint["step"], JointStep) and joint["step"].prompted.object_kind == "instances"
    steps = joint["result"].steps
    expected = sum(joint_prompted_step(step, 0.5, seed=0) for step in range(1, steps + 1))
    assert joint["metrics"]["step_kinds"] == {"prompted": expected, "prompt_free": steps - expected}
    assert 0 < expected < steps
    # the whole mask decoder trains (the IoU head too, as in a binary joint run); the prompt encoder does not
    trainable = joint["trainable"]
    assert any("mask_decoder" in n and "iou_prediction_head" in n for n in trainable)
    assert not any("prompt_encoder" in n or "shared_image_embedding" in n for n in trainable)
    base, saved = base_decoder(), joint["saved"]
    moved = changed(saved, base)
    assert any("iou_prediction_head" in n for n in moved) and any("output_hypernetworks_mlps.0" in n for n in moved)
    head = [n for n in joint["initial"] if "instance_head" in n]
    final = dict(joint["final"].named_parameters())
    assert head and [n for n in head if not torch.equal(final[n], joint["initial"][n])]


def test_an_instance_run_without_joint_keeps_sams_decoder_bitwise_and_saves_the_same_keys(plain, joint):
    assert isinstance(plain["step"], ENGINE.InstanceStep) and plain["metrics"]["step_kinds"] == {}
    assert not any("mask_decoder" in n for n in plain["trainable"])
    base, saved = base_decoder(), plain["saved"]
    assert set(base) <= set(saved) and changed(saved, base) == []
    # the frozen decoder is saved with the adapter as it always was: both runs write the same tensors by name
    assert saved.keys() == joint["saved"].keys()
    assert sum(PREFIX + "instance_head." in n for n in saved) == sum("instance_head" in n for n in plain["trainable"])


def test_sams_decoder_trains_at_the_bases_default_rate_while_the_instance_head_keeps_lr(joint, plain):
    # --lr 1e-2 suits the fresh instance head; the tiny base's default (2e-3) is what its pretrained decoder takes
    assert joint["config"]["lr"] == 1e-2 and joint["config"]["decoder_lr"] == 2e-3
    (rest, rate, names), (decoder, decoder_rate, decoder_names) = joint["groups"]
    assert (rest, rate, decoder, decoder_rate) == ("rest", 1e-2, "mask_decoder", 2e-3)
    assert decoder_names == [n for n in joint["trainable"] if "mask_decoder." in n] and decoder_names
    assert not any("mask_decoder." in n for n in names) and any("instance_head" in n for n in names)
    # without joint_prompted: one group, as before
    assert plain["config"]["decoder_lr"] is None and [g[:2] for g in plain["groups"]] == [(None, 1e-2)]


def test_an_interrupted_joint_instance_run_resumes_to_the_same_model(joint, workspace, monkeypatch):
    out, real, saved = "joint-crashed", ENGINE.save_checkpoint, []

    def save_then_die(directory, *args, **kwargs):
        path = real(directory, *args, **kwargs)
        saved.append(directory)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ENGINE, "save_checkpoint", save_then_die)
    extra = ["--joint_prompted", "0.5", "--save_every_steps", "2"]
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=run_args(workspace, out, *extra)), show_progress=False)
    monkeypatch.undo()
    resumed = traced_run(workspace, out, *extra, "--resume", "latest")
    assert [g[:2] for g in resumed["groups"]] == [("rest", 1e-2), ("mask_decoder", 2e-3)]
    assert resumed["metrics"]["step_kinds"] == joint["metrics"]["step_kinds"]
    assert resumed["saved"].keys() == joint["saved"].keys()
    assert all(torch.equal(resumed["saved"][k], joint["saved"][k]) for k in joint["saved"])


# ---------------------------------------------------------------- the export gives back the trained model


def test_the_exported_joint_model_reloads_to_the_same_instances_and_prompted_masks(joint, workspace):
    adapter = joint["result"].adapter_dir
    assert joint["metrics"]["history"][-1]["step"] == joint["result"].steps  # exported = the final model
    loaded = Segmenter.from_pretrained(adapter, device="cpu")
    here = Segmenter(joint["final"].eval(), loaded.task)
    image = next((workspace / "nuclei" / "test" / "images").glob("*.png"))
    for method in ("ais", "apg"):
        assert np.array_equal(loaded.predict_instances(image, method)[0], here.predict_instances(image, method)[0])
    boxes = [[6, 8, 30, 34], [20, 14, 58, 50]]
    masks, scores = loaded.predict(image, boxes=boxes, return_scores=True)
    expected, expected_scores = here.predict(image, boxes=boxes, return_scores=True)
    assert masks.shape == (2, *np.asarray(Image.open(image)).shape[:2])
    assert np.array_equal(masks, expected) and np.array_equal(scores, expected_scores)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(instance_logits(loaded.model, pixels), instance_logits(here.model, pixels))
    # the decoder that answered is the trained one, not the base's
    model, _ = load_trained(adapter)
    decoder = find_sam(model).mask_decoder.modules_to_save["default"].state_dict()
    reloaded = {f"{PREFIX}mask_decoder.{n}": t for n, t in decoder.items()}
    assert changed(joint["saved"], reloaded) == [] and changed(reloaded, base_decoder())


# ---------------------------------------------------------------- the prompted step's objects


def test_the_prompted_objects_of_an_instance_map_are_its_ids_so_touching_objects_stay_two():
    labels = two_touching_ids()
    config = PromptConfig(kind="mixed", min_area=10)
    objects = draw_objects(labels, config, np.random.default_rng(0), "instances")
    assert len(objects) == 2 and objects.class_ids.tolist() == [256, 300]
    for mask, value in zip(objects.masks, (256, 300), strict=True):
        assert np.array_equal(mask, labels == value)
    assert not objects.masks[:, :4, :4].any()  # ignored pixels belong to no object
    assert len(draw_objects(labels, config, np.random.default_rng(0), "binary")) == 1  # one component


def test_the_prompted_step_of_an_instance_model_trains_sams_decoder_on_each_id_and_skips_empty_images():
    sam = random_sam(tiny_sam_config(), seed=0)
    install_instance_head(sam, InstanceSettings(hidden_channels=8))
    step = PromptedStep(sam, PromptConfig(kind="box", min_area=10), object_kind="instances", seed=0)
    labels = torch.stack([torch.from_numpy(two_touching_ids()), torch.zeros(64, 64, dtype=torch.int64)])
    out = step(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), labels, step=1)
    assert out["objects"].item() == 2 and out["skipped"].item() == 1 and out["task"].item() > 0
    out["loss"].backward()
    assert sam.mask_decoder.iou_prediction_head.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in trained_head(sam).parameters())  # the instance head takes no part
    empty = step(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.int64), step=2)
    assert empty["loss"].item() == 0.0 and empty["objects"].item() == 0 and empty["skipped"].item() == 1


# ---------------------------------------------------------------- refusals


def test_decoder_lr_outside_a_joint_instance_run_is_refused_naming_it(workspace):
    with pytest.raises(ValueError, match=r"decoder_lr=0\.001 .*--joint_prompted"):
        load_config(overrides=run_args(workspace, "refused", "--decoder_lr", "1e-3"))
    with pytest.raises(ValueError, match="decoder_lr must be > 0"):
        load_config(overrides=run_args(workspace, "refused", "--joint_prompted", "0.5", "--decoder_lr", "0"))
    config = load_config(overrides=run_args(workspace, "accepted", "--joint_prompted", "0.5", "--decoder_lr", "5e-3"))
    assert config.decoder_lr == 5e-3


def test_joint_prompted_with_multiclass_is_refused_naming_the_option(workspace):
    with pytest.raises(ValueError, match=r"joint_prompted=0\.25 .*multiclass.*drop joint_prompted"):
        load_config(overrides=[*run_args(workspace, "refused"), "--mode", "multiclass", "--joint_prompted", "0.25"])
    write_dataset("scene", workspace / "scene", train=4, val=2, test=0, size=64, seed=0)
    args = ["--data", str(workspace / "scene"), "--model", str(workspace / "sam"), "--output_dir"]
    args += [str(workspace / "refused-auto"), "--epochs", "1", "--joint_prompted", "0.25", "--retention", "off"]
    with pytest.raises(ValueError, match=r"joint_prompted=0\.25: .*multiclass.*drop joint_prompted"):
        train(load_config(overrides=args), show_progress=False)
    assert load_config(overrides=run_args(workspace, "accepted", "--joint_prompted", "0.25")).joint_prompted == 0.25
