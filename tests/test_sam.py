"""SAM glue: variants and parameter counts, image-size changes, loading errors."""

import pytest
import torch
from transformers import SamModel

from convlora import ConvLoraConfig, load_sam, resize_sam
from convlora.cli import main
from convlora.models import parameter_counts, tiny_sam_config


def test_vit_b_counts_match_the_released_model_and_the_adapter_arithmetic():
    lora = parameter_counts("vit-b", ConvLoraConfig(r=4), plain_lora=True)
    conv = parameter_counts("vit-b", ConvLoraConfig(r=4))
    assert lora["model"] == 93_735_728  # SAM ViT-B as released
    assert lora["mask_decoder"] == 4_058_340
    # 12 layers x r (d_in + d_out) = 12 * 4 * (768 + 2304)
    assert lora["adapter"] == 12 * 4 * (768 + 2304) == 147_456
    # plus 8 full 3x3 experts (9 r^2 + r) and gate + noise weights (2 r e) per layer
    assert conv["conv_experts"] == 12 * (8 * (9 * 16 + 4) + 2 * 4 * 8) == 14_976
    assert conv["adapter"] == lora["adapter"] + conv["conv_experts"]
    assert conv["trainable"] == conv["adapter"] + conv["mask_decoder"]
    assert conv["merged_extra"] == conv["adapter"] and lora["merged_extra"] == 0


def test_params_command_prints_a_table_for_each_variant(capsys):
    assert main(["params", "--variants", "vit-b", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "| vit-b | 93,735,728 | LoRA | 147,456 |" in out
    assert "| vit-b | 93,735,728 | Conv-LoRA | 162,432 | 14,976 |" in out


def test_resize_changes_the_input_and_mask_size(make_sam):
    model = resize_sam(make_sam(), 96)
    assert model.config.vision_config.image_size == 96
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 96, 96), multimask_output=False).pred_masks
    assert out.shape[-2:] == (48, 48)
    assert model.vision_encoder.pos_embed.shape == (1, 12, 12, 32)


def test_resize_to_the_same_size_is_a_no_op(make_sam):
    model = make_sam()
    assert resize_sam(model, 64) is model


def test_resized_global_attention_equals_sams_run_time_interpolation(make_sam):
    original = make_sam()
    resized = resize_sam(make_sam(), 128)
    grid = torch.randn(1, 16, 16, 32)
    # layer 1 is the global-attention layer of the tiny config
    with torch.no_grad():
        at_run_time = original.vision_encoder.layers[1].attn(grid)[0]
        pre_resized = resized.vision_encoder.layers[1].attn(grid)[0]
    assert torch.allclose(at_run_time, pre_resized, atol=1e-6)


@pytest.mark.parametrize("size", [100, 0, -8, 64.0])
def test_resize_refuses_sizes_that_are_not_multiples_of_the_patch(make_sam, size):
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        resize_sam(make_sam(), size)


def test_load_sam_reads_a_local_transformers_checkpoint_and_resizes_it(make_sam, tmp_path):
    make_sam().save_pretrained(tmp_path / "sam")
    model = load_sam(tmp_path / "sam", image_size=128)
    assert isinstance(model, SamModel) and model.config.vision_config.image_size == 128


def test_load_sam_errors_name_the_path_and_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_sam(tmp_path / "empty")
    (tmp_path / "weights.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass the directory"):
        load_sam(tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not an embedded model"):
        load_sam("no-such-org/no-such-model", local_files_only=True)


def test_tiny_config_validates_its_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_sam_config(image_size=60)
