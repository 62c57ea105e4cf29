"""Sliding-window inference: windows cover the image, blending is exact, one window equals the whole image."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from convlora.cli import main
from convlora.inference import Segmenter, base_task, tile_starts, tiled_logits
from convlora.models import random_sam, tiny_sam_config


@pytest.mark.parametrize(("length", "tile", "overlap"), [(1000, 256, 32), (257, 256, 0), (4096, 512, 64), (50, 64, 8)])
def test_windows_cover_the_image_and_share_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(length, starts[-1] + tile) == length
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap


def test_blending_reproduces_what_every_window_agrees_on():
    image = np.random.default_rng(0).integers(0, 256, size=(70, 95, 3), dtype=np.uint8)

    def per_pixel(crop: np.ndarray) -> torch.Tensor:  # any window sees the same value at a pixel
        return torch.from_numpy(crop[..., :2].astype(np.float32)).permute(2, 0, 1)

    blended = tiled_logits(per_pixel, image, tile=32, overlap=12)
    expected = torch.from_numpy(image[..., :2].astype(np.float32)).permute(2, 0, 1)
    assert blended.shape == (2, 70, 95)
    assert torch.allclose(blended, expected, atol=1e-4)


def test_overlaps_blend_smoothly_between_disagreeing_windows():
    image = np.zeros((10, 40, 3), np.uint8)
    windows = iter([0.0, 1.0])

    def constant(crop: np.ndarray) -> torch.Tensor:
        return torch.full((1, *crop.shape[:2]), next(windows))

    row = tiled_logits(constant, image, tile=24, overlap=8)[0, 0]  # windows [0, 24) and [16, 40)
    assert row[:16].eq(0).all() and row[24:].eq(1).all()
    assert (row[16:24].diff() > 0).all()


def test_an_image_that_fits_one_tile_gives_the_whole_image_prediction():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    image = np.random.default_rng(1).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    whole = segmenter.predict_logits(image)
    tiled = segmenter.predict_logits(image, tile=128, overlap=16)
    assert (whole - tiled).abs().max() <= 1e-6


def test_tiled_prediction_of_a_large_image_keeps_its_size_and_differs_from_shrinking_it():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    image = np.random.default_rng(2).integers(0, 256, size=(200, 330, 3), dtype=np.uint8)
    tiled = segmenter.predict_logits(image, tile=64, overlap=16)
    assert tiled.shape == (1, 200, 330) and torch.isfinite(tiled).all()
    assert not torch.allclose(tiled, segmenter.predict_logits(image), atol=1e-3)


@pytest.mark.parametrize(("tile", "overlap", "message"), [(0, 0, "tile"), (64, 64, "overlap"), (64, -1, "overlap")])
def test_bad_tile_settings_are_refused(tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        tiled_logits(lambda crop: torch.zeros(1, *crop.shape[:2]), np.zeros((100, 100, 3), np.uint8), tile, overlap)


def test_cli_predict_and_evaluate_accept_tile_and_overlap(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, size=(150, 260, 3), dtype=np.uint8)).save(data / "images" / f"{name}.png")
        mask = np.zeros((150, 260), np.uint8)
        mask[20:90, 40:200] = 255
        Image.fromarray(mask).save(data / "masks" / f"{name}.png")
    out = tmp_path / "out"
    args = ["--model", "convlora-tiny", "--tile", "128", "--overlap", "32"]
    assert main(["predict", *args, "--images", str(data / "images"), "--output", str(out)]) == 0
    assert np.asarray(Image.open(out / "masks" / "a.png")).shape == (150, 260)
    assert json.loads((out / "predictions.json").read_text())["tile"] == {"tile": 128, "overlap": 32}
    scores = tmp_path / "scores.json"
    assert main(["evaluate", *args, "--data", str(data), "--output", str(scores)]) == 0
    assert 0.0 <= json.loads(scores.read_text())["iou"] <= 1.0
