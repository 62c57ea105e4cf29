"""Conv-LoRA on every SAM generation: one table of families x methods drives the invariants on tiny models.

Families: SAM (ViT, fused qkv), SAM 2 (Hiera: fused qkv, per-stage widths) and SAM 3 (ViT with RoPE and
separate q/k/v/o). Methods: Conv-LoRA, PEFT's LoRA and the decoder-only baseline, built through the same
registry the trainer uses.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from convlora import ConvLoraConfig
from convlora.artifact.methods import METHODS
from convlora.models import apply_conv_lora, install_class_decoder, random_sam, tiny_sam_config
from convlora.models.family import (
    FAMILIES,
    enable_gradient_checkpointing,
    family_for_type,
    family_of,
    find_sam,
    prepare_model,
    prompted_logits,
    segmentation_logits,
)
from convlora.models.loading import load_sam, resize_model
from convlora.models.merged_io import save_merged
from convlora.models.sam2 import tiny_sam2_config
from convlora.models.sam3 import tiny_sam3_config
from convlora.tuner.layer import ConvLoraLinear
from convlora.tuner.presets import FAMILY_PRESETS, target_modules_pattern

# family -> (config builder, input size, number of encoder blocks)
FAMILY_CASES = {
    "sam": (tiny_sam_config, 64, 2),
    "sam2": (tiny_sam2_config, 256, 5),
    "sam3": (tiny_sam3_config, 224, 4),
}
METHOD_CASES = ["conv_lora", "lora", "decoder"]
CASES = [(family, method) for family in FAMILY_CASES for method in METHOD_CASES]
CASE_IDS = [f"{family}-{method}" for family, method in CASES]
ADAPTER = {"r": 2, "lora_alpha": 4, "num_experts": 2, "target_preset": "attention_mlp", "layers": [0, 1]}


def make_base(family: str, seed: int = 0):
    return random_sam(FAMILY_CASES[family][0](), seed=seed)


def make_images(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = FAMILY_CASES[family][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(family: str, method: str, init: bool = True, seed: int = 0):
    """A model with exactly the method's weights trainable; ``init=False`` gives adapters that are not zero."""
    return METHODS[method].build(make_base(family, seed), ConvLoraConfig(**ADAPTER, init_lora_weights=init))


def logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return segmentation_logits(model.eval(), images)


def perturb_decoder(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in find_sam(model).mask_decoder.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(("family", "method"), CASES, ids=CASE_IDS)
def test_a_fresh_model_gives_the_base_models_masks(family, method):
    images = make_images(family)
    expected = logits(make_base(family), images)
    assert torch.equal(logits(build(family, method), images), expected)


@pytest.mark.parametrize(("family", "method"), CASES, ids=CASE_IDS)
def test_only_adapters_and_the_mask_decoder_train(family, method):
    model = build(family, method)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if "lora_" in name}
    assert trainable and all("lora_" in name or "mask_decoder" in name for name in trainable)
    assert bool(adapters) == (method != "decoder")
    decoder = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "mask_decoder" in name)
    assert decoder == sum(p.numel() for p in make_base(family).mask_decoder.parameters())


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_conv_lora_sits_on_the_preset_of_each_family_and_sees_every_grid(family):
    model = build(family, "conv_lora", init=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ConvLoraLinear)}
    pattern = target_modules_pattern("attention_mlp", [0, 1], family)
    assert layers and all(re.fullmatch(pattern, name.removeprefix("base_model.model.")) for name in layers)
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape))) for m in layers.values()]
    logits(model, make_images(family, batch=1))
    for hook in hooks:
        hook.remove()
    assert all(len(shape) == 4 for shape in shapes)  # channels-last grids (b*windows, h, w, c), read from the shape
    if family == "sam2":  # block 1 starts stage 2: its qkv sees stage 1's width, its proj/mlp stage 2's
        assert len({shape[-1] for shape in shapes}) >= 3
    if family == "sam3":  # layer 0 is windowed (8x8 windows of a 16x16 grid), layer 1 global
        assert {shape[:3] for shape in shapes} == {(4, 8, 8), (1, 16, 16)}


