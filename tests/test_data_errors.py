"""Every kind of dataset problem is found, named with its file, and listed together with the others."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlora.data import (
    DatasetError,
    Sample,
    SegmentationDataset,
    check_dataset,
    inspect_dataset,
    load_datasets,
    read_image,
)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def picture(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask_of(values, height: int = 12, width: int = 16) -> np.ndarray:
    """A mask holding each of ``values`` in a vertical band."""
    mask = np.zeros((height, width), np.uint8)
    for i, value in enumerate(values):
        mask[:, i * width // len(values) : (i + 1) * width // len(values)] = value
    return mask


def pair(root: Path, name: str, values=(0, 255), image_ext: str = ".png") -> None:
    save(root / "images" / f"{name}{image_ext}", picture())
    save(root / "masks" / f"{name}.png", mask_of(values))


def only_problem(report, kind: str):
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.format()
    return found[0]


def test_empty_folder_is_refused_with_the_layouts_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    report = inspect_dataset(tmp_path)
    problem = only_problem(report, "empty")
    assert problem.path == str(tmp_path) and "no images found" in problem.message
    assert "images/ and masks/" in problem.message and "['stuff']" in problem.message
    with pytest.raises(DatasetError, match="no images found") as caught:
        check_dataset(tmp_path, skip_bad=True)  # skip_bad cannot help a dataset-wide problem
    assert isinstance(caught.value, ValueError) and caught.value.report is not None


def test_missing_source_is_reported(tmp_path):
    problem = only_problem(inspect_dataset(tmp_path / "nope"), "not_found")
    assert problem.path == str(tmp_path / "nope") and "does not exist" in problem.message


def test_image_without_mask_names_the_image_and_the_expected_mask(tmp_path):
    pair(tmp_path, "a")
    save(tmp_path / "images" / "lonely.jpg", picture())
    problem = only_problem(inspect_dataset(tmp_path), "missing_mask")
    assert problem.path == str(tmp_path / "images" / "lonely.jpg")
    assert "image without mask" in problem.message and "lonely.<ext>" in problem.message


def test_mask_without_image_names_the_mask(tmp_path):
    pair(tmp_path, "a")
    save(tmp_path / "masks" / "orphan.png", mask_of([0]))
    problem = only_problem(inspect_dataset(tmp_path), "missing_image")
    assert problem.path == str(tmp_path / "masks" / "orphan.png")
    assert "mask without image" in problem.message and "orphan.<ext>" in problem.message


def test_size_mismatch_names_the_mask_and_both_sizes(tmp_path):
    save(tmp_path / "images" / "a.png", picture(12, 16))
    save(tmp_path / "masks" / "a.png", mask_of([0, 255], 10, 16))
    problem = only_problem(inspect_dataset(tmp_path), "size_mismatch")
    assert problem.path == str(tmp_path / "masks" / "a.png")
    assert "mask is 10x16" in problem.message and "a.png is 12x16" in problem.message
    assert "expected the same size" in problem.message


def test_size_mismatch_explains_an_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "images" / "a.jpg", picture(12, 16), exif=exif)
    save(tmp_path / "masks" / "a.png", mask_of([0, 255], 12, 16))
    problem = only_problem(inspect_dataset(tmp_path), "size_mismatch")
    assert "EXIF rotation" in problem.message and "16x12" in problem.message


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_truncated_image_is_a_problem_not_a_crash(tmp_path, extension):
    pair(tmp_path, "good")
    path = save(tmp_path / "images" / f"cut{extension}", picture(64, 64))
    save(tmp_path / "masks" / "cut.png", mask_of([0, 255], 64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = inspect_dataset(tmp_path)
    problem = only_problem(report, "unreadable_image")
    assert problem.path == str(path) and "unreadable image" in problem.message
    assert "truncated" in problem.message or "broken" in problem.message or "Error" in problem.message
    assert [s.key for s in report.usable_samples()] == ["good"]
    with pytest.raises(DatasetError, match="cut"):
        read_image(path)


def test_garbage_image_and_mask_files_are_problems(tmp_path):
    pair(tmp_path, "good")
    (tmp_path / "images" / "junk.png").write_bytes(b"not a png at all")
    save(tmp_path / "images" / "badmask.png", picture())
    save(tmp_path / "masks" / "junk.png", mask_of([0, 255]))
    (tmp_path / "masks" / "badmask.png").write_bytes(b"garbage")
    report = inspect_dataset(tmp_path)
    assert only_problem(report, "unreadable_image").path.endswith("images/junk.png")
    assert only_problem(report, "unreadable_mask").path.endswith("masks/badmask.png")


def test_mask_values_that_fit_no_binary_encoding_are_named(tmp_path):
    pair(tmp_path, "a", (0, 1))
    pair(tmp_path, "b", (0, 1, 2))
    problem = only_problem(inspect_dataset(tmp_path, mode="binary"), "mask_values")
    assert problem.path == str(tmp_path / "masks" / "b.png")
    assert "[2]" in problem.message and "0/255" in problem.message and "0/1" in problem.message


@pytest.mark.parametrize("declared", ["classes_json", "num_classes"])
def test_class_ids_beyond_num_classes_are_named(tmp_path, declared):
    pair(tmp_path, "a", (0, 1, 2))
    pair(tmp_path, "b", (0, 5, 255))
    num_classes = None
    if declared == "classes_json":
        (tmp_path / "classes.json").write_text(json.dumps(["background", "cat", "dog"]))
    else:
        num_classes = 3
    problem = only_problem(inspect_dataset(tmp_path, num_classes=num_classes), "class_out_of_range")
    assert problem.path == str(tmp_path / "masks" / "b.png")
    assert "[5] >= num_classes 3" in problem.message and "0..2" in problem.message


def test_colour_masks_ask_for_index_masks(tmp_path):
    save(tmp_path / "images" / "a.png", picture())
    colour = np.zeros((12, 16, 3), np.uint8)
    colour[:, 8:] = (128, 0, 0)
    save(tmp_path / "masks" / "a.png", colour)
    problem = only_problem(inspect_dataset(tmp_path), "colour_mask")
    assert problem.path == str(tmp_path / "masks" / "a.png")
    assert "(128, 0, 0)" in problem.message and "index mask" in problem.message


def test_csv_lines_pointing_to_missing_files_are_named(tmp_path):
    pair(tmp_path, "a")
    pair(tmp_path, "b")
    lines = ["image,mask", "images/a.png,masks/a.png", "images/gone.png,masks/a.png", "images/b.png,masks/gone.png"]
    (tmp_path / "list.csv").write_text("\n".join([*lines, "images/a.png,masks/b.png"]) + "\n")
    report = inspect_dataset(tmp_path / "list.csv")
    missing = [p for p in report.problems if p.kind == "missing_file"]
    assert [p.path for p in missing] == [str(tmp_path / "images" / "gone.png"), str(tmp_path / "masks" / "gone.png")]
    assert "line 3" in missing[0].message and "'images/gone.png' does not exist" in missing[0].message
    duplicate = only_problem(report, "duplicate")
    assert "line 5" in duplicate.message and "first on line 2" in duplicate.message


def test_unknown_csv_columns_are_named_with_the_expected_ones(tmp_path):
    pair(tmp_path, "a")
    (tmp_path / "list.csv").write_text("image,msk\nimages/a.png,masks/a.png\n")
    problem = only_problem(inspect_dataset(tmp_path / "list.csv"), "csv_columns")
    assert problem.path == str(tmp_path / "list.csv")
    assert "msk" in problem.message and "'image,mask'" in problem.message


def test_duplicate_names_and_bad_classes_json_are_problems(tmp_path):
    pair(tmp_path, "a")
    save(tmp_path / "images" / "a.jpg", picture())
    (tmp_path / "classes.json").write_text('{"0": "background", "2": "dog"}')
    report = inspect_dataset(tmp_path)
    assert "a.jpg, a.png" in only_problem(report, "duplicate").message
    assert "missing [1]" in only_problem(report, "classes_json").message


def test_soft_binary_masks_are_detected(tmp_path):
    save(tmp_path / "images" / "a.png", picture(40, 40))
    soft = np.zeros((40, 40), np.uint8)
    soft[:, 20:] = 255
    soft[:, 18:22] = np.linspace(10, 240, 40, dtype=np.uint8)[:, None]  # an interpolated edge
    save(tmp_path / "masks" / "a.png", soft)
    problem = only_problem(inspect_dataset(tmp_path), "soft_masks")
    assert "anti-aliased" in problem.message and "threshold" in problem.message
    assert not [p for p in inspect_dataset(tmp_path, mode="multiclass").problems if p.kind == "soft_masks"]


def test_mixed_0_255_and_0_1_masks_are_a_problem(tmp_path):
    for name in "abc":
        pair(tmp_path, name, (0, 255))
    pair(tmp_path, "d", (0, 1))
    problem = only_problem(inspect_dataset(tmp_path), "mixed_masks")
    assert "3 of 4 masks hold only 0 and 255" in problem.message


def test_all_problems_are_listed_at_once(tmp_path):
    pair(tmp_path, "good", (0, 1))
    save(tmp_path / "images" / "no_mask.png", picture())
    save(tmp_path / "masks" / "no_image.png", mask_of([0, 1]))
    save(tmp_path / "images" / "small.png", picture())
    save(tmp_path / "masks" / "small.png", mask_of([0, 1], 6, 8))
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    save(tmp_path / "masks" / "broken.png", mask_of([0, 1]))
    save(tmp_path / "images" / "wrong.png", picture())
    save(tmp_path / "masks" / "wrong.png", mask_of([0, 1, 7]))
    report = inspect_dataset(tmp_path, mode="binary")
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["mask_values", "missing_image", "missing_mask", "size_mismatch", "unreadable_image"]
    text = report.format()
    assert all(str(p) in text for p in report.problems)
    json.dumps(report.to_dict())  # JSON-able
    assert [s.key for s in report.usable_samples()] == ["good"]


def test_check_dataset_lists_the_first_twenty_problems_and_the_count(tmp_path):
    pair(tmp_path, "a")
    for i in range(25):
        save(tmp_path / "images" / f"extra_{i:02d}.png", picture())
    with pytest.raises(DatasetError) as caught:
        check_dataset(tmp_path)
    message = str(caught.value)
    assert "has 25 problems" in message and "... and 5 more" in message
    assert "extra_19.png" in message and "extra_20.png" not in message
    assert "skip_bad=True" in message


def test_skip_bad_leaves_out_bad_samples_and_counts_them(tmp_path):
    pair(tmp_path, "a")
    pair(tmp_path, "b")
    save(tmp_path / "images" / "c.png", picture())
    save(tmp_path / "images" / "d.png", picture(10, 10))
    save(tmp_path / "masks" / "d.png", mask_of([0, 255]))
    report = check_dataset(tmp_path, skip_bad=True)
    assert report.skipped == 2 and [s.key for s in report.usable_samples()] == ["a", "b"]
    assert "skipped 2 bad samples" in report.format()
    assert report.to_dict()["skipped"] == 2


def test_unchecked_bad_masks_fail_in_the_dataset_with_the_file_named(tmp_path):
    pair(tmp_path, "a", (0, 3))
    dataset = SegmentationDataset([Sample(str(tmp_path / "images" / "a.png"), str(tmp_path / "masks" / "a.png"))])
    with pytest.raises(DatasetError, match=r"masks/a\.png: labels \[3\] outside 0\.\.1"):
        dataset[0]


def test_training_refuses_data_without_masks_or_a_train_split(tmp_path):
    save(tmp_path / "plain" / "a.png", picture())
    with pytest.raises(DatasetError, match="training needs masks"):
        load_datasets(tmp_path / "plain")
    pair(tmp_path / "splits" / "val", "a")
    with pytest.raises(DatasetError, match="no train split"):
        load_datasets(tmp_path / "splits")
