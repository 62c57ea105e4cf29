"""Retention: a fine-tune's prompted quality on a keep set relative to its base (exactly 1 at strength 0), SAM's
correction clicks, the checkpoint rule that weighs retention, and the ``convlora tradeoff`` command end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlora import load_sam
from convlora.artifact import TaskInfo, export_trained, load_trained
from convlora.artifact.methods import build_task_model
from convlora.artifact.strength import set_strength
from convlora.cli import main
from convlora.data.prompts import PAD_LABEL, Prompts
from convlora.evaluation.retention import (
    GENERIC_KEEP_STREAM,
    PRETRAINING_STREAMS,
    PROTOCOLS,
    choose_checkpoint,
    choose_weighted,
    error_click,
    generic_keep_set,
    interactive_clicks,
    keep_set_from_folder,
    prompted_quality,
    retention,
)
from convlora.tradeoff import check_strengths, tradeoff
from convlora.tuner import ConvLoraConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam_dir) -> Path:
    """An exported Conv-LoRA adapter with non-identity weights and a changed mask decoder."""
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(tiny_sam_dir), "conv_lora")
    model = build_task_model(load_sam(tiny_sam_dir), task, ConvLoraConfig(r=2, num_experts=2, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter, generator=torch.Generator().manual_seed(1)))
    return export_trained(model, task, tmp_path_factory.mktemp("retention") / "adapter")


@pytest.fixture(scope="module")
def keep():
    return generic_keep_set(3, size=64)


def square(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


# ------------------------------------------------------------------------------------------- retention


def test_retention_is_exactly_one_at_strength_zero(trained, tiny_sam_dir, keep):
    model, task = load_trained(trained)
    set_strength(model, task, 0.0)
    result = retention(model, load_sam(tiny_sam_dir), keep)
    assert [result[p] for p in PROTOCOLS] == [1.0, 1.0, 1.0] and result["mean"] == 1.0
    assert result["model"] == result["base"] and result["model"]["objects"] >= 3


def test_at_strength_one_retention_divides_the_fine_tunes_own_scores_by_the_bases(trained, tiny_sam_dir, keep):
    own = prompted_quality(load_trained(trained)[0], keep)
    base = prompted_quality(load_sam(tiny_sam_dir), keep)
    model, task = load_trained(trained)
    set_strength(model, task, 0.3)
    set_strength(model, task, 1.0)  # back to the fine-tune as trained
    result = retention(model, base, keep)
    assert result["model"] == own
    assert [result[p] for p in PROTOCOLS] == [own[p] / base[p] for p in PROTOCOLS]
    assert result["mean"] == pytest.approx(sum(own[p] / base[p] for p in PROTOCOLS) / 3)
    assert any(result[p] != 1.0 for p in PROTOCOLS)  # the fine-tune does change what SAM answers


def test_one_click_is_the_point_protocol_and_scores_repeat_exactly(tiny_sam_dir, keep):
    base = load_sam(tiny_sam_dir)
    scores = prompted_quality(base, keep, protocols=("point", "clicks"), num_clicks=1)
    assert scores["point"] == scores["clicks"]
    assert prompted_quality(base, keep) == prompted_quality(base, keep)


def test_base_scores_from_another_keep_set_are_refused(tiny_sam_dir, keep):
    base = load_sam(tiny_sam_dir)
    with pytest.raises(ValueError, match="measured on 999 objects, this keep set has"):
        retention(base, {"box": 0.5, "point": 0.5, "clicks": 0.5, "objects": 999.0}, keep)
    with pytest.raises(ValueError, match=r"lack the protocols \['clicks'\]"):
        retention(base, {"box": 0.5, "point": 0.5}, keep)


def test_the_generic_keep_set_draws_from_a_stream_convlora_tiny_never_saw(monkeypatch):
    spec = importlib.util.spec_from_file_location("pretrain_base", ROOT / "tools" / "pretrain_base.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain_base", tool)  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    used = {"train": tool.TRAIN_STREAM, "prompts": tool.PROMPT_STREAM, "held_out": tool.HELD_OUT_STREAM}
    assert used == PRETRAINING_STREAMS and GENERIC_KEEP_STREAM not in used.values()
    image = generic_keep_set(1)[0].image
    assert image.shape == (128, 128, 3)
    assert not np.array_equal(image, tool.held_out_images(1)[0][0])


# ------------------------------------------------------------------------------------------------ keep sets


def write_folder(root: Path, masks: list[np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def test_a_binary_folder_gives_its_connected_components(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:30, 15:30] = 255
    keep = keep_set_from_folder(write_folder(tmp_path / "binary", [mask, mask]))
    item = keep[0]
    assert len(keep) == 2 and sorted(item.objects.masks.sum(axis=(1, 2)).tolist()) == [64, 150]
    assert item.valid.all() and item.image.shape == (32, 32, 3)


def test_an_instance_folder_gives_one_object_per_id_even_where_they_touch(tmp_path):
    ids = np.zeros((32, 32), np.uint16)
    ids[4:14, 4:14] = 1
    ids[4:14, 14:24] = 2  # touching: one connected component, two objects
    ids[20:28, 4:12] = 3
    keep = keep_set_from_folder(write_folder(tmp_path / "instances", [ids]), mask_reading="instances")
    assert keep[0].objects.class_ids.tolist() == [1, 2, 3]
    assert keep[0].objects.masks.sum(axis=(1, 2)).tolist() == [100, 100, 64]


# ------------------------------------------------------------------------------------------------- clicks


def test_the_click_goes_to_the_centre_of_the_largest_error_region_not_the_largest_error_set():
    target = square(40, slice(0, 40), slice(0, 12))
    prediction = target.copy()
    prediction[2:8, 2:8] = False  # missed: two regions of 36 pixels (72 in all)
    prediction[30:36, 2:8] = False
    prediction[15:23, 20:28] = True  # a false alarm of 64 pixels: the largest single region
    point, label = error_click(prediction, target)
    assert label == 0 and point.tolist() == [23.0, 18.0]
    point, label = error_click(prediction, target, valid=~square(40, slice(14, 24), slice(19, 29)))
    assert label == 1 and point.tolist() == [4.0, 4.0]  # the alarm is ignored: the first missed region
    assert error_click(target, target)[1] == PAD_LABEL


def test_the_second_click_lands_in_the_middle_of_what_the_first_mask_missed():
    target = square(40, slice(10, 30), slice(4, 36))[None]  # 20 x 32 object
    left = square(40, slice(10, 30), slice(4, 20))[None]  # the model only ever finds its left half
    calls = []

    def decode(prompts: Prompts, mask_inputs, multimask):
        calls.append((prompts, mask_inputs, multimask))
        low = torch.full((1, 1, 10, 10), float(len(calls)))
        return low, torch.where(torch.as_tensor(left), 1.0, -1.0)

    masks, prompts = interactive_clicks(decode, target, num_clicks=3)
    assert [c[2] for c in calls] == [True, False, False]  # SAM's three masks for the lone first click only
    first, second = calls[0][0], calls[1][0]
    assert first.points.tolist() == [[[19.0, 19.0]]] and first.point_labels.tolist() == [[1]]
    assert second.points[0, 1].tolist() == [27.0, 19.0] and second.point_labels.tolist() == [[1, 1]]
    assert calls[0][1] is None and float(calls[1][1][0, 0, 0, 0]) == 1.0  # the previous logits fed back
    assert prompts.points.shape == (1, 3, 2) and np.array_equal(masks, left)
    calls.clear()
    interactive_clicks(decode, target, num_clicks=2, mask_input=False)
    assert [c[1] for c in calls] == [None, None]


# ------------------------------------------------------------------------------------------ selection rule

HISTORY = [
    {"epoch": 1, "s_measure": 0.70, "retention": 0.99},
    {"epoch": 2, "s_measure": 0.76, "retention": 0.97},
    {"epoch": 3, "s_measure": 0.83, "retention": 0.90},  # the best metric, but it forgot too much
    {"epoch": 4, "s_measure": 0.79, "retention": 0.95},
    {"epoch": 5, "s_measure": 0.79, "retention": 0.96},  # ties with epoch 4: the higher retention wins
]


def test_the_rule_picks_the_best_metric_among_the_entries_that_keep_enough():
    choice = choose_checkpoint(HISTORY, "s_measure", min_retention=0.95)
    assert choice.index == 4 and choice.entry["epoch"] == 5 and choice.met_bound
    assert (
        choice.reason
        == "epoch 5: s_measure 0.79 with retention 0.96 (best of the 4 evaluations with retention >= 0.95)"
    )
    assert choose_checkpoint(HISTORY, "s_measure", min_retention=0.0).index == 2
    lower = [{"step": 10, "ber": 5.0, "retention": 1.0}, {"step": 20, "ber": 4.0, "retention": 0.96}]
    assert choose_checkpoint(lower, "ber").reason.startswith("step 20: ber 4 with retention 0.96")


def test_when_no_entry_keeps_enough_the_one_that_forgot_least_is_chosen_and_the_reason_says_so():
    history = [{"epoch": 1, "iou": 0.8, "retention": 0.85}, {"epoch": 2, "iou": 0.7, "retention": 0.9}]
    choice = choose_checkpoint(history, "iou", min_retention=0.95)
    assert choice.index == 1 and not choice.met_bound
    assert choice.reason == (
        "epoch 2: retention 0.9 is the highest of the 2 evaluations, none of which has retention >= 0.95 (iou 0.7)"
    )


def test_retention_results_and_bad_histories():
    history = [{"strength": 0.5, "iou": 0.6, "retention": {"mean": 0.97, "box": 0.9}}]
    assert choose_checkpoint(history, "iou", what="strengths").reason.startswith("strength 0.5: iou 0.6")
    with pytest.raises(ValueError, match="empty"):
        choose_checkpoint([], "iou")
    with pytest.raises(ValueError, match="history entry 0 has no number 'retention'"):
        choose_checkpoint([{"iou": 0.5}], "iou")
    with pytest.raises(ValueError, match="unknown metric"):
        choose_checkpoint(HISTORY, "nonsense")


def test_the_weighted_rule_trades_metric_against_retention():
    assert choose_weighted(HISTORY, "s_measure", 0.0).index == 2
    assert choose_weighted(HISTORY, "s_measure", 1.0).index == 0
    choice = choose_weighted(HISTORY, "s_measure", 0.5)
    assert choice.index == 4 and choice.reason.startswith("epoch 5: 0.5 x s_measure 0.79 + 0.5 x retention 0.96")


# --------------------------------------------------------------------------------------- the command


def test_tradeoff_writes_one_row_per_strength_and_refuses_a_foreign_folder(trained, polyp_dir, tmp_path, capsys):
    output = tmp_path / "tradeoff"
    argv = ["tradeoff", "--model", str(trained), "--data", str(polyp_dir), "--keep_data", str(polyp_dir),
            "--keep-images", "2", "--strengths", "1", "0", "0.5", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    assert "Chosen: strength" in capsys.readouterr().out
    table = (output / "tradeoff.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 0.5", "| 1"]
    result = json.loads((output / "tradeoff.json").read_text())
    assert result["metric"] == "s_measure" and result["split"] == "val" and result["images"] == 4
    assert [r["strength"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert result["rows"][0]["retention"] == 1.0 and result["rows"][0]["keep_scores"] == result["base_keep_scores"]
    assert (output / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # its own folder is replaced

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main([*argv[:-1], str(mine)]) == 2
    assert "holds files convlora did not write (thesis.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_without_keep_data_a_base_other_than_convlora_tiny_is_refused_in_one_line(trained, polyp_dir, tmp_path):
    with pytest.raises(ValueError, match="--keep_data is required: the base model .* has no built-in keep set"):
        tradeoff(trained, polyp_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"--strengths takes numbers in \[0, 1\], got 1.5"):
        check_strengths([0.5, 1.5])
