"""Real file conventions: high-bit-depth and multi-channel images, instance / JPEG / colour / palette masks, names.

Every file is written here as real datasets ship them, and the tests assert on the values read.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from convlora.artifact import TASK_FILE, TaskInfo
from convlora.data import (
    DatasetError,
    ImageReading,
    SegmentationDataset,
    build_datasets,
    check_dataset,
    colors_to_ids,
    inspect_dataset,
    instance_masks,
    load_datasets,
    read_class_names,
    read_image,
    read_image_size,
    read_mask,
    to_rgb8,
)
from convlora.inference import Segmenter
from convlora.training.config import load_config


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def save_tiff(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kwargs)
    return path


def nuclei_image(size: int = 64, top: int = 235, seed: int = 0) -> np.ndarray:
    """A 16-bit fluorescence-like image whose values span only 0..top (as microscopy cameras give)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = 20 + 0.5 * rng.normal(size=(size, size))
    margin = min(8, size // 4)
    for cy, cx in rng.integers(margin, size - margin, (6, 2)):
        image += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    image = np.clip(image, 0, None)
    return np.rint(image * top / image.max()).astype(np.uint16)


def instance_map(size: int = 48, objects: int = 12, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """Separate discs, one id each (1..objects), like nucleus instance labels."""
    mask = np.zeros((size, size), dtype)
    yy, xx = np.mgrid[:size, :size]
    per_row = int(np.ceil(np.sqrt(objects)))
    step = size // per_row
    ids = np.random.default_rng(seed).permutation(objects) + 1
    for i, object_id in enumerate(ids):
        cy, cx = (i // per_row) * step + step // 2, (i % per_row) * step + step // 2
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= (step // 2 - 2) ** 2] = object_id
    return mask


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def one_line(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ------------------------------------------------------------------------------------------------ images


def test_a_16_bit_tiff_using_0_to_235_is_stretched_to_0_255_not_black(tmp_path):
    stored = nuclei_image()
    assert stored.max() == 235
    path = save_tiff(tmp_path / "images" / "nuclei.tif", stored)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert (out[..., 0] == out[..., 2]).all()  # grey repeated to RGB
    assert out.min() == 0 and out.max() == 255  # the old value * 255 / 65535 gave 0..1: a black image
    low, high = np.percentile(stored, (1, 99.8))
    expected = np.clip(np.rint((stored - low) * 255 / (high - low)), 0, 255)
    assert np.array_equal(out[..., 0], expected)
    assert (out[..., 0] > 128).sum() == (stored > (low + high) / 2).sum()  # the nuclei stay bright


def test_inspect_reports_the_value_range_and_warns_below_5_percent_of_the_type(tmp_path):
    stored = nuclei_image()
    save_tiff(tmp_path / "images" / "nuclei.tif", stored)
    save_tiff(tmp_path / "images" / "bright.tif", np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16))
    report = inspect_dataset(tmp_path)
    low = int(stored.min())
    assert report.image_values["all:nuclei"] == {"type": "uint16", "channels": 1, "min": low, "max": 235.0}
    assert report.image_values["all:bright"]["max"] == 60000.0
    assert any("2 images store more than 8 bits per sample (uint16: 2)" in note for note in report.notes)
    [warning] = report.warnings
    assert warning.startswith("1 image uses under 5% of its type's value range")
    assert f"nuclei.tif: values {low}..235 of uint16 0..65535" in warning and "stretched per image" in warning
    text = report.format()
    assert "images: 2 uint16 with 1 channel, values 0..60000" in text and "warning: 1 image" in text
    assert json.loads(json.dumps(report.to_dict()))["image_values"]["all:nuclei"]["max"] == 235.0


def test_a_dark_8_bit_image_is_kept_as_stored_and_warned_about(tmp_path):
    dark = np.random.default_rng(0).integers(0, 8, (16, 16), dtype=np.uint8)
    path = save(tmp_path / "dark.png", dark)
    assert np.array_equal(read_image(path)[..., 1], dark)  # 8-bit images are never rescaled
    [warning] = inspect_dataset(tmp_path).warnings
    assert "values 0..7 of uint8 0..255" in warning and "almost uniform" in warning


def test_a_float32_tiff_is_normalised_per_image(tmp_path):
    values = np.linspace(-3.0, 7.5, 40 * 40, dtype=np.float32).reshape(40, 40)
    path = save_tiff(tmp_path / "float.tif", values)
    out = read_image(path)[..., 0]
    assert out[0, 0] == 0 and out[-1, -1] == 255
    low, high = np.percentile(values.astype(np.float64), (1, 99.8))
    assert np.array_equal(out, np.clip(np.rint((values - low) * 255 / (high - low)), 0, 255))
    minmax = read_image(path, ImageReading("minmax"))[..., 0]
    assert np.array_equal(minmax, np.rint((values.astype(np.float64) + 3.0) * 255 / 10.5).astype(np.uint8))
    values[0, :5] = np.nan
    save_tiff(tmp_path / "float.tif", values)
    assert (read_image(path)[0, :5] == 0).all()
    assert any("NaN or infinite values" in note for note in inspect_dataset(tmp_path).notes)


def test_a_12_bit_png_maps_a_fixed_0_4095_range(tmp_path):
    stored = np.array([[0, 4095, 2048], [1000, 4095, 0]], np.uint16)
    path = save(tmp_path / "camera.png", stored)
    out = read_image(path, {"intensity": "fixed", "intensity_range": [0, 4095]})
    assert out[..., 0].tolist() == [[0, 255, 128], [62, 255, 0]]  # 2048 * 255 / 4095 = 127.5 -> 128
    config = load_config(overrides=["--data", str(tmp_path), "--intensity", "fixed", "--intensity_range", "0,4095"])
    assert np.array_equal(read_image(path, config.image_reading()), out)


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        (ImageReading("minmax"), [0, 2, 4, 9]),  # the one bright outlier takes the whole range
        (ImageReading("fixed", (0, 2000)), [13, 76, 140, 255]),
        (ImageReading("none"), [100, 255, 255, 255]),
        (ImageReading("percentile"), [0, 64, 128, 255]),  # 1st..99.8th percentile: 100..2100, the outlier clipped
    ],
    ids=["minmax", "fixed", "none", "percentile"],
)
def test_every_intensity_mapping_gives_its_values(reading, expected):
    stored = np.repeat(np.array([100, 600, 1100, 2100], np.uint16), 250).reshape(1, 1000)
    stored[0, -1] = 60000
    out = to_rgb8(stored, reading)[0, ::250, 0]
    assert out.tolist() == expected


def test_images_with_4_channels_are_refused_without_a_channel_choice(tmp_path):
    channels = np.stack([nuclei_image(seed=i) * (i + 1) for i in range(4)])  # (c, h, w)
    path = save_tiff(tmp_path / "images" / "stack.tif", channels, photometric="minisblack")
    with pytest.raises(DatasetError) as caught:
        read_image(path)
    message = one_line(caught, path)
    assert "image has 4 channels" in message and "expected at most 3" in message and "--channels 0,2" in message
    problem = next(p for p in inspect_dataset(tmp_path).problems if p.kind == "channels")
    assert problem.path == str(path) and "4 channels" in problem.message
    out = read_image(path, ImageReading(channels=(0, 2)))
    assert out.shape == (64, 64, 3) and (out[..., 2] == 0).all()
    both = channels[[0, 2]].astype(np.float64)
    low, high = np.percentile(both, (1, 99.8))
    expected = np.clip(np.rint((both - low) * 255 / (high - low)), 0, 255)
    assert np.array_equal(np.moveaxis(out[..., :2], -1, 0), expected)  # scaled together, in the order asked
    with pytest.raises(DatasetError, match=r"stack\.tif: image has 4 channels .* asks for channel 7"):
        read_image(path, ImageReading(channels=(0, 7)))


def test_channels_last_tiffs_read_like_channels_first_ones(tmp_path):
    channels = np.stack([nuclei_image(seed=i) for i in range(5)])
    first = save_tiff(tmp_path / "first.tif", channels, photometric="minisblack")
    last = save_tiff(
        tmp_path / "last.tif", np.moveaxis(channels, 0, -1), photometric="minisblack", planarconfig="contig"
    )
    reading = ImageReading(channels=(4, 1, 0))
    assert np.array_equal(read_image(first, reading), read_image(last, reading))
    with pytest.raises(DatasetError, match="5 channels"):
        read_image(last)


def test_grey_tiffs_are_repeated_and_rgba_drops_alpha(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(read_image(save_tiff(tmp_path / "grey.tif", grey)), np.repeat(grey[..., None], 3, -1))
    rgba = np.concatenate([picture(8, 8), np.full((8, 8, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(read_image(save(tmp_path / "rgba.tif", rgba)), rgba[..., :3])
    assert np.array_equal(read_image(save(tmp_path / "rgba.png", rgba)), rgba[..., :3])


def test_lzw_tiffs_that_tifffile_cannot_decode_fall_back_to_pillow(tmp_path):
    stored = nuclei_image(16)
    path = tmp_path / "lzw.tif"
    Image.fromarray(stored).save(path, compression="tiff_lzw")  # LZW needs imagecodecs in tifffile
    low, high = np.percentile(stored, (1, 99.8))
    assert np.array_equal(read_image(path)[..., 0], np.clip(np.rint((stored - low) * 255 / (high - low)), 0, 255))
    assert read_image_size(path) == (16, 16)


def test_tiff_orientation_is_applied_like_exif(tmp_path):
    stored = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
    path = save_tiff(tmp_path / "turned.tif", stored, extratags=[(274, "H", 1, 6, False)])
    assert read_image_size(path) == (10, 6)
    assert np.array_equal(read_image(path)[..., 0], np.rot90(stored, -1))


def test_a_16_bit_rgb_png_is_read_at_8_bits_with_a_note(tmp_path):
    rgb16 = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 5000).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    (tmp_path / "deep.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    out = read_image(tmp_path / "deep.png")
    assert np.array_equal(out, (rgb16.astype(np.int64) >> 8).astype(np.uint8))
    assert any("16-bit RGB PNGs" in note for note in inspect_dataset(tmp_path).notes)


def test_the_reading_recorded_in_task_info_is_what_segmenter_applies(tmp_path):
    stored = np.array([[0, 3000], [1000, 300]], np.uint16).repeat(4, 0).repeat(4, 1)
    path = save(tmp_path / "camera.png", stored)
    reading = ImageReading("fixed", (0, 4095))
    task = TaskInfo("binary", 2, ["background", "cell"], 64, "random", "decoder", image_reading=reading.to_dict())
    segmenter = Segmenter(torch.nn.Identity(), task)
    assert np.array_equal(segmenter._pixels(path), read_image(path, reading))
    assert np.array_equal(segmenter._pixels(stored), read_image(path, reading))  # arrays are read the same way
    assert not np.array_equal(segmenter._pixels(path), read_image(path))  # and not with the default
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / TASK_FILE).write_text(json.dumps({**task.to_dict(), "format_version": 1}))
    assert TaskInfo.read(tmp_path / "model").image_reading == reading.to_dict()


def test_a_task_file_without_image_reading_loads_with_the_defaults(tmp_path):
    old = {"mode": "binary", "num_classes": 2, "class_names": ["background", "object"], "image_size": 64}
    (tmp_path / TASK_FILE).write_text(json.dumps({**old, "base_model": "x", "method": "decoder", "format_version": 1}))
    task = TaskInfo.read(tmp_path)
    assert task.image_reading == {"intensity": "percentile", "intensity_range": None, "channels": None}
    rgb = picture(5, 7)
    assert np.array_equal(Segmenter(torch.nn.Identity(), task)._pixels(rgb), rgb)  # 8-bit: as always


def test_build_datasets_reads_images_as_the_config_says(tmp_path):
    for i in range(3):
        save(tmp_path / "images" / f"{i}.png", (nuclei_image(16, seed=i) * 10).astype(np.uint16))
        save(tmp_path / "masks" / f"{i}.png", np.where(nuclei_image(16, seed=i) > 100, 255, 0).astype(np.uint8))
    config = load_config(
        overrides=[
            "--data",
            str(tmp_path),
            "--intensity",
            "fixed",
            "--intensity_range",
            "[0, 4095]",
            "--image_size",
            "16",
        ]
    )
    data = build_datasets(config)
    assert data.image_reading == {"intensity": "fixed", "intensity_range": [0.0, 4095.0], "channels": None}
    assert data.train.reading == ImageReading("fixed", (0, 4095)) and data.val.reading == data.train.reading
    index = 0
    assert np.array_equal(
        data.train.original_image(index), read_image(data.train.samples[index].image, config.image_reading())
    )


# ------------------------------------------------------------------------------------------------- masks


def write_instances(root: Path, count: int = 3, objects: int = 12, dtype=np.uint16, extension: str = ".tif") -> None:
    for i in range(count):
        mask = instance_map(objects=objects, dtype=dtype, seed=i)
        save(root / "images" / f"{i}.png", picture(48, 48, seed=i))
        if extension == ".tif":
            save_tiff(root / "masks" / f"{i}.tif", mask)
        else:
            save(root / "masks" / f"{i}{extension}", mask)


@pytest.mark.parametrize(("dtype", "extension"), [(np.uint16, ".tif"), (np.uint8, ".png")], ids=["tiff16", "png8"])
def test_instance_masks_read_as_binary_foreground(tmp_path, dtype, extension):
    write_instances(tmp_path, dtype=dtype, extension=extension)
    report = check_dataset(tmp_path)
    assert (report.mode, report.num_classes, report.mask_encoding) == ("binary", 2, "instances")
    assert any("3 masks hold instance ids (up to 12 objects per mask" in note for note in report.notes)
    dataset = SegmentationDataset.from_report(report, image_size=32)
    for index in range(3):
        stored = read_mask(dataset.samples[index].mask)
        assert np.array_equal(dataset.original_mask(index), (stored > 0).astype(np.int64))  # foreground exact
        ids, masks = instance_masks(dataset.original_ids(index))
        assert ids.tolist() == list(range(1, 13)) and masks.shape == (12, 48, 48)
        assert masks.sum() == (stored > 0).sum() and not (masks.sum(axis=0) > 1).any()
    data = load_datasets(tmp_path, image_size=32)
    assert "instance ids" in data.summary()  # the training log says so


def test_instance_masks_in_declared_binary_mode_need_only_a_few_ids(tmp_path):
    write_instances(tmp_path, objects=3)
    inferred = inspect_dataset(tmp_path)
    assert inferred.mode == "multiclass"  # 3 ids each: too few to tell from classes, but a hint says so
    assert any("could also be instance ids" in note and "--mode binary" in note for note in inferred.notes)
    report = check_dataset(tmp_path, mode="binary")
    assert report.mask_encoding == "instances" and report.ok


def test_mask_reading_forces_either_reading(tmp_path):
    write_instances(tmp_path)
    as_classes = inspect_dataset(tmp_path, mask_reading="classes")
    assert (as_classes.mode, as_classes.num_classes, as_classes.mask_encoding) == ("multiclass", 13, "ids")
    write_instances(tmp_path / "few", objects=2)
    forced = check_dataset(tmp_path / "few", mask_reading="instances")
    assert (forced.mode, forced.mask_encoding) == ("binary", "instances")
    assert any("as mask_reading='instances' says" in note for note in forced.notes)
    with pytest.raises(ValueError, match="mask_reading='instances'"):
        inspect_dataset(tmp_path, mode="multiclass", mask_reading="instances")
    with pytest.raises(ValueError, match="mask_reading 'instances'"):
        load_config(overrides=["--data", str(tmp_path), "--mask_reading", "instances", "--mode", "multiclass"])


def test_jpeg_masks_are_thresholded_and_the_changed_pixels_counted(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 5:20] = 255
    save(tmp_path / "images" / "a.png", picture(32, 32))
    path = save(tmp_path / "masks" / "a.jpg", mask, quality=60)
    decoded = np.asarray(Image.open(path).convert("L"))
    changed = int(((decoded != 0) & (decoded != 255)).sum())
    assert changed > 0
    read = read_mask(path)
    assert np.array_equal(read, np.where(decoded >= 128, 255, 0))
    report = check_dataset(tmp_path)
    note = next(n for n in report.notes if "JPEG" in n)
    assert f"thresholded at 128 to 0/255, changing {changed:,} pixels" in note
    assert (read == mask).mean() > 0.97


def colour_dataset(root: Path, entries, masks: dict[str, np.ndarray]) -> None:
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(entries))
    for name, rgb in masks.items():
        save(root / "images" / f"{name}.png", picture(*rgb.shape[:2]))
        save(root / "masks" / f"{name}.png", rgb)


COLOURS = {"background": (0, 0, 0), "leaf": (0, 128, 0), "disease": (255, 200, 0)}


def paint(ids: np.ndarray, table: dict[int, tuple[int, int, int]]) -> np.ndarray:
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    for class_id, colour in table.items():
        rgb[ids == class_id] = colour
    return rgb


def test_colour_coded_masks_become_class_ids_through_the_colour_table(tmp_path):
    ids = np.zeros((12, 16), np.uint8)
    ids[2:9, 3:12], ids[4:6, 5:8], ids[11, :] = 1, 2, 255
    colours = dict(enumerate(COLOURS.values())) | {255: (224, 224, 192)}
    entries = {str(i): {"name": name, "color": list(c)} for i, (name, c) in enumerate(COLOURS.items())}
    entries["255"] = {"name": "void", "color": "#e0e0c0"}
    colour_dataset(tmp_path, entries, {"a": paint(ids, colours)})
    report = check_dataset(tmp_path)
    assert (report.mode, report.num_classes, report.class_names) == ("multiclass", 3, list(COLOURS))
    assert report.class_colors[(255, 200, 0)] == 2 and report.class_colors[(224, 224, 192)] == 255
    assert any("1 masks are colour-coded" in note for note in report.notes)
    dataset = SegmentationDataset.from_report(report, image_size=16)
    assert np.array_equal(dataset.original_mask(0), ids.astype(np.int64))  # class ids exact, 255 = ignore


def test_an_unknown_colour_is_a_one_line_error_with_file_count_and_colour(tmp_path):
    ids = np.zeros((12, 16), np.uint8)
    ids[:, 8:] = 1
    rgb = paint(ids, dict(enumerate(COLOURS.values())))
    rgb[0, :5] = (9, 9, 9)  # 5 pixels of a colour the table lacks
    entries = [{"name": name, "color": list(c)} for name, c in COLOURS.items()]
    colour_dataset(tmp_path, entries, {"a": rgb})
    path = tmp_path / "masks" / "a.png"
    problem = next(p for p in inspect_dataset(tmp_path).problems if p.kind == "unknown_color")
    assert problem.path == str(path) and "5 pixels have colour (9, 9, 9)" in problem.message
    with pytest.raises(DatasetError) as caught:
        read_mask(path, {tuple(c): i for i, c in enumerate(COLOURS.values())})
    assert "5 pixels have colour (9, 9, 9)" in one_line(caught, path)
    with pytest.raises(ValueError, match=r"2 pixels have colour \(1, 2, 3\)"):
        colors_to_ids(np.array([[[1, 2, 3], [1, 2, 3]]], np.uint8), {(0, 0, 0): 0})


def test_palette_pngs_keep_class_ids_and_255_is_ignored(tmp_path):
    ids = np.zeros((12, 16), np.uint8)
    ids[2:10, 2:8], ids[3:9, 9:15] = 1, 15
    ids[1, 1:9], ids[10, 1:9] = 255, 255  # VOC's object borders
    voc = Image.fromarray(ids, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 13 + [192, 128, 128] + [0, 0, 0] * 239 + [224, 224, 192])
    (tmp_path / "masks").mkdir()
    voc.save(tmp_path / "masks" / "2007_000032.png")
    save(tmp_path / "images" / "2007_000032.jpg", picture(12, 16))
    names = ["background", *(f"c{i}" for i in range(1, 21))]
    (tmp_path / "class_names.txt").write_text("\n".join(names) + "\n")
    report = check_dataset(tmp_path)
    assert (report.mode, report.num_classes, report.mask_encoding) == ("multiclass", 21, "ids")
    assert report.class_names == names
    labels = SegmentationDataset.from_report(report, image_size=16).original_mask(0)
    assert np.array_equal(labels, ids.astype(np.int64)) and (labels == 255).sum() == 16


@pytest.mark.parametrize("name", ["class_names.txt", "labels.txt"])
def test_class_names_come_from_a_text_file_one_per_line(tmp_path, name):
    save(tmp_path / "images" / "a.png", picture(12, 16))
    save(tmp_path / "masks" / "a.png", np.array([[0, 1], [2, 255]], np.uint8).repeat(6, 0).repeat(8, 1))
    (tmp_path / name).write_text("__ignore__\n_background_\nroad\ncar\n\n")  # labelme's export
    report = check_dataset(tmp_path)
    assert report.class_names == ["_background_", "road", "car"] and report.num_classes == 3
    (tmp_path / "classes.json").write_text(json.dumps(["bg", "lane", "vehicle"]))
    report = check_dataset(tmp_path)
    assert report.class_names == ["bg", "lane", "vehicle"]
    assert any(f"{name} ignored: classes.json names the classes" in note for note in report.notes)


# ------------------------------------------------------------------------------------------- bad variants


def _five_d_tiff(path: Path) -> None:
    save_tiff(path, np.zeros((2, 3, 8, 8), np.uint16), imagej=True, metadata={"axes": "ZCYX"})


def _fractional_mask(path: Path) -> None:
    save_tiff(path, np.array([[0.0, 0.5], [1.0, 2.0]], np.float32))


@pytest.mark.parametrize(
    ("name", "write", "reader", "expected"),
    [
        ("stack.tif", lambda p: save_tiff(p, np.zeros((4, 8, 8), np.uint16), photometric="minisblack"), read_image,
         "image has 4 channels"),
        ("zstack.tif", _five_d_tiff, read_image, "expected one 2-D image with at most one channel axis"),
        ("soft.tif", _fractional_mask, read_mask, "fractional (float) values; expected integer class ids"),
        ("colour.png", lambda p: save(p, picture(8, 8)), read_mask, "colour mask (RGB with"),
        ("names.txt", lambda p: p.write_text("bg\n\nroad\n"), read_class_names, "line 2 is blank"),
        ("twice.txt", lambda p: p.write_text("bg\nroad\nroad\n"), read_class_names, "appear more than once"),
    ],
    ids=["channels", "dimensions", "float_mask", "colour_without_table", "blank_name", "repeated_name"],
)  # fmt: skip
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, name, write, reader, expected):
    path = tmp_path / name
    write(path)
    with pytest.raises(DatasetError) as caught:
        reader(path)
    assert expected in one_line(caught, path)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"name": "bg", "color": [0, 0, 0]}, {"name": "leaf"}], "classes [1] have no color"),
        ([{"name": "bg", "color": [0, 0, 0]}, {"name": "leaf", "color": [0, 0, 0]}], "share the color (0, 0, 0)"),
        ([{"name": "bg", "color": [0, 0, 300]}, {"name": "leaf", "color": "#00ff00"}], "expected [r, g, b]"),
    ],
    ids=["missing", "repeated", "out_of_range"],
)
def test_bad_colour_tables_are_dataset_problems_naming_classes_json(tmp_path, entries, expected):
    colour_dataset(tmp_path, entries, {"a": paint(np.zeros((8, 8), np.uint8), {0: (0, 0, 0)})})
    problem = next(p for p in inspect_dataset(tmp_path).problems if p.kind == "classes_json")
    assert problem.path == str(tmp_path / "classes.json") and expected in problem.message
    assert "\n" not in str(problem)
