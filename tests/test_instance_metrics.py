"""Instance segmentation metrics (convlora.evaluation.instances) on hand-made id maps with values worked out by hand.

The base layout: two 4x4 squares on a 4x14 image. The first is predicted exactly (IoU 1); the second is
predicted one column to the right, so it overlaps the truth in 4x3 = 12 pixels of a 20-pixel union: IoU 12/20 =
0.6 exactly. Over the ten thresholds 0.50, 0.55, ..., 0.95 the second square matches at 0.50, 0.55 and 0.60
(SA = 2 / 2 = 1) and not from 0.65 on (TP 1, FP 1, FN 1: SA = 1/3), so msa = (3 * 1 + 7 * 1/3) / 10 = 8/15.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from convlora.evaluation import (
    DEFAULT_THRESHOLDS,
    InstanceMetrics,
    connected_components,
    instance_scores,
    match_instances,
    relabel_sequential,
)

ACCURACIES = ("msa", "sa50", "sa75", "ap50", "f1_50", "precision_50", "recall_50")


def two_squares(first: int = 1, second: int = 2, dtype=np.int64, shift: int = 0) -> np.ndarray:
    ids = np.zeros((4, 14), dtype=dtype)
    ids[:, 0:4] = first
    ids[:, 8 + shift : 12 + shift] = second
    return ids


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def random_ids(rng: np.random.Generator, size: int = 24, objects: int = 6) -> np.ndarray:
    """Blocky random objects with scattered noise pixels, ids drawn from a wide, non-contiguous range."""
    blocks = np.kron(rng.integers(0, objects + 1, (size // 4, size // 4)), np.ones((4, 4), dtype=np.int64))
    noise = rng.random(blocks.shape) < 0.15
    blocks[noise] = rng.integers(0, objects + 1, int(noise.sum()))
    lookup = np.concatenate([[0], rng.choice(np.arange(1, 10**6), objects, replace=False)])
    return lookup[blocks]


# ------------------------------------------------------------------------------------ hand-made cases


def test_shifted_square_with_iou_exactly_0_6_matches_up_to_0_6_and_gives_msa_8_15():
    truth, pred = two_squares(), two_squares(shift=1)
    match = match_instances(truth, pred)
    np.testing.assert_array_equal(match.iou, [[1.0, 0.0], [0.0, 0.6]])
    for threshold, tp in ((0.5, 2), (0.55, 2), (0.6, 2), (0.65, 1), (0.95, 1), (1.0, 1)):
        assert match_instances(truth, pred, threshold).tp == tp, threshold
    scores = instance_scores(truth, pred)
    assert scores["msa"] == pytest.approx(8 / 15, abs=1e-12)
    assert scores["sa50"] == scores["ap50"] == 1.0
    assert scores["sa75"] == pytest.approx(1 / 3, abs=1e-12)
    assert (scores["f1_50"], scores["precision_50"], scores["recall_50"]) == (1.0, 1.0, 1.0)
    assert (scores["n_true"], scores["n_pred"], scores["count_error"]) == (2, 2, 0)


def test_np_arange_thresholds_do_not_lose_a_pair_with_iou_exactly_on_a_threshold():
    thresholds = np.arange(0.5, 1.0, 0.05)  # its third value is 0.6000000000000001
    assert thresholds[2] > 0.6
    scores = instance_scores(two_squares(), two_squares(shift=1), thresholds=thresholds)
    assert scores["msa"] == pytest.approx(8 / 15, abs=1e-12)


def test_split_object_matches_at_iou_exactly_0_5_but_not_above():
    # One true 4x4 square, predicted as two 4x2 halves: each half has IoU 8/16 = 0.5. The threshold is
    # inclusive (iou >= t), so at 0.5 one half matches (TP 1, FP 1, FN 0: SA 1/2) and from 0.55 on none does
    # (TP 0, FP 2, FN 1: SA 0). msa = 0.5 / 10.
    truth = np.zeros((4, 4), np.int64)
    truth[:] = 1
    pred = np.zeros((4, 4), np.int64)
    pred[:, :2], pred[:, 2:] = 1, 2
    match = match_instances(truth, pred, 0.5)
    np.testing.assert_array_equal(match.iou, [[0.5, 0.5]])
    assert (match.tp, match.fp, match.fn) == (1, 1, 0)
    assert match_instances(truth, pred, 0.55).tp == 0
    assert match_instances(truth, pred, 0.5000001).tp == 0
    scores = instance_scores(truth, pred)
    assert scores["sa50"] == 0.5 and scores["sa75"] == 0.0
    assert scores["msa"] == pytest.approx(0.05, abs=1e-12)
    assert scores["f1_50"] == pytest.approx(2 / 3, abs=1e-12)
    assert (scores["precision_50"], scores["recall_50"], scores["count_error"]) == (0.5, 1.0, 1)


def test_merged_prediction_of_two_touching_discs_matches_only_the_larger_disc():
    shape = (20, 30)
    big, small = disc(shape, (10, 8), 6), disc(shape, (10, 18.5), 4)
    assert not (big & small).any() and (np.roll(big, 1, axis=1) & small).any()  # disjoint but touching
    truth = np.zeros(shape, np.int64)
    truth[big], truth[small] = 1, 2
    pred = np.where(big | small, 9, 0)
    match = match_instances(truth, pred)
    union = big.sum() + small.sum()
    np.testing.assert_allclose(match.iou[:, 0], [big.sum() / union, small.sum() / union], rtol=0, atol=1e-15)
    assert big.sum() / union > 0.5 > small.sum() / union
    np.testing.assert_array_equal(match.matched_ids, [[1, 9]])
    scores = instance_scores(truth, pred)
    assert scores["sa50"] == 0.5  # TP 1, FP 0, FN 1
    assert (scores["precision_50"], scores["recall_50"], scores["count_error"]) == (1.0, 0.5, -1)


def test_non_contiguous_ids_score_the_same_as_ids_1_and_2():
    base = instance_scores(two_squares(), two_squares(shift=1))
    truth = two_squares(5, 300)
    truth[0, 13] = 17  # a third, one-pixel true object that is missed
    pred = two_squares(300, 5, shift=1)
    match = match_instances(truth, pred)
    np.testing.assert_array_equal(match.true_ids, [5, 17, 300])
    np.testing.assert_array_equal(match.pred_ids, [5, 300])
    np.testing.assert_array_equal(match.matched_ids, [[5, 300], [300, 5]])
    assert instance_scores(two_squares(5, 300), pred) == base
    assert instance_scores(truth, pred)["sa50"] == pytest.approx(2 / 3)


def test_wide_id_maps_with_ids_above_255_and_above_65535_match_like_small_ids():
    truth = two_squares(256, 65535, dtype=np.uint16)
    pred = two_squares(70000, 2**31 - 1, dtype=np.int32, shift=1)
    match = match_instances(truth, pred)
    np.testing.assert_array_equal(match.matched_ids, [[256, 70000], [65535, 2**31 - 1]])
    assert instance_scores(truth, pred) == instance_scores(two_squares(), two_squares(shift=1))
    assert instance_scores(truth.astype(np.uint64), pred.astype(np.uint32)) == instance_scores(truth, pred)


def test_ignored_pixels_are_left_out_of_areas_overlaps_and_counts():
    truth, pred = two_squares(), two_squares(shift=1)
    pred[0, 13] = 3  # a one-pixel false positive
    ignore = np.zeros(truth.shape, bool)
    ignore[:, 8] = ignore[:, 12] = True  # the truth's missed column and the prediction's extra column
    assert instance_scores(truth, pred)["n_pred"] == 3
    ignore[0, 13] = True
    match = match_instances(truth, pred, 0.95, ignore=ignore)
    np.testing.assert_array_equal(match.iou, [[1.0, 0.0], [0.0, 1.0]])
    scores = instance_scores(truth, pred, ignore=ignore)
    assert scores["msa"] == 1.0 and scores["n_pred"] == 2
    everything = np.ones(truth.shape, bool)
    assert instance_scores(truth, pred, ignore=everything)["msa"] == 1.0  # nothing left: both empty


def test_both_maps_empty_score_1_and_one_empty_map_scores_0():
    empty, full = np.zeros((4, 14), np.int64), two_squares()
    both = instance_scores(empty, empty)
    assert all(both[key] == 1.0 for key in ACCURACIES)
    assert (both["n_true"], both["n_pred"], both["count_error"]) == (0, 0, 0)
    missed, spurious = instance_scores(full, empty), instance_scores(empty, full)
    assert all(missed[key] == 0.0 for key in ACCURACIES) and missed["count_error"] == -2
    assert all(spurious[key] == 0.0 for key in ACCURACIES) and spurious["count_error"] == 2
    assert match_instances(empty, full).iou.shape == (0, 2)


def test_matching_maximises_the_number_of_pairs_rather_than_taking_the_best_iou_first():
    # 1 x 16 image. T1 = cols 0-9, T2 = cols 10-15; P2 = cols 0-2, P1 = cols 3-13.
    # IoU(T1, P1) = 7/14 = 0.5, IoU(T1, P2) = 3/10 = 0.3, IoU(T2, P1) = 4/13 ~ 0.308.
    # At 0.3, taking the best pair first (T1-P1) leaves one match; the optimum pairs T1-P2 and T2-P1.
    truth = np.array([[1] * 10 + [2] * 6])
    pred = np.array([[2] * 3 + [1] * 11 + [0] * 2])
    assert match_instances(truth, pred, 0.3).matched_ids.tolist() == [[1, 2], [2, 1]]
    assert match_instances(truth, pred, 0.31).matched_ids.tolist() == [[1, 1]]


def test_among_equally_many_pairs_the_matching_takes_the_larger_iou():
    # T = cols 0-9; Pb = cols 0-5 (IoU 6/10), Pa = cols 6-10 (IoU 4/11).
    truth = np.array([[1] * 10 + [0] * 2])
    pred = np.array([[2] * 6 + [1] * 5 + [0]])
    assert match_instances(truth, pred, 0.3).matched_ids.tolist() == [[1, 2]]


def test_coco_ap50_ranks_predictions_by_score_while_ap50_ignores_scores():
    # Two true squares found, plus one false positive. Ranked hit, miss, hit: precision 1, 1/2, 2/3 at
    # recall 1/2, 1/2, 1. COCO samples the precision envelope at 101 recall levels: 1 for the 51 levels
    # up to 1/2 and 2/3 for the 50 above, AP = (51 + 50 * 2/3) / 101 = 253/303. Ranked miss, hit, hit the
    # envelope is 2/3 everywhere.
    truth = two_squares()
    pred = two_squares(1, 2)
    pred[:, 5:7] = 3
    good = instance_scores(truth, pred, scores={1: 0.9, 3: 0.8, 2: 0.7})
    bad = instance_scores(truth, pred, scores={1: 0.5, 3: 0.8, 2: 0.7})
    assert good["coco_ap50"] == pytest.approx(253 / 303, abs=1e-12)
    assert bad["coco_ap50"] == pytest.approx(2 / 3, abs=1e-12)
    assert good["ap50"] == bad["ap50"] == pytest.approx(2 / 3)  # TP 2, FP 1, FN 0
    assert "coco_ap50" not in instance_scores(truth, pred)
    empty = np.zeros_like(truth)
    assert instance_scores(empty, empty, scores={})["coco_ap50"] == 1.0
    assert instance_scores(truth, empty, scores={})["coco_ap50"] == 0.0
    with pytest.raises(ValueError, match=r"scores has no entry for predicted ids \[3\]"):
        instance_scores(truth, pred, scores={1: 0.9, 2: 0.7})


# ------------------------------------------------------------------------------------------ invariances


def test_iou_matrix_equals_a_brute_force_computation_per_pair_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth, pred = random_ids(rng), random_ids(rng)
        ignore = rng.random(truth.shape) < 0.1
        match = match_instances(truth, pred, ignore=ignore)
        keep = ~ignore
        expected_true = np.unique(truth[keep & (truth > 0)])
        expected_pred = np.unique(pred[keep & (pred > 0)])
        np.testing.assert_array_equal(match.true_ids, expected_true)
        np.testing.assert_array_equal(match.pred_ids, expected_pred)
        brute = np.zeros((len(expected_true), len(expected_pred)))
        for i, t in enumerate(expected_true):
            for j, p in enumerate(expected_pred):
                a, b = (truth == t) & keep, (pred == p) & keep
                brute[i, j] = (a & b).sum() / (a | b).sum()
        np.testing.assert_array_equal(match.iou, brute)


def test_matching_equals_a_brute_force_best_matching_on_small_random_maps():
    rng = np.random.default_rng(1)
    for _ in range(60):
        truth, pred = rng.integers(0, 4, (6, 6)), rng.integers(0, 4, (6, 6))
        threshold = float(rng.choice([0.1, 0.2, 0.3, 0.5]))
        match = match_instances(truth, pred, threshold)
        n, m = match.iou.shape
        best = (0, 0.0)
        for columns in itertools.permutations([*range(m), *[None] * n], n):
            ious = [match.iou[i, j] for i, j in enumerate(columns) if j is not None and match.iou[i, j] >= threshold]
            best = max(best, (len(ious), sum(ious)))
        found = match.iou[match.pairs[:, 0], match.pairs[:, 1]]
        assert match.tp == best[0]
        assert found.sum() == pytest.approx(best[1], abs=1e-12)
        assert (found >= threshold).all()
        assert len(set(match.pairs[:, 0])) == len(set(match.pairs[:, 1])) == match.tp


def test_scores_do_not_depend_on_which_ids_the_predicted_objects_carry():
    rng = np.random.default_rng(2)
    truth, pred = random_ids(rng), random_ids(rng)
    ids = np.unique(pred[pred > 0])
    renamed = dict(zip(ids.tolist(), rng.permutation(ids * 7 + 3).tolist(), strict=True))
    permuted = np.vectorize(lambda v: renamed.get(v, 0))(pred)
    assert instance_scores(truth, permuted) == instance_scores(truth, pred)
    assert instance_scores(truth, relabel_sequential(pred)) == instance_scores(truth, pred)


def test_torch_input_gives_the_same_scores_as_numpy_input():
    rng = np.random.default_rng(3)
    truth, pred = random_ids(rng), random_ids(rng)
    ignore = rng.random(truth.shape) < 0.1
    expected = instance_scores(truth, pred, ignore=ignore)
    assert instance_scores(torch.from_numpy(truth), torch.from_numpy(pred), ignore=torch.from_numpy(ignore)) == expected
    as_int32 = instance_scores(torch.from_numpy(truth).int(), torch.from_numpy(pred).int(), ignore=ignore)
    assert as_int32 == expected


# ------------------------------------------------------------------------------------------ accumulator


def test_accumulator_gives_per_image_means_and_pooled_ratios_worked_out_by_hand():
    # Image 1: the shifted squares (SA 1 at 0.50-0.60, 1/3 above; 2 true, 2 predicted). Image 2: the split
    # square (SA 1/2 at 0.50, 0 above; 1 true, 2 predicted). Image 3: both empty (SA 1).
    split_truth = np.ones((4, 4), np.int64)
    split_pred = np.repeat([[1, 1, 2, 2]], 4, axis=0)
    metrics = InstanceMetrics()
    metrics.update(two_squares(), two_squares(shift=1))
    metrics.update(split_truth, split_pred)
    metrics.update(np.zeros((3, 3), np.int64), np.zeros((3, 3), np.int64))
    result = metrics.compute()
    assert result["images"] == 3 and (result["n_true"], result["n_pred"]) == (3, 4)
    assert result["msa"] == pytest.approx((8 / 15 + 0.05 + 1) / 3, abs=1e-12)
    assert result["sa50"] == result["ap50"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-12)
    assert result["sa75"] == pytest.approx((1 / 3 + 0 + 1) / 3, abs=1e-12)
    assert result["f1_50"] == pytest.approx((1 + 2 / 3 + 1) / 3, abs=1e-12)
    assert result["precision_50"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-12)
    # Pooled over 3 true and 4 predicted objects. TP per threshold: 3 at 0.50, 2 at 0.55 and 0.60, 1 above.
    # SA = TP / (7 - TP): 3/4, 2/5, 2/5, then 1/6 for the seven thresholds from 0.65.
    assert result["msa_pooled"] == pytest.approx((3 / 4 + 2 * 2 / 5 + 7 / 6) / 10, abs=1e-12)
    assert result["sa50_pooled"] == result["ap50_pooled"] == pytest.approx(3 / 4, abs=1e-12)
    assert result["sa75_pooled"] == pytest.approx(1 / 6, abs=1e-12)
    assert result["f1_50_pooled"] == pytest.approx(6 / 7, abs=1e-12)
    assert (result["precision_50_pooled"], result["recall_50_pooled"]) == (0.75, 1.0)
    assert result["count_error"] == pytest.approx(1 / 3) and result["count_error_abs"] == pytest.approx(1 / 3)


def test_accumulator_per_image_means_equal_the_mean_of_instance_scores():
    rng = np.random.default_rng(4)
    pairs = [(random_ids(rng), random_ids(rng)) for _ in range(4)]
    metrics = InstanceMetrics()
    for truth, pred in pairs:
        metrics.update(truth, pred)
    result = metrics.compute()
    for key in ACCURACIES:
        assert result[key] == pytest.approx(np.mean([instance_scores(t, p)[key] for t, p in pairs]), abs=1e-12)


def test_accumulator_batches_and_merged_states_equal_one_image_at_a_time():
    rng = np.random.default_rng(5)
    truth = np.stack([random_ids(rng) for _ in range(4)])
    pred = np.stack([random_ids(rng) for _ in range(4)])
    single = InstanceMetrics()
    for index in range(4):
        single.update(truth[index], pred[index])
    batched = InstanceMetrics()
    batched.update(torch.from_numpy(truth), torch.from_numpy(pred))
    first, second = InstanceMetrics(), InstanceMetrics()
    first.update(truth[:1], pred[:1])
    second.update(truth[1:], pred[1:])
    restored = InstanceMetrics()
    restored.load_state(second.state())  # as after an all-reduce: states add up
    restored.merge(first.state())
    first.merge(second)
    expected = single.compute()
    assert batched.compute() == expected
    assert first.compute() == pytest.approx(expected, abs=1e-12)
    assert restored.compute() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="other thresholds"):
        first.merge(InstanceMetrics(thresholds=[0.5, 0.6]))
    single.reset()
    with pytest.raises(ValueError, match="no image was added"):
        single.compute()


def test_accumulator_leaves_ignored_pixels_out():
    truth, pred = two_squares(), two_squares(shift=1)
    ignore = np.zeros(truth.shape, bool)
    ignore[:, 8] = ignore[:, 12] = True
    metrics = InstanceMetrics()
    metrics.update(truth[None], pred[None], ignore=ignore[None])
    assert metrics.compute()["msa"] == metrics.compute()["msa_pooled"] == 1.0


# -------------------------------------------------------------------------------------------- helpers


def test_relabel_sequential_numbers_objects_1_to_n_in_id_order():
    ids = np.array([[0, 300, 5], [70000, 5, 0]], np.int64)
    relabelled = relabel_sequential(ids)
    assert relabelled.dtype == np.int32
    assert relabelled.tolist() == [[0, 2, 1], [3, 1, 0]]
    assert relabel_sequential(torch.tensor([[4, 9], [9, 4]])).tolist() == [[1, 2], [2, 1]]  # no background


def test_connected_components_labels_regions_by_connectivity_and_drops_small_ones():
    binary = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 1],
        ],
        dtype=bool,
    )
    assert connected_components(binary, connectivity=1).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 2, 0, 3]]
    assert connected_components(binary).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 2]]
    assert connected_components(binary, min_size=2).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    assert connected_components(binary, connectivity=1, min_size=2).max() == 1
    assert connected_components(torch.from_numpy(binary).to(torch.uint8), connectivity=1).max() == 3


def test_a_binary_prediction_is_scored_as_instances_through_its_connected_components():
    truth = two_squares()
    binary = two_squares(shift=1) > 0
    assert instance_scores(truth, connected_components(binary)) == instance_scores(truth, two_squares(shift=1))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("true_ids", "pred_ids", "kwargs", "message"),
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64), {}, "true_ids has dtype float32"),
        (np.zeros((4, 4), np.int64), np.zeros((4, 4), bool), {}, "pred_ids is a boolean mask.*connected_components"),
        (np.zeros((4, 4), np.int64), np.zeros((4, 5), np.int64), {}, r"pred_ids has shape \(4, 5\)"),
        (np.full((4, 4), -1), np.zeros((4, 4), np.int64), {}, "negative ids"),
        (np.zeros((2, 4, 4), np.int64), np.zeros((2, 4, 4), np.int64), {}, r"expected \(h, w\)"),
        (np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64), {"ignore": np.zeros((4, 4))}, "ignore has dtype"),
        (np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64), {"thresholds": [0.0, 0.5]}, r"thresholds must"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_argument(true_ids, pred_ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        instance_scores(true_ids, pred_ids, **kwargs)


def test_default_thresholds_are_the_ten_from_0_5_to_0_95():
    assert tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist()) == DEFAULT_THRESHOLDS
