"""Instance training (``--mode instances``), AIS / APG prediction, tiles, export, merge and ONNX on tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convlora.training.engine as ENGINE
from convlora import Segmenter
from convlora.artifact import TaskInfo, load_trained
from convlora.artifact.methods import build_task_model
from convlora.cli import main
from convlora.evaluation import connected_components, instance_scores
from convlora.inference import base_task, evaluate, merge_model, predict_folder
from convlora.instances import instance_logits, objects_from_ids, refine_objects, resolve_overlaps, stitch_instances
from convlora.instances.step import InstanceStep
from convlora.models import random_sam, tiny_sam_config
from convlora.models.processing import preprocess
from convlora.prompting import encode_images
from convlora.synthetic import write_dataset
from convlora.training.checkpoint import list_checkpoints
from convlora.training.config import load_config
from convlora.training.engine import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir, nuclei_dir) -> Path:
    root = tmp_path_factory.mktemp("instances")
    (root / "sam").symlink_to(tiny_sam_dir)
    (root / "nuclei").symlink_to(nuclei_dir)
    return root


def run_args(workspace: Path, out: str, *extra: str) -> list[str]:
    args = ["--data", str(workspace / "nuclei"), "--model", str(workspace / "sam"), "--mode", "instances"]
    args += ["--output_dir", str(workspace / out), "--epochs", "3", "--batch_size", "2", "--lr", "1e-2"]
    return [*args, "--instance_channels", "8", "--log_every_steps", "1", "--overlay_samples", "1", *extra]


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    """One Conv-LoRA instance run on the tiny nuclei set (3 epochs of 3 steps)."""
    train(load_config(overrides=run_args(workspace, "run")), show_progress=False)
    return workspace / "run"


def two_discs(size: int = 64) -> np.ndarray:
    """Two discs of radius 12.5 touching along x = 32: one connected component, two objects."""
    yy, xx = np.mgrid[:size, :size]
    left, right = np.hypot(yy - 32, xx - 20), np.hypot(yy - 32, xx - 44)
    return np.where(np.minimum(left, right) < 12.5, np.where(left < right, 1, 2), 0)


def disc_image(truth: np.ndarray) -> np.ndarray:
    image = np.full((*truth.shape, 3), 30, np.uint8)
    image[truth > 0] = (200, 80, 80)
    return image


@pytest.fixture(scope="module")
def disc_model():
    """A tiny Conv-LoRA instance model fitted (200 steps) to two touching discs and to an empty image."""
    torch.manual_seed(0)
    names = ["background", "object"]
    task = TaskInfo("instances", 2, names, 64, "random", "conv_lora", instance_head={"hidden_channels": 16})
    model = build_task_model(random_sam(tiny_sam_config(), seed=0), task)
    step = InstanceStep(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    truth = two_discs()
    pixels = torch.stack([preprocess(disc_image(truth), 64)[0], preprocess(disc_image(truth * 0), 64)[0]])
    labels = torch.stack([torch.from_numpy(truth), torch.zeros(64, 64, dtype=torch.int64)])
    for _ in range(200):
        loss = step(pixels, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Segmenter(model.eval(), task), truth


# ---------------------------------------------------------------- training


def test_instance_training_lowers_the_loss_and_exports_the_decoder_with_its_settings(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = [entry["task"] for entry in metrics["train_loss"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert metrics["best"]["metric"] == "msa" and "f1_50" in metrics["history"][-1]
    task = TaskInfo.read(trained / "adapter")
    assert task.mode == "instances" and task.instance_head["hidden_channels"] == 8
    assert task.instance_head["in_channels"] == 16
    saved = json.loads((trained / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert "instance_head" in saved  # PEFT carries the head with the adapter
    assert (trained / "val_overlays.png").is_file()


def test_model_selection_can_use_f1_at_iou_0_5(workspace):
    result = train(
        load_config(overrides=run_args(workspace, "f1", "--epochs", "1", "--metric", "f1_50")), show_progress=False
    )
    assert result.metric == "f1_50" and result.best_value == result.history[-1]["f1_50"]


def test_ais_separates_two_touching_discs_after_a_short_fit(disc_model):
    segmenter, truth = disc_model
    assert connected_components(truth > 0).max() == 1
    ids, found = segmenter.predict_instances(disc_image(truth), "ais")
    assert ids.max() == 2 and len(found) == 2
    assert instance_scores(truth, ids)["msa"] > 0.8
    auto, _ = segmenter.predict_instances(disc_image(truth), "auto")
    assert np.array_equal(auto, ids)


def test_an_image_without_objects_trains_and_predicts_an_empty_map(disc_model):
    segmenter, truth = disc_model
    ids, found = segmenter.predict_instances(disc_image(truth * 0), "ais")
    assert ids.shape == truth.shape and ids.max() == 0 and len(found) == 0
    empty, _ = segmenter.predict_instances(disc_image(truth * 0), "apg")
    assert empty.max() == 0


def test_saved_instance_models_of_three_methods_load_to_equal_outputs_in_a_fresh_process(workspace):
    """conv_lora (the head in PEFT's modules_to_save), decoder and full (the head in its own file)."""
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.save(pixels, workspace / "pixels.pt")
    folders, here = [], []
    for method in ("conv_lora", "decoder", "full"):
        out = workspace / f"saved-{method}"
        config = load_config(overrides=run_args(workspace, out.name, "--epochs", "1", "--method", method))
        train(config, show_progress=False)
        folders.append(str(out / "adapter"))
        with torch.no_grad():
            here.append(instance_logits(load_trained(out / "adapter")[0], pixels))
    code = (
        "import sys, torch; from convlora.artifact import load_trained\n"
        "from convlora.instances import instance_logits\n"
        "pixels = torch.load(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    found = [instance_logits(load_trained(folder)[0], pixels) for folder in sys.argv[3:]]\n"
        "torch.save(found, sys.argv[2])"
    )
    output = workspace / "fresh.pt"
    subprocess.run([sys.executable, "-c", code, str(workspace / "pixels.pt"), str(output), *folders], check=True)
    for found, expected in zip(torch.load(output), here, strict=True):
        assert torch.equal(found, expected)


def test_an_interrupted_instance_run_resumes_to_the_same_decoder(workspace, trained, monkeypatch):
    out = workspace / "crashed"
    real, saved = ENGINE.save_checkpoint, []

    def save_then_die(directory, *args, **kwargs):
        path = real(directory, *args, **kwargs)
        saved.append(directory)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ENGINE, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=run_args(workspace, out.name, "--save_every_steps", "2")), show_progress=False)
    monkeypatch.undo()
    assert list_checkpoints(out)
    train(
        load_config(overrides=run_args(workspace, out.name, "--save_every_steps", "2", "--resume", "latest")),
        show_progress=False,
    )
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outputs = [instance_logits(load_trained(run / "adapter")[0], pixels) for run in (trained, out)]
    assert torch.equal(*outputs)


