"""The benchmark's instance experiments and its retention measured after training, on tiny budgets.

Invariants: retention measured after training on a run's exported model equals what the run measured at its
kept evaluation (the benchmark can score earlier runs without training them again); an instance experiment's
recorded numbers are what the public API gives for the same model and data, and its report shows them.
"""

import json
from pathlib import Path

import pytest

from convlora import Segmenter
from convlora.bench import experiment_from_dict, main
from convlora.bench.markdown import instance_goals
from convlora.inference import evaluate_instances

pytestmark = pytest.mark.slow

DATA = {"train": 8, "val": 2, "test": 3, "size": 64}


def _quality(name: str, train: dict, **extra) -> dict:
    return {
        "name": name, "kind": "quality", "domains": ["skin"], "arms": [{"method": "lora"}], "seeds": [0],
        "max_steps": 2, "model": "convlora-tiny", "data": DATA, "train": {"batch_size": 4, "epochs": 1, **train},
        **extra,
    }  # fmt: skip


def _run(root: Path, config: dict) -> dict:
    path = root / f"{config['name']}.json"
    path.write_text(json.dumps(config))
    args = ["run", str(path), "--results-dir", str(root / "results"), "--work-dir", str(root / "work"), "--no-report"]
    assert main(args) == 0
    return json.loads((root / "results" / f"{config['name']}.json").read_text())


def test_retention_measured_after_training_equals_the_runs_own_measurement(tmp_path):
    during = _run(tmp_path, _quality("during", {"retention": "on", "keep_images": 2}))["runs"][0]
    after = _run(tmp_path, _quality("after", {"retention": "off"}, retention_after=2))["runs"][0]
    assert set(during["retention"]) == set(after["retention"]) and len(after["retention"]) == 8
    for key, value in during["retention"].items():
        assert after["retention"][key] == pytest.approx(value, abs=1e-6), key
    assert after["retention_measured"] == "after training" and "retention_measured" not in during
    assert after["test_metrics"] == during["test_metrics"]  # the same training: retention changes nothing of it
    # a rerun reads the stored numbers back instead of measuring again
    again = _run(tmp_path, _quality("after", {"retention": "off"}, retention_after=2))["runs"][0]
    assert again["reused"] and again["retention"] == after["retention"]


def test_retention_after_refuses_a_negative_count():
    with pytest.raises(ValueError, match="retention_after"):
        experiment_from_dict(_quality("bad", {}, retention_after=-1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"domains": ["polyp"]}, "instance domains"),
        ({"arms": []}, "at least one method"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"amg": {"points": 4}}, "amg"),
        ({"data": {"square": True}}, "unknown data keys"),
    ],
)
def test_bad_instance_configs_are_refused_with_the_field_named(change, message):
    config = {"name": "i", "kind": "instances", "arms": [{"method": "lora"}], **change}
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(config)


def test_an_instance_experiment_records_what_the_api_gives_and_reports_it(tmp_path, tiny_sam_dir):
    config = {
        "name": "inst", "kind": "instances", "domains": ["nuclei"], "arms": [{"method": "conv_lora"}], "seeds": [0],
        "epochs": 1, "model": str(tiny_sam_dir), "data": {"train": 4, "val": 1, "test": 2, "size": 64},
        "amg": {"points_per_side": 4},
    }  # fmt: skip
    result = _run(tmp_path, config)
    runs = {run["mode"]: run for run in result["runs"]}
    assert set(runs) == {"instances", "binary"}
    assert set(runs["instances"]["ways"]) == {"ais", "apg"} and set(runs["binary"]["ways"]) == {"binary_cc"}
    data = next((tmp_path / "work" / "data").iterdir())
    model_dirs = {p.parents[2].name.split("-")[1]: p for p in (tmp_path / "work").rglob("train/adapter")}
    direct = evaluate_instances(Segmenter.from_pretrained(model_dirs["instances"]), data, "ais", None)
    recorded = runs["instances"]["ways"]["ais"]
    for key in ("msa", "f1_50", "n_pred", "n_true", "images"):
        assert recorded[key] == pytest.approx(direct[key]), key
    assert result["amg"]["nuclei"]["ways"]["amg"]["n_true"] == recorded["n_true"]
    summary = result["summary"][0]["arms"]["conv_lora"]["ways"]
    assert summary["ais"]["msa"] == {"mean": pytest.approx(recorded["msa"]), "std": 0.0, "n": 1}

    assert main(["report", "--results-dir", str(tmp_path / "results")]) == 0
    table = (tmp_path / "results" / "inst.md").read_text()
    assert f"| nuclei | AIS | **{recorded['msa']:.3f} ± 0.000** |" in table
    goal = instance_goals(result)[0]
    amg = result["amg"]["nuclei"]["ways"]["amg"]
    assert goal["ais_minus_amg"] == pytest.approx(recorded["msa"] - amg["msa"])
    assert (tmp_path / "results" / "inst.png").stat().st_size > 0
    assert "**One mask per object**" not in (tmp_path / "results" / "summary.md").read_text()  # no title: the name
    assert "(`inst`)" in (tmp_path / "results" / "summary.md").read_text()


def test_instance_experiments_measure_retention_and_decoder_only_instance_runs_keep_all_of_it(tmp_path):
    config = {
        "name": "kept", "kind": "instances", "domains": ["nuclei"], "arms": [{"method": "decoder"}], "seeds": [0],
        "epochs": 1, "model": "convlora-tiny", "data": {"train": 4, "val": 1, "test": 1, "size": 64},
        "amg": {"points_per_side": 4}, "retention_after": 2,
    }  # fmt: skip
    result = _run(tmp_path, config)
    runs = {run["mode"]: run for run in result["runs"]}
    # in instance mode nothing of SAM's encoder or prompted decoder trains for decoder-only: SAM is untouched
    assert runs["instances"]["retention"] and set(runs["instances"]["retention"].values()) == {1.0}
    assert runs["binary"]["retention"]["retention"] != 1.0  # a binary decoder-only run trains SAM's mask decoder
    kept = result["summary"][0]["arms"]["decoder"]["retention"]
    assert kept["instances"]["mean"] == 1.0 and kept["binary"]["mean"] == runs["binary"]["retention"]["retention"]
    assert main(["report", "--results-dir", str(tmp_path / "results")]) == 0
    table = (tmp_path / "results" / "kept.md").read_text()
    assert "| AIS | decoder |" in table and "1.000 ± 0.000 |" in table and "| 1 (the base) |" in table
    base = runs["instances"]["retention_base_scores"]["retention_val"]
    assert f"box {base['box']:.3f}, point {base['point']:.3f}" in table
    # the binary run's validation objects are connected components, the instance run's one per id
    assert runs["binary"]["retention_base_scores"]["retention_val"]["objects"] < base["objects"]
