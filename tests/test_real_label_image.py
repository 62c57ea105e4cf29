"""A real microscopy instance label image, read as shipped: 2018 Data Science Bowl nuclei from the stardist wheel.

Nothing here is generated. ``tests/data/real/stardist_nuclei_2d/`` holds a fluorescence image and its hand-drawn
label image exactly as the ``stardist`` 0.9.2 wheel ships them (its README gives origin, licence, credit and
sha256). Every expected number is computed here from the files with tifffile, Pillow, numpy and scipy, never with
the convlora code under test.
"""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from convlora import Segmenter
from convlora.artifact import TaskInfo
from convlora.artifact.methods import build_task_model
from convlora.data import check_dataset, instance_masks, load_datasets, read_image, read_image_size, read_mask
from convlora.data.instances import InstanceStats, instance_ids, instance_labels, instance_stats
from convlora.evaluation import DEFAULT_THRESHOLDS, InstanceMetrics, connected_components, instance_scores
from convlora.instances import instance_targets
from convlora.instances.files import save_id_map
from convlora.models import random_sam, tiny_sam_config

REAL = Path(__file__).parent / "data" / "real" / "stardist_nuclei_2d"
IMAGE, MASK = REAL / "img2d.tif", REAL / "mask2d.tif"
SHA256 = {
    "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
}
# Two touching nuclei of the label image (35 shared 4-neighbour edges, the longest contact in it).
MERGED_PAIR = (156, 173)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """The label image as tifffile reads it, the reference every test compares with."""
    return tifffile.imread(MASK)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return tifffile.imread(IMAGE)


def copy_pair(folder: Path) -> None:
    """``folder/images/nuclei.tif`` + ``folder/masks/nuclei.tif``: the files copied byte for byte."""
    for kind, source in (("images", IMAGE), ("masks", MASK)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / kind / "nuclei.tif")


