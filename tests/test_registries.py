"""Adding a model family or a training method is one registry entry: everything else follows from it.

Each test adds a fake entry — a family whose model type transformers' SAM classes carry under another name,
a method that trains only biases — through the one registry call, and then uses it as a user would:
adapters on its preset, prompts, saving and loading, the model card, the plots, the merge refusal.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import PeftModel
from torch import nn
from transformers import SamConfig, SamModel

from convlora import ConvLoraConfig, apply_conv_lora
from convlora.artifact import TaskInfo, export_trained, load_trained
from convlora.artifact.methods import METHODS, Method, build_task_model
from convlora.bench.plots import colour
from convlora.inference import Segmenter, base_task, merge_model
from convlora.models import describe_targets, family_of, find_sam, load_sam, random_sam, sam, tiny_sam_config
from convlora.models.base import ModelFamily
from convlora.models.family import FAMILIES, register_family, unregister_family
from convlora.prompting import encode_images
from convlora.training.report import card_metadata
from convlora.tuner.presets import MODEL_TYPE_FAMILIES


class FakeSamConfig(SamConfig):
    model_type = "fake_sam"


class FakeSamModel(SamModel):
    config_class = FakeSamConfig


FAKE = ModelFamily(
    name="fake",
    model_types=("fake_sam",),
    model_class=lambda: FakeSamModel,
    encoder_layers=sam.encoder_layers,
    image_size=sam.image_size,
    encoder_path=sam.ENCODER_PATH,
    target_presets={"qkv": r"attn\.qkv", "out_only": r"attn\.proj"},
    encode_image=sam.encode_image,
    description="a test family: SAM's architecture under another model_type",
)


@pytest.fixture
def fake_family():
    register_family(FAKE)  # the one entry
    try:
        yield FAKE
    finally:
        unregister_family("fake")
    assert "fake" not in FAMILIES and "fake_sam" not in MODEL_TYPE_FAMILIES


def fake_model() -> FakeSamModel:
    reference = random_sam(tiny_sam_config(), seed=0)
    settings = {k: v for k, v in reference.config.to_dict().items() if k != "model_type"}
    model = FakeSamModel(FakeSamConfig(**settings))
    model.load_state_dict(reference.state_dict())
    return model.eval()


def test_a_family_registered_once_gets_presets_prompts_and_peft_round_trips(fake_family, tmp_path):
    model = fake_model()
    assert family_of(model) is FAKE
    adapted = apply_conv_lora(model, ConvLoraConfig(r=2, num_experts=2, target_preset="out_only"))
    targets = describe_targets(adapted)
    assert targets and all(re.search(r"vision_encoder\.layers\.\d+\.attn\.proj$", name) for name in targets)
    # prompts: the family's own image encoding, the same numbers as SAM's on the same weights
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = random_sam(tiny_sam_config(), seed=0).eval()
    with torch.no_grad():
        ours = encode_images(fake_model(), pixels)["image_embeddings"]
        theirs = encode_images(reference, pixels)["image_embeddings"]
    assert torch.equal(ours, theirs)
    boxes = np.array([[5.0, 5.0, 40.0, 30.0]], np.float32)
    image = np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    masks = Segmenter(fake_model(), base_task(64, "fake")).predict(image, boxes=boxes)
    assert np.array_equal(masks, Segmenter(reference, base_task(64, "sam")).predict(image, boxes=boxes))
    # an adapter saved on the fake family loads back through stock PEFT with the same outputs
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    adapted.eval()
    adapted.save_pretrained(tmp_path / "adapter")
    restored = PeftModel.from_pretrained(fake_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = adapted(pixel_values=pixels, multimask_output=False).pred_masks
        assert torch.equal(restored(pixel_values=pixels, multimask_output=False).pred_masks, expected)


def test_registering_a_family_twice_or_a_taken_model_type_is_refused(fake_family):
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAKE)
    with pytest.raises(ValueError, match="already belong"):
        register_family(ModelFamily("other", ("sam",), lambda: SamModel, sam.encoder_layers, sam.image_size))


# --- A method: one METHODS entry -------------------------------------------------------------------------------

BIAS_WEIGHTS = "bias_model.safetensors"


def _build_bias(base: nn.Module, adapter_config: object) -> nn.Module:
    base.requires_grad_(False)
    for name, parameter in base.named_parameters():
        parameter.requires_grad_(name.endswith(".bias"))
    return base


def _export_bias(model: nn.Module, folder: Path) -> None:
    biases = {name: p.detach().contiguous() for name, p in model.named_parameters() if name.endswith(".bias")}
    safetensors.torch.save_file(biases, str(folder / BIAS_WEIGHTS))


def _load_bias(base: nn.Module, folder: Path, source: str) -> nn.Module:
    _, unexpected = safetensors.torch.load_model(base, str(folder / BIAS_WEIGHTS), strict=False)
    assert not unexpected
    return base


BIAS = Method(
    "bias_only", False, _build_bias, _export_bias, _load_bias, "every bias (BitFit)", label="BitFit",
    colour="#17becf", card_tags=("bitfit",),
)  # fmt: skip


@pytest.fixture
def bias_method(monkeypatch):
    monkeypatch.setitem(METHODS, "bias_only", BIAS)  # the one entry
    return BIAS


def test_a_method_registered_once_builds_exports_loads_and_reports(bias_method, tiny_sam_dir, tmp_path, capsys):
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(tiny_sam_dir), "bias_only")
    model = build_task_model(load_sam(tiny_sam_dir), task, freeze_iou_head=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".bias") for name in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.add_(0.05)
    folder = export_trained(model, task, tmp_path / "adapter")
    restored, restored_task = load_trained(folder)
    assert restored_task.method == "bias_only"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = find_sam(model).eval()(pixel_values=pixels, multimask_output=False).pred_masks
        assert torch.equal(restored(pixel_values=pixels, multimask_output=False).pred_masks, expected)
    assert "bitfit" in card_metadata(task)["tags"]
    assert colour("bias_only") == "#17becf"
    with pytest.raises(ValueError, match=r"nothing to merge; merge works for \[.*'conv_lora'.*'lora'.*\]"):
        merge_model(folder, tmp_path / "merged")


def test_the_engine_trains_a_method_registered_once(bias_method, tiny_sam_dir, polyp_dir, tmp_path):
    from convlora.training.config import load_config
    from convlora.training.engine import train

    args = ["--data", str(polyp_dir), "--model", str(tiny_sam_dir), "--output_dir", str(tmp_path / "run")]
    args += ["--method", "bias_only", "--epochs", "2", "--batch_size", "4", "--lr", "3e-3", "--overlay_samples", "0"]
    result = train(load_config(overrides=args), show_progress=False)
    model, task = load_trained(result.adapter_dir)
    assert task.method == "bias_only" and (result.adapter_dir / BIAS_WEIGHTS).is_file()
    base = load_sam(tiny_sam_dir)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and all(name.endswith(".bias") for name in changed)  # only what the method trains moved
    assert "bitfit" in (result.adapter_dir / "README.md").read_text()  # the card's tags come from the entry