# ---------------------------------------------------------------- refusals


def test_binary_masks_are_refused_for_instance_training_naming_binary(workspace, polyp_dir):
    args = run_args(workspace, "refused-binary")
    args[1] = str(polyp_dir)
    with pytest.raises(ValueError, match=r"binary masks .*--mode binary"):
        train(load_config(overrides=args), show_progress=False)


def test_class_maps_are_refused_for_instance_training_naming_multiclass(workspace):
    write_dataset("scene", workspace / "scene", train=4, val=2, test=0, size=64, seed=0)
    args = run_args(workspace, "refused-classes")
    args[1] = str(workspace / "scene")
    with pytest.raises(ValueError, match=r"class maps .*--mode multiclass"):
        train(load_config(overrides=args), show_progress=False)


def test_masks_holding_one_id_each_are_refused_even_when_read_as_instances(workspace, polyp_dir):
    args = run_args(workspace, "refused-one-id", "--mask_reading", "instances")
    args[1] = str(polyp_dir)
    with pytest.raises(ValueError, match="at most one object id"):
        train(load_config(overrides=args), show_progress=False)


REFUSED = [
    (["--prompt", "box"], "prompt"),
    (["--loss", "bce_dice"], "loss"),
    (["--instance_channels", "6"], "instance_channels"),
]


