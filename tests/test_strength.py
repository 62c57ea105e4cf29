"""A fine-tune's strength after training: 0 is SAM's own model, 1 the fine-tune, both bit for bit; an adapter
exported at a strength reproduces it under stock PEFT in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convlora import load_sam
from convlora.artifact import TaskInfo, export_trained, load_trained
from convlora.artifact.methods import build_task_model
from convlora.artifact.strength import set_strength
from convlora.cli import main
from convlora.inference import Segmenter
from convlora.tuner import ConvLoraConfig

ROOT = Path(__file__).resolve().parents[1]
PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def masks(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS, multimask_output=False).pred_masks


@pytest.fixture(scope="module", params=["conv_lora", "lora"])
def trained(request, tmp_path_factory, tiny_sam_dir) -> Path:
    """An exported adapter with non-identity weights and a changed mask decoder."""
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(tiny_sam_dir), request.param)
    config = ConvLoraConfig(r=2, num_experts=2, init_lora_weights=False)
    model = build_task_model(load_sam(tiny_sam_dir), task, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return export_trained(model, task, tmp_path_factory.mktemp(request.param) / "adapter")


def test_strength_zero_is_the_base_and_one_is_the_fine_tune_bit_for_bit(trained, tiny_sam_dir):
    model, task = load_trained(trained)
    tuned = masks(model.eval())
    base = masks(load_sam(tiny_sam_dir).eval())
    assert not torch.equal(tuned, base)
    assert torch.equal(masks(set_strength(model, task, 0.0)), base)
    halfway = masks(set_strength(model, task, 0.5))
    assert not torch.equal(halfway, base) and not torch.equal(halfway, tuned)
    assert torch.equal(masks(set_strength(model, task, 1.0)), tuned)  # strengths do not compound


def test_an_adapter_exported_at_a_strength_reproduces_it_under_stock_peft_in_a_fresh_process(
    trained, tiny_sam_dir, tmp_path, capsys
):
    assert main(["export", "--model", str(trained), "--format", "adapter", "--strength", "0.4", "--output",
                 str(tmp_path / "at-0.4")]) == 0  # fmt: skip
    expected = masks(Segmenter.from_pretrained(trained, strength=0.4).model)
    save_file({"pixels": PIXELS}, str(tmp_path / "pixels.safetensors"))
    code = (
        "import sys, torch, convlora\n"
        "from peft import PeftModel\n"
        "from safetensors.torch import load_file, save_file\n"
        "model = PeftModel.from_pretrained(convlora.load_sam(sys.argv[1]), sys.argv[2]).eval()\n"
        "pixels = load_file(sys.argv[3])['pixels']\n"
        "with torch.no_grad():\n"
        "    out = model(pixel_values=pixels, multimask_output=False).pred_masks\n"
        "save_file({'masks': out.contiguous()}, sys.argv[4])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tiny_sam_dir), str(tmp_path / "at-0.4"), str(tmp_path / "pixels.safetensors"),
         str(tmp_path / "out.safetensors")],
        check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["masks"], expected)


def test_bad_strengths_and_methods_are_refused(trained, tiny_sam_dir, tmp_path, capsys):
    model, task = load_trained(trained)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="strength must be a number in"):
            set_strength(model, task, bad)
    with pytest.raises(ValueError, match="method 'decoder'"):
        set_strength(model, TaskInfo("binary", 2, ["b", "o"], 64, "x", "decoder"), 0.5)
    with pytest.raises(ValueError, match="needs a trained adapter folder"):
        Segmenter.from_pretrained(tiny_sam_dir, strength=0.5)
    assert main(["export", "--model", str(trained), "--format", "adapter", "--output", str(tmp_path / "x")]) == 2
    assert "give --strength" in capsys.readouterr().err