def touching_pairs(ids: np.ndarray) -> dict[tuple[int, int], int]:
    """``(smaller id, larger id)`` -> how many 4-neighbour pixel edges the two objects share."""
    ids = ids.astype(np.int64)
    counts: dict[tuple[int, int], int] = {}
    for first, second in ((ids[:, :-1], ids[:, 1:]), (ids[:-1], ids[1:])):
        contact = (first != second) & (first > 0) & (second > 0)
        low, high = np.minimum(first, second)[contact], np.maximum(first, second)[contact]
        for pair in zip(low.tolist(), high.tolist(), strict=True):
            counts[pair] = counts.get(pair, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ the files


def test_the_files_are_the_bytes_stardist_ships_and_the_readme_names_their_hashes():
    readme = (REAL / "README.md").read_text()
    for name, digest in SHA256.items():
        assert hashlib.sha256((REAL / name).read_bytes()).hexdigest() == digest
        assert digest in readme
    assert "BSD 3-Clause" in (REAL / "LICENSE-stardist.txt").read_text()


def test_the_label_image_is_a_plain_uint16_tiff_that_pillow_reads_the_same(labels):
    with tifffile.TiffFile(MASK) as tif:
        page = tif.pages[0]
        assert (len(tif.pages), page.shape, page.dtype, int(page.compression)) == (1, (512, 512), np.uint16, 1)
    assert np.array_equal(np.asarray(Image.open(MASK)), labels)  # a second, independent decoder agrees


# ------------------------------------------------------------------------------------ reading


def test_read_mask_gives_the_stored_uint16_ids_of_125_nuclei_with_gaps_in_the_numbering(labels):
    mask = read_mask(MASK)
    assert mask.dtype == np.uint16 and mask.shape == (512, 512)
    assert np.array_equal(mask, labels)
    expected_ids = np.unique(labels)[1:]
    assert np.array_equal(instance_ids(mask), expected_ids)
    assert (len(expected_ids), int(expected_ids.max())) == (125, 183)  # ids 1..183, 58 of them unused
    ids, objects = instance_masks(mask)
    assert np.array_equal(ids, expected_ids)
    assert np.array_equal(objects.sum(axis=(1, 2)), np.bincount(labels.ravel())[expected_ids])


def test_touching_and_diagonally_joined_real_objects_each_count_as_one_region(labels):
    eight = np.ones((3, 3), bool)
    assert ndimage.label(labels > 0, structure=eight)[1] == 102  # 125 nuclei in 102 blobs: 21 pairs touch
    assert connected_components(labels > 0).max() == 102
    assert len(touching_pairs(labels)) == 21
    # object 129 is joined only through a diagonal step, as a hand-drawn outline can be
    assert ndimage.label(labels == 129)[1] == 2 and ndimage.label(labels == 129, structure=eight)[1] == 1
    assert instance_stats(read_mask(MASK)) == InstanceStats(ids=125, single_region=125)


def test_check_dataset_recognises_the_real_label_image_as_instance_masks(tmp_path):
    copy_pair(tmp_path)
    report = check_dataset(tmp_path)
    assert (report.mode, report.num_classes, report.mask_encoding) == ("binary", 2, "instances")
    assert report.class_names == ["background", "object"] and not report.problems
    assert any("up to 125 objects per mask; recognised by their shape" in note for note in report.notes)
    assert report.image_values["all:nuclei"] == {"type": "uint16", "channels": 1, "min": 0.0, "max": 235.0}
    assert any("1st..99.8th percentile" in note for note in report.notes)
    assert any("values 0..235 of uint16 0..65535" in warning for warning in report.warnings)
    # read as class ids instead, the same file is a 184-class map: the instance reading is the choice made above
    classes = check_dataset(tmp_path, mask_reading="classes")
    assert (classes.mode, classes.num_classes, classes.mask_encoding) == ("multiclass", 184, "ids")


def test_instance_mode_trains_on_the_ids_renumbered_in_order_and_keeps_the_stored_ids(tmp_path, labels):
    for split in ("train", "val"):
        copy_pair(tmp_path / split)
    data = load_datasets(tmp_path, mode="instances", image_size=512)
    assert data.mode == "instances" and data.task_family == "instances"
    assert np.array_equal(data.val.original_ids(0), labels)
    lookup = np.zeros(int(labels.max()) + 1, np.int64)
    lookup[np.unique(labels)[1:]] = np.arange(1, 126)  # id i -> its rank among the 125 ids
    target = data.val[0]["labels"]
    assert target.dtype == torch.int64 and target.shape == (512, 512)
    assert np.array_equal(target.numpy(), lookup[labels])
    assert np.array_equal(instance_labels(read_mask(MASK)), lookup[labels])


def test_an_instance_map_survives_the_16_bit_png_that_predictions_are_saved_as(tmp_path, labels):
    path = save_id_map(read_mask(MASK), tmp_path / "ids")
    assert path.suffix == ".png"
    again = read_mask(path)
    assert again.dtype == np.uint16 and np.array_equal(again, labels)


# ------------------------------------------------------------------------------------ metrics


def test_the_real_labels_score_exactly_one_against_themselves(labels):
    scores = instance_scores(read_mask(MASK), labels)
    for key in ("msa", "sa50", "sa75", "ap50", "f1_50", "precision_50", "recall_50"):
        assert scores[key] == 1.0, key
    assert (scores["n_true"], scores["n_pred"], scores["count_error"]) == (125, 125, 0)


def test_merging_two_touching_real_nuclei_lowers_the_scores_by_the_exact_amount(labels):
    first, second = MERGED_PAIR
    assert touching_pairs(labels)[MERGED_PAIR] == 35
    areas = np.bincount(labels.ravel())
    assert (areas[first], areas[second]) == (266, 440)
    merged = np.where(labels == first, second, labels)  # one predicted object covering both
    # the merged object's IoU with each part is that part's area over both areas: 440 / 706 = 0.623 at best
    share = max(areas[first], areas[second]) / (areas[first] + areas[second])
    tp = {t: 123 + (share >= t) for t in DEFAULT_THRESHOLDS}  # 124 predictions, 125 true objects
    accuracy = {t: tp[t] / (125 + 124 - tp[t]) for t in DEFAULT_THRESHOLDS}  # TP / (TP + FP + FN)
    assert [tp[t] for t in DEFAULT_THRESHOLDS] == [124, 124, 124] + [123] * 7  # matched up to IoU 0.6 only
    scores = instance_scores(read_mask(MASK), merged)
    assert scores["msa"] == pytest.approx(np.mean(list(accuracy.values())), abs=1e-12)
    assert scores["msa"] == pytest.approx((3 * 124 / 125 + 7 * 123 / 126) / 10, abs=1e-12)
    assert scores["sa50"] == pytest.approx(124 / 125) and scores["sa75"] == pytest.approx(123 / 126)
    assert scores["f1_50"] == pytest.approx(2 * 124 / (125 + 124))
    assert (scores["n_true"], scores["n_pred"], scores["count_error"]) == (125, 124, -1)

    metrics = InstanceMetrics()
    metrics.update(labels, labels)
    metrics.update(labels, merged)
    result = metrics.compute()
    assert result["msa"] == pytest.approx((1.0 + scores["msa"]) / 2, abs=1e-12)
    pooled = [(125 + tp[t]) / (250 + 249 - 125 - tp[t]) for t in DEFAULT_THRESHOLDS]
    assert result["msa_pooled"] == pytest.approx(np.mean(pooled), abs=1e-12)


# ------------------------------------------------------------------------------------ targets


def test_instance_targets_of_the_real_labels_follow_every_object_and_shared_edge(labels):
    maps = instance_targets(read_mask(MASK))
    foreground, centre, boundary = maps
    assert maps.shape == (3, 512, 512) and maps.dtype == np.float32
    assert np.array_equal(foreground == 1.0, labels > 0) and np.array_equal(foreground == 0.0, labels == 0)
    peaks = labels[centre == 1.0]  # one centre pixel per object, inside it
    assert np.array_equal(np.sort(peaks), np.unique(labels)[1:])
    # an object pixel with a 4-neighbour in the image holding another id (or background) is an edge: boundary 0
    padded = np.pad(labels.astype(np.int64), 1, mode="edge")  # the image border is no edge
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    edge = (labels > 0) & np.any([n != labels for n in neighbours], axis=0)
    assert edge.sum() > 0 and np.all(boundary[edge] == 0.0)
    cut = (labels > 0) & ~edge
    cut[1:-1, 1:-1] = False  # object pixels on the image border with no other id beside them
    assert cut.sum() > 0 and np.all(boundary[cut] > 0.0)
    # each object's deepest pixels reach 1, except a hand-drawn sliver two pixels thick (rows 509-510), which
    # is all edge: its boundary map is 0 everywhere, as documented for objects at most two pixels thick
    rows = np.nonzero(labels == 155)[0]
    assert (rows.min(), rows.max(), int((labels == 155).sum())) == (509, 510, 25)
    ids = np.unique(labels)[1:]
    deepest = np.asarray(ndimage.maximum(boundary, labels, ids))
    assert deepest[ids == 155] == 0.0 and np.all(deepest[ids != 155] == 1.0)


# ------------------------------------------------------------------------------------ the raw image


def test_read_image_keeps_the_16_bit_values_and_stretches_them_as_documented(pixels):
    assert pixels.dtype == np.uint16 and (int(pixels.min()), int(pixels.max())) == (0, 235)
    assert read_image_size(IMAGE) == (512, 512)
    kept = read_image(IMAGE, {"intensity": "none"})  # values 0..235 fit 0..255: kept exactly, grey to RGB
    assert kept.dtype == np.uint8 and kept.shape == (512, 512, 3)
    assert all(np.array_equal(kept[..., c], pixels) for c in range(3))
    minmax = read_image(IMAGE, {"intensity": "minmax"})[..., 0].astype(np.int64)
    assert np.array_equal(minmax, (pixels.astype(np.int64) * 255 * 2 + 235) // (235 * 2))  # round half up
    values = pixels.astype(np.float64)
    low, high = np.percentile(values, (1.0, 99.8))
    exact = np.clip((values - low) * 255.0 / (high - low), 0, 255)
    read = read_image(IMAGE)
    assert all(np.array_equal(read[..., c], read[..., 0]) for c in range(3))
    assert np.all(np.abs(read[..., 0] - exact) <= 0.5 + 1e-4)  # each value rounded to a nearest integer
    assert np.all(read[values <= low] == 0) and np.all(read[values >= high] == 255)


def test_a_tiny_instance_model_predicts_an_id_map_of_the_real_image_shape():
    head = {"hidden_channels": 8}
    task = TaskInfo("instances", 2, ["background", "object"], 64, "random", "conv_lora", instance_head=head)
    segmenter = Segmenter(build_task_model(random_sam(tiny_sam_config(), seed=0), task).eval(), task)
    for tile in (None, 256):
        ids, found = segmenter.predict_instances(IMAGE, "ais", tile=tile, overlap=32 if tile else 0)
        assert ids.shape == (512, 512) and ids.dtype == np.int32
        assert np.array_equal(np.unique(ids[ids > 0]), np.arange(1, len(found) + 1))  # objects 1..n
        assert instance_scores(read_mask(MASK), ids)["n_true"] == 125
