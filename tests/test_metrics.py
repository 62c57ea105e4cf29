"""Segmentation metrics: hand-computed values, wiring to py_sod_metrics, merging of partial states."""

import math

import numpy as np
import pytest
import torch

from convlora.evaluation.metrics import (
    HIGHER_IS_BETTER,
    MAIN_METRICS,
    BinaryMetrics,
    MulticlassMetrics,
    build_metrics,
    higher_is_better,
    is_better,
    main_metric,
)

# A 3x3 ground truth with a 2x2 object in the top-left corner, used by several tests.
GT = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


def binary(probs, target) -> dict[str, float]:
    """Metrics of one image given as nested lists of probabilities and 0/1/255 labels."""
    metrics = BinaryMetrics()
    metrics.update(torch.tensor([probs], dtype=torch.float32), torch.tensor([target]), from_logits=False)
    return metrics.compute()


def direct_sod(pred_u8: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The same scores straight from py_sod_metrics, fed as in its README: uint8 maps, gt 0/255."""
    from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

    gt_u8 = gt.astype(np.uint8) * 255
    s, e, w, mae = Smeasure(), Emeasure(), WeightedFmeasure(), MAE()
    for metric in (s, e, w, mae):
        metric.step(pred_u8, gt_u8)
    em = e.get_results()["em"]
    return {
        "s_measure": s.get_results()["sm"],
        "e_measure_mean": em["curve"].mean(),
        "e_measure_max": em["curve"].max(),
        "e_measure_adaptive": em["adp"],
        "weighted_f_measure": w.get_results()["wfm"],
        "mae": mae.get_results()["mae"],
    }


# ---------------------------------------------------------------- binary metrics by hand


def test_perfect_prediction_scores_perfectly():
    results = binary(GT, GT)
    assert results["iou"] == results["dice"] == results["iou_dataset"] == 1.0
    assert results["ber"] == 0.0 and results["mae"] == 0.0
    assert results["s_measure"] == pytest.approx(1.0, abs=1e-12)
    assert results["weighted_f_measure"] == pytest.approx(1.0, abs=1e-12)
    # E-measure divides by (pixels - 1), as the MATLAB code does, so a perfect 3x3 map scores 9/8.
    # Thresholds 1..255 of the 8-bit map binarise it to the gt: 9/8 each. Threshold 0 makes every pixel
    # foreground: demeaned prediction 0, alignment 0, enhanced value 1/4 per pixel -> (9/4) / 8 = 9/32.
    assert results["e_measure_adaptive"] == pytest.approx(9 / 8)
    assert results["e_measure_max"] == pytest.approx(9 / 8)
    assert results["e_measure_mean"] == pytest.approx((255 * 9 / 8 + 9 / 32) / 256)


def test_perfect_prediction_e_measure_is_close_to_one_on_a_larger_image():
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[8:24, 8:24] = 1
    results = binary(gt.tolist(), gt.tolist())
    assert results["e_measure_adaptive"] == pytest.approx(1024 / 1023)
    assert results["e_measure_mean"] == pytest.approx(1.0, abs=0.01)
    assert results["s_measure"] == pytest.approx(1.0) and results["weighted_f_measure"] == pytest.approx(1.0)


def test_all_wrong_prediction_scores_zero():
    wrong = [[1 - v for v in row] for row in GT]
    results = binary(wrong, GT)
    assert results["iou"] == results["dice"] == 0.0
    assert results["ber"] == 100.0 and results["mae"] == 1.0
    # S-measure by hand: object term 0 (prediction 0 on the object, 1 on the background). Region term:
    # the centroid (0.5, 0.5) rounds to (0, 0), splitting at row/column 1 with weights 1/9, 2/9, 2/9, 4/9.
    # SSIM: top-left 1 (single pixel); top-right pred [0, 1] vs gt [1, 0]: x = y = 1/2, var 1/2 each,
    # cov -1/2 -> 4 (1/4) (-1/2) / ((1/2) (1)) = -1; bottom-left likewise -1; bottom-right pred
    # [[0, 1], [1, 1]] vs gt [[1, 0], [0, 0]]: x = 3/4, y = 1/4, var 1/4 each, cov -1/4
    # -> 4 (3/16) (-1/4) / ((10/16) (1/2)) = -0.6. Region = (1 - 2 - 2 - 2.4) / 9 = -0.6;
    # S = max(0, 0.5 * 0 - 0.5 * 0.6) = 0.
    assert results["s_measure"] == 0.0
    # Adaptive threshold min(2 * 5/9, 1) = 1 binarises the map to the inverse of the gt: the two parts
    # present (pred fg on gt bg, pred bg on gt fg) have alignment -1, enhanced value 0 -> E = 0.
    assert results["e_measure_adaptive"] == pytest.approx(0.0, abs=1e-12)
    # Only threshold 0 (all foreground) scores: 9/32 as in the perfect case, averaged over 256 thresholds.
    assert results["e_measure_mean"] == pytest.approx(9 / 32 / 256)


def test_all_wrong_weighted_f_measure_is_zero_on_a_larger_image():
    gt = np.zeros((16, 16), dtype=np.int64)
    gt[4:12, 4:12] = 1
    results = binary((1 - gt).tolist(), gt.tolist())
    assert results["weighted_f_measure"] == pytest.approx(0.0, abs=1e-12)
    assert results["s_measure"] == 0.0 and results["iou"] == 0.0


def test_half_overlap_has_exact_iou_dice_ber_and_mae():
    gt = [[1, 1, 0, 0], [1, 1, 0, 0]]
    pred = [[0, 1, 1, 0], [0, 1, 1, 0]]
    results = binary(pred, gt)
    # TP 2, FP 2, FN 2, TN 2: IoU 2 / 6, Dice 2 * 2 / (2 * 2 + 2 + 2), BER 100 (1 - (2/4 + 2/4) / 2)
    assert results["iou"] == pytest.approx(1 / 3)
    assert results["dice"] == pytest.approx(1 / 2)
    assert results["ber"] == pytest.approx(50.0)
    assert results["mae"] == pytest.approx(4 / 8)


def test_s_and_e_measure_by_hand_on_a_graded_prediction():
    probs = [[0.6, 1, 0], [1, 1, 0], [0, 0, 1]]  # 0.6 is 153/255, exact in 8 bits
    results = binary(probs, GT)
    # Object term. Foreground values (0.6, 1, 1, 1): mean 0.9, std (ddof 1) sqrt(0.12 / 3) = 0.2,
    # score 2 (0.9) / (0.81 + 1 + 0.2). Background values of 1 - pred: (1, 1, 1, 1, 0): mean 0.8,
    # std sqrt(0.8 / 4), score 2 (0.8) / (0.64 + 1 + sqrt(0.2)). Weighted by the gt shares 4/9, 5/9.
    object_score = 4 / 9 * 1.8 / 2.01 + 5 / 9 * 1.6 / (1.64 + math.sqrt(0.2))
    # Region term: split at (1, 1) as above. Top-left (single pixel), top-right ([1, 0] vs [1, 0]) and
    # bottom-left score 1. Bottom-right pred [[1, 0], [0, 1]] vs gt [[1, 0], [0, 0]]: x = 1/2, y = 1/4,
    # var_x = 1/3, var_y = 1/4, cov = (3/8 + 1/8 + 1/8 - 1/8) / 3 = 1/6;
    # SSIM = 4 (1/2)(1/4)(1/6) / ((1/4 + 1/16)(1/3 + 1/4)) = 1 / 2.1875.
    region_score = 1 / 9 + 2 / 9 + 2 / 9 + 4 / 9 / 2.1875
    assert results["s_measure"] == pytest.approx(0.5 * object_score + 0.5 * region_score, abs=1e-12)
    # Adaptive E-measure: threshold min(2 * 4.6 / 9, 1) = 1 keeps the four pixels at 1: 3 on the object,
    # 1 on the background; one object pixel (0.6) is missed. Means: pred 4/9, gt 4/9, so demeaned values
    # are 5/9 (fg) and -4/9 (bg) on both sides. Agreeing pixels (3 + 4) align perfectly (enhanced 1);
    # the 2 disagreeing ones have alignment 2 (5/9)(-4/9) / (25/81 + 16/81) = -40/41, enhanced
    # (1 - 40/41)^2 / 4 = 1/6724. E = (7 + 2/6724) / (9 - 1).
    assert results["e_measure_adaptive"] == pytest.approx((7 + 2 / 6724) / 8, abs=1e-12)
    # IoU at 0.5: 0.6 counts as foreground -> TP 4, FP 1: 4/5; MAE: (0.4 + 1) / 9
    assert results["iou"] == pytest.approx(4 / 5)
    assert results["mae"] == pytest.approx(1.4 / 9)


def test_ber_is_dataset_level_while_iou_and_dice_are_per_image_means():
    metrics = BinaryMetrics(sod_metrics=False)
    # image A: TP 1, FP 1, FN 0, TN 2; image B: TP 1, FP 0, FN 2, TN 1
    metrics.update(torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]), torch.tensor([[[1, 0], [0, 0]]]), from_logits=False)
    metrics.update(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[1, 1], [1, 0]]]), from_logits=False)
    results = metrics.compute()
    # totals TP 2, FP 1, FN 2, TN 3: TPR 2/4, TNR 3/4, BER 100 (1 - (1/2 + 3/4) / 2) = 37.5
    # (the mean of the per-image BERs would be (100/6 + 100/3) / 2 = 25)
    assert results["ber"] == pytest.approx(37.5)
    assert results["ber_fg"] == pytest.approx(50.0) and results["ber_bg"] == pytest.approx(25.0)
    # IoU per image 1/2 and 1/3; Dice 2/3 and 2/4; dataset-level IoU 2 / (2 + 1 + 2)
    assert results["iou"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert results["dice"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert results["iou_dataset"] == pytest.approx(2 / 5)
    assert "s_measure" not in results


def test_ignored_pixels_are_left_out_of_counts_and_background_for_sod_metrics():
    probs = torch.tensor([[[0.9, 0.8], [0.7, 0.1]]])
    target = torch.tensor([[[1, 255], [0, 0]]])
    metrics = BinaryMetrics()
    metrics.update(probs, target, from_logits=False)
    results = metrics.compute()
    # valid pixels: TP (0, 0), FP (1, 0), TN (1, 1) -> IoU 1/2, BER 100 (1 - (1 + 1/2) / 2) = 25
    assert results["iou"] == pytest.approx(1 / 2)
    assert results["ber"] == pytest.approx(25.0)
    # SOD metrics see the ignored pixel as background in both maps
    filled = np.rint(np.array([[0.9, 0.0], [0.7, 0.1]], dtype=np.float32).astype(np.float64) * 255).astype(np.uint8)
    expected = direct_sod(filled, np.array([[1, 0], [0, 0]]))
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key


def test_both_masks_empty_counts_as_a_perfect_image():
    results = binary([[0.1, 0.2], [0.0, 0.3]], [[0, 0], [0, 0]])
    assert results["iou"] == results["dice"] == 1.0
    assert results["ber"] == 0.0


def test_logits_are_thresholded_like_probabilities():
    logits = torch.tensor([[[[2.0, 0.0], [-3.0, 0.4]]]])
    target = torch.tensor([[[1, 1], [0, 1]]])
    from_logits, from_probs = BinaryMetrics(), BinaryMetrics()
    from_logits.update(logits, target)
    from_probs.update(torch.sigmoid(logits), target, from_logits=False)
    # logit 0 is probability 0.5, not above the threshold: TP 2, FN 1 -> IoU 2/3
    assert from_logits.compute()["iou"] == pytest.approx(2 / 3)
    for key, value in from_probs.compute().items():
        assert from_logits.compute()[key] == pytest.approx(value, abs=1e-12), key


# ---------------------------------------------------------------- wiring to py_sod_metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_sod_metrics_agree_with_py_sod_metrics_called_directly(seed):
    generator = torch.Generator().manual_seed(seed)
    gt = torch.zeros(1, 24, 20, dtype=torch.long)
    gt[0, 5:15, 4:12] = 1
    probs = (0.6 * gt.float() + 0.5 * torch.rand(1, 24, 20, generator=generator)).clamp(0, 1) * 0.8
    metrics = BinaryMetrics()
    metrics.update(probs, gt, from_logits=False)
    results = metrics.compute()
    pred_u8 = np.rint(probs[0].double().numpy() * 255).astype(np.uint8)
    for key, value in direct_sod(pred_u8, gt[0].numpy()).items():
        assert results[key] == pytest.approx(value, abs=1e-12), key


def test_sod_metrics_without_minmax_normalisation_use_py_sod_metrics_unnormalised():
    from py_sod_metrics import MAE, Smeasure

    gt = torch.zeros(1, 10, 10, dtype=torch.long)
    gt[0, 2:6, 3:8] = 1
    probs = 0.2 + 0.5 * gt.float()  # range 0.2 .. 0.7: min-max normalisation would change it
    raw, normalised = BinaryMetrics(minmax_normalize=False), BinaryMetrics()
    raw.update(probs, gt, from_logits=False)
    normalised.update(probs, gt, from_logits=False)
    pred = np.rint(probs[0].double().numpy() * 255) / 255
    s, mae = Smeasure(), MAE()
    s.step(pred, gt[0].numpy().astype(bool), normalize=False)
    mae.step(pred, gt[0].numpy().astype(bool), normalize=False)
    assert raw.compute()["s_measure"] == pytest.approx(s.get_results()["sm"], abs=1e-12)
    # 80 background pixels off by 0.2, 20 object pixels off by 0.3 (up to 8-bit rounding)
    assert raw.compute()["mae"] == pytest.approx(0.8 * 0.2 + 0.2 * 0.3, abs=1 / 255)
    assert raw.compute()["mae"] == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert normalised.compute()["mae"] == 0.0  # min-max maps 0.2 -> 0 and 0.7 -> 1


def test_s_measure_stays_finite_when_the_object_touches_only_the_last_column():
    # The centroid then lies on the last column, one region quadrant is empty (weight 0) and
    # py_sod_metrics' own Smeasure returns NaN; ours skips the empty quadrant.
    gt = [[0, 0, 1], [0, 0, 1], [0, 0, 1]]
    results = binary([[0, 0.2, 1], [0, 0, 1], [0, 0, 0.8]], gt)
    assert 0.0 < results["s_measure"] <= 1.0
    assert binary(gt, gt)["s_measure"] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- multi-class


def onehot_logits(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    labels_t = torch.tensor(labels)
    return torch.nn.functional.one_hot(labels_t, num_classes).permute(2, 0, 1)[None].float()


def test_confusion_matrix_miou_by_hand_with_an_ignored_pixel():
    target = torch.tensor([[[0, 0, 1], [0, 1, 1], [2, 2, 255]]])
    pred = [[0, 1, 1], [0, 1, 2], [2, 0, 0]]  # the ignored pixel's prediction does not count
    metrics = MulticlassMetrics(3, class_names=["background", "glass", "cup"])
    metrics.update(onehot_logits(pred, 3), target)
    results = metrics.compute()
    # confusion (rows gt, columns prediction): [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert torch.equal(metrics.state()["confusion"], torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 1]]))
    # IoU_0 = 2 / (3 + 3 - 2), IoU_1 = 2 / (3 + 3 - 2), IoU_2 = 1 / (2 + 2 - 1)
    assert results["iou/background"] == pytest.approx(1 / 2)
    assert results["iou/glass"] == pytest.approx(1 / 2)
    assert results["iou/cup"] == pytest.approx(1 / 3)
    assert results["miou"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert results["pixel_accuracy"] == pytest.approx(5 / 8)
    assert results["mean_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)


def test_miou_leaves_out_classes_absent_from_gt_and_prediction():
    target = torch.tensor([[[0, 0, 1], [0, 1, 1], [2, 2, 255]]])
    pred = [[0, 1, 1], [0, 1, 2], [2, 0, 0]]
    metrics = MulticlassMetrics(5)
    metrics.update(torch.tensor([pred]), target)  # integer labels are accepted as they are
    results = metrics.compute()
    assert results["miou"] == pytest.approx(4 / 9)
    assert "iou/3" not in results and "iou/4" not in results
    # a class predicted but absent from the gt counts, with IoU 0
    metrics.update(torch.tensor([[[3]]]), torch.tensor([[[0]]]))
    results = metrics.compute()
    assert results["iou/3"] == 0.0
    assert results["miou"] == pytest.approx((2 / 5 + 1 / 2 + 1 / 3 + 0) / 4)


# ---------------------------------------------------------------- accumulation across processes


def random_binary_images(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    images = []
    for index in range(count):
        h, w = 10 + index, 12 - index
        target = (torch.rand(1, h, w, generator=generator) > 0.6).long()
        target[0, 0, 0] = 255
        images.append((torch.randn(1, 1, h, w, generator=generator) + 2 * target[:, None], target))
    return images


def test_binary_state_merged_from_halves_equals_the_whole():
    images = random_binary_images(4)
    whole, first, second = BinaryMetrics(), BinaryMetrics(), BinaryMetrics()
    for index, (logits, target) in enumerate(images):
        whole.update(logits, target)
        (first if index < 2 else second).update(logits, target)
    merged = BinaryMetrics()
    merged.merge(first)
    merged.merge(second.state())
    # what the trainer does under several processes: sum the states (all-reduce), then load
    reduced = BinaryMetrics()
    reduced.load_state({key: first.state()[key] + second.state()[key] for key in first.state()})
    expected = whole.compute()
    for candidate in (merged, reduced):
        for key, value in candidate.compute().items():
            assert value == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    assert int(reduced.state()["images"]) == 4


def test_multiclass_state_merged_from_halves_equals_the_whole():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 5, 6, generator=generator)
    target = torch.randint(0, 3, (4, 5, 6), generator=generator)
    target[:, 0, 0] = 255
    whole, first, second = MulticlassMetrics(3), MulticlassMetrics(3), MulticlassMetrics(3)
    whole.update(logits, target)
    first.update(logits[:2], target[:2])
    second.update(logits[2:], target[2:])
    first.merge(second)
    assert torch.equal(first.state()["confusion"], whole.state()["confusion"])
    assert first.compute() == whole.compute()


def test_state_holds_only_summable_tensors_and_reset_clears_it():
    metrics = BinaryMetrics()
    logits, target = random_binary_images(1)[0]
    metrics.update(logits, target)
    state = metrics.state()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert state["e_measure_curve_sum"].shape == (256,)
    state["images"] += 100  # a copy: the accumulator is unchanged
    assert int(metrics.state()["images"]) == 1
    metrics.reset()
    with pytest.raises(ValueError, match="no image with valid pixels"):
        metrics.compute()


def test_load_state_rejects_a_state_of_another_shape():
    with pytest.raises(ValueError, match="do not match"):
        BinaryMetrics(sod_metrics=False).load_state(BinaryMetrics().state())
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(4, 4\)"):
        MulticlassMetrics(4).load_state(MulticlassMetrics(3).state())


# ---------------------------------------------------------------- checkpoint selection and errors


def test_main_metric_of_every_task_family_is_computed_and_has_a_direction():
    binary_keys = set(binary(GT, GT))
    multiclass = MulticlassMetrics(3)
    multiclass.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 2]]]))
    multiclass_keys = set(multiclass.compute())
    from convlora.evaluation.instances import instance_scores

    ids = np.zeros((4, 4), np.int32)
    ids[:2, :2] = 1
    instance_keys = set(instance_scores(ids, ids))
    instance_keys |= {f"{key}_pooled" for key in instance_keys} | {"count_error_abs"}  # over a dataset
    keys = {"multiclass": multiclass_keys, "instances": instance_keys}
    for task, metric in MAIN_METRICS.items():
        assert metric.name in keys.get(task, binary_keys), task
        assert HIGHER_IS_BETTER[metric.name] == metric.higher_is_better, task
    prompted = {"object_iou", "object_dice"}  # computed by prompted evaluation (convlora.training.prompted)
    ranked = set(HIGHER_IS_BETTER) - binary_keys - {"miou", "pixel_accuracy", "mean_accuracy"} - prompted
    assert binary_keys | {"miou", "pixel_accuracy", "mean_accuracy"} | prompted <= set(HIGHER_IS_BETTER)
    assert ranked and ranked <= instance_keys, ranked - instance_keys
    assert main_metric("shadow").name == "ber" and not main_metric("shadow").higher_is_better
    assert main_metric("polyp").name == "s_measure"


def test_is_better_follows_the_metric_direction():
    assert is_better("ber", 3.0, 4.0) and not is_better("ber", 5.0, 4.0)
    assert is_better("s_measure", 0.9, 0.8) and not is_better("mae", 0.09, 0.08)
    assert is_better("iou/glass", 0.5, None) and not is_better("iou", float("nan"), 0.1)
    assert higher_is_better("miou")
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        higher_is_better("accuracy")
    with pytest.raises(ValueError, match="unknown task family 'lungs'"):
        main_metric("lungs")


def test_build_metrics_per_mode():
    assert isinstance(build_metrics("binary", sod_metrics=False), BinaryMetrics)
    assert build_metrics("multiclass", num_classes=4).num_classes == 4
    with pytest.raises(ValueError, match="need num_classes"):
        build_metrics("multiclass")
    with pytest.raises(ValueError, match="mode must be"):
        build_metrics("auto")


def test_metrics_refuse_bad_inputs_with_clear_messages():
    metrics = BinaryMetrics(sod_metrics=False)
    with pytest.raises(ValueError, match=r"values \[128\]; expected 0, 1 or 255"):
        metrics.update(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 255], [128, 1]]]))
    with pytest.raises(ValueError, match="resize predictions to the original image size"):
        metrics.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        metrics.update(torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 2, 2, dtype=torch.long), from_logits=False)
    with pytest.raises(ValueError, match="preds has 2 channels, expected 3"):
        MulticlassMetrics(3).update(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside 0..2"):
        MulticlassMetrics(3).update(torch.zeros(1, 3, 1, 2), torch.tensor([[[5, 0]]]))
