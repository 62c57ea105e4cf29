"""What a client hands the Segmenter: array-like prompts, in-memory and batched images, plain PEFT adapter folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convlora import ConvLoraConfig, apply_conv_lora
from convlora.artifact import load_trained
from convlora.cli import main
from convlora.data import read_image
from convlora.data.prompt_files import build_prompts
from convlora.inference import Segmenter, base_task
from convlora.models import find_sam, load_sam
from convlora.models.adapters import apply_lora


def picture(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def segmenter(make_sam):
    return Segmenter(make_sam(), base_task(64, "random"))


def count_encoder_calls(model) -> list[int]:
    calls = [0]
    find_sam(model).vision_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- prompts as arrays ------------------------------------------------------------------------------------------

DETECTIONS = [[50, 40, 150, 110], [3, 7, 60, 90], [100, 0, 159, 119]]


def test_detector_boxes_as_float32_arrays_give_the_masks_of_the_same_boxes_as_lists(segmenter):
    image = picture()
    expected, expected_scores = segmenter.predict(image, boxes=DETECTIONS, return_scores=True)
    assert expected.shape == (3, 120, 160)
    for boxes in (
        np.array(DETECTIONS, np.float32),  # what a detector returns
        np.array(DETECTIONS, np.int64),
        torch.tensor(DETECTIONS, dtype=torch.float32),
        tuple(tuple(box) for box in DETECTIONS),
        [[np.float32(v) for v in box] for box in DETECTIONS],  # numpy numbers inside lists
        [np.array(box, np.float64) for box in DETECTIONS],
    ):
        masks, scores = segmenter.predict(image, boxes=boxes, return_scores=True)
        assert np.array_equal(masks, expected) and np.array_equal(scores, expected_scores)


def test_a_flat_array_of_four_numbers_is_one_box(segmenter):
    image = picture()
    one = segmenter.predict(image, boxes=np.array([50, 40, 150, 110], np.float32))
    assert one.shape == (1, 120, 160)
    assert np.array_equal(one, segmenter.predict(image, boxes=[[50, 40, 150, 110]]))


def test_points_and_labels_as_arrays_give_the_masks_of_the_same_lists(segmenter):
    image = picture()
    one_prompt = segmenter.predict(image, points=[[30, 40], [90, 60]], point_labels=[1, 0])
    as_arrays = segmenter.predict(
        image, points=np.array([[30, 40], [90, 60]], np.float32), point_labels=np.array([1, 0])
    )
    assert one_prompt.shape == (1, 120, 160) and np.array_equal(as_arrays, one_prompt)
    groups, labels = [[[30, 40], [90, 60]], [[10, 10], [20, 30]]], [[1, 0], [1, 1]]
    per_prompt = segmenter.predict(image, points=groups, point_labels=labels)
    as_tensors = segmenter.predict(image, points=torch.tensor(groups), point_labels=torch.tensor(labels))
    assert per_prompt.shape == (2, 120, 160) and np.array_equal(as_tensors, per_prompt)


def test_build_prompts_gives_the_same_arrays_for_lists_arrays_tensors_and_numpy_numbers():
    expected = build_prompts(boxes=[[1, 2, 30, 40]], points=[[[5, 6], [7, 8]]], point_labels=[[1, 0]])
    for boxes, points, labels in (
        (np.array([1, 2, 30, 40], np.int32), np.array([[[5, 6], [7, 8]]], np.float32), np.array([[1, 0]])),
        (torch.tensor([[1.0, 2.0, 30.0, 40.0]]), torch.tensor([[[5, 6], [7, 8]]]), torch.tensor([[1, 0]])),
        (((1, 2, 30, 40),), (((5, 6), (7, 8)),), ((np.int64(1), np.int64(0)),)),
    ):
        got = build_prompts(boxes=boxes, points=points, point_labels=labels)
        for key in ("boxes", "points", "point_labels"):
            assert np.array_equal(getattr(got, key), getattr(expected, key)), key
            assert getattr(got, key).dtype == getattr(expected, key).dtype


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"boxes": np.zeros((2, 5))}, r"predict: boxes is an array of shape \(2, 5\); expected \(n, 4\), or \(4,\)"),
        ({"boxes": np.zeros((1, 2, 4))}, r"boxes is an array of shape \(1, 2, 4\); expected \(n, 4\)"),
        (
            {"points": np.zeros(2)},
            r"points is an array of shape \(2,\); expected \(n, 2\) for one prompt or \(k, n, 2\)",
        ),
        ({"points": np.ones((2, 3))}, r"points is an array of shape \(2, 3\)"),
        ({"points": np.ones((2, 2)), "point_labels": np.ones((1, 1, 2))}, r"point_labels is an array of shape"),
        ({"points": np.ones((2, 2)), "point_labels": np.array([1, 2])}, r"points\[1\] has label 2"),
        ({"boxes": np.array([[5, 5, 1, 1]], np.float32)}, r"boxes\[0\] is \[5.0, 5.0, 1.0, 1.0\]: x0 > x1"),
        ({"boxes": np.array([[0, 0, 10, 500]])}, r"boxes\[0\] is \[0, 0, 10, 500\], outside the 160x120"),
        ({"boxes": np.float32(3)}, r"boxes is an array of shape \(\); expected \(n, 4\)"),
        ({"boxes": 3}, r"boxes is 3; expected a list or array"),
    ],
)
def test_prompts_of_the_wrong_shape_are_refused_naming_argument_found_and_expected(segmenter, prompt, message):
    with pytest.raises(ValueError, match=message) as error:
        segmenter.predict(picture(), **prompt)
    assert "\n" not in str(error.value)


def test_a_detector_that_found_nothing_gives_no_masks_not_a_prompt_free_map(segmenter):
    masks, scores = segmenter.predict(picture(), boxes=np.zeros((0, 4), np.float32), return_scores=True)
    assert masks.shape == (0, 120, 160) and masks.dtype == bool and scores.shape == (0,)
    assert segmenter.predict(picture(), boxes=[]).shape == (0, 120, 160)


# --- images in memory and in lists ------------------------------------------------------------------------------


def test_rgba_array_and_pil_image_are_read_like_the_rgba_png_file(segmenter, tmp_path):
    rgba = np.concatenate([picture(), np.random.default_rng(5).integers(0, 256, (120, 160, 1), dtype=np.uint8)], -1)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert np.array_equal(read_image(path), rgba[..., :3])  # the file reader drops alpha without blending
    expected = segmenter.predict_logits(path)
    for image in (rgba, Image.fromarray(rgba, "RGBA"), Image.open(path)):
        assert torch.equal(segmenter.predict_logits(image), expected)
    assert np.array_equal(segmenter.predict(rgba, boxes=DETECTIONS), segmenter.predict(path, boxes=DETECTIONS))
    assert not torch.equal(segmenter.predict_logits(picture()[..., ::-1].copy()), expected)  # the input matters


def test_grey_arrays_and_pil_images_are_read_like_the_grey_png_file(segmenter, tmp_path):
    grey = picture()[..., 0].copy()
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    expected = segmenter.predict_logits(path)
    assert torch.equal(segmenter.predict_logits(grey), expected)
    assert torch.equal(segmenter.predict_logits(Image.open(path)), expected)
    assert torch.equal(segmenter.predict_logits(np.repeat(grey[..., None], 3, -1)), expected)


def test_a_pil_image_gets_its_exif_orientation_applied_like_its_file(segmenter, tmp_path):
    path = tmp_path / "turned.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(picture()).save(path, exif=exif)
    mask = segmenter.predict(Image.open(path))
    assert mask.shape == (160, 120)
    assert np.array_equal(mask, segmenter.predict(path))


def test_a_list_of_images_gives_the_one_by_one_results_in_batches(segmenter, tmp_path):
    Image.fromarray(picture(50, 90, seed=3)).save(tmp_path / "a.png")
    images = [picture(), tmp_path / "a.png", Image.fromarray(picture(64, 64, seed=1)), picture(33, 20, seed=2)[..., 0]]
    single = [segmenter.predict_logits(image) for image in images]
    calls = count_encoder_calls(segmenter.model)
    batched = segmenter.predict_logits(images, batch_size=3)
    assert calls[0] == 2  # 3 + 1 images
    assert [tuple(logits.shape) for logits in batched] == [(1, 120, 160), (1, 50, 90), (1, 64, 64), (1, 33, 20)]
    for alone, together in zip(single, batched, strict=True):
        assert torch.allclose(alone, together, atol=1e-5)
    masks = segmenter.predict(tuple(images), batch_size=2)
    assert isinstance(masks, list) and all(mask.dtype == np.uint8 for mask in masks)
    for image, mask in zip(images, masks, strict=True):
        assert np.array_equal(mask, segmenter.predict(image))
    probabilities = segmenter.predict_proba(images)
    assert np.allclose(probabilities[1], segmenter.predict_proba(images[1]), atol=1e-6)
    assert segmenter.predict([]) == []


def test_a_list_of_images_takes_one_prompt_entry_per_image(segmenter):
    images = [picture(), picture(48, 80, seed=1)]
    boxes = [np.array(DETECTIONS, np.float32), np.array([2, 3, 40, 30], np.float32)]
    results = segmenter.predict(images, boxes=boxes, return_scores=True)
    for image, box, (masks, scores) in zip(images, boxes, results, strict=True):
        alone, alone_scores = segmenter.predict(image, boxes=box, return_scores=True)
        assert np.array_equal(masks, alone) and np.array_equal(scores, alone_scores)
    assert [masks.shape for masks, _ in results] == [(3, 120, 160), (1, 48, 80)]
    points = segmenter.predict(images, points=[[[5, 5]], None])
    assert points[0].shape == (1, 120, 160) and points[1].shape == (48, 80)  # None: that image prompt-free
    with pytest.raises(ValueError, match=r"predict: 2 images but boxes has 3 entries; with a list of images"):
        segmenter.predict(images, boxes=DETECTIONS)
    with pytest.raises(ValueError, match=r"predict: image 1: boxes\[0\] is \[0, 0, 90, 10\], outside the 80x48"):
        segmenter.predict(images, boxes=[[0, 0, 10, 10], [0, 0, 90, 10]])


def test_a_stacked_array_of_images_is_refused_pointing_to_a_list(segmenter):
    with pytest.raises(ValueError, match=r"shape \(2, 120, 160, 3\), a stack of images; pass a list"):
        segmenter.predict(np.stack([picture(), picture()]))


# --- plain PEFT adapter folders ---------------------------------------------------------------------------------


def plain_peft_folder(make_sam, folder, apply) -> Segmenter:
    """Save a non-identity adapter with PEFT's own save_pretrained; returns a Segmenter around the PeftModel."""
    torch.manual_seed(4)
    model = apply(make_sam(), ConvLoraConfig(r=2, num_experts=2, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # the fine-tuned mask decoder
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return Segmenter(model.eval(), base_task(64, "peft"))


@pytest.mark.parametrize(("apply", "method"), [(apply_conv_lora, "conv_lora"), (apply_lora, "lora")])
def test_a_plain_peft_folder_loads_onto_the_given_base_with_the_peft_models_outputs(
    make_sam, tiny_sam_dir, tmp_path, apply, method
):
    folder = tmp_path / "adapter"
    reference = plain_peft_folder(make_sam, folder, apply)
    assert not (folder / "convlora_task.json").exists() and not (folder / "config.json").exists()
    loaded = Segmenter.from_pretrained(folder, base_model=str(tiny_sam_dir), device="cpu")
    assert loaded.task.method == method and loaded.task.mode == "binary" and loaded.task.image_size == 64
    image = picture()
    expected = reference.predict_logits(image)
    assert torch.equal(loaded.predict_logits(image), expected)
    base = Segmenter(load_sam(tiny_sam_dir), base_task(64, "base")).predict_logits(image)
    assert (expected - base).abs().max() > 1e-3  # the adapter and its decoder changed the outputs
    model, task = load_trained(folder, base_model=str(tiny_sam_dir))
    assert task.base_model == str(tiny_sam_dir) and torch.equal(Segmenter(model, task).predict_logits(image), expected)


def test_a_plain_peft_folder_without_a_base_names_the_recorded_base(make_sam, tiny_sam_dir, tmp_path):
    folder = tmp_path / "adapter"
    model = apply_conv_lora(load_sam(tiny_sam_dir), ConvLoraConfig(r=2, num_experts=2))
    model.save_pretrained(folder)
    recorded = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_sam_dir)
    message = f"{folder} is a plain PEFT adapter folder .*pass base_model / --base-model.*'{recorded}'"
    with pytest.raises(ValueError, match=message) as error:
        Segmenter.from_pretrained(folder, device="cpu")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):
        load_trained(folder)


def test_cli_predict_takes_a_plain_peft_folder_with_base_model(make_sam, tiny_sam_dir, tmp_path, capsys):
    folder = tmp_path / "adapter"
    reference = plain_peft_folder(make_sam, folder, apply_conv_lora)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(2):
        Image.fromarray(picture(60 + seed * 10, 90, seed=seed)).save(images / f"im{seed}.png")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(folder), "--images", str(images), "--output", str(out)]
    assert main([*argv, "--base-model", str(tiny_sam_dir)]) == 0
    for seed in range(2):
        written = np.asarray(Image.open(out / "masks" / f"im{seed}.png"))
        expected = reference.predict(images / f"im{seed}.png")
        assert written.shape == expected.shape and np.array_equal(written > 0, expected == 1)
    assert main([*argv[:-1], str(tmp_path / "out2")]) == 2
    assert "pass base_model / --base-model" in capsys.readouterr().err
