"""The benchmark runner end to end with a tiny budget: JSON schema, finite metrics, ratios, report files."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from convlora.bench import experiment_from_dict, main
from convlora.bench.cost import ALLOCATOR, ratios, run_isolated
from convlora.bench.formatting import fmt_seconds
from convlora.bench.quality import mean_std

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_sam_dir) -> Path:
    """One quality and one cost experiment of the runner on a stand-in tiny SAM, results in ``root/results``."""
    root = tmp_path_factory.mktemp("bench")
    (root / "sam").symlink_to(tiny_sam_dir)
    quality = {
        "name": "smoke_quality",
        "kind": "quality",
        "domains": ["polyp"],
        "arms": [{"method": "lora"}, {"method": "conv_lora", "conv_lora": {"num_experts": 2}}],
        "seeds": [0],
        "max_steps": 2,
        "model": str(root / "sam"),
        "data": {"train": 8, "val": 2, "test": 3, "size": 64},
        "train": {"batch_size": 4, "epochs": 1},
    }
    cost = {
        "name": "smoke_cost",
        "kind": "cost",
        "model": str(root / "sam"),
        "methods": ["lora", "conv_lora"],
        "conv_lora": {"num_experts": 2},
        "image_size": 64,
        "batch_size": 2,
        "warmup_steps": 1,
        "timed_steps": 2,
        "latency_runs": 2,
        "latency_warmup": 1,
        "sweeps": {"batch_size": [1], "prompts": [3]},
        "sweep_predict": True,
    }
    for name, config in (("quality", quality), ("cost", cost)):
        (root / f"{name}.json").write_text(json.dumps(config))
    args = ["run", str(root / "quality.json"), str(root / "cost.json")]
    assert main([*args, "--results-dir", str(root / "results"), "--work-dir", str(root / "work")]) == 0
    return root


def test_results_record_machine_versions_commit_and_config(smoke):
    for name in ("smoke_quality", "smoke_cost"):
        result = json.loads((smoke / "results" / f"{name}.json").read_text())
        assert result["schema"] == "convlora-benchmark/1" and result["name"] == name
        env = result["environment"]
        assert env["machine"]["cpu"] and env["machine"]["cores"] >= 1
        assert {"python", "torch", "transformers", "peft", "convlora"} <= set(env["versions"])
        assert "sha" in env["commit"] and env["threads"] >= 1
        assert result["command"].startswith("convlora benchmark run")
        assert result["config"]["name"] == name and len(result["load_before"]) == 3


def test_quality_runs_hold_finite_test_metrics_and_a_summary_per_arm(smoke):
    result = json.loads((smoke / "results" / "smoke_quality.json").read_text())
    assert [(r["arm"], r["seed"], r["steps"]) for r in result["runs"]] == [("lora", 0, 2), ("conv_lora", 0, 2)]
    for run in result["runs"]:
        assert run["test_metrics"] and all(math.isfinite(v) for v in run["test_metrics"].values())
        assert run["trainable_parameters"] > 0 and run["adapter_bytes"] > 0
    row = result["summary"][0]
    assert row["domain"] == "polyp" and row["metrics"] == ["s_measure"] and row["baseline"] == "lora"
    assert math.isfinite(result["zero_shot"]["polyp"]["s_measure"])  # the base model, before fine-tuning
    assert row["zero_shot"]["s_measure"] == result["zero_shot"]["polyp"]["s_measure"]
    conv = row["arms"]["conv_lora"]
    assert conv["metrics"]["s_measure"]["mean"] == result["runs"][1]["test_metrics"]["s_measure"]
    assert conv["trainable_parameters"] > row["arms"]["lora"]["trainable_parameters"]  # the conv experts


def test_cost_ratios_to_lora_are_the_absolute_values_divided(smoke):
    result = json.loads((smoke / "results" / "smoke_cost.json").read_text())
    rows = result["reference"]["methods"]
    assert set(rows) == {"lora", "conv_lora"}
    for method, row in rows.items():
        assert row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0 and row["artifact_bytes"] > 0
        assert len(row["step_seconds_all"]) == 2
        for key, ratio in result["reference"]["ratios_to_lora"][method].items():
            assert ratio == pytest.approx(row[key] / rows["lora"][key])
    assert result["reference"]["ratios_to_lora"]["lora"]["step_seconds"] == 1.0
    latency = result["latency"]["seconds"]
    assert set(latency) == {"base", "lora_adapter", "conv_lora_adapter", "lora_merged", "conv_lora_merged"}
    assert rows["conv_lora"]["merged_latency_seconds"] == latency["conv_lora_merged"]
    assert result["latency"]["merged_extra_parameters"]["lora_merged"] == 0
    assert result["latency"]["merged_extra_parameters"]["conv_lora_merged"] > 0
    # per-run ratios: each model's runs over LoRA merged's runs, paired run by run
    runs, paired = result["latency"]["seconds_all"], result["latency"]["paired_ratios_to_lora_merged"]
    assert paired["lora_merged"] == 1.0
    ratios = [a / b for a, b in zip(runs["conv_lora_merged"], runs["lora_merged"], strict=True)]
    assert paired["conv_lora_merged"] == pytest.approx(statistics.median(ratios))
    for row in rows.values():  # the library code paged in is counted apart from the peak (Linux reports it)
        assert row["code_pages_bytes"] is None or 0 <= row["code_pages_bytes"] < 200 * 2**20
    point = result["sweeps"]["batch_size"][0]
    assert point["batch_size"] == 1 and point["methods"]["conv_lora"]["batch_size"] == 1
    # prediction at the sweep point: the merged models' forward per image, and prompted prediction by prompts
    for method, row in point["predict"].items():
        assert row["method"] == method and row["batch_size"] == 1 and row["peak_memory_bytes"] > 0
        assert row["seconds_per_image"] == pytest.approx(statistics.median(row["seconds_all"]))
    prompted = result["sweeps"]["prompts"][0]
    assert prompted["prompts"] == 3 and set(prompted["prompted"]) == {"lora", "conv_lora"}
    for row in prompted["prompted"].values():
        assert row["seconds_per_image"] == pytest.approx(row["encoder_seconds"] + row["decoder_seconds"])
        assert row["decoder_seconds_per_prompt"] == pytest.approx(row["decoder_seconds"] / 3)
    # memory is measured under the fixed mmap threshold, timings with freed memory kept; both recorded
    assert {row["allocator"]["kind"] for row in rows.values()} == {"memory"}
    assert result["reference"]["interleaved_timing"]["allocator"]["kind"] == "timing"
    assert result["latency"]["allocator"] == {"kind": "timing", **ALLOCATOR["timing"]}
    faults = result["latency"]["page_faults_per_run"]
    assert set(faults) == {*latency, "conv_lora_merged_dense"} and all(n is None or n >= 0 for n in faults.values())


def test_each_measurement_process_gets_its_tasks_allocator_and_not_the_callers(monkeypatch):
    import subprocess

    seen = {}

    def fake_run(command, env, **kwargs):
        seen[json.loads(Path(command[-2]).read_text())["task"]] = env
        Path(command[-1]).write_text(json.dumps({"measured": True}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    for task in ("train", "interleaved", "latency"):
        result = run_isolated({"task": task}, threads=3)
        kind = "memory" if task == "train" else "timing"
        assert result == {"measured": True, "allocator": {"kind": kind, **ALLOCATOR[kind]}}
        malloc = {key: value for key, value in seen[task].items() if key.startswith("MALLOC_")}
        assert malloc == ALLOCATOR[kind] and seen[task]["OMP_NUM_THREADS"] == "3"
    assert seen["latency"]["MALLOC_MMAP_MAX_"] == "0" and "MALLOC_MMAP_MAX_" not in seen["train"]
    run_isolated({"task": "latency"}, threads=1, allocator="system")  # glibc's defaults: no MALLOC_* at all
    assert not [key for key in seen["latency"] if key.startswith("MALLOC_")]
    with pytest.raises(ValueError, match="allocator must be one of"):
        run_isolated({"task": "latency"}, threads=1, allocator="jemalloc")


def test_report_writes_tables_and_plots_from_the_json_alone(smoke):
    results = smoke / "results"
    for name in ("smoke_quality.md", "smoke_quality.png", "smoke_cost.md", "smoke_cost.png", "smoke_cost_scaling.png"):
        assert (results / name).stat().st_size > 0, name
    (results / "smoke_cost.md").unlink()
    assert main(["report", "--results-dir", str(results)]) == 0
    table = (results / "smoke_cost.md").read_text()
    conv = json.loads((results / "smoke_cost.json").read_text())["reference"]["ratios_to_lora"]["conv_lora"]
    assert f"| conv_lora | {conv['trainable_parameters']:.2f}× |" in table
    index = (results / "README.md").read_text()
    assert "## smoke_quality" in index and "## smoke_cost" in index
    prompted = json.loads((results / "smoke_cost.json").read_text())["sweeps"]["prompts"][0]["prompted"]["lora"]
    assert re.search(rf"^\| 3 \| {re.escape(fmt_seconds(prompted['seconds_per_image']))} \|", table, re.M)
    assert "lora predict per image" in table


def test_rerunning_reuses_finished_quality_runs(smoke):
    from convlora.cli import main as cli_main

    # through the `convlora benchmark` command this time
    args = ["benchmark", "run", str(smoke / "quality.json"), "--results-dir", str(smoke / "again")]
    assert cli_main([*args, "--work-dir", str(smoke / "work"), "--no-report"]) == 0
    result = json.loads((smoke / "again" / "smoke_quality.json").read_text())
    assert all(run["reused"] for run in result["runs"])


def test_mean_std_and_ratios_by_hand():
    assert mean_std([0.5, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414213562), "n": 2}
    assert mean_std([float("nan")])["n"] == 0
    table = ratios({"lora": {"a": 4.0, "b": 0}, "full": {"a": 10.0, "b": 3}}, ["a", "b"])
    assert table["full"] == {"a": 2.5, "b": None}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arms": [{"method": "adapter"}]}, "arm method"),
        ({"domains": ["moon"]}, "unknown domains"),
        ({"seeds": []}, "seeds"),
        ({"steps": 3}, "unknown keys"),
        ({"arms": [{"method": "full", "conv_lora": {"r": 2}}]}, "do not apply"),
        ({"baseline": "conv_lora"}, "baseline"),
    ],
)
def test_bad_quality_configs_are_refused_with_the_field_named(change, message):
    config = {"name": "q", "kind": "quality", "domains": ["polyp"], "arms": [{"method": "lora"}], **change}
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(config)


def test_the_command_names_a_missing_config(tmp_path, capsys):
    from convlora.cli import main as cli_main

    assert cli_main(["benchmark", "run", str(tmp_path / "nope.json")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err


def test_committed_experiment_configs_are_valid():
    from convlora.bench import load_experiment

    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    assert "quality.json" in names and "cost_tiny.json" in names
    for path in CONFIGS.glob("*.json"):
        assert load_experiment(path).name == path.stem


def test_summary_block_of_a_readme_is_replaced_and_a_readme_without_markers_named(smoke, tmp_path):
    from convlora.bench.markdown import SUMMARY_END, SUMMARY_START

    results = smoke / "results"
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{SUMMARY_START}\nstale numbers\n{SUMMARY_END}\n\nafter\n")
    assert main(["report", "--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    summary = (results / "summary.md").read_text()
    assert "stale numbers" not in text and f"{SUMMARY_START}\n{summary}{SUMMARY_END}" in text
    assert text.startswith("# title\n") and text.endswith("\nafter\n")
    conv = json.loads((results / "smoke_cost.json").read_text())["reference"]["ratios_to_lora"]["conv_lora"]
    assert f"| {conv['step_seconds']:.2f}× |" in summary
    readme.write_text("no markers here\n")
    assert main(["report", "--results-dir", str(results), "--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers here\n"


def test_project_readme_shows_the_summary_of_the_committed_results():
    from convlora.bench.markdown import SUMMARY_END, SUMMARY_START, summary_markdown
    from convlora.bench.schema import load_results

    results = load_results(CONFIGS.parent / "results")
    if not results:
        pytest.skip("no benchmark results are committed yet")
    summary = summary_markdown(results)
    readme = (CONFIGS.parents[1] / "README.md").read_text()
    assert f"{SUMMARY_START}\n{summary}{SUMMARY_END}" in readme, "run `convlora benchmark report --readme README.md`"


def test_gpu_cost_script_rehearses_on_cpu(tmp_path):
    """tools/gpu_cost.py (the script for a lent GPU) runs end to end on the CPU at a tiny size.

    Invariants: every variant and batch size is there, sparse and dense routing train the same tensors and
    give the same first loss (same seed, weights and data), LoRA's ratios to itself are 1, full fine-tuning
    trains more tensors than the adapters, and no GPU memory is claimed on the CPU.
    """
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_cost.py"
    module_spec = importlib.util.spec_from_file_location("gpu_cost", path)
    gpu_cost = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gpu_cost)
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--model", "random:convlora-tiny", "--image-size", "64", "--batch-sizes", "1", "2",
            "--warmup", "0", "--steps", "1", "--latency-runs", "1", "--threads", "1", "--output", str(out)]  # fmt: skip
    assert gpu_cost.main(args) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["environment"]["gpu"] is None
    assert set(result["batch_sizes"]) == {"1", "2"}
    for batch in result["batch_sizes"].values():
        rows = batch["training"]
        assert set(rows) == set(gpu_cost.VARIANTS)
        sparse, dense = rows["conv_lora_sparse"], rows["conv_lora_dense"]
        assert (sparse["routing"], dense["routing"]) == ("sparse", "dense")
        assert sparse["trainable_parameters"] == dense["trainable_parameters"] > rows["lora"]["trainable_parameters"]
        assert rows["full"]["trainable_parameters"] > sparse["trainable_parameters"]
        assert math.isclose(sparse["first_loss"], dense["first_loss"], rel_tol=1e-5)
        assert all(row["step_seconds"] > 0 and row["peak_memory_bytes"] is None for row in rows.values())
        assert batch["ratios_to_lora"]["lora"] == {"step_seconds": 1.0, "peak_memory_bytes": None}
        assert {"lora_merged", "conv_lora_merged"} <= set(batch["latency"]["seconds"])
    with pytest.raises(SystemExit):
        gpu_cost.main(["--steps", "0", "--output", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists()
