"""SAM pre/post-processing in torch, overlays and mask PNGs, checked on known inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convlora.models.processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PALETTE,
    ResizeInfo,
    overlay,
    postprocess_masks,
    preprocess,
    preprocess_batch,
    preprocess_mask,
    resized_shape,
    save_mask_png,
)


@pytest.mark.parametrize(
    ("original", "size", "expected"),
    [
        ((480, 640), 1024, (768, 1024)),
        ((640, 480), 1024, (1024, 768)),
        ((100, 100), 64, (64, 64)),
        ((3, 1000), 64, (1, 64)),  # never below one pixel
        ((30, 61), 64, (31, 64)),  # rounds half up like SAM: 30 * 64 / 61 = 31.47
    ],
)
def test_resized_shape_scales_the_longest_side_to_the_input_size(original, size, expected):
    assert resized_shape(original, size) == expected


def test_preprocess_normalises_with_imagenet_mean_and_std():
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 128
    pixel_values, info = preprocess(image, input_size=8)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert pixel_values.dtype == torch.float32
    assert info == ResizeInfo((8, 8), (8, 8), 8)
    for channel in range(3):
        assert torch.allclose(pixel_values[channel], torch.full((8, 8), expected[channel]), atol=1e-6)


def test_preprocess_pads_bottom_right_with_zero_after_resizing():
    image = np.full((20, 40, 3), 255, np.uint8)  # wide image: padding goes to the bottom
    pixel_values, info = preprocess(image, input_size=64)
    assert pixel_values.shape == (3, 64, 64)
    assert info.resized_size == (32, 64)
    assert torch.count_nonzero(pixel_values[:, 32:]) == 0
    assert (pixel_values[:, :32] > 2.0).all()  # white, normalised
    tall, info = preprocess(np.full((40, 20, 3), 255, np.uint8), input_size=64)
    assert info.resized_size == (64, 32)
    assert torch.count_nonzero(tall[:, :, 32:]) == 0 and (tall[:, :, :32] > 2.0).all()


def test_preprocess_downscaling_is_antialiased():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes average to grey when shrunk with antialiasing
    pixel_values, _ = preprocess(stripes, input_size=16)
    grey = (127.5 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    interior = pixel_values[0, :, 1:-1]  # the filter's support is clipped at the border
    assert torch.allclose(interior, torch.full_like(interior, grey), atol=1e-4)


def test_preprocess_rejects_non_rgb_uint8_input():
    with pytest.raises(ValueError, match=r"uint8 \(h, w, 3\)"):
        preprocess(np.zeros((8, 8), np.uint8), 16)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32), 16)


def test_preprocess_batch_stacks_images_of_different_sizes():
    batch, infos = preprocess_batch([np.zeros((10, 20, 3), np.uint8), np.zeros((30, 15, 3), np.uint8)], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert [i.original_size for i in infos] == [(10, 20), (30, 15)]
    assert [i.resized_size for i in infos] == [(16, 32), (32, 16)]


def test_preprocess_mask_keeps_ids_and_marks_padding_as_ignore():
    mask = np.zeros((10, 20), np.uint8)
    mask[:, 10:] = 3
    labels = preprocess_mask(mask, input_size=40)
    assert labels.dtype == torch.int64 and labels.shape == (40, 40)
    assert (labels[20:] == 255).all()
    assert (labels[:20, :20] == 0).all() and (labels[:20, 20:] == 3).all()
    assert set(preprocess_mask(np.random.default_rng(0).integers(0, 5, (13, 17)), 32).unique().tolist()) <= {
        0, 1, 2, 3, 4, 255,
    }  # fmt: skip


def test_mask_survives_preprocess_and_postprocess_round_trip():
    original = np.zeros((48, 96), np.int64)  # resized to (32, 64) inside a 64x64 input
    original[6:30, 12:45] = 1
    original[24:42, 60:90] = 2
    labels = preprocess_mask(original, input_size=64)
    one_hot = F.one_hot(labels.clamp(max=2), 3).permute(2, 0, 1).float()  # (3, 64, 64); padding counts as class 2
    logits = F.avg_pool2d(one_hot[None], 4) * 20 - 10  # (1, 3, 16, 16): SAM's quarter-size logits
    restored = postprocess_masks(logits, ResizeInfo.fit(original.shape, 64))
    assert restored.shape == (1, 3, 48, 96)
    predicted = restored.argmax(1)[0].numpy()
    agreement = (predicted == original).mean()
    assert agreement > 0.97
    assert (predicted[8:28, 14:43] == 1).all() and (predicted[26:40, 62:88] == 2).all()


def test_postprocess_crops_the_padding_before_resizing():
    info = ResizeInfo.fit((20, 80), 64)  # resized (16, 64): rows 16..63 are padding
    logits = torch.full((1, 1, 64, 64), -5.0)
    logits[..., 16:, :] = 5.0  # only padding is positive
    out = postprocess_masks(logits, info)
    assert out.shape == (1, 1, 20, 80)
    assert (out < 0).all()  # a crop at the wrong place would bring positive padding in
    half = postprocess_masks(torch.zeros(2, 4, 16, 16, dtype=torch.float16), info)
    assert half.dtype == torch.float32 and half.shape == (2, 4, 20, 80)


def test_postprocess_rejects_non_square_logits():
    with pytest.raises(ValueError, match=r"\(b, c, s, s\)"):
        postprocess_masks(torch.zeros(1, 1, 16, 8), ResizeInfo.fit((8, 8), 64))


def test_overlay_colours_classes_and_leaves_background_and_ignore_alone():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [255, 1, 0]])
    out = overlay(image, mask, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert (out[0, 0] == 100).all() and (out[1, 0] == 100).all() and (out[1, 2] == 100).all()
    assert out[0, 1].tolist() == np.rint(0.5 * 100 + 0.5 * PALETTE[0]).astype(int).tolist()
    assert out[0, 2].tolist() == np.rint(0.5 * 100 + 0.5 * PALETTE[1]).astype(int).tolist()
    assert overlay(image, torch.tensor(mask), alpha=1.0)[0, 1].tolist() == PALETTE[0].tolist()


def test_overlay_rejects_bad_alpha_and_mismatched_mask():
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), int), alpha=1.5)
    with pytest.raises(ValueError, match=r"mask shape \(3, 2\)"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2), int))


def test_save_mask_png_writes_binary_as_0_255_and_ids_unchanged(tmp_path):
    binary = np.array([[0, 1], [1, 0]], bool)
    path = save_mask_png(binary, tmp_path / "binary.png", binary=True)
    assert np.asarray(Image.open(path)).tolist() == [[0, 255], [255, 0]]
    ids = np.array([[0, 3, 7], [255, 1, 2]])
    with Image.open(save_mask_png(torch.tensor(ids), tmp_path / "sub" / "ids.png")) as saved:
        assert saved.mode == "L"
        assert np.asarray(saved).tolist() == ids.tolist()
    with Image.open(save_mask_png(np.array([[0, 300]]), tmp_path / "wide.png")) as saved:
        assert np.asarray(saved).tolist() == [[0, 300]]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["binary.png", "ids.png", "sub", "wide.png"]  # no temp files


def test_save_mask_png_rejects_bad_masks(tmp_path):
    with pytest.raises(ValueError, match="only 0 and 1"):
        save_mask_png(np.array([[0, 2]]), tmp_path / "a.png", binary=True)
    with pytest.raises(ValueError, match="negative"):
        save_mask_png(np.array([[0, -1]]), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.png"):
        save_mask_png(np.array([[0, 1]]), tmp_path / "a.jpg")
    assert not list(tmp_path.iterdir())


def test_families_that_resize_to_the_square_get_their_own_normalisation_and_no_padding():
    from convlora.models.family import FAMILIES
    from convlora.models.processing import InputFormat, ResizeInfo

    sam3 = FAMILIES["sam3"].input_format
    assert sam3 == InputFormat((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=False)
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :10] = 255  # left half white
    pixel_values, info = preprocess(image, 32, sam3)
    assert info == ResizeInfo((10, 20), (32, 32), 32)
    # stretched to the whole square (no padding), white -> (1 - 0.5) / 0.5 = 1, black -> -1
    assert pixel_values[:, :, :14].min().item() == pytest.approx(1.0)
    assert pixel_values[:, :, 18:].max().item() == pytest.approx(-1.0)
    labels = preprocess_mask((image[..., 0] > 0).astype(np.uint8), 32, pad_to_square=False)
    assert labels.shape == (32, 32) and labels.max().item() == 1 and (labels == 255).sum().item() == 0
    logits = torch.full((1, 1, 8, 8), -5.0)
    logits[..., :4] = 5.0
    restored = postprocess_masks(logits, info)
    assert restored.shape == (1, 1, 10, 20)
    assert bool((restored[0, 0, :, :8] > 0).all()) and bool((restored[0, 0, :, 12:] < 0).all())


def test_a_sam2_dataset_reads_images_the_way_the_family_expects(tmp_path):
    from convlora.data import load_datasets
    from convlora.models.family import FAMILIES
    from convlora.synthetic import write_dataset

    write_dataset("polyp", tmp_path / "d", train=2, val=1, test=0, size=40, seed=0)
    data = load_datasets(tmp_path / "d", image_size=32)
    data.set_image_size(32, FAMILIES["sam2"].input_format)
    item = data.train[0]
    assert item["labels"].shape == (32, 32) and int((item["labels"] == 255).sum()) == 0  # no padded border
    assert data.train.resize_info(0).resized_size == (32, 32)