@pytest.mark.parametrize(("extra", "named"), REFUSED)
def test_settings_instance_training_cannot_take_are_refused_by_name(workspace, extra, named):
    with pytest.raises(ValueError, match=named):
        load_config(overrides=run_args(workspace, "refused", *extra))


def test_ais_on_a_model_without_an_instance_decoder_is_refused_naming_amg():
    segmenter = Segmenter(random_sam(tiny_sam_config(), seed=0), base_task(64, "random"))
    for method in ("ais", "apg"):
        with pytest.raises(ValueError, match="use 'amg'"):
            segmenter.predict_instances(np.zeros((32, 32, 3), np.uint8), method)


# ---------------------------------------------------------------- APG and tiles


def test_apg_keeps_one_object_per_seed_and_resolves_overlaps_by_predicted_iou():
    model = random_sam(tiny_sam_config(), seed=0).eval()
    seeds = np.zeros((64, 64), np.int32)
    seeds[5:15, 5:15], seeds[20:34, 30:44], seeds[40:60, 8:20] = 1, 2, 3
    pixels, info = preprocess(disc_image(seeds), 64)
    ids, refined = refine_objects(model, encode_images(model, pixels[None]), info, objects_from_ids(seeds))
    assert ids.max() == 3 and len(refined) == 3
    for seed_id, (x, y) in enumerate(objects_from_ids(seeds).points.astype(int), start=1):
        assert ids[y, x] == seed_id  # each seed point is held by its own object
    first, second = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    first[:, :3], second[:, 1:] = True, True
    ids, kept = resolve_overlaps([first, second], np.array([0.4, 0.9]), (4, 4))
    assert ids[0].tolist() == [1, 2, 2, 2] and kept.tolist() == [0, 1]


