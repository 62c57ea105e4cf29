"""The synthetic nuclei domain: instance-id masks of touching and overlapping nuclei on 12-bit images, written
as 16-bit PNGs that convlora's own readers take back unchanged."""

import numpy as np
import pytest
from scipy import ndimage

from convlora.synthetic import DOMAINS, MODES, preview_grid, sample, write_dataset
from convlora.synthetic import nuclei as nuclei_domain

SEEDS = range(16)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    """Nuclei scenes of seeds 0..15 at 112 x 128 px (rendered once)."""
    return [nuclei_domain._render(np.random.default_rng(seed), 112, 128) for seed in SEEDS]


def _touching_pairs(ids: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different ids that are 4-neighbours somewhere (no background between them)."""
    pairs = set()
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1], ids[1:])):
        meet = (a != b) & (a > 0) & (b > 0)
        pairs |= {(min(x, y), max(x, y)) for x, y in zip(a[meet].tolist(), b[meet].tolist(), strict=True)}
    return pairs


def test_the_registry_holds_nuclei_as_an_instance_domain_scored_by_msa():
    spec = DOMAINS["nuclei"]
    assert "instances" in MODES and spec.mode == "instances"
    assert spec.class_names == ("background", "nucleus") and spec.num_classes == 2 and spec.metric == "msa"


def test_the_same_seed_draws_the_same_nuclei_and_another_seed_differs():
    image, ids = nuclei_domain.generate(np.random.default_rng(3), 64, 80)
    again, ids_again = nuclei_domain.generate(np.random.default_rng(3), 64, 80)
    other, _ = nuclei_domain.generate(np.random.default_rng(4), 64, 80)
    assert np.array_equal(image, again) and np.array_equal(ids, ids_again)
    assert not np.array_equal(image, other)


def test_ids_run_from_1_to_n_and_each_id_is_one_connected_region(scenes):
    extra = [nuclei_domain.generate(np.random.default_rng(s), h, w)[1] for s, (h, w) in enumerate([(17, 45), (40, 33)])]
    for ids in [scene["ids"] for scene in scenes] + extra:
        assert ids.dtype == np.uint16
        n = int(ids.max())
        assert np.unique(ids).tolist() == list(range(n + 1))
        for k in range(1, n + 1):
            assert ndimage.label(ids == k)[1] == 1, f"id {k} is in pieces"


def test_counts_vary_from_a_few_to_dozens_with_empty_fields_and_nuclei_cut_by_the_border(scenes):
    counts = [int(scene["ids"].max()) for scene in scenes]
    assert min(c for c in counts if c) <= 10 and max(counts) >= 28 and max(counts) <= 40
    placed = [len(nuclei_domain._place(np.random.default_rng(s), 128, 128, 1.0)) for s in range(100)]
    assert 0 < placed.count(0) <= 12  # about one field in twenty is empty
    on_border = [len(set(np.concatenate([i[0], i[-1], i[:, 0], i[:, -1]]).tolist()) - {0}) for i in
                 (scene["ids"] for scene in scenes)]  # fmt: skip
    assert sum(b > 0 for b in on_border) >= len(scenes) // 2


def test_most_images_hold_nuclei_that_touch_with_no_background_between(scenes):
    busy = [scene["ids"] for scene in scenes if scene["ids"].max() >= 2]
    with_pairs = [ids for ids in busy if _touching_pairs(ids)]
    assert len(with_pairs) >= 0.8 * len(busy)
    shares = [len({k for pair in _touching_pairs(ids) for k in pair}) / ids.max() for ids in busy]
    assert np.mean(shares) > 0.4  # many nuclei, not just one pair, touch another


def test_a_nucleus_on_top_takes_the_overlap_and_is_brighter_there(scenes):
    checked, brighter = 0, []
    for scene in scenes:
        ids, image = scene["ids"], scene["image"].astype(float)
        shapes = scene["shapes"]
        for j, (nucleus, (top, top_id)) in enumerate(zip(scene["nuclei"], shapes, strict=True)):
            if not nucleus.on_top or not top_id:
                continue
            later_tops = [s for n, (s, _) in zip(scene["nuclei"][j + 1 :], shapes[j + 1 :], strict=True) if n.on_top]
            free = top & ~np.any(later_tops, axis=0) if later_tops else top
            for below, below_id in shapes[:j]:
                overlap = free & below
                alone = below & ~top & (ids == below_id)
                if overlap.sum() < 6 or not below_id or alone.sum() < 6:
                    continue
                checked += 1
                assert (ids[overlap] == top_id).mean() > 0.95  # the later one's id wins in the overlap
                brighter.append(np.median(image[overlap]) > np.median(image[alone]))
    assert checked >= 5 and np.mean(brighter) > 0.8  # fluorescence adds up where nuclei overlap


def test_images_are_12_bit_uint16_spanning_most_of_the_range(scenes):
    for scene in scenes:
        image = scene["image"]
        assert image.dtype == np.uint16 and image.shape == scene["ids"].shape and image.max() <= 4095
        if scene["ids"].any():
            assert int(image.max()) - int(image.min()) > 3000
            fg, bg = image[scene["ids"] > 0], image[scene["ids"] == 0]
            assert np.median(fg) > 3 * np.median(bg)  # dark background, bright nuclei


def test_written_dataset_reads_back_through_convlora_readers_with_the_same_ids(tmp_path):
    from PIL import Image

    from convlora.data import SegmentationDataset, check_dataset, instance_masks, read_mask

    root = write_dataset("nuclei", tmp_path / "nuclei", train=3, val=1, test=0, size=48, seed=2)
    report = check_dataset(root, mask_reading="instances")
    assert report.mode == "binary" and report.mask_encoding == "instances"
    assert report.class_names == ["background", "nucleus"]
    assert check_dataset(root).mask_encoding == "instances"  # recognised by their shape, no flag needed
    dataset = SegmentationDataset.from_report(report, "train", image_size=32)
    for i in range(3):
        image, ids = sample("nuclei", i, split="train", size=48, seed=2)
        path = root / "train" / "masks" / f"{i:05d}.png"
        assert Image.open(path).mode.startswith("I;16")
        assert Image.open(root / "train" / "images" / f"{i:05d}.png").mode.startswith("I;16")
        stored = read_mask(path)
        assert stored.dtype == np.uint16 and np.array_equal(stored, ids)
        assert np.array_equal(dataset.original_ids(i), ids)
        assert np.array_equal(np.asarray(Image.open(root / "train" / "images" / f"{i:05d}.png")), image)
        found, masks = instance_masks(stored)
        assert found.tolist() == list(range(1, int(ids.max()) + 1)) and masks.sum() == (ids > 0).sum()
        # binary reading: nonzero = foreground
        assert np.array_equal(dataset.original_mask(i), (ids > 0).astype(np.int64))
        assert dataset.original_image(i).shape == (*ids.shape, 3)


def test_synth_and_inspect_commands_write_and_read_the_instance_masks(tmp_path, capsys):
    from convlora.cli import main

    out = tmp_path / "nuclei"
    assert main(["synth", "nuclei", str(out), "--train", "4", "--val", "2", "--test", "2", "--size", "40"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--mask-reading", "instances"]) == 0
    text = capsys.readouterr().out
    assert "masks hold instance ids" in text and "mask_reading='instances'" in text
    assert "classes: 0=background, 1=nucleus" in text and "uint16" in text and "no problems found" in text


def test_training_entry_points_refuse_the_instance_domain_in_one_line():
    from convlora.bench.experiments import experiment_from_dict
    from convlora.recipes import recipe

    message = (
        "the nuclei domain holds instance masks and has no recipe; train it with --mode instances (examples/nuclei.py)"
    )
    with pytest.raises(ValueError, match=r"has no recipe; train it with --mode instances") as error:
        recipe("nuclei")
    assert str(error.value) == message
    config = {"name": "q", "kind": "quality", "domains": ["nuclei"], "arms": [{"method": "lora"}]}
    with pytest.raises(ValueError, match="holds instance masks"):
        experiment_from_dict(config)


def test_preview_shows_the_16_bit_image_and_a_colour_per_nucleus():
    grid = preview_grid("nuclei", n=2, size=32, columns=2)
    assert grid.shape == (32, 130, 3) and grid.dtype == np.uint8
    _, ids = sample("nuclei", 0, size=32, square=True)
    tile = grid[:, 32:64]
    assert (tile[ids == 0] == 0).all() and (tile[ids > 0].max(axis=-1) > 0).all()
