"""Retention in instance runs (``--mode instances``): SAM's own prompted path, scored on the adapted encoder.

An instance run trains its instance decoder and adapts the image encoder; SAM's prompt encoder and mask decoder
take no loss, and they are what answers a box, a point or clicks. Invariants on a tiny random SAM and a tiny
nuclei set: the prompted path reads the adapted encoder and never the instance decoder; a ``decoder`` run
(nothing of SAM trains) keeps exactly 1.0; the numbers a run records are those a direct measurement of its
export gives; the validation objects are the instances, not the connected components of the foreground.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convlora.artifact import TaskInfo, load_trained
from convlora.artifact.methods import build_task_model
from convlora.data import SegmentationDataset, find_objects
from convlora.data.decode import read_mask
from convlora.data.report import Sample
from convlora.evaluation.retention import (
    PROTOCOLS,
    KeepImage,
    keep_set_from_dataset,
    keep_set_from_folder,
    prompted_quality,
    retention,
)
from convlora.models import find_sam, load_sam, random_sam, tiny_sam_config
from convlora.synthetic import write_dataset
from convlora.training.config import load_config
from convlora.training.engine import train
from convlora.training.retention_monitor import plan_keep_set

pytestmark = pytest.mark.slow

KEYS = [f"{key}{suffix}" for key in ("retention", "retention_val") for suffix in ["", *(f"/{p}" for p in PROTOCOLS)]]
MIN_AREA = 10  # keep_set_from_dataset's default, which the engine uses


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir, keep_folder) -> Path:
    root = tmp_path_factory.mktemp("instance_retention")
    (root / "sam").symlink_to(tiny_sam_dir)
    write_dataset("nuclei", root / "nuclei", train=4, val=2, test=0, size=64, seed=0)
    (root / "keep").symlink_to(keep_folder)
    return root


def run_args(workspace: Path, out: str, *extra: str) -> list[str]:
    args = ["--data", str(workspace / "nuclei"), "--model", str(workspace / "sam"), "--mode", "instances"]
    args += ["--output_dir", str(workspace / out), "--epochs", "2", "--batch_size", "2", "--lr", "1e-2"]
    args += ["--instance_channels", "8", "--log_every_steps", "1", "--overlay_samples", "0"]
    return [*args, "--keep_data", str(workspace / "keep"), *extra]


def run(workspace: Path, out: str, *extra: str) -> tuple[object, dict]:
    result = train(load_config(overrides=run_args(workspace, out, *extra)), show_progress=False)
    return result, json.loads((workspace / out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def lora_run(workspace):
    return run(workspace, "lora", "--method", "lora")


@pytest.fixture(scope="module")
def decoder_run(workspace):
    return run(workspace, "decoder", "--method", "decoder")


def val_counts(workspace: Path) -> tuple[int, int]:
    """Instance ids of at least MIN_AREA pixels in the val masks, and connected components of their foreground."""
    ids = components = 0
    for path in sorted((workspace / "nuclei" / "val" / "masks").glob("*.png")):
        stored = read_mask(str(path))
        _, areas = np.unique(stored[stored > 0], return_counts=True)
        ids += int((areas >= MIN_AREA).sum())
        components += len(find_objects(stored > 0, "binary", min_area=MIN_AREA))
    return ids, components


# ---------------------------------------------------------------- training runs


def test_an_instance_run_records_retention_at_every_evaluation_equal_to_a_direct_measurement_of_its_export(
    workspace, lora_run
):
    result, recorded = lora_run
    assert len(recorded["history"]) == 2
    for entry in recorded["history"]:
        for key in KEYS:
            assert math.isfinite(entry[key]) and entry[key] > 0, (key, entry[key])
    # LoRA adapted the encoder the prompted decoder reads: the measurement sees it
    assert any(entry[key] != 1.0 for entry in recorded["history"] for key in KEYS)
    assert recorded["selection"]["metric"] == "msa" and recorded["retention"]["keep_set"]["objects"] == 4
    # the validation objects are the nuclei themselves (touching ones apart), not the foreground's components
    ids, components = val_counts(workspace)
    assert recorded["retention"]["val_keep_set"]["objects"] == ids and ids > components
    assert "instance ids" in recorded["retention"]["val_keep_set"]["description"]
    # the exported model scored from scratch against a freshly loaded base
    base = load_sam(str(workspace / "sam"))
    keep = keep_set_from_folder(workspace / "keep")
    model, task = load_trained(result.adapter_dir)
    assert task.mode == "instances"
    chosen = next(e for e in recorded["history"] if e["epoch"] == result.best_epoch)
    direct = retention(model, prompted_quality(base, keep), keep)
    val = keep_set_from_folder(workspace / "nuclei", split="val")  # the folder reader: one object per stored id
    direct_val = retention(model, prompted_quality(base, val), val)
    assert direct_val["model"]["objects"] == ids
    for key, measured in (("retention", direct), ("retention_val", direct_val)):
        assert measured["mean"] == pytest.approx(chosen[key], abs=1e-6), key
        for protocol in PROTOCOLS:
            assert measured[protocol] == pytest.approx(chosen[f"{key}/{protocol}"], abs=1e-6), (key, protocol)


def test_a_decoder_instance_run_trains_nothing_of_sam_and_keeps_retention_exactly_one(workspace, decoder_run):
    result, recorded = decoder_run
    assert len(recorded["history"]) == 2
    for entry in recorded["history"]:
        assert {key: entry[key] for key in KEYS} == dict.fromkeys(KEYS, 1.0)
    assert recorded["selection"]["retention"] == 1.0
    # why: every weight of the exported SAM is the base's; only the instance decoder learnt
    model, _ = load_trained(result.adapter_dir)
    base = random_sam(tiny_sam_config(), seed=0).state_dict()
    sam = {k: v for k, v in find_sam(model).state_dict().items() if not k.startswith("instance_head.")}
    assert sam.keys() == base.keys() and all(torch.equal(sam[k], base[k]) for k in base)
    assert (result.adapter_dir / "instance_head.safetensors").is_file()


def test_select_retention_on_an_instance_run_keeps_the_best_msa_among_evaluations_reaching_the_bound(workspace):
    extra = ["--method", "full", "--epochs", "3", "--keep_checkpoints", "3"]
    reference, plain = run(workspace, "full-best", *extra)
    history = plain["history"]
    best = reference.best_epoch
    kept_by_best = next(e["retention"] for e in history if e["epoch"] == best)
    top = max(e["retention"] for e in history)
    assert top > kept_by_best, "the tiny run no longer has an evaluation retaining more than the best-msa one"
    bound = (top + kept_by_best) / 2  # the best-msa evaluation misses it, the highest retention reaches it
    result, recorded = run(workspace, "full-retention", *extra, "--select", "retention", "--min_retention", str(bound))
    assert recorded["history"] == history  # the rule changes nothing of the training
    eligible = [i for i, e in enumerate(history) if e["retention"] >= bound]
    expected = max(eligible, key=lambda i: (history[i]["msa"], history[i]["retention"], -i))
    assert result.best_epoch == history[expected]["epoch"] != best
    selection = recorded["selection"]
    assert selection["metric"] == "msa" and selection["met_bound"] is True
    assert selection["reason"].startswith(f"epoch {history[expected]['epoch']}: msa ")
    assert f"retention >= {bound:g}" in selection["reason"]
    # the export is that evaluation's model, and SAM's prompted path in it is the base's
    model, _ = load_trained(result.adapter_dir)
    params = dict(model.named_parameters())
    step = history[expected]["step"]
    saved = load_file(workspace / "full-retention" / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")
    assert saved and all(torch.equal(params[name], value) for name, value in saved.items())
    base = random_sam(tiny_sam_config(), seed=0).state_dict()
    parts = ("prompt_encoder", "shared_image_embedding", "mask_decoder")
    prompted = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in parts}
    assert prompted and all(torch.equal(v, base[k]) for k, v in prompted.items())
    # a bound above every value keeps the highest retention and says the bound was missed
    _, missed = run(workspace, "full-missed", *extra, "--select", "retention", "--min_retention", "10")
    highest = max(range(len(history)), key=lambda i: (history[i]["retention"], -i))
    assert missed["selection"]["epoch"] == history[highest]["epoch"] and missed["selection"]["met_bound"] is False


# ---------------------------------------------------------------- keep sets and the prompted path


def write_instance_sample(folder: Path, name: str, ids: np.ndarray) -> Sample:
    image = np.full((*ids.shape, 3), 30, np.uint8)
    image[(ids > 0) & (ids != 255)] = (200, 80, 80)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(ids).save(folder / "masks" / f"{name}.png")
    return Sample(str(folder / "images" / f"{name}.png"), str(folder / "masks" / f"{name}.png"), key=name)


def test_the_val_keep_set_of_an_instance_dataset_has_one_object_per_id_not_per_component(tmp_path):
    eight = np.zeros((40, 40), np.uint8)
    eight[5:15, 5:15], eight[5:15, 15:25] = 3, 7  # two touching squares: one component, two objects
    eight[25:35, 25:35] = 9
    eight[30:32, 5:7] = 12  # 4 px: below min_area
    eight[0, :] = 255  # ignored in an 8-bit map
    sixteen = np.zeros((40, 40), np.uint16)
    sixteen[2:12, 2:30], sixteen[12:22, 2:30] = 255, 256  # in a 16-bit map 255 is an object id like any other
    samples = [write_instance_sample(tmp_path, "eight", eight), write_instance_sample(tmp_path, "sixteen", sixteen)]
    dataset = SegmentationDataset(samples, image_size=64, mode="instances")
    keep = keep_set_from_dataset(dataset, "val", min_area=MIN_AREA)  # objects by the dataset's mode
    first, second = keep[0], keep[1]
    assert len(first.objects) == 3 and len(second.objects) == 2
    assert sorted(first.objects.masks.sum(axis=(1, 2)).tolist()) == [100, 100, 100]
    assert sorted(second.objects.masks.sum(axis=(1, 2)).tolist()) == [280, 280]
    assert not first.valid[0].any() and first.valid[1:].all() and second.valid.all()
    assert not first.objects.masks[:, 0].any()  # no ignored pixel belongs to an object
    assert "instance ids of at least 10 px" in keep.description
    binary = keep_set_from_dataset(dataset, "val", min_area=MIN_AREA, object_kind="binary")
    assert len(binary[0].objects) == 2 and len(binary[1].objects) == 1  # components merge the touching objects
    with pytest.raises(ValueError, match="object_kind must be one of"):
        keep_set_from_dataset(dataset, "val", object_kind="ids")


def keep_images() -> list[KeepImage]:
    images = []
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        ids = np.zeros((64, 64), np.int64)
        ids[8:24, 10:30], ids[40:56, 30 + 4 * i : 58] = 1, 2
        image[ids == 1], image[ids == 2] = (200, 80, 60), (60, 160, 200)
        images.append(KeepImage(image, find_objects(ids, "instances"), np.ones((64, 64), bool)))
    return images


@pytest.mark.parametrize("method", ["decoder", "lora", "conv_lora", "full"])
def test_an_instance_model_is_prompted_through_sams_decoder_on_its_adapted_encoder_never_its_head(method):
    keep = keep_images()
    base_scores = prompted_quality(random_sam(tiny_sam_config(), seed=0), keep)
    names = ["background", "object"]
    task = TaskInfo("instances", 2, names, 64, "random", method, instance_head={"hidden_channels": 8})
    model = build_task_model(random_sam(tiny_sam_config(), seed=0), task)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert not [name for name in trainable if "mask_decoder" in name]  # SAM's prompted decoder is frozen
    assert retention(model, base_scores, keep)["model"] == base_scores  # a fresh model is SAM's own
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "instance_head" in name:
                param.add_(1.0)
    assert retention(model, base_scores, keep)["model"] == base_scores  # the instance decoder takes no part
    encoder = [p for name, p in model.named_parameters() if p.requires_grad and "vision_encoder" in name]
    if method == "decoder":
        assert encoder == [] and {name.split(".")[0] for name in trainable} == {"instance_head"}
        return
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in encoder:
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    moved = retention(model, base_scores, keep)
    assert any(moved[p] != 1.0 for p in PROTOCOLS), moved  # what the adapted encoder does reaches the prompts


def test_instance_runs_plan_a_keep_set_and_multiclass_runs_still_skip_it():
    settings = SimpleNamespace(retention="on", select="retention", keep_data=None, model="convlora-tiny", keep_images=2)
    keep, reason = plan_keep_set(settings, "instances")
    assert keep is not None and keep.name == "generic" and len(keep) == 2
    assert reason.startswith("retention: generic keep set") and "instance run" in reason
    with pytest.raises(ValueError, match="retention 'on' needs keep_data"):
        plan_keep_set(SimpleNamespace(**{**vars(settings), "model": "my/sam"}), "instances")
    off, note = plan_keep_set(SimpleNamespace(**{**vars(settings), "model": "my/sam", "retention": "auto",
                                              "select": "best"}), "instances")  # fmt: skip
    assert off is None and note.startswith("retention: off: no keep set")
    skipped, why = plan_keep_set(SimpleNamespace(**{**vars(settings), "select": "best"}), "multiclass")
    assert skipped is None and "class-query decoder" in why and "in place of SAM's prompted mask decoder" in why


@pytest.mark.parametrize("mode", ["instances", "binary"])
def test_a_full_instance_run_freezes_every_part_of_sams_prompted_path(mode):
    from convlora.artifact.methods import freeze_unused_decoder_parts

    model = random_sam(tiny_sam_config(), seed=0)
    frozen = set(freeze_unused_decoder_parts(model, mode))
    prompted = [
        n for n, _ in model.named_parameters() if n.split(".")[0] in ("prompt_encoder", "shared_image_embedding")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {n for n, _ in model.named_parameters() if n.startswith("mask_decoder.")}
    if mode == "instances":  # no loss reaches any of it: frozen, so multi-process training finds no unused parameter
        assert prompted and set(prompted) | decoder == frozen and not trainable & frozen
    else:  # prompt-free binary runs still read the prompt encoder's no-mask embedding and train the first mask MLP
        assert not set(prompted) & frozen and decoder - frozen
    assert any(n.startswith("vision_encoder.") for n in trainable)
