"""Every domain example runs end to end on the embedded base with a tiny budget."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from convlora.cli import main
from convlora.recipes import RECIPES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("domain", sorted(RECIPES))
def test_example_script_runs_with_a_tiny_budget(domain, tmp_path, monkeypatch, capsys):
    argv = [f"{domain}.py", "--quick", "--output-dir", str(tmp_path / "run"), "--synthetic-dir", str(tmp_path / "data")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / f"{domain}.py"), run_name="__main__")
    comparison = json.loads((tmp_path / "run" / "comparison.json").read_text())
    metric = RECIPES[domain].metric
    assert comparison["model"] == "convlora-tiny"
    assert metric in comparison["zero_shot"] and metric in comparison["fine_tuned"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "| metric | zero-shot | fine-tuned |" in capsys.readouterr().out


def test_every_domain_has_an_example_script_and_a_readme_section():
    readme = (EXAMPLES / "README.md").read_text()
    for domain in RECIPES:
        assert (EXAMPLES / f"{domain}.py").is_file()
        assert f"examples/{domain}.py" in readme


def test_demo_command_runs_quickly_and_resumes_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--output-dir", "runs/demo"]) == 0
    assert (tmp_path / "runs" / "demo" / "comparison.json").is_file()
    assert (tmp_path / "data" / "polyp" / "dataset.json").is_file()


def test_the_prompted_example_compares_vanilla_and_both_fine_tunes_under_the_same_boxes(tmp_path, monkeypatch):
    argv = [
        "prompted_skin.py",
        "--quick",
        "--output-dir",
        str(tmp_path / "run"),
        "--synthetic-dir",
        str(tmp_path / "d"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "prompted_skin.py"), run_name="__main__")
    rows = json.loads((tmp_path / "run" / "comparison.json").read_text())["test"]
    assert set(rows) == {"vanilla", "decoder", "conv_lora"}
    assert len({rows[name]["objects"] for name in rows}) == 1  # the same boxes for every model
    assert all(0.0 <= rows[name]["object_iou"] <= 1.0 for name in rows)
