"""Every domain example runs end to end on the embedded base with a tiny budget; so do the two API examples."""

import json
import os
import re
import runpy
import subprocess
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


# ------------------------------------------------------------------ the API examples, run as a user runs them

API_EXAMPLES = ["api_accelerate.py", "api_hf_tutorial.py"]


def run_api_example(script: str, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXAMPLES / script), "--output-dir", str(tmp_path / "run"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def printed(pattern: str, stdout: str) -> list[float]:
    return [float(value) for value in re.findall(pattern, stdout, re.MULTILINE)]


def test_the_accelerate_api_example_trains_then_reloads_and_merges_to_the_same_masks(tmp_path):
    result = run_api_example("api_accelerate.py", tmp_path, "--epochs", "3", "--train-images", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = printed(r"^epoch \d+/3: loss ([\d.]+)$", result.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0]
    before, after = printed(r"^val IoU (?:before|after) fine-tuning: ([\d.]+)$", result.stdout)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert printed(r"^reloaded adapter: max \|logit difference\| (\S+)$", result.stdout)[0] <= 1e-4
    assert printed(r"^merge_and_unload: max \|logit difference\| (\S+)$", result.stdout)[0] <= 1e-3
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "CONV_LORA"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".convlora-output.json", "adapter", "data"]


def test_the_hf_tutorial_example_trains_with_box_prompts_and_reloads_to_the_same_masks(tmp_path):
    result = run_api_example("api_hf_tutorial.py", tmp_path, "--epochs", "3", "--train-images", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = printed(r"^epoch \d+/3: loss ([\d.]+)$", result.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0]
    before, after = printed(r"^val box IoU (?:before|after) fine-tuning: ([\d.]+)$", result.stdout)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert printed(r"^reloaded adapter: max \|logit difference\| (\S+)$", result.stdout)[0] <= 1e-4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("script", API_EXAMPLES)
def test_an_api_example_refuses_an_output_folder_it_did_not_write(script, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    result = run_api_example(script, tmp_path, "--epochs", "2")
    assert result.returncode != 0
    assert "holds files convlora did not write (notes.txt)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_every_example_script_is_listed_in_the_readme_and_the_api_examples_in_the_docs():
    readme = (EXAMPLES / "README.md").read_text()
    guide = (EXAMPLES.parent / "docs" / "guides" / "examples.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/{script.name}" in readme, script.name
    for script in API_EXAMPLES:
        assert f"examples/{script}" in guide, script
