"""Prompts from hand-made masks (exact boxes, points inside, negatives outside, bounded jitter) and prompts files."""

import json

import numpy as np
import pytest

from convlora.data.prompt_files import (
    build_prompts,
    load_prompts,
    read_prompts_file,
    write_coco_boxes,
    write_prompts_file,
)
from convlora.data.prompts import (
    PAD_LABEL,
    PromptConfig,
    boxes_from_masks,
    correction_points,
    derive_prompts,
    find_objects,
    interior_point,
    points_from_masks,
    sample_objects,
)


def two_blobs() -> np.ndarray:
    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:12] = 1  # 6 x 9 = 54 pixels
    labels[12:18, 20:24] = 1  # 6 x 4 = 24 pixels
    labels[0, 29] = 1  # a single pixel
    return labels


def test_binary_objects_are_connected_components_largest_first():
    objects = find_objects(two_blobs())
    assert objects.masks.sum(axis=(1, 2)).tolist() == [54, 24, 1]
    assert objects.class_ids.tolist() == [1, 1, 1]


def test_min_area_drops_small_components():
    assert len(find_objects(two_blobs(), min_area=2)) == 2
    assert len(find_objects(two_blobs(), min_area=30)) == 1


def test_diagonal_pixels_are_one_component():
    labels = np.eye(4, dtype=np.uint8)
    assert len(find_objects(labels)) == 1


def test_ignored_pixels_belong_to_no_object():
    labels = two_blobs()
    labels[2:8, 3:12] = 255
    assert find_objects(labels).masks.sum(axis=(1, 2)).tolist() == [24, 1]


def test_instance_ids_are_objects_even_when_touching():
    labels = np.zeros((6, 6), np.uint16)
    labels[1:3, 1:3] = 7
    labels[1:3, 3:5] = 300
    objects = find_objects(labels, "instances")
    assert objects.class_ids.tolist() == [7, 300]
    assert objects.masks.sum(axis=(1, 2)).tolist() == [4, 4]


def test_class_objects_are_components_of_each_class():
    labels = np.zeros((8, 8), np.uint8)
    labels[0:2, 0:2] = 2
    labels[5:8, 5:8] = 2
    labels[0:3, 5:8] = 1
    objects = find_objects(labels, "classes")
    assert objects.class_ids.tolist() == [1, 2, 2]
    assert objects.masks.sum(axis=(1, 2)).tolist() == [9, 9, 4]


def test_exact_box_is_the_component_extent():
    boxes = boxes_from_masks(find_objects(two_blobs()).masks)
    assert boxes.tolist() == [[3, 2, 11, 7], [20, 12, 23, 17], [29, 0, 29, 0]]


def test_jittered_boxes_move_at_most_the_fraction_of_their_side_and_stay_in_the_image():
    masks = find_objects(two_blobs(), min_area=2).masks
    exact = boxes_from_masks(masks)
    rng = np.random.default_rng(3)
    moved = False
    for _ in range(50):
        jittered = boxes_from_masks(masks, jitter=0.2, rng=rng)
        sides = np.array([[10, 6, 10, 6], [5, 6, 5, 6]], np.float32)  # (w + 1, h + 1) per coordinate
        assert (np.abs(jittered - exact) <= 0.2 * sides + 1e-5).all()
        assert (jittered[:, 0::2] >= 0).all() and (jittered[:, 0::2] <= 29).all()
        assert (jittered[:, 1::2] >= 0).all() and (jittered[:, 1::2] <= 19).all()
        assert (jittered[:, 0] <= jittered[:, 2]).all() and (jittered[:, 1] <= jittered[:, 3]).all()
        moved |= not np.allclose(jittered, exact)
    assert moved


def test_deepest_point_is_the_centre_of_a_rectangle():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 1:8] = True
    assert interior_point(mask).tolist() == [4.0, 4.0]


def test_positive_points_lie_inside_away_from_the_border_and_negatives_outside():
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 5:25] = 1
    labels[0:40, 35:40] = 255  # ignored strip
    masks = find_objects(labels).masks
    rng = np.random.default_rng(0)
    for _ in range(20):
        points, point_labels = points_from_masks(masks, num_positive=3, num_negative=4, rng=rng, valid=labels != 255)
        assert point_labels.tolist() == [[1, 1, 1, 0, 0, 0, 0]]
        cols, rows = points[0, :, 0].astype(int), points[0, :, 1].astype(int)
        assert masks[0][rows[:3], cols[:3]].all()
        # away from the border: at least half the deepest distance (10) from the outside
        assert ((rows[:3] >= 14) & (rows[:3] <= 25) & (cols[:3] >= 9) & (cols[:3] <= 20)).all()
        assert not masks[0][rows[3:], cols[3:]].any()
        assert (labels[rows[3:], cols[3:]] != 255).all()


def test_negative_points_become_padding_when_the_object_fills_the_image():
    masks = np.ones((1, 4, 4), bool)
    _, point_labels = points_from_masks(masks, num_negative=1, rng=np.random.default_rng(0))
    assert point_labels.tolist() == [[1, PAD_LABEL]]


def test_correction_click_is_positive_in_a_missed_region():
    target = np.zeros((1, 12, 12), bool)
    target[0, 2:10, 2:10] = True
    prediction = target.copy()
    prediction[0, 2:10, 6:10] = False  # missed the right half (32 px)
    prediction[0, 0, 0] = True  # one false alarm
    points, labels = correction_points(prediction, target, rng=np.random.default_rng(1))
    assert labels.tolist() == [1]
    col, row = points[0].astype(int)
    assert target[0, row, col] and not prediction[0, row, col]


