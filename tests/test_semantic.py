"""The multi-class decoder: SAM's decoder math, any number of classes, PEFT and merge round trips."""

import copy

import pytest
import torch

from convlora import ConvLoraConfig, apply_conv_lora, load_merged, save_merged
from convlora.models.semantic import ClassQueryMaskDecoder, install_class_decoder


def test_class_queries_reproduce_sams_own_mask_outputs(make_sam, images):
    """With SAM's four mask tokens as class tokens and identical hypernetwork MLPs, the class decoder computes
    exactly what SAM's decoder computes for its four masks."""
    sam = make_sam()
    decoder = sam.mask_decoder
    for mlp in decoder.output_hypernetworks_mlps[1:]:
        mlp.load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
    with torch.no_grad():
        single = sam(pixel_values=images, multimask_output=False).pred_masks[:, 0]
        multi = sam(pixel_values=images, multimask_output=True).pred_masks[:, 0]
    reference = torch.cat([single, multi], dim=1)  # all four mask tokens, in order
    classes = install_class_decoder(copy.deepcopy(sam), num_classes=4)
    with torch.no_grad():
        classes.mask_decoder.class_tokens.weight.copy_(decoder.mask_tokens.weight)
        out = classes(pixel_values=images).pred_masks[:, 0]
    assert torch.allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("num_classes", [2, 12, 40])
def test_any_number_of_classes_gives_one_map_per_class(make_sam, images, num_classes):
    model = install_class_decoder(make_sam(), num_classes)
    out = model(pixel_values=images).pred_masks
    assert out.shape == (2, 1, num_classes, 32, 32)
    # all class tokens start from the same pretrained token, so all maps start equal
    assert torch.allclose(out[:, :, 0], out[:, :, -1])


def test_class_decoder_adds_only_tokens_and_one_shared_mlp(make_sam):
    sam = make_sam()
    before = sum(p.numel() for p in sam.mask_decoder.parameters())
    mlp = sum(p.numel() for p in sam.mask_decoder.output_hypernetworks_mlps[0].parameters())
    install_class_decoder(sam, 30)
    after = sum(p.numel() for p in sam.mask_decoder.parameters())
    assert after - before == 30 * 16 + mlp


def test_fewer_than_two_classes_is_refused(make_sam):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        install_class_decoder(make_sam(), 1)


def test_multiclass_adapter_trains_class_tokens_and_round_trips_through_merge(make_sam, images, tmp_path):
    model = apply_conv_lora(install_class_decoder(make_sam(), 12), ConvLoraConfig(init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("class_tokens" in n for n in trainable) and any("class_mlp" in n for n in trainable)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=images).pred_masks
    merged = model.merge_and_unload().eval()
    assert isinstance(merged.mask_decoder, ClassQueryMaskDecoder)
    save_merged(merged, tmp_path / "merged")
    restored = load_merged(tmp_path / "merged")
    with torch.no_grad():
        assert (restored(pixel_values=images).pred_masks - expected).abs().max() <= 1e-5
