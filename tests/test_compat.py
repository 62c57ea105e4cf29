"""Files written by convlora 0.1 (the flat layout, before the restructure) still load and behave the same.

``tests/fixtures/v0_1`` was written once by the old code (``tools/make_compat_fixture.py`` says how): a tiny
random base, a Conv-LoRA run's adapter folder, a merged checkpoint, a training checkpoint after step 2 of 4,
and the logits the old code computed for a fixed input.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convlora import load_config, load_trained, train
from convlora.synthetic import write_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0]


def test_an_adapter_folder_of_version_0_1_gives_the_masks_it_gave_then(expected):
    model, task = load_trained(FIXTURE / "adapter", base_model=str(FIXTURE / "base"))
    assert task.method == "conv_lora" and task.image_size == 64
    # the expert mixture now routes densely (no data-dependent shapes): the same sums in another order
    torch.testing.assert_close(_logits(model, expected["pixel_values"]), expected["adapter_logits"], atol=1e-6, rtol=0)


def test_a_merged_checkpoint_of_version_0_1_gives_the_masks_it_gave_then(expected):
    model, task = load_trained(FIXTURE / "merged")
    assert task.merged
    torch.testing.assert_close(_logits(model, expected["pixel_values"]), expected["merged_logits"], atol=1e-6, rtol=0)


def test_a_training_checkpoint_of_version_0_1_resumes_to_the_end_of_its_run(tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURE.parents[2])  # the old adapter names its base relative to the repository
    write_dataset("polyp", tmp_path / "data", train=8, val=2, test=0, size=64, seed=0)
    run = tmp_path / "run"
    # the run folder as the old run left it at step 2: its checkpoint and the best model so far
    shutil.copytree(FIXTURE / "checkpoint", run / "checkpoints" / "step-00000002")
    shutil.copytree(FIXTURE / "adapter", run / "adapter")
    config = load_config(
        data=str(tmp_path / "data"), model=str(FIXTURE / "base"), output_dir=str(run), epochs=2, batch_size=4,
        lr=3e-3, save_every_steps=2, keep_checkpoints=5, overlay_samples=0, conv_lora={"r": 2, "num_experts": 2},
        resume="latest",
    )  # fmt: skip
    result = train(config, show_progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert result.steps == 4 and metrics["steps"] == 4
    # the evaluation of epoch 0 came from the old checkpoint, the one of epoch 1 from the resumed run
    assert [entry["epoch"] for entry in metrics["history"]] == [0, 1]
    old_progress = json.loads((FIXTURE / "checkpoint" / "progress.json").read_text())
    assert metrics["history"][0] == old_progress["history"][0]
