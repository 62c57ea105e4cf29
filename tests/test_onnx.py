"""ONNX export: the exported files give PyTorch's outputs in onnxruntime (CPU), within 1e-4."""

import json

import numpy as np
import pytest
import torch

from convlora.cli import main
from convlora.deploy import DEPLOY_FILE, export_model, export_onnx, exportable
from convlora.inference import merge_model
from convlora.models import (
    apply_conv_lora,
    install_class_decoder,
    load_sam,
    random_sam,
    sam_config,
    segmentation_logits,
    tiny_sam2_config,
)
from convlora.models.processing import IMAGENET_MEAN, IMAGENET_STD, preprocess
from convlora.training.artifact import TaskInfo, export_trained, load_trained
from convlora.tuner.config import ConvLoraConfig
from convlora.tuner.moe import ConvExpertMixture

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
TOLERANCE = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90 + 7 * i, 128 - 9 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def embedded_export(tmp_path_factory):
    """The embedded base with an all-non-zero Conv-LoRA adapter, saved as training does, exported by the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = apply_conv_lora(load_sam("convlora-tiny"), ConvLoraConfig(init_lora_weights=False))
    task = TaskInfo("binary", 2, ["background", "polyp"], 128, "convlora-tiny", "conv_lora")
    export_trained(model, task, root / "adapter")
    assert main(["export", "--model", str(root / "adapter"), "--format", "onnx", "--output", str(root / "onnx")]) == 0
    trained, _ = load_trained(root / "adapter")
    return root / "onnx", trained


def test_prompt_free_model_gives_pytorch_logits_for_preprocessed_images_at_any_batch_size(embedded_export):
    folder, trained = embedded_export
    pixels = torch.stack([preprocess(image, 128)[0] for image in random_images(3)])  # export used batch 2
    (found,) = session(folder / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(trained, pixels)
        base = segmentation_logits(load_sam("convlora-tiny"), pixels)
    assert found.shape == (3, 1, 64, 64)
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE
    assert (expected - base).abs().max() > 1e-2, "the adapter should change the logits, or the test proves little"


def test_encoder_and_prompt_decoder_give_transformers_box_and_point_masks(embedded_export):
    folder, trained = embedded_export
    pixels = preprocess(random_images(1, seed=3)[0], 128)[0][None]
    (embeddings,) = session(folder / "image_encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
    decoder = session(folder / "prompt_decoder.onnx")
    box = [12.0, 20.0, 100.0, 90.0]
    prompts = {
        "box": ({"input_boxes": torch.tensor([[box]])}, [[box[:2], box[2:]]], [[2.0, 3.0]]),
        # without a box SAM pads the points with one (0, 0) point labelled -1
        "points": (
            {"input_points": torch.tensor([[[[40.0, 50.0], [90.0, 30.0]]]]), "input_labels": torch.tensor([[[1, 0]]])},
            [[[40.0, 50.0], [90.0, 30.0], [0.0, 0.0]]],
            [[1.0, 0.0, -1.0]],
        ),
    }
    for name, (torch_prompt, coords, labels) in prompts.items():
        masks, iou = decoder.run(
            None,
            {
                "image_embeddings": embeddings,
                "point_coords": np.asarray(coords, np.float32),
                "point_labels": np.asarray(labels, np.float32),
            },
        )
        with torch.no_grad():
            expected = trained(pixel_values=pixels, multimask_output=False, **torch_prompt)
        assert np.abs(masks - expected.pred_masks[:, 0].numpy()).max() <= TOLERANCE, name
        assert np.abs(iou - expected.iou_scores[:, 0].numpy()).max() <= TOLERANCE, name


def test_deploy_json_says_input_size_normalisation_classes_and_postprocessing(embedded_export):
    folder, _ = embedded_export
    info = json.loads((folder / DEPLOY_FILE).read_text())
    assert info["preprocess"]["image_size"] == 128
    assert info["preprocess"]["mean"] == list(IMAGENET_MEAN)
    assert info["preprocess"]["std"] == list(IMAGENET_STD)
    assert info["class_names"] == ["background", "polyp"]
    assert info["postprocess"]["shape"] == ["batch", 1, "m", "m"]
    assert set(info["files"].values()) == {"model.onnx", "image_encoder.onnx", "prompt_decoder.onnx"}
    assert all(0 <= diff <= TOLERANCE for diff in info["check"].values())
    assert info["prompt_decoder"]["point_labels"]["2"] == "box top-left corner"


def test_a_merged_model_folder_exports_to_the_same_logits(embedded_export, tmp_path):
    folder, trained = embedded_export
    merge_model(folder.parent / "adapter", tmp_path / "merged")
    info = export_onnx(tmp_path / "merged", tmp_path / "onnx", prompted=False)
    pixels = torch.stack([preprocess(image, 128)[0] for image in random_images(2, seed=7)])
    (found,) = session(tmp_path / "onnx" / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(trained, pixels)
    assert info["check"]["model.onnx"] <= TOLERANCE
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE


def test_a_random_vit_b_shaped_model_exports_within_tolerance(tmp_path):
    # ViT-B widths (768 encoder, 256 neck and decoder, 16 px patches, 14 px windows) at 224 px; 2 of the 12
    # blocks (one windowed, one global) to keep the export to seconds on a CPU
    config = sam_config("vit-b", image_size=224)
    config.vision_config.num_hidden_layers = 2
    config.vision_config.global_attn_indexes = [1]
    torch.manual_seed(0)
    model = apply_conv_lora(random_sam(config, seed=0), ConvLoraConfig(init_lora_weights=False))
    task = TaskInfo("binary", 2, ["background", "object"], 224, "random:vit-b", "conv_lora")
    info = export_model(model, task, tmp_path / "onnx", prompted=False)
    assert list(info["files"].values()) == ["model.onnx"]
    assert info["check"]["model.onnx"] <= TOLERANCE
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    (found,) = session(tmp_path / "onnx" / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(model.eval(), pixels)
    assert found.shape == (1, 1, 56, 56)
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE


def test_multiclass_models_export_one_logit_map_per_class_and_no_prompt_decoder(tmp_path, make_sam):
    base = install_class_decoder(make_sam(), 3)
    model = apply_conv_lora(base, ConvLoraConfig(init_lora_weights=False, num_experts=3))
    task = TaskInfo("multiclass", 3, ["background", "a", "b"], 64, "random:tiny", "conv_lora")
    info = export_model(model, task, tmp_path / "onnx")
    assert list(info["files"].values()) == ["model.onnx"]
    assert info["check"]["model.onnx"] <= TOLERANCE
    (found,) = session(tmp_path / "onnx" / "model.onnx").run(
        None, {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)}
    )
    assert found.shape == (1, 3, 32, 32)


def test_export_merges_the_model_and_routes_every_mixture_densely(make_sam):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(num_experts=2))
    ready = exportable(model)
    mixtures = [m for m in ready.modules() if isinstance(m, ConvExpertMixture)]
    assert mixtures and {m.routing for m in mixtures} == {"dense"}
    assert not any(p.requires_grad for p in ready.parameters())
    assert not hasattr(ready, "peft_config")


def test_families_without_a_checked_export_are_refused_by_name():
    with pytest.raises(ValueError, match=r"not 'sam2'"):
        exportable(random_sam(tiny_sam2_config(), seed=0))
