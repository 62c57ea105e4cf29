"""The trained instance decoder's building blocks: targets, head, loss, and the seeded watershed."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from convlora.evaluation import connected_components, instance_scores, match_instances
from convlora.instances import (
    InstanceHead,
    ids_from_logits,
    ids_from_maps,
    instance_loss,
    instance_targets,
    target_weight,
)
from convlora.models import random_sam, tiny_sam_config
from convlora.models.processing import ResizeInfo, preprocess_batch


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    """Id map of discs; where discs overlap, a pixel belongs to the nearest centre (so they touch, not overlap)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    distances = np.stack([np.hypot(rows - y, cols - x) for y, x in centres])
    ids = distances.argmin(axis=0) + 1
    return np.where(distances.min(axis=0) < radius, ids, 0).astype(np.int64)


def edge_pixels(mask: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour outside the object (the image border does not count)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def test_a_disc_has_centre_one_at_its_centre_and_boundary_zero_on_its_edge():
    ids = discs((21, 21), [(10, 10)], 6.5)
    maps = instance_targets(ids)
    assert maps.shape == (3, 21, 21) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps[0], ids > 0)
    assert maps[1, 10, 10] == 1.0 and np.unravel_index(maps[1].argmax(), ids.shape) == (10, 10)
    assert maps[2, 10, 10] == 1.0
    edge = edge_pixels(ids > 0)
    assert edge.sum() > 20 and (maps[2][edge] == 0).all()
    assert (maps[1][edge] < 0.2).all()  # 1 - (R - 1) / R at most, R = 7 here
    assert (maps[:, ids == 0] == 0).all()
    assert 0.0 < maps[1, 10, 13] < maps[1, 10, 12] < 1.0  # falls off linearly from the centre


def test_the_shared_edge_of_two_touching_squares_is_boundary_for_both():
    ids = np.zeros((12, 20), np.int64)
    ids[2:9, 2:9], ids[2:9, 9:16] = 1, 2
    maps = instance_targets(ids)
    assert (maps[2, 2:9, 8] == 0).all() and (maps[2, 2:9, 9] == 0).all()
    assert maps[2, 5, 5] == 1.0 and maps[2, 5, 12] == 1.0
    assert maps[1, 5, 5] == 1.0 and maps[1, 5, 12] == 1.0  # one centre per square, each at its middle
    merged = ndimage.distance_transform_edt(ids > 0)  # one transform over the union would miss the shared edge
    assert merged[5, 8] > 1


def test_an_object_cut_by_the_image_border_is_deepest_at_the_border():
    ids = np.zeros((10, 10), np.int64)
    ids[3:8, :4] = 7
    maps = instance_targets(ids)
    assert maps[2, 5, 0] == 1.0 and maps[2, 5, 3] == 0.0  # the border is no boundary, the inner edge is
    assert maps[1, 5, 0] == 1.0


def test_ignored_pixels_get_weight_zero_and_no_target():
    ids = np.zeros((6, 6), np.uint8)
    ids[1:4, 1:4], ids[:, 5] = 3, 255
    maps, weight = instance_targets(ids), target_weight(ids)
    assert weight[:, 5].sum() == 0 and weight[:, :5].min() == 1
    assert (maps[:, :, 5] == 0).all() and maps[0].sum() == 9
    wide = instance_targets(ids.astype(np.uint16))  # 255 is an object id in 16-bit maps
    assert wide[0, :, 5].sum() == 6 and target_weight(ids.astype(np.uint16)).min() == 1


def test_an_object_covering_the_whole_image_has_both_maps_one():
    maps = instance_targets(np.full((4, 5), 2, np.int32))
    assert (maps == 1).all()


def test_targets_reject_maps_that_are_not_id_maps():
    with pytest.raises(ValueError, match="shape"):
        instance_targets(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="dtype"):
        instance_targets(np.zeros((3, 4), np.float32))


