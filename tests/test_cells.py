"""The synthetic cells domain: instance-id masks of phase-contrast cells packed into confluent patches, on 8-bit grey
images, written as 8-bit image and 16-bit mask PNGs that convlora's own readers take back unchanged."""

import numpy as np
import pytest
from scipy import ndimage

from convlora.synthetic import DOMAINS, preview_grid, sample, write_dataset
from convlora.synthetic import cells as cells_domain
from convlora.synthetic import nuclei as nuclei_domain

SEEDS = range(16)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    """Cells scenes of seeds 0..15 at 112 x 128 px (rendered once)."""
    return [cells_domain._render(np.random.default_rng(seed), 112, 128) for seed in SEEDS]


def _touching(ids: np.ndarray) -> np.ndarray:
    """Bool ``(h, w)``: pixels of a cell with a 4-neighbour of another cell (no background between them)."""
    out = np.zeros(ids.shape, bool)
    for axis in (0, 1):
        a, b = np.moveaxis(ids, axis, 0)[:-1], np.moveaxis(ids, axis, 0)[1:]
        meet = (a != b) & (a > 0) & (b > 0)
        np.moveaxis(out, axis, 0)[:-1] |= meet
        np.moveaxis(out, axis, 0)[1:] |= meet
    return out


def _touching_share(ids: np.ndarray) -> float:
    """Share of the image's cells that touch another one."""
    return len(set(ids[_touching(ids)].tolist())) / int(ids.max())


def test_the_registry_holds_cells_as_an_instance_domain_scored_by_msa():
    spec = DOMAINS["cells"]
    assert spec.mode == "instances" and spec.metric == "msa" and spec.generate is cells_domain.generate
    assert spec.class_names == ("background", "cell") and spec.num_classes == 2
    assert spec.imitates == "LIVECell (phase-contrast cell cytoplasm)"


def test_the_same_seed_draws_the_same_cells_and_another_seed_differs():
    image, ids = cells_domain.generate(np.random.default_rng(3), 64, 80)
    again, ids_again = cells_domain.generate(np.random.default_rng(3), 64, 80)
    other, _ = cells_domain.generate(np.random.default_rng(4), 64, 80)
    assert np.array_equal(image, again) and np.array_equal(ids, ids_again)
    assert not np.array_equal(image, other)


def test_ids_run_from_1_to_n_and_each_id_is_one_4_connected_region_of_some_size(scenes):
    extra = [cells_domain.generate(np.random.default_rng(s), h, w)[1] for s, (h, w) in enumerate([(17, 45), (40, 33)])]
    for ids in [scene["ids"] for scene in scenes] + extra:
        assert ids.dtype == np.uint16
        n = int(ids.max())
        assert np.unique(ids).tolist() == list(range(n + 1))
        min_area = max(3.0, cells_domain.MIN_AREA * (min(ids.shape) / 128) ** 2)
        for k in range(1, n + 1):
            assert ndimage.label(ids == k)[1] == 1, f"id {k} is in pieces"  # default structure: 4-connected
            assert (ids == k).sum() >= min_area


def test_counts_vary_from_a_few_to_dozens_with_empty_fields(scenes):
    counts = [int(scene["ids"].max()) for scene in scenes]
    assert min(c for c in counts if c) <= 6 and max(counts) >= 30
    placed = [len(cells_domain._place(np.random.default_rng(s), 128, 128, 1.0)) for s in range(100)]
    assert 0 < placed.count(0) <= 12  # about one field in twenty is empty


def test_most_images_hold_cells_that_share_a_boundary_with_no_background_between(scenes):
    busy = [scene["ids"] for scene in scenes if scene["ids"].max() >= 2]
    with_touching = [ids for ids in busy if _touching(ids).any()]
    assert len(with_touching) >= 0.8 * len(busy)
    shares = [_touching_share(ids) for ids in busy]
    assert np.mean(shares) > 0.55  # confluent patches: most cells, not one pair, touch another


def test_cells_are_larger_than_nuclei_at_the_same_image_size(scenes):
    def mean_area(maps: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(ids.ravel())[1:].mean() for ids in maps if ids.any()]))

    nuclei = [nuclei_domain.generate(np.random.default_rng(seed), 112, 128)[1] for seed in range(8)]
    assert mean_area([scene["ids"] for scene in scenes]) > 1.5 * mean_area(nuclei)


def test_images_are_8_bit_grey_with_a_mid_grey_background_and_faint_lines_between_cells(scenes):
    outer, between = [], []
    for scene in scenes:
        image, ids = scene["image"], scene["ids"]
        assert image.dtype == np.uint8 and image.shape == ids.shape
        background = image[ids == 0].astype(float)
        assert 90 <= np.median(background) <= 170 and np.percentile(background, 90) < 200
        fg = ids > 0
        if not fg.any():
            continue
        # Contrast against the cell interiors: the cluster's outer edge (halo) is loud, shared boundaries faint.
        touching = _touching(ids)
        interior = ndimage.binary_erosion(fg & ~ndimage.binary_dilation(touching, iterations=2), iterations=2)
        halo = ndimage.binary_dilation(fg, iterations=2) & ~fg
        if interior.sum() < 50 or touching.sum() < 20:
            continue
        level = np.median(image[interior])
        outer.append(abs(float(np.mean(image[halo])) - level))
        between.append(abs(float(np.mean(image[touching])) - level))
    assert len(outer) >= 8 and np.mean(outer) > 2 * np.mean(between)


def test_written_dataset_reads_back_through_convlora_readers_with_the_same_pixels_and_ids(tmp_path):
    from PIL import Image

    from convlora.data import SegmentationDataset, check_dataset, read_image, read_mask

    root = write_dataset("cells", tmp_path / "cells", train=3, val=1, test=0, size=48, seed=2)
    report = check_dataset(root)  # instance masks recognised by their shape, no flag needed
    assert report.mode == "binary" and report.mask_encoding == "instances"
    assert report.class_names == ["background", "cell"]
    dataset = SegmentationDataset.from_report(report, "train", image_size=32)
    for i in range(3):
        image, ids = sample("cells", i, split="train", size=48, seed=2)
        image_path, mask_path = (root / "train" / kind / f"{i:05d}.png" for kind in ("images", "masks"))
        assert Image.open(image_path).mode == "L" and Image.open(mask_path).mode.startswith("I;16")
        assert np.array_equal(np.asarray(Image.open(image_path)), image)
        assert np.array_equal(read_image(image_path), np.repeat(image[..., None], 3, axis=-1))  # grey as RGB
        stored = read_mask(mask_path)
        assert stored.dtype == np.uint16 and np.array_equal(stored, ids)
        assert np.array_equal(dataset.original_ids(i), ids)


def test_the_training_recipes_refuse_the_instance_domain_as_they_refuse_nuclei():
    from convlora.recipes import recipe

    with pytest.raises(ValueError, match=r"^the cells domain holds instance masks and has no recipe; train it with"):
        recipe("cells")


def test_preview_shows_the_grey_image_and_a_colour_per_cell():
    grid = preview_grid("cells", n=2, size=32, columns=2)
    assert grid.shape == (32, 130, 3) and grid.dtype == np.uint8
    image, ids = sample("cells", 0, size=32, square=True)
    assert np.array_equal(grid[:, :32], np.repeat(image[..., None], 3, axis=-1))
    tile = grid[:, 32:64]
    assert (tile[ids == 0] == 0).all() and (tile[ids > 0].max(axis=-1) > 0).all()