def test_tile_stitching_keeps_an_object_crossing_a_border_as_one_id():
    image = np.zeros((40, 100, 3), np.uint8)
    image[10:30, 40:60] = 255  # crosses the border between the windows [0, 60) and [40, 100)
    image[5:10, 5:10] = image[30:36, 90:96] = 255

    def components(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = connected_components(crop[..., 0] > 0)
        return ids, np.arange(1, ids.max() + 1, dtype=np.float32)

    ids, scores = stitch_instances(components, image, tile=60, overlap=20)
    assert ids.max() == 3 and len(scores) == 3
    assert len(np.unique(ids[10:30, 40:60])) == 1 and ids[20, 50] > 0


def test_tiled_ais_blends_the_maps_so_discs_crossing_window_borders_stay_two_objects(monkeypatch):
    """A stand-in decoder that is perfect on each window: what is left to test is the blending and one watershed."""
    import convlora.inference as inference
    from convlora.instances import instance_targets

    def perfect(model, crop, *args, **kwargs):
        ids = (crop[..., 0] == 200).astype(np.int64) + 2 * (crop[..., 0] == 190)  # each disc has its own colour
        maps = np.clip(instance_targets(ids), 1e-4, 1 - 1e-4)
        return torch.logit(torch.from_numpy(maps))

    monkeypatch.setattr(inference, "instance_map_logits", perfect)
    big = np.zeros((64, 150), np.int64)
    big[:, 40:104] = two_discs()  # the discs straddle the borders of the 48 px windows
    image = disc_image(big)
    image[big == 2] = (190, 90, 90)
    segmenter = Segmenter(random_sam(tiny_sam_config(), seed=0), base_task(64, "random"))
    monkeypatch.setattr(inference, "has_instance_head", lambda model: True)
    ids, found = segmenter.predict_instances(image, "ais", tile=48, overlap=16)
    assert ids.max() == 2 and len(found) == 2
    assert instance_scores(big, ids)["sa75"] == 1.0


def test_tiled_ais_and_apg_with_a_trained_decoder_give_the_untiled_objects(disc_model):
    segmenter, truth = disc_model
    big = np.zeros((64, 128), np.int64)
    big[:, :64] = truth  # windows of 64 px without overlap: the fitted image and an empty one
    for method in ("ais", "apg"):
        ids, _ = segmenter.predict_instances(disc_image(big), method, tile=64, overlap=0)
        whole, _ = segmenter.predict_instances(disc_image(truth), method)
        assert ids.max() == 2 and np.array_equal(ids[:, :64], whole), method


# ---------------------------------------------------------------- files, merge, ONNX


def test_predict_writes_ids_coco_and_overlays_with_auto_choosing_ais(trained, workspace, capsys):
    images = workspace / "nuclei" / "test" / "images"
    out = workspace / "predicted"
    assert main(["predict", "--model", str(trained / "adapter"), "--images", str(images), "--output", str(out),
                 "--instances", "auto"]) == 0  # fmt: skip
    stems = sorted(p.stem for p in images.glob("*.png"))
    for stem in stems:
        ids = np.asarray(Image.open(out / "instances" / f"{stem}.png"))
        document = json.loads((out / "instances" / f"{stem}.json").read_text())
        assert document["method"] == "ais" and len(document["annotations"]) == len(np.unique(ids[ids > 0]))
        assert (out / "overlays" / f"{stem}.png").is_file()
    tiled = predict_folder(trained / "adapter", images, workspace / "tiled", instances="apg", tile=40, overlap=16)
    assert tiled["count"] == len(stems)


def test_evaluate_scores_an_instance_model_by_its_objects(trained, workspace):
    scores = evaluate(trained / "adapter", workspace / "nuclei")
    assert scores["images"] == 2 and 0.0 <= scores["msa"] <= 1.0 and scores["n_true"] > 0


def test_merge_keeps_the_instance_decoder(trained, workspace):
    merged = workspace / "merged"
    merge_model(trained / "adapter", merged)
    assert (merged / "instance_head.safetensors").is_file()
    image = np.asarray(Image.open(next((workspace / "nuclei" / "test" / "images").glob("*.png"))))
    before = Segmenter.from_pretrained(trained / "adapter").predict_instances(image, "ais")[0]
    after = Segmenter.from_pretrained(merged).predict_instances(image, "ais")[0]
    assert np.array_equal(before, after)


def test_onnx_export_gives_the_decoder_maps_and_the_prompt_decoder(trained, workspace):
    pytest.importorskip("onnxruntime")
    from convlora.deploy import export_onnx

    info = export_onnx(trained / "adapter", workspace / "onnx")
    assert info["io"]["model.onnx"]["outputs"]["logits"]["shape"] == ["batch", 3, 32, 32]
    assert set(info["files"]) == {"model", "image_encoder", "prompt_decoder"}
    assert max(info["check"].values()) < 1e-4
    assert info["instance_head"]["hidden_channels"] == 8 and "watershed" in " ".join(info["postprocess"]["steps"])


def test_the_nuclei_example_compares_ais_apg_amg_and_binary_cc_with_a_tiny_budget(tmp_path, capsys):
    import runpy

    argv = ["nuclei.py", "--quick", "--output-dir", str(tmp_path / "run"), "--synthetic-dir", str(tmp_path / "data")]
    script = Path(__file__).resolve().parent.parent / "examples" / "nuclei.py"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        runpy.run_path(str(script), run_name="__main__")
    rows = json.loads((tmp_path / "run" / "comparison.json").read_text())["rows"]
    assert [row["method"].split()[0] for row in rows] == ["AIS", "APG", "AMG", "binary-CC"]
    assert len({row["n_true"] for row in rows}) == 1 and all(row["seconds_per_image"] > 0 for row in rows)
    assert "| method | mSA | F1@0.5 |" in capsys.readouterr().out