def test_an_empty_map_gives_zero_targets_and_no_objects():
    maps = instance_targets(np.zeros((8, 9), np.uint16))
    assert not maps.any()
    ids = ids_from_maps(*maps)
    assert ids.shape == (8, 9) and ids.dtype == np.int32 and not ids.any()


def test_the_watershed_separates_two_touching_discs_that_connected_components_merge():
    truth = discs((40, 56), [(20, 17), (20, 37)], 11.0)
    assert connected_components(truth > 0).max() == 1
    ids = ids_from_maps(*instance_targets(truth))
    scores = instance_scores(truth, ids)
    iou = match_instances(truth, ids).iou
    assert scores["n_pred"] == 2 and scores["msa"] > 0.9
    assert iou.max(axis=1).min() > 0.9


def test_a_foreground_region_without_a_seed_is_kept_and_specks_are_dropped():
    foreground = np.zeros((12, 12), np.float32)
    foreground[1:6, 1:6] = foreground[8:10, 8:10] = 1.0
    zeros = np.zeros_like(foreground)  # no centre anywhere: no seed
    ids = ids_from_maps(foreground, zeros, zeros, min_size=5)
    assert ids.max() == 1 and (ids[1:6, 1:6] == 1).all() and not ids[8:10, 8:10].any()
    assert ids_from_maps(foreground, zeros, zeros, min_size=1).max() == 2


def test_the_head_gives_three_maps_at_four_times_the_grid():
    head = InstanceHead(16, hidden_channels=8)
    assert head(torch.zeros(2, 16, 8, 8)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="embedding"):
        head(torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match="hidden_channels"):
        InstanceHead(16, hidden_channels=6)


def test_the_loss_ignores_pixels_of_weight_zero():
    torch.manual_seed(0)
    logits, targets = torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 8).round()
    weight = torch.ones(1, 8, 8)
    weight[..., :2] = 0
    changed = logits.clone()
    changed[..., :2] = 50.0
    assert torch.allclose(instance_loss(logits, targets, weight), instance_loss(changed, targets, weight))
    assert not torch.allclose(instance_loss(logits, targets), instance_loss(changed, targets))


def test_ids_from_logits_come_at_the_original_image_size():
    truth = discs((30, 60), [(15, 20), (15, 39)], 10.0)
    maps = torch.from_numpy(instance_targets(truth))
    padded = torch.zeros(3, 64, 64)
    padded[:, :32, :64] = torch.nn.functional.interpolate(maps[None], size=(32, 64), mode="bilinear")[0]
    logits = torch.logit(padded.clamp(1e-4, 1 - 1e-4))
    ids = ids_from_logits(logits, ResizeInfo.fit((30, 60), 64))
    assert ids.shape == (30, 60) and instance_scores(truth, ids)["sa50"] == 1.0


def test_the_head_learns_the_maps_of_touching_discs_on_a_frozen_encoder():
    rng = np.random.default_rng(0)
    truths, images = [], []
    for _ in range(3):
        y, x = rng.integers(22, 42, size=2)
        truth = discs((64, 64), [(y, x - 9), (y, x + 9)], 11.0)
        image = np.zeros((64, 64, 3), np.uint8)
        image[truth == 1], image[truth == 2] = (200, 80, 80), (80, 200, 80)
        truths.append(truth)
        images.append(image)
    encoder = random_sam(tiny_sam_config(), seed=0).vision_encoder.eval()
    with torch.no_grad():
        embedding = encoder(preprocess_batch(images, 64)[0]).last_hidden_state  # (3, 16, 8, 8), fixed
    targets = torch.from_numpy(np.stack([instance_targets(truth) for truth in truths]))
    torch.manual_seed(0)
    head = InstanceHead(embedding.shape[1], hidden_channels=16)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = instance_loss(head(embedding), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        ids = ids_from_logits(head(embedding[:1])[0], ResizeInfo.fit((64, 64), 64))
    assert instance_scores(truths[0], ids)["sa50"] == 1.0  # the two discs of a training image, apart