def test_correction_click_is_negative_in_a_false_alarm():
    target = np.zeros((1, 12, 12), bool)
    target[0, 2:5, 2:5] = True
    prediction = target.copy()
    prediction[0, 6:12, 6:12] = True
    points, labels = correction_points(prediction, target, rng=np.random.default_rng(1))
    assert labels.tolist() == [0]
    col, row = points[0].astype(int)
    assert prediction[0, row, col] and not target[0, row, col]


def test_a_perfect_prediction_gets_a_padding_click():
    target = np.zeros((2, 5, 5), bool)
    target[:, 1:3, 1:3] = True
    _, labels = correction_points(target, target)
    assert labels.tolist() == [PAD_LABEL, PAD_LABEL]


def test_object_sampling_is_seeded_and_bounded():
    labels = np.zeros((10, 40), np.uint8)
    labels[2:5, 0:40:3] = 1  # 14 vertical bars
    objects = find_objects(labels)
    first = sample_objects(objects, 5, np.random.default_rng(7))
    again = sample_objects(objects, 5, np.random.default_rng(7))
    assert len(first) == 5
    assert np.array_equal(first.masks, again.masks)
    assert len(sample_objects(objects, 50, np.random.default_rng(7))) == 14


def test_evaluation_prompts_use_exact_boxes_and_fixed_seed_points():
    objects = find_objects(two_blobs(), min_area=2)
    config = PromptConfig(kind="box_point", box_jitter=0.3)
    first = derive_prompts(objects, "box_point", config, np.random.default_rng(0), training=False)
    again = derive_prompts(objects, "box_point", config, np.random.default_rng(0), training=False)
    assert first.boxes.tolist() == boxes_from_masks(objects.masks).tolist()
    assert np.array_equal(first.points, again.points)
    assert first.single_point.tolist() == [False, False]


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "lasso"), ("max_objects", 0), ("box_jitter", 1.5), ("correction_rounds", -1), ("num_points", True)],
)
def test_bad_prompt_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PromptConfig(**{field: value})


# --- prompts given by users: lists and files ----------------------------------------------------------------------


def test_prompts_json_round_trips(tmp_path):
    prompts = {
        "a.png": build_prompts(boxes=[[1, 2, 30, 40], [5, 5, 9, 9]]),
        "b.png": build_prompts(points=[[[3, 4], [8, 8]], [[10, 1]]], point_labels=[[1, 0], [1]]),
        "c.png": build_prompts(boxes=[[0, 0, 20, 20]], points=[[4, 4]]),
    }
    path = write_prompts_file(tmp_path / "prompts.json", prompts)
    back = load_prompts(path, {"a.png": (50, 50), "b.png": (50, 50), "c.png": (50, 50)})
    for name, entry in prompts.items():
        for key in ("boxes", "points", "point_labels"):
            original, loaded = getattr(entry, key), getattr(back[name], key)
            assert (original is None and loaded is None) or np.array_equal(original, loaded)


def test_coco_boxes_round_trip_as_xywh(tmp_path):
    boxes = {"a.png": [[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 9.0, 9.0]], "b.png": [[0.0, 0.0, 10.0, 12.5]]}
    sizes = {"a.png": (50, 60), "b.png": (20, 20)}
    path = write_coco_boxes(tmp_path / "coco.json", boxes, sizes)
    data = json.loads(path.read_text())
    assert data["annotations"][0]["bbox"] == [1.0, 2.0, 29.0, 38.0]
    back = load_prompts(path, sizes)
    assert {name: p.boxes.tolist() for name, p in back.items()} == boxes


def write(tmp_path, data) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"boxes": [[0, 0, 10, 10], [5, 5, 70, 10]]},
            r"p.json: a.png: boxes\[1\] is \[5, 5, 70, 10\], outside the 64x32",
        ),
        ({"boxes": [[20, 0, 10, 10]]}, r"boxes\[0\] .*x0 > x1"),
        ({"boxes": [[1, 2, 3]]}, r"boxes\[0\] .*four numbers"),
        ({"points": [[1, 1], [2, 2]], "point_labels": [1, 2]}, r"points\[1\] has label 2; point labels are 1"),
        ({"points": [[1, 1], [2, 2]], "point_labels": [1]}, r"2 points but 1 point_labels"),
        ({"points": [[1, 1], [80, 2]]}, r"points\[1\] is \[80, 2\], outside"),
        ({"boxes": [[0, 0, 5, 5], [1, 1, 6, 6]], "points": [[1, 1]]}, r"2 boxes but 1 point lists"),
        ({"point_labels": [1]}, r"point_labels given without points"),
        ({"box": [[0, 0, 5, 5]]}, r"unknown keys \['box'\]"),
    ],
)
def test_bad_prompt_entries_give_one_line_naming_file_and_entry(tmp_path, entry, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"a.png": entry}))
    with pytest.raises(ValueError, match=message) as error:
        load_prompts(path, {"a.png": (32, 64)})
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_an_image_not_in_the_folder_is_named(tmp_path):
    path = write(tmp_path, {"zebra.png": {"boxes": [[0, 0, 5, 5]]}})
    with pytest.raises(ValueError, match=r"image 'zebra.png' is not in the image folder \(it holds a.png\)"):
        load_prompts(path, {"a.png": (32, 64)})


def test_bad_coco_annotations_are_named(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match=r"annotations\[0\] names image_id 2"):
        read_prompts_file(write(tmp_path, coco))
    coco["annotations"] = [{"image_id": 1, "bbox": [0, 0, -1, 1]}]
    with pytest.raises(ValueError, match=r"annotations\[0\].bbox .*negative width"):
        read_prompts_file(write(tmp_path, coco))


def test_prompts_file_that_is_not_json_or_a_mapping_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompts_file(path)
    with pytest.raises(ValueError, match="must map image file names"):
        read_prompts_file(write(tmp_path, [1, 2]))