@pytest.mark.parametrize(("family", "method"), CASES, ids=CASE_IDS)
def test_one_training_step_changes_the_masks_and_no_frozen_weight(family, method):
    model = build(family, method, init=False).train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    images = make_images(family)
    before = logits(model, images)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    output = segmentation_logits(model, images)
    F.binary_cross_entropy_with_logits(output, (torch.rand_like(output) > 0.5).float()).backward()
    optimizer.step()
    assert (logits(model, images) - before).abs().max() > 1e-4
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_prompt_free_and_prompted_masks_have_the_families_shapes(family):
    model = build(family, "conv_lora", init=False).eval()
    size = FAMILY_CASES[family][1]
    side = 4 * find_sam(model).prompt_encoder.image_embedding_size[0]  # 4x the encoder's final grid
    images = make_images(family)
    assert segmentation_logits(model, images).shape == (2, 1, side, side)
    boxes = torch.tensor([[[4.0, 4.0, size / 2, size / 2]], [[8.0, 8.0, size - 1.0, size / 3]]])
    with torch.no_grad():
        boxed = prompted_logits(model, images, input_boxes=boxes)
        points = torch.tensor([[[[size / 3, size / 3]]], [[[size / 2, size / 4]]]])
        pointed = prompted_logits(
            model, images, input_points=points, input_labels=torch.ones(2, 1, 1, dtype=torch.long)
        )
    assert boxed.shape == pointed.shape == (2, 1, side, side)
    assert not torch.equal(boxed, segmentation_logits(model, images))


@pytest.mark.parametrize("family", list(FAMILY_CASES))
@pytest.mark.parametrize("method", ["conv_lora", "lora"])
def test_merging_keeps_the_masks_and_the_merged_checkpoint_round_trips(family, method, tmp_path):
    model = build(family, method, init=False)
    images = make_images(family)
    expected = logits(model, images)
    merged = model.merge_and_unload()
    assert (logits(merged, images) - expected).abs().max() <= 1e-5
    save_merged(merged, tmp_path / "merged")
    restored = load_sam(tmp_path / "merged")
    assert type(restored) is type(merged)
    assert torch.equal(logits(restored, images), logits(merged, images))


SUBPROCESS = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_families import CASES, make_base, make_images, logits
from convlora.artifact.methods import METHODS
out = {{}}
for family, method in CASES:
    model = METHODS[method].load(make_base(family), Path({root!r}) / f"{{family}}-{{method}}", "base")
    out[f"{{family}}-{{method}}"] = logits(model, make_images(family)).flatten().tolist()
