"""Invariants of the Conv-LoRA PEFT method on tiny random SAM models, driven by one table of cases."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import SamModel

from convlora import (
    ConvLoraConfig,
    ConvLoraMergedLinear,
    apply_conv_lora,
    load_merged,
    merged_extra_parameters,
    moe_aux_loss,
    save_merged,
)
from convlora._io import OUTPUT_MARKER
from convlora.tuner.layer import ConvLoraLinear
from convlora.tuner.moe import ConvExpertMixture

CASES = {
    "reference": {},
    "depthwise": {"r": 4, "expert_conv": "depthwise"},
    "top2_weighted": {"num_experts": 4, "top_k": 2, "weighted_combine": True},
    "single_expert": {"num_experts": 1},
    "qkv_proj_last_layer": {"target_preset": "qkv_proj", "layers": [1]},
    "bilinear_downscale": {"num_experts": 3, "expert_scales": [0.5, 1, 2], "interpolation": "bilinear"},
    "dropout": {"lora_dropout": 0.1},
}
case_ids = list(CASES)


def config_for(case: str, **overrides) -> ConvLoraConfig:
    return ConvLoraConfig(**{**CASES[case], **overrides})


def masks(model, images):
    with torch.no_grad():
        return model(pixel_values=images, multimask_output=False).pred_masks


def expected_targets(config: ConvLoraConfig) -> set[str]:
    names = {"qkv": ["attn.qkv"], "qkv_proj": ["attn.qkv", "attn.proj"]}[config.target_preset or "qkv"]
    layers = config.layers if config.layers is not None else [0, 1]
    return {f"base_model.model.vision_encoder.layers.{i}.{n}" for i in layers for n in names}


@pytest.mark.parametrize("case", case_ids)
def test_adapters_sit_exactly_on_the_configured_targets(case, make_sam):
    config = config_for(case)
    model = apply_conv_lora(make_sam(), config)
    adapted = {name for name, m in model.named_modules() if isinstance(m, ConvLoraLinear)}
    assert adapted == expected_targets(config)


@pytest.mark.parametrize("case", case_ids)
def test_fresh_adapter_is_the_identity(case, make_sam, images):
    base = make_sam()
    reference = masks(base, images)
    model = apply_conv_lora(base, config_for(case)).eval()
    assert torch.equal(masks(model, images), reference)


@pytest.mark.parametrize("case", case_ids)
def test_only_adapters_and_mask_decoder_are_trainable(case, make_sam):
    model = apply_conv_lora(make_sam(), config_for(case))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    for name in trainable:
        in_adapter = ".conv_lora_" in name
        in_decoder = "mask_decoder.modules_to_save.default." in name
        assert in_adapter or in_decoder, name
    assert any("conv_lora_experts" in name and "gate_weight" in name for name in trainable)


@pytest.mark.parametrize("case", case_ids)
def test_save_then_load_reproduces_outputs_exactly(case, make_sam, images, tmp_path):
    model = apply_conv_lora(make_sam(), config_for(case, init_lora_weights=False)).eval()
    before = masks(model, images)
    assert not torch.equal(before, masks(make_sam(), images)), "a random adapter must change the output"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_sam(), tmp_path).eval()
    assert torch.equal(masks(loaded, images), before)


@pytest.mark.parametrize("case", case_ids)
def test_saved_files_are_peft_files_holding_every_expert_and_gate_tensor(case, make_sam, tmp_path):
    config = config_for(case)
    apply_conv_lora(make_sam(), config).save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for target in expected_targets(config):
        for tensor in ("conv_lora_A.weight", "conv_lora_B.weight"):
            assert f"{target}.{tensor}" in saved
        for tensor in ("expert_weight", "expert_bias", "gate_weight", "noise_weight"):
            assert f"{target}.conv_lora_experts.{tensor}" in saved
        assert saved[f"{target}.conv_lora_experts.expert_weight"].shape[0] == config.num_experts
    assert any(".mask_decoder." in key for key in saved)
    assert not any(".default." in key for key in saved), "the adapter name must not leak into saved keys"
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "CONV_LORA"
    assert stored["num_experts"] == config.num_experts


def test_adapter_loads_under_another_name(make_sam, images, tmp_path):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    expected = masks(model, images)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_sam(), tmp_path, adapter_name="polyps").eval()
    assert loaded.active_adapter == "polyps"
    assert torch.equal(masks(loaded, images), expected)


def test_several_adapters_switch_with_set_adapter(make_sam, images, tmp_path):
    first = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    torch.manual_seed(1)
    second = apply_conv_lora(make_sam(), ConvLoraConfig(r=2, num_experts=3, init_lora_weights=False)).eval()
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    expected_a, expected_b = masks(first, images), masks(second, images)
    assert not torch.equal(expected_a, expected_b)

    model = PeftModel.from_pretrained(make_sam(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.eval()
    assert torch.equal(masks(model, images), expected_a)
    model.set_adapter("b")
    assert torch.equal(masks(model, images), expected_b)
    model.set_adapter("a")
    assert torch.equal(masks(model, images), expected_a)


def test_disabled_adapter_gives_the_base_model_exactly(make_sam, images):
    reference = masks(make_sam(), images)
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    assert not torch.equal(masks(model, images), reference)
    with model.disable_adapter():
        assert torch.equal(masks(model, images), reference)
    assert not torch.equal(masks(model, images), reference)


@pytest.mark.parametrize("case", ["reference", "top2_weighted"])
def test_training_changes_only_adapter_and_decoder_tensors_and_trains_the_gate(case, make_sam, images):
    model = apply_conv_lora(make_sam(), config_for(case))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.zeros(2, 1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    model.train()
    losses = []
    for _ in range(5):
        logits = model(pixel_values=images, multimask_output=False).pred_masks
        task = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        aux = moe_aux_loss(model)
        (task + aux).backward()
        gate_grads = [m.gate_weight.grad for m in model.modules() if isinstance(m, ConvExpertMixture)]
        assert all(g is not None and g.abs().sum() > 0 for g in gate_grads), "the gate must receive gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(task.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        trainable = ".conv_lora_" in name or "modules_to_save.default" in name
        if not trainable:
            assert not changed, f"frozen tensor {name} changed"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "conv_lora_B" in n)


def test_aux_loss_is_positive_in_training_and_zero_in_eval(make_sam, images):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False))
    model.train()
    model(pixel_values=images, multimask_output=False)
    assert moe_aux_loss(model).item() > 0
    model.eval()
    model(pixel_values=images, multimask_output=False)
    assert moe_aux_loss(model).item() == 0


def test_bf16_autocast_and_a_bf16_model_run_and_stay_close_to_fp32(make_sam, images):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    reference = masks(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = masks(model, images)
    assert torch.isfinite(autocast_out).all()
    assert (autocast_out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05

    bf16_model = apply_conv_lora(make_sam().to(torch.bfloat16), ConvLoraConfig(init_lora_weights=False))
    bf16_out = masks(bf16_model.eval(), images.to(torch.bfloat16))
    assert bf16_out.dtype == torch.bfloat16 and torch.isfinite(bf16_out.float()).all()
    bf16_model.train()
    logits = bf16_model(pixel_values=images.to(torch.bfloat16), multimask_output=False).pred_masks
    (logits.float().mean() + moe_aux_loss(bf16_model)).backward()
    grads = [p.grad for n, p in bf16_model.named_parameters() if "conv_lora_A" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_keeps_gradients_and_aux_loss(make_sam, images):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False))
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    logits = model(pixel_values=images, multimask_output=False).pred_masks
    aux = moe_aux_loss(model)
    assert aux.requires_grad and aux.item() > 0
    (logits.mean() + aux).backward()
    grads = [p.grad for n, p in model.named_parameters() if "conv_lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", case_ids)
def test_merge_and_unload_matches_the_adapter_model(case, make_sam, images):
    model = apply_conv_lora(make_sam(), config_for(case, init_lora_weights=False)).eval()
    expected = masks(model, images)
    merged = model.merge_and_unload().eval()
    assert isinstance(merged, SamModel)
    found = masks(merged, images)
    assert (found - expected).abs().max() <= 1e-5
    # without no_grad the side branches' up-projections add out of place: the same masks
    assert (merged(pixel_values=images, multimask_output=False).pred_masks - found).abs().max() <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision takes the out-of-place path too
        low = masks(merged, images)
    assert (low.float() - found).abs().max() < 0.1 * found.abs().max()
    layers = [m for m in merged.modules() if isinstance(m, ConvLoraMergedLinear)]
    config = config_for(case)
    assert len(layers) == len(expected_targets(config))
    # the trained mask decoder survives the merge
    assert not any("modules_to_save" in n for n, _ in merged.named_modules())


def test_merged_extra_parameters_are_the_side_branches(make_sam):
    config = ConvLoraConfig(r=4, num_experts=3)
    merged = apply_conv_lora(make_sam(), config).merge_and_unload()
    d, out = 32, 96  # tiny encoder width and fused qkv width
    per_layer = 4 * d + 4 * out + 3 * (4 * 4 * 9 + 4) + 2 * 4 * 3
    assert merged_extra_parameters(merged) == 2 * per_layer


def test_in_place_merge_and_unmerge_round_trip(make_sam, images):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    expected = masks(model, images)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.base_model.merge_adapter()
    assert (masks(model, images) - expected).abs().max() <= 1e-5
    model.base_model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.allclose(p, weights[name], atol=1e-6)
    assert (masks(model, images) - expected).abs().max() <= 1e-6


def test_merged_checkpoint_round_trip_and_vanilla_transformers_refuses_it(make_sam, images, tmp_path):
    merged = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).merge_and_unload().eval()
    expected = masks(merged, images)
    save_merged(merged, tmp_path / "merged")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert files == {"config.json", "convlora_model.safetensors", OUTPUT_MARKER}
    restored = load_merged(tmp_path / "merged")
    assert torch.equal(masks(restored, images), expected)
    with pytest.raises(OSError):
        SamModel.from_pretrained(tmp_path / "merged")


def test_plain_lora_is_one_flag_away_and_merges_into_a_vanilla_sam(make_sam, images, tmp_path):
    config = ConvLoraConfig(init_lora_weights=False)
    model = apply_conv_lora(make_sam(), config, plain_lora=True).eval()
    assert model.peft_config["default"].peft_type == "LORA"
    assert model.peft_config["default"].target_modules == config.target_modules
    expected = masks(model, images)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ConvLoraMergedLinear) for m in merged.modules())
    save_merged(merged, tmp_path / "lora")
    vanilla = SamModel.from_pretrained(tmp_path / "lora").eval()
    assert (masks(vanilla, images) - expected).abs().max() <= 1e-5


def test_an_adapter_can_be_trained_further_after_loading(make_sam, images, tmp_path):
    apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(make_sam(), tmp_path, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("conv_lora_experts" in n for n in trainable)
    assert any("mask_decoder" in n for n in trainable)


def test_targets_outside_the_image_encoder_are_refused(make_sam):
    config = ConvLoraConfig(target_modules=["mask_decoder.transformer.layers.0.mlp.lin1"], modules_to_save=None)
    with pytest.raises(ValueError, match="token grid of SAM's image encoder"):
        apply_conv_lora(make_sam(), config)


def test_a_layer_fed_tokens_instead_of_a_grid_fails_with_a_clear_error():
    layer = ConvLoraLinear(torch.nn.Linear(8, 8), "default", ConvLoraConfig(r=2, num_experts=2))
    with pytest.raises(ValueError, match="channels-last grid"):
        layer(torch.randn(2, 5, 8))


def test_applying_to_a_model_that_is_not_sam_is_refused():
    with pytest.raises(ValueError, match="not a SAM model"):
        apply_conv_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_layers_out_of_range_are_refused(make_sam):
    with pytest.raises(ValueError, match="out of range"):
        apply_conv_lora(make_sam(), ConvLoraConfig(layers=[5]))


def test_sam_hq_models_are_supported(images):
    from transformers import SamHQConfig

    from convlora.models import random_sam, tiny_sam_config

    config_dict = tiny_sam_config().to_dict()
    config_dict["vision_config"]["num_hidden_layers"] = 2
    hq_config = SamHQConfig(
        vision_config=config_dict["vision_config"],
        prompt_encoder_config=config_dict["prompt_encoder_config"],
        mask_decoder_config={**config_dict["mask_decoder_config"], "vit_dim": 32},
    )
    base = random_sam(hq_config)
    reference = masks(base, images)
    model = apply_conv_lora(copy.deepcopy(base), ConvLoraConfig(init_lora_weights=False)).eval()
    out = masks(model, images)
    assert out.shape == reference.shape and not torch.equal(out, reference)
    merged = model.merge_and_unload().eval()
    assert (masks(merged, images) - out).abs().max() <= 1e-5
