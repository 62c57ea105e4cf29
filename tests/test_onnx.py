"""ONNX export: the exported files give PyTorch's outputs in onnxruntime (CPU), within 1e-4.

The embedded SAM base is exported through the CLI; SAM-HQ, SAM 2 and SAM 3 run from one table of tiny
random models (a Conv-LoRA model with non-zero adapters, merged LoRA, the plain base, multi-class decoders).
"""

import json

import numpy as np
import pytest
import torch

from convlora.artifact import TaskInfo, export_trained, load_trained
from convlora.cli import main
from convlora.deploy import DEPLOY_FILE, _export, _Graph, _max_diff, export_model, export_onnx, exportable
from convlora.inference import merge_model
from convlora.models import (
    apply_conv_lora,
    apply_lora,
    family_of,
    find_sam,
    install_class_decoder,
    load_sam,
    random_sam,
    sam_config,
    segmentation_logits,
    tiny_sam2_config,
    tiny_sam3_config,
    tiny_sam_config,
)
from convlora.models.processing import IMAGENET_MEAN, IMAGENET_STD, preprocess
from convlora.tuner.config import ConvLoraConfig
from convlora.tuner.moe import ConvExpertMixture

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
TOLERANCE = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_named(onnx_session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [output.name for output in onnx_session.get_outputs()]
    return dict(zip(names, onnx_session.run(None, feed), strict=True))


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


def tiny_sam_hq_config():
    from transformers import SamHQConfig

    parts = {
        key: {k: v for k, v in value.items() if k != "model_type"}
        for key, value in tiny_sam_config().to_dict().items()
        if key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    }
    parts["mask_decoder_config"]["vit_dim"] = 32  # the HQ decoder reads the encoder's first global block (width 32)
    return SamHQConfig(**parts)


# family -> (config builder, input size, the image encoder's outputs after image_embeddings, padding rule)
PYRAMID = ["high_resolution_features_0", "high_resolution_features_1"]
FAMILY_CASES = {
    "sam_hq": (tiny_sam_hq_config, 64, ["intermediate_embeddings"], "box"),
    "sam2": (lambda: tiny_sam2_config(image_size=128), 128, PYRAMID, "always"),
    "sam3": (tiny_sam3_config, 224, PYRAMID, "always"),
}
ADAPTER = {"r": 2, "num_experts": 2, "init_lora_weights": False}


def make_base(family: str):
    return random_sam(FAMILY_CASES[family][0](), seed=0)


def small_lora(model, scale: float = 0.05):
    """PEFT's LoRA with lora_B drawn at ``scale``: PEFT's ``init_lora_weights=False`` draws B as large as A, which
    makes a tiny random SAM 3 so sensitive that float32 PyTorch itself is 6e-5 away from float64."""
    model = apply_lora(model, ConvLoraConfig(r=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def task_of(family: str, method: str, mode: str = "binary") -> TaskInfo:
    names = ["background", "object"] if mode == "binary" else ["background", "a", "b"]
    return TaskInfo(mode, len(names), names, FAMILY_CASES[family][1], f"random:{family}", method)


def family_images(model, count: int, seed: int = 0) -> torch.Tensor:
    family = family_of(model)
    size = family.image_size(find_sam(model))
    return torch.stack([preprocess(image, size, family.input_format)[0] for image in random_images(count, seed)])


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family_export(request, tmp_path_factory):
    """A tiny model of the family with an all-non-zero Conv-LoRA adapter, exported with the encoder / decoder split."""
    family = request.param
    torch.manual_seed(0)
    model = apply_conv_lora(make_base(family), ConvLoraConfig(**ADAPTER)).eval()
    folder = tmp_path_factory.mktemp(f"onnx-{family}")
    info = export_model(model, task_of(family, "conv_lora"), folder)
    return family, folder, model, info


def test_every_familys_prompt_free_model_gives_pytorch_logits_at_another_batch_size(family_export):
    family, folder, model, _ = family_export
    pixels = family_images(model, 3)  # traced at batch 2
    (found,) = session(folder / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(model, pixels)
        base = segmentation_logits(make_base(family), pixels)
    side = 4 * find_sam(model).prompt_encoder.image_embedding_size[0]
    assert found.shape == (3, 1, side, side)
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE
    assert (expected - base).abs().max() > 1e-2, "the adapter should change the logits, or the test proves little"


def test_every_familys_encoder_and_decoder_give_transformers_box_and_point_masks(family_export):
    family, folder, model, _ = family_export
    size, padding = FAMILY_CASES[family][1], FAMILY_CASES[family][3]
    pixels = family_images(model, 1, seed=3)
    encoder = session(folder / "image_encoder.onnx")
    features = run_named(encoder, {"pixel_values": pixels.numpy()})
    decoder = session(folder / "prompt_decoder.onnx")
    box = [size * 0.1, size * 0.15, size * 0.8, size * 0.7]
    points = [[size * 0.3, size * 0.4], [size * 0.7, size * 0.25]]
    pad = padding == "always"  # SAM 2 / SAM 3 end every prompt with a padding point, SAM-HQ only a box-less one
    prompts = {
        "box": (
            {"input_boxes": torch.tensor([[box]])},
            [box[:2], box[2:]] + [[0.0, 0.0]] * pad,
            [2.0, 3.0] + [-1.0] * pad,
        ),
        "points": (
            {"input_points": torch.tensor([[points]]), "input_labels": torch.tensor([[[1, 0]]])},
            [*points, [0.0, 0.0]],
            [1.0, 0.0, -1.0],
        ),
    }
    for name, (torch_prompt, coords, labels) in prompts.items():
        feed = {i.name: features[i.name] for i in decoder.get_inputs() if i.name in features}
        feed |= {"point_coords": np.asarray([coords], np.float32), "point_labels": np.asarray([labels], np.float32)}
        found = run_named(decoder, feed)
        with torch.no_grad():
            expected = model(pixel_values=pixels, multimask_output=False, **torch_prompt)
        assert np.abs(found["masks"] - expected.pred_masks[:, 0].numpy()).max() <= TOLERANCE, name
        assert np.abs(found["iou_scores"] - expected.iou_scores[:, 0].numpy()).max() <= TOLERANCE, name
        if family in ("sam2", "sam3"):
            object_scores = expected.object_score_logits[:, 0].numpy()
            assert np.abs(found["object_score_logits"] - object_scores).max() <= TOLERANCE, name


def test_every_familys_deploy_json_lists_its_files_inputs_outputs_and_input_format(family_export):
    family, folder, model, _ = family_export
    info = json.loads((folder / DEPLOY_FILE).read_text())
    extra_features = FAMILY_CASES[family][2]
    input_format = family_of(model).input_format
    assert info["family"] == family
    assert info["files"] == {name: f"{name}.onnx" for name in ("model", "image_encoder", "prompt_decoder")}
    assert set(info["io"]) == set(info["check"]) == set(info["files"].values()) and info["not_exported"] == {}
    assert all(0 <= diff <= TOLERANCE for diff in info["check"].values())
    encoder, decoder = info["io"]["image_encoder.onnx"], info["io"]["prompt_decoder.onnx"]
    assert list(encoder["outputs"]) == ["image_embeddings", *extra_features]
    assert list(decoder["inputs"]) == [*encoder["outputs"], "point_coords", "point_labels"]
    assert all(decoder["inputs"][name] == encoder["outputs"][name] for name in encoder["outputs"])
    assert decoder["inputs"]["point_coords"]["shape"] == ["batch", "points", 2]
    expected_outputs = ["masks", "iou_scores"] + ["object_score_logits"] * (family != "sam_hq")
    assert list(decoder["outputs"]) == info["prompt_decoder"]["outputs"] == expected_outputs
    assert info["io"]["model.onnx"]["outputs"]["logits"]["shape"][:2] == ["batch", 1]
    assert info["preprocess"]["mean"] == list(input_format.mean) and info["preprocess"]["std"] == list(input_format.std)
    assert info["preprocess"]["pad_to_square"] is input_format.pad_to_square is (family == "sam_hq")
    assert ("as SAM 2 does" in info["prompt_decoder"]["note"]) is (family != "sam_hq")
    assert set(info["tensors"]) >= {"pixel_values", "logits", *extra_features}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
@pytest.mark.parametrize("method", ["lora", "base"])
def test_merged_lora_and_plain_base_models_of_every_family_export_prompt_free(family, method, tmp_path):
    model = small_lora(make_base(family)) if method == "lora" else make_base(family)
    info = export_model(model, task_of(family, method), tmp_path, prompted=False, check=False)
    assert list(info["files"].values()) == ["model.onnx"] and info["check"] is None
    assert set(info["not_exported"]) == {"image_encoder.onnx", "prompt_decoder.onnx"}
    assert "prompted=False" in info["not_exported"]["prompt_decoder.onnx"]
    pixels = family_images(model, 1, seed=5)
    (found,) = session(tmp_path / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(model, pixels)
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE
    if method == "lora":
        with torch.no_grad():
            assert (expected - segmentation_logits(make_base(family), pixels)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sam2", "sam3"])
def test_multiclass_sam2_and_sam3_models_export_one_logit_map_per_class(family, tmp_path):
    base = install_class_decoder(make_base(family), 3)
    with torch.no_grad():  # class tokens start as copies of one token; trained ones differ
        base.mask_decoder.class_tokens.weight.add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(0)
    model = apply_conv_lora(base, ConvLoraConfig(**ADAPTER)).eval()
    info = export_model(model, task_of(family, "conv_lora", "multiclass"), tmp_path, check=False)
    assert list(info["files"].values()) == ["model.onnx"]
    assert "class-query decoder has no prompt input" in info["not_exported"]["prompt_decoder.onnx"]
    pixels = family_images(model, 3, seed=2)
    (found,) = session(tmp_path / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(model, pixels)
    assert found.shape[:2] == (3, 3) and info["io"]["model.onnx"]["outputs"]["logits"]["shape"][:2] == ["batch", 3]
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE
    assert np.abs(found[:, 1] - found[:, 2]).max() > 1e-3, "the class maps should differ"


def test_a_sam2_adapter_folder_exports_through_the_cli(tmp_path):
    base = make_base("sam2")
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(0)
    model = apply_conv_lora(base, ConvLoraConfig(**ADAPTER))
    task = TaskInfo("binary", 2, ["background", "object"], 128, str(tmp_path / "base"), "conv_lora")
    export_trained(model, task, tmp_path / "adapter")
    command = ["export", "--model", str(tmp_path / "adapter"), "--output", str(tmp_path / "onnx")]
    assert main([*command, "--no-prompted", "--no-check"]) == 0
    trained, _ = load_trained(tmp_path / "adapter")
    pixels = family_images(trained, 2, seed=4)
    (found,) = session(tmp_path / "onnx" / "model.onnx").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = segmentation_logits(trained.eval(), pixels)
    assert json.loads((tmp_path / "onnx" / DEPLOY_FILE).read_text())["family"] == "sam2"
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE


def test_sam3_concept_models_are_refused_naming_the_family_and_why():
    from transformers import Sam3Config, Sam3Model

    with torch.device("meta"):
        concept = Sam3Model(Sam3Config(vision_config=tiny_sam3_config().vision_config))
    with pytest.raises(ValueError, match=r"not 'sam3_concept' .*text or exemplar prompts.*Sam3TrackerModel") as error:
        exportable(concept)
    assert "\n" not in str(error.value)


def test_a_task_whose_size_differs_from_the_models_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"task image_size is 96 but the sam2 model takes 128 px inputs"):
        export_model(make_base("sam2"), TaskInfo("binary", 2, ["bg", "fg"], 96, "random:sam2", "base"), tmp_path)


def test_a_graph_that_keeps_the_traced_batch_size_fails_the_check_naming_the_file(tmp_path):
    class FixedBatch(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values.reshape(int(pixel_values.shape[0]), -1).sum(1)  # int(): a constant in the trace

    graph = _Graph(FixedBatch(), {"pixel_values": torch.ones(2, 3)}, ("sums",), {"pixel_values": {0: "batch"}})
    _export(graph, tmp_path / "fixed.onnx", 17)
    with pytest.raises(RuntimeError, match=r"fixed.onnx, traced at batch 2, fails in onnxruntime at batch 1"):
        _max_diff(tmp_path / "fixed.onnx", graph, graph.run(graph.inputs))