json.dump(out, open({result!r}, "w"))
"""


def test_every_family_and_method_reloads_bit_for_bit_in_a_fresh_process(tmp_path):
    expected = {}
    for family, method in CASES:
        model = build(family, method, init=False)
        if method == "decoder":
            perturb_decoder(model)
        folder = tmp_path / f"{family}-{method}"
        folder.mkdir()
        METHODS[method].export(model, folder)
        expected[f"{family}-{method}"] = logits(model, make_images(family))
    result = tmp_path / "result.json"
    code = textwrap.dedent(SUBPROCESS).format(tests=str(Path(__file__).parent), root=str(tmp_path), result=str(result))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    reloaded = json.loads(result.read_text())
    for key, tensor in expected.items():
        assert torch.equal(torch.tensor(reloaded[key], dtype=tensor.dtype).reshape(tensor.shape), tensor), key


def test_a_sam_adapter_on_a_sam2_model_is_refused_naming_both(tmp_path):
    apply_conv_lora(make_base("sam"), ConvLoraConfig(**ADAPTER)).save_pretrained(str(tmp_path))
    assert "family" not in json.loads((tmp_path / "adapter_config.json").read_text())  # written as before
    with pytest.raises(ValueError, match=r"targets a sam model .* Sam2Model is a sam2 model"):
        PeftModel.from_pretrained(make_base("sam2"), str(tmp_path))


def test_a_sam2_adapter_on_a_sam3_model_is_refused_naming_both(tmp_path):
    apply_conv_lora(make_base("sam2"), ConvLoraConfig(**ADAPTER)).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["family"] == "sam2"
    with pytest.raises(ValueError, match=r"targets a sam2 model .* Sam3TrackerModel is a sam3 model") as error:
        PeftModel.from_pretrained(make_base("sam3"), str(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("family", "preset"), [("sam", "qv"), ("sam2", "attention"), ("sam3", "qkv_proj")])
def test_a_preset_the_family_lacks_is_refused_naming_both(family, preset):
    with pytest.raises(ValueError, match=rf"target_preset '{preset}' does not exist for \w+ \(family {family}\)"):
        apply_conv_lora(make_base(family), ConvLoraConfig(target_preset=preset))


def test_a_default_config_resolves_to_each_familys_qkv_and_sam_stays_as_before():
    config = ConvLoraConfig()
    assert config.target_modules == target_modules_pattern("qkv") and config.family is None
    for family, (_, _, blocks) in FAMILY_CASES.items():
        model = apply_conv_lora(make_base(family), config)
        assert config.family == (None if family == "sam" else family)  # SAM adapters save exactly as before
        expected = blocks * (3 if family == "sam3" else 1)
        assert sum(isinstance(m, ConvLoraLinear) for m in model.modules()) == expected
    assert sorted(FAMILY_PRESETS["sam2"]) == ["attention_mlp", "qkv", "qkv_proj"]
    assert sorted(FAMILY_PRESETS["sam3"]) == ["attention", "attention_mlp", "qkv", "qv"]


@pytest.mark.parametrize(("family", "size"), [("sam2", 320), ("sam3", 280)])
def test_resizing_keeps_the_weights_and_gives_masks_at_a_quarter_of_the_grid(family, size):
    base = make_base(family)
    resized = resize_model(base, size)
    assert family_of(resized).image_size(resized) == size
    before, after = base.state_dict(), resized.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    model = apply_conv_lora(resized, ConvLoraConfig(r=2, num_experts=2, init_lora_weights=False))
    images = torch.randn(1, 3, size, size)
    patch = family_of(resized).patch_size(resized)
    grid = size // 16 if family == "sam2" else size // patch
    assert logits(model, images).shape == (1, 1, 4 * grid, 4 * grid)
    with pytest.raises(ValueError, match="multiple of"):
        resize_model(make_base(family), size + 2)


@pytest.mark.parametrize("family", ["sam2", "sam3"])
def test_load_sam_picks_the_family_from_config_json(family, tmp_path):
    base = make_base(family)
    base.save_pretrained(str(tmp_path))
    loaded = load_sam(tmp_path)
    assert type(loaded) is type(base) and family_of(loaded).name == family
    images = make_images(family)
    assert torch.equal(logits(loaded, images), logits(base, images))


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_the_multi_class_decoder_gives_one_map_per_class_trains_and_round_trips(family, tmp_path):
    base = install_class_decoder(make_base(family), num_classes=3)
    model = apply_conv_lora(base, ConvLoraConfig(**ADAPTER, init_lora_weights=False)).train()
    images = make_images(family)
    output = segmentation_logits(model, images)
    side = 4 * find_sam(model).prompt_encoder.image_embedding_size[0]
    assert output.shape == (2, 3, side, side)
    assert torch.equal(logits(model, images)[:, 1], logits(model, images)[:, 2])  # classes start alike
    model.train()
    labels = torch.randint(0, 3, (2, side, side), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(segmentation_logits(model, images), labels).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    trained = logits(model, images)
    assert not torch.equal(trained[:, 1], trained[:, 2])
    merged = model.merge_and_unload()
    save_merged(merged, tmp_path / "merged")
    assert torch.equal(logits(load_sam(tmp_path / "merged"), images), logits(merged, images))


def test_edgetam_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="convolutional RepViT"):
        family_for_type("edgetam", "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "edgetam"}))
    with pytest.raises(ValueError, match=r"model_type='edgetam': EdgeTAM's image encoder is a convolutional"):
        load_sam(tmp_path)


def test_sam3_concept_models_image_path_takes_the_presets_but_has_no_prompt_free_call():
    from transformers import Sam3Config, Sam3Model

    with torch.device("meta"):
        concept = Sam3Model(Sam3Config(vision_config=tiny_sam3_config().vision_config))
    model = apply_conv_lora(concept, ConvLoraConfig(target_preset="qv"))
    adapted = [name for name, m in model.named_modules() if isinstance(m, ConvLoraLinear)]
    assert len(adapted) == 8 and all(".vision_encoder.backbone.layers." in name for name in adapted)
    with pytest.raises(ValueError, match=r"concept model \(Sam3Model\) segments from text"):
        segmentation_logits(model, torch.empty(1, 3, 224, 224, device="meta"))
    family = family_for_type("sam3", "config.json")
    assert family is FAMILIES["sam3_concept"] and family.preset_family == "sam3" and not family.prompt_free
    assert family_for_type("sam3_video", "config.json") is FAMILIES["sam3"]
    assert family_for_type("sam2_video", "config.json") is FAMILIES["sam2"]


@pytest.mark.parametrize("family", ["sam2", "sam3"])
def test_evaluation_uses_the_mask_token_training_uses(family):
    # convlora's task setting (TaskInfo.single_mask_token, applied by training and load_trained), not the loader's
    model = make_base(family)
    assert model.config.mask_decoder_config.dynamic_multimask_via_stability is True
    images = make_images(family)
    with torch.no_grad():
        trained_token = segmentation_logits(model.train(), images)
    assert not torch.equal(logits(model, images), trained_token)  # transformers' eval-time fallback
    prepare_model(model)
    assert torch.equal(logits(model, images), trained_token)
    assert model.config.mask_decoder_config.dynamic_multimask_via_stability is False


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_gradient_checkpointing_gives_the_same_gradients_in_every_family(family):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_conv_lora(make_base(family), ConvLoraConfig(**ADAPTER, init_lora_weights=False)).train()
        if checkpointing:
            assert enable_gradient_checkpointing(model) == FAMILY_CASES[family][2]
        segmentation_logits(model, make_images(family, batch=1)).square().mean().backward()
        grads.append([p.grad for name, p in model.named_parameters() if "lora_" in name and p.grad is not None])
    assert grads[0] and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_a_sam2_video_checkpoint_loads_as_the_image_model(tmp_path):
    from transformers import Sam2VideoConfig, Sam2VideoModel

    tiny = tiny_sam2_config()
    parts = {name: getattr(tiny, name).to_dict() for name in ("vision_config", "prompt_encoder_config")}
    torch.manual_seed(0)
    video = Sam2VideoModel(Sam2VideoConfig(**parts, mask_decoder_config=tiny.mask_decoder_config.to_dict()))
    video.save_pretrained(str(tmp_path))
    model = load_sam(tmp_path)
    assert type(model).__name__ == "Sam2Model" and family_of(model).name == "sam2"
    qkv = "vision_encoder.backbone.blocks.0.attn.qkv.weight"
    assert torch.equal(model.get_parameter(qkv), video.get_parameter(qkv))


def test_a_segmenter_of_a_sam3_model_reads_images_as_sam3_does():
    from convlora.inference import Segmenter, base_task
    from convlora.models.processing import InputFormat

    segmenter = Segmenter(make_base("sam3").eval(), base_task(224, "tiny-sam3"))
    assert segmenter.input_format == InputFormat((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=False)
    logits = segmenter.predict_logits(torch.zeros(30, 50, 3, dtype=torch.uint8).numpy())
    assert logits.shape == (1, 30, 50)


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_a_prompted_training_step_runs_on_every_family_and_reaches_the_adapters(family):
    from convlora.data.prompts import PromptConfig
    from convlora.training.prompted import PromptedStep, prepare_prompted_model

    model = build(family, "conv_lora", init=False)
    config = PromptConfig(kind="box")
    prepare_prompted_model(model, config)
    size = FAMILY_CASES[family][1]
    labels = torch.zeros(2, size, size, dtype=torch.int64)
    labels[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    out = PromptedStep(model, config).train()(make_images(family), labels)
    assert out["objects"] == 2 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if "conv_lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
