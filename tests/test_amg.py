"""Automatic mask generation: it finds the objects of a drawn image, encodes each crop once, suppresses
duplicates exactly as specified, and runs on every family and on adapters."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from convlora import ConvLoraConfig, apply_conv_lora, load_sam
from convlora.evaluation import instance_scores
from convlora.instances import AmgConfig, generate_masks, nms
from convlora.instances import amg as amg_module
from convlora.instances.amg import box_iou, clean_regions, crop_boxes, mask_boxes, point_grid, stability_scores
from convlora.models import random_sam, tiny_sam2_config, tiny_sam_config

RELAXED = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.9}


def drawn_discs() -> tuple[np.ndarray, np.ndarray]:
    """Three flat-coloured discs on a noisy grey background, and their instance ids."""
    rng = np.random.default_rng(0)
    height, width = 160, 200
    image = rng.normal(110, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
    truth = np.zeros((height, width), np.int32)
    yy, xx = np.mgrid[:height, :width]
    for i, (cy, cx, radius, colour) in enumerate(
        [(50, 50, 25, (220, 60, 60)), (100, 140, 30, (60, 200, 80)), (120, 45, 18, (60, 80, 220))]
    ):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[disc] = colour
        truth[disc] = i + 1
    return image, truth


@pytest.fixture(scope="module")
def embedded() -> nn.Module:
    return load_sam("convlora-tiny").eval()


def test_amg_on_the_embedded_base_finds_every_disc_of_a_drawn_image(embedded):
    image, truth = drawn_discs()
    found = generate_masks(embedded, image, AmgConfig(points_per_side=8, **RELAXED))
    assert found.masks.shape[1:] == truth.shape
    for object_id in (1, 2, 3):
        disc = truth == object_id
        best = max(np.logical_and(m, disc).sum() / np.logical_or(m, disc).sum() for m in found.masks)
        assert best > 0.9, (object_id, best)
    scores = instance_scores(truth, found.id_map())
    assert scores["recall_50"] == 1.0
    assert np.all(np.diff(found.scores) <= 0)  # best first


def test_the_image_encoder_runs_once_per_crop_not_once_per_batch_of_points(embedded, monkeypatch):
    calls = []
    real = amg_module.encode_images

    def counting(model, pixel_values):
        calls.append(tuple(pixel_values.shape))
        return real(model, pixel_values)

    monkeypatch.setattr(amg_module, "encode_images", counting)
    image, _ = drawn_discs()
    generate_masks(embedded, image, AmgConfig(points_per_side=6, points_per_batch=4, crop_n_layers=1, **RELAXED))
    assert len(calls) == 1 + 4  # the whole image, then the four crops of layer 1; 9 point batches each


def test_crops_from_smaller_crops_win_and_masks_cut_by_a_crop_edge_are_dropped(embedded):
    image, truth = drawn_discs()
    found = generate_masks(embedded, image, AmgConfig(points_per_side=8, crop_n_layers=1, **RELAXED))
    height, width = truth.shape
    inner = 0
    for box, (x0, y0, x1, y1) in zip(found.boxes, found.crop_boxes, strict=True):
        if (x0, y0, x1, y1) == (0, 0, width, height):
            continue
        inner += 1  # a mask of an inner crop never touches that crop's edges inside the image
        assert (x0 == 0 or box[0] > x0) and (y0 == 0 or box[1] > y0)
        assert (x1 == width or box[2] < x1 - 1) and (y1 == height or box[3] < y1 - 1)
    assert inner > 0
    boxes = torch.as_tensor(found.boxes).float()
    assert box_iou(boxes, boxes).fill_diagonal_(0).max() <= 0.7 + 1e-6  # no two survivors overlap more


def test_nms_equals_a_brute_force_greedy_suppression():
    rng = np.random.default_rng(3)
    for _ in range(20):
        corners = rng.integers(0, 40, (12, 2))
        boxes = torch.as_tensor(np.concatenate([corners, corners + rng.integers(2, 20, (12, 2))], axis=1)).float()
        scores = torch.as_tensor(rng.random(12)).float()
        kept, order = [], sorted(range(12), key=lambda i: -float(scores[i]))
        for i in order:
            if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= 0.5 for j in kept):
                kept.append(i)
        assert nms(boxes, scores, 0.5).tolist() == kept


def test_box_iou_mask_boxes_and_stability_scores_on_hand_made_values():
    assert box_iou(torch.tensor([[0.0, 0, 3, 3]]), torch.tensor([[2.0, 2, 5, 5]])).item() == pytest.approx(4 / 28)
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    assert mask_boxes(masks).tolist() == [[2, 1, 5, 2], [0, 0, 0, 0]]
    logits = torch.tensor([[[2.0, 2.0, 0.0, -0.5, -2.0]]])
    assert stability_scores(logits, 1.0).tolist() == [0.5]  # 2 pixels above +1 of 4 above -1


def test_point_grid_and_crops_cover_the_image():
    assert point_grid(3).shape == (9, 2) and point_grid(3).min() > 0 and point_grid(3).max() < 1
    for height, width, layers in itertools.product((90, 301), (120, 257), (0, 1, 2)):
        crops = crop_boxes(height, width, layers, 512 / 1500)
        assert len(crops) == 1 + sum(4**k for k in range(1, layers + 1))
        for layer in range(1, layers + 1):
            covered = np.zeros((height, width), bool)
            for (x0, y0, x1, y1), k in crops:
                if k == layer:
                    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                    covered[y0:y1, x0:x1] = True
            assert covered.all()


def test_small_islands_and_holes_are_cleaned_up():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False  # a one-pixel hole
    mask[17, 17] = True  # a one-pixel island
    cleaned = clean_regions(mask, 4)
    assert cleaned[5, 5] and not cleaned[17, 17] and cleaned.sum() == 100


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_amg_runs_on_adapters_and_an_identity_adapter_changes_nothing(family):
    config = tiny_sam_config() if family == "sam" else tiny_sam2_config()
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    settings = AmgConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    base = generate_masks(random_sam(config, seed=0).eval(), image, settings)
    adapted = apply_conv_lora(random_sam(config, seed=0), ConvLoraConfig(r=2, num_experts=2)).eval()
    found = generate_masks(adapted, image, settings)
    assert len(base) > 0 and np.array_equal(found.masks, base.masks) and np.allclose(found.scores, base.scores)
    assert found.id_map().max() <= len(found)


def test_bad_settings_and_images_are_refused_naming_them(embedded):
    with pytest.raises(ValueError, match="points_per_side"):
        AmgConfig(points_per_side=0)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        AmgConfig(pred_iou_thresh=1.5)
    with pytest.raises(ValueError, match="uint8"):
        generate_masks(embedded, np.zeros((10, 10), np.float32))


def test_an_image_without_objects_gives_an_empty_id_map(embedded):
    image = np.full((64, 80, 3), 128, np.uint8)
    found = generate_masks(embedded, image, AmgConfig(points_per_side=4, pred_iou_thresh=1.0))
    assert len(found) == 0 and found.id_map().shape == (64, 80) and not found.id_map().any()


def test_predict_instances_writes_a_16_bit_id_image_and_coco_rle_that_decode_to_the_same_objects(tmp_path, capsys):
    from PIL import Image

    from convlora.cli import main
    from convlora.instances.files import decode_annotation

    image, truth = drawn_discs()
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "discs.png")
    argv = ["predict", "--model", "convlora-tiny", "--images", str(tmp_path / "images"), "--output"]
    argv += [str(tmp_path / "out"), "--instances", "amg", "--points_per_side", "8"]
    argv += ["--pred_iou_thresh", "0.7", "--stability_score_thresh", "0.9"]
    assert main(argv) == 0
    with Image.open(tmp_path / "out" / "instances" / "discs.png") as written:
        assert written.mode.startswith("I;16") or written.mode == "I"
        ids = np.asarray(written).astype(np.int64)
    record = json.loads((tmp_path / "out" / "instances" / "discs.json").read_text())
    entries = record["annotations"]
    assert len(entries) == ids.max() >= 3
    assert instance_scores(truth, ids)["recall_50"] == 1.0
    for entry in entries:
        mask = decode_annotation(entry)
        assert mask.shape == truth.shape and mask.sum() == entry["area"]
        x, y, w, h = entry["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        visible = ids == entry["id"]  # where it is not covered by a smaller object, the id map shows it
        assert visible.any() and not (visible & ~mask).any()
    assert main([*argv[:-6], "--instances", "ais"]) == 2
    assert "use 'amg'" in capsys.readouterr().err


def test_id_maps_above_65535_objects_are_written_as_32_bit_tiff(tmp_path):
    import tifffile

    from convlora.instances.files import save_id_map

    ids = np.arange(70000, dtype=np.int64).reshape(280, 250)
    path = save_id_map(ids, tmp_path / "many")
    assert path.suffix == ".tif" and np.array_equal(tifffile.imread(path), ids)
    small = save_id_map(ids[:2, :2] + 300, tmp_path / "few")
    from PIL import Image

    with Image.open(small) as written:
        assert small.suffix == ".png" and np.array_equal(np.asarray(written), ids[:2, :2] + 300)


def test_evaluate_with_instances_scores_amg_objects_against_16_bit_id_masks(tmp_path, capsys):
    from PIL import Image

    from convlora.cli import main

    image, truth = drawn_discs()
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray((truth * (300 + i)).astype(np.uint16)).save(tmp_path / "data" / "masks" / f"{i}.png")
    argv = ["evaluate", "--model", "convlora-tiny", "--data", str(tmp_path / "data"), "--instances", "amg"]
    argv += ["--points_per_side", "8", "--pred_iou_thresh", "0.7", "--stability_score_thresh", "0.9"]
    assert main([*argv, "--output", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    expected = instance_scores(truth, generate_masks(
        load_sam("convlora-tiny").eval(), image, AmgConfig(points_per_side=8, **RELAXED)).id_map())  # fmt: skip
    assert scores["images"] == 2 and scores["n_true"] == 6
    assert scores["msa"] == pytest.approx(expected["msa"]) and scores["recall_50"] == 1.0
    binary = tmp_path / "binary"
    (binary / "images").mkdir(parents=True)
    (binary / "masks").mkdir()
    Image.fromarray(image).save(binary / "images" / "0.png")
    Image.fromarray(((truth > 0) * 255).astype(np.uint8)).save(binary / "masks" / "0.png")
    assert main([*argv[:4], str(binary), "--instances", "amg"]) == 2
    assert "at most one object id" in capsys.readouterr().err
