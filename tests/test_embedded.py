"""The embedded convlora-tiny base: offline loading by name, real segmentation skill, its corpus and pretraining."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import convlora
from convlora.models import embedded as assets
from convlora.models import random_sam
from convlora.synthetic import objects

# tools/pretrain_base.py rebuilds the shipped base; it is a script, not part of the package
_SPEC = importlib.util.spec_from_file_location(
    "pretrain_base", Path(__file__).parents[1] / "tools" / "pretrain_base.py"
)
pretrain = sys.modules.setdefault("pretrain_base", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(pretrain)

TINY_ARCHITECTURE = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "window_size": 2,
    "global_attn_indexes": [1],
    "decoder_size": 16,
    "mlp_ratio": 2.0,
}


@pytest.fixture(scope="module")
def embedded():
    return assets.load_embedded("convlora-tiny")


@pytest.mark.slow
def test_embedded_model_loads_by_name_in_a_fresh_offline_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    code = (
        "import convlora; m = convlora.load_sam('convlora-tiny'); "
        "print(type(m).__name__, m.config.vision_config.image_size, convlora.count_parameters(m))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name, size, params = done.stdout.split()
    assert (name, size) == ("SamModel", "128")
    assert int(params) == convlora.count_parameters(assets.load_embedded("convlora-tiny"))


def test_load_sam_by_name_gives_the_embedded_weights(embedded):
    by_name = convlora.load_sam("convlora-tiny")
    stored = load_file(assets.embedded_path("convlora-tiny") / "model.safetensors")
    state = by_name.state_dict()
    for key, value in stored.items():
        assert torch.equal(state[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(by_name.parameters(), embedded.parameters(), strict=True))


def test_unknown_embedded_name_is_refused_with_the_available_names():
    with pytest.raises(ValueError, match="convlora-tiny"):
        assets.load_embedded("convlora-huge")


def test_embedded_folder_holds_only_safetensors_and_json():
    folder = assets.embedded_path("convlora-tiny")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors", "pretraining.json"]
    assert (folder / "model.safetensors").stat().st_size < 20e6
    record = assets.embedded_info("convlora-tiny")
    for key in ("command", "seed", "wall_time_s", "machine", "steps", "images_seen", "held_out"):
        assert key in record, key
    assert record["architecture"] == assets.BASE_ARCHITECTURE


def test_embedded_model_segments_held_out_objects_far_better_than_a_random_one(embedded):
    # measured on these 12 images: trained 0.77 / 0.76 / 0.71, random 0.10 / 0.05 / 0.00 (foreground / box / point)
    trained = pretrain.evaluate(embedded, num_images=12)
    untrained = pretrain.evaluate(random_sam(embedded.config, seed=0), num_images=12)
    assert trained["foreground_iou"] > 0.65 and untrained["foreground_iou"] < 0.3
    assert trained["box_iou"] > 0.65 and untrained["box_iou"] < 0.3
    assert trained["point_iou"] > 0.55 and untrained["point_iou"] < 0.3


def test_embedded_model_takes_conv_lora_and_predicts_prompt_free(embedded):
    peft_model = convlora.apply_conv_lora(embedded, convlora.ConvLoraConfig(r=2, num_experts=2))
    out = peft_model(pixel_values=torch.zeros(1, 3, 128, 128), multimask_output=False)
    assert out.pred_masks.shape == (1, 1, 1, 64, 64)  # the 16x16 token grid upscaled 4x


def test_objects_corpus_is_deterministic_by_seed():
    image, masks = objects.sample((7, 1), size=48)
    again, masks_again = objects.sample((7, 1), size=48)
    other, _ = objects.sample((7, 2), size=48)
    assert np.array_equal(image, again) and np.array_equal(masks, masks_again)
    assert not np.array_equal(image, other)


@pytest.mark.parametrize("seed", range(6))
def test_objects_masks_are_visible_disjoint_instances(seed):
    image, masks = objects.sample(seed, size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert masks.dtype == bool and masks.ndim == 3 and 1 <= len(masks) <= 5
    assert masks.reshape(len(masks), -1).any(axis=1).all()  # every listed object is visible
    assert masks.sum(axis=0).max() == 1  # occlusion: a pixel belongs to one object at most
    assert np.array_equal(objects.foreground(masks), masks.any(axis=0))


def test_held_out_images_never_come_from_the_training_stream():
    held_out = pretrain.held_out_images(2, size=32)
    training = pretrain.training_images(seed=0, step=0, batch_size=2, size=32, max_objects=5)
    assert not any(np.array_equal(a[0], b[0]) for a in held_out for b in training)


def _tiny_config(**overrides):
    values = dict(architecture=dict(TINY_ARCHITECTURE), steps=8, batch_size=2, warmup_steps=2, lr=2e-3,
                  checkpoint_every=4, eval_every=0, final_eval_images=2, log_every=1)  # fmt: skip
    values.update(overrides)
    return pretrain.PretrainConfig(**values)


def test_tiny_pretraining_lowers_the_loss_and_writes_a_loadable_model(tmp_path):
    record = pretrain.pretrain(_tiny_config(steps=12, checkpoint_every=12), tmp_path, command="test")
    losses = [entry["loss"] for entry in record["loss_log"]]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    saved = json.loads((tmp_path / "pretraining.json").read_text())
    assert saved["steps"] == 12 and saved["images_seen"] == 24 and saved["command"] == "test"
    assert set(saved["held_out"]) >= {"foreground_iou", "point_iou", "box_iou"}
    model = convlora.load_sam(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert model.config.vision_config.image_size == 32 and len(stored) > 0
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt*"))


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    pretrain.pretrain(_tiny_config(), tmp_path / "straight", command="test")

    real_save = pretrain.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(_tiny_config(), tmp_path / "resumed", command="test")
    assert json.loads((tmp_path / "resumed/checkpoint/progress.json").read_text())["step"] == 4
    monkeypatch.setattr(pretrain, "save_checkpoint", real_save)
    record = pretrain.pretrain(_tiny_config(), tmp_path / "resumed", command="test")
    assert record["steps"] == 8 and record["images_seen"] == 16
    straight = load_file(tmp_path / "straight/model.safetensors")
    resumed = load_file(tmp_path / "resumed/model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resuming_with_other_settings_is_refused(tmp_path):
    pretrain.pretrain(_tiny_config(steps=4), tmp_path, command="test")
    with pytest.raises(ValueError, match="other settings"):
        pretrain.pretrain(_tiny_config(steps=4, lr=1e-3), tmp_path, command="test")


def test_a_minutes_budget_fixes_the_step_count_from_the_measured_speed(tmp_path):
    record = pretrain.pretrain(_tiny_config(steps=None, minutes=0.04, checkpoint_every=1000), tmp_path, command="t")
    assert record["steps"] >= 23  # the speed is measured over 20 steps after 3 warm-up steps
    assert record["config"]["minutes"] == 0.04
