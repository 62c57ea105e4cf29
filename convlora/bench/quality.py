"""Quality runs: every arm on every domain and seed, same data and step budget, scored on the test split.

Each run calls the library's own :func:`convlora.train` with the domain's recipe
(``convlora.recipes``), the arm's method and Conv-LoRA settings, the seed and the step budget, and
keeps the test metrics of its best-on-validation checkpoint. Runs are resumable: a run whose
``result.json`` exists with the same settings is not repeated, so an interrupted benchmark continues
where it stopped and experiments that share a run (the default Conv-LoRA arm of the ablations is the
main experiment's ``conv_lora``) train it once.

>>> settings = run_settings(load_experiment("benchmarks/configs/quality.json"), "polyp", 0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._io import folder_kind, write_json
from ..artifact.methods import METHODS
from ..evaluation.metrics import higher_is_better
from ..examples import zero_shot_metrics
from ..recipes import recipe
from ..synthetic import write_dataset
from ..training import load_config, train
from .environment import load_average
from .experiments import Arm, QualityExperiment
from .retention_after import AfterTraining

# Bump when a run's meaning changes (what is trained or measured), so older results are not reused.
RUN_FORMAT = 1


def dataset_for(experiment: QualityExperiment, domain: str, work_dir: Path, data_dir: Path | None) -> Path:
    """The dataset of ``domain``: ``data_dir/<domain>`` for real data, else synthetic data written once.

    Args:
        experiment: the experiment (its ``data`` settings choose the synthetic dataset).
        domain: a recipe domain.
        work_dir: folder of the benchmark's working files.
        data_dir: a folder with one dataset per domain (``<data_dir>/<domain>``), or ``None``.
    """
    if data_dir is not None:
        path = data_dir / domain
        if not path.exists():
            raise ValueError(f"--data-dir {data_dir}: no dataset for domain {domain!r} (expected {path})")
        return path

    s = experiment.data_settings(domain)
    name = f"{domain}-size{s['size']}-seed{s['seed']}-{s['train']}-{s['val']}-{s['test']}"
    name += "-square" if s["square"] else ""
    return write_dataset(
        domain, work_dir / "data" / name, train=s["train"], val=s["val"], test=s["test"], size=s["size"],
        seed=s["seed"], square=s["square"],
    )  # fmt: skip


def train_fields(
    experiment: QualityExperiment,
    domain: str,
    arm: Arm,
    seed: int,
    data: Path,
    *,
    real: bool,
    model: str | None,
    max_steps: int | None,
) -> dict[str, Any]:
    """``TrainConfig`` fields of one run: recipe, then the experiment's ``train``, then arm, seed and budget."""
    fields = recipe(domain).train_fields(real=real)
    fields.update(experiment.train)
    fields.update(arm.train)
    fields.update(data=str(data), method=arm.method, seed=seed, max_steps=max_steps, overlay_samples=0)
    if max_steps is not None and not real:
        # a budget beyond the recipe's epochs needs more epochs: the step budget, not the epochs, ends the run
        steps_per_epoch = math.ceil(
            experiment.data_settings(domain)["train"] / (fields["batch_size"] * fields.get("grad_accum", 1))
        )
        fields["epochs"] = max(fields["epochs"], math.ceil(max_steps / steps_per_epoch))
    if METHODS[arm.method].uses_adapter:
        fields["conv_lora"] = dict(arm.conv_lora)
    # the experiment's model is the base for its synthetic data; real data keeps the recipe's real checkpoint
    model = model or (None if real else experiment.model)
    if model is not None:
        fields["model"] = model
    return fields


def run_key(fields: dict[str, Any], domain: str) -> str:
    """Short hash of everything that decides a run's outcome (the seed excluded), naming its folder."""
    payload = json.dumps({"format": RUN_FORMAT, "domain": domain, **fields, "seed": None}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _artifact_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != "README.md")


def earlier_record(result_file: Path, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The record in ``result_file`` if it exists and was made with exactly ``fields``, else ``None``."""
    if not result_file.is_file():
        return None
    try:
        record = json.loads(result_file.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("fields") == fields else None


def fresh_train_dir(run_dir: Path) -> Path:
    """``run_dir/train``, emptied of an interrupted run's files (a run starts again from scratch)."""
    train_dir = run_dir / "train"
    if train_dir.exists():
        if folder_kind(train_dir) != "run":
            raise ValueError(f"{train_dir} holds files a benchmark run did not write; move them away to run it")
        shutil.rmtree(train_dir)
    return train_dir


def run_one(fields: dict[str, Any], run_dir: Path, domain: str, arm: Arm) -> dict[str, Any]:
    """Train one run (unless its ``result.json`` already holds it) and return its record."""
    result_file = run_dir / "result.json"
    earlier = earlier_record(result_file, fields)
    if earlier is not None:
        return {**earlier, "arm": arm.name, "reused": True}
    train_dir = fresh_train_dir(run_dir)
    load_before = load_average()
    started = time.time()
    result = train(load_config(**fields, output_dir=str(train_dir)), show_progress=False)
    wall = time.time() - started
    metrics = result.test_metrics
    if metrics is None:
        raise ValueError(f"{fields['data']} has no labelled test split: quality runs are scored on held-out test data")
    record = {
        "domain": domain,
        "arm": arm.name,
        "method": arm.method,
        "conv_lora": dict(arm.conv_lora),
        "seed": fields["seed"],
        "steps": result.steps,
        "test_metrics": metrics,
        "val_best": {"metric": result.metric, "value": result.best_value, "epoch": result.best_epoch},
        "retention": kept_retention(result.history, result.best_epoch),
        "trainable_parameters": result.trainable_parameters,
        "adapter_bytes": _artifact_bytes(result.adapter_dir),
        "wall_seconds": round(wall, 2),
        "load_before": load_before,
        "load_after": load_average(),
        "fields": fields,
    }
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)  # resumable state, not needed once finished
    write_json(result_file, record)
    return {**record, "reused": False}


def kept_retention(history: list[dict[str, Any]], epoch: int | None) -> dict[str, float]:
    """The retention of the kept model (``retention``, ``retention_val``, per protocol), from its evaluation.

    Empty when the run did not measure retention. Tables report these keys like test metrics
    (``report_metrics``: ``["s_measure", "retention", "retention_val"]``).

    >>> kept_retention([{"epoch": 0, "iou": 0.5, "retention": 0.98}, {"epoch": 1, "retention": 0.9}], 0)
    {'retention': 0.98}
    """
    entry = next((e for e in history if e.get("epoch") == epoch), {})
    return {k: v for k, v in entry.items() if k.startswith("retention")}


def _reported(record: dict[str, Any]) -> dict[str, Any]:
    """A run's numbers the tables report: its test metrics and the kept model's retention."""
    return {**record["test_metrics"], **record.get("retention", {})}


def _higher_is_better(metric: str) -> bool:
    """A reported number's direction: retention (no task metric) is better higher."""
    return metric.startswith("retention") or higher_is_better(metric)


def zero_shot(fields: dict[str, Any], domain_dir: Path, domain: str) -> dict[str, Any]:
    """Test metrics of the untouched base model, once per domain and setting; cached like a run.

    The reference every method starts from: prompt-free, SAM's own first mask for binary domains and a
    freshly initialised class decoder (seed 0) for multi-class ones; with a prompt kind in the experiment's
    ``train`` settings, vanilla SAM under the same ground-truth prompts the fine-tunes are tested with.
    """

    fields = {**fields, "method": "decoder", "seed": 0, "max_steps": None}
    fields.pop("conv_lora", None)
    run_dir = domain_dir / f"zero_shot-{run_key(fields, domain)}"
    result_file = run_dir / "result.json"
    earlier = earlier_record(result_file, fields)
    if earlier is not None:
        return {**earlier, "reused": True}
    started = time.time()
    torch.manual_seed(0)
    metrics = zero_shot_metrics(load_config(**fields, output_dir=str(run_dir / "unused")))
    record = {"domain": domain, "test_metrics": metrics, "wall_seconds": round(time.time() - started, 2),
              "fields": fields}  # fmt: skip
    write_json(result_file, record)
    return {**record, "reused": False}


def own_parameters(result: dict[str, Any]) -> dict[str, int] | None:
    """Per arm, the parameters it trains besides the mask decoder, counted on the meta device (no weights).

    Only for results on the embedded base's architecture (the synthetic suite); ``None`` otherwise.

    Args:
        result: a quality result (its ``config`` names the model and the arms).
    """
    from transformers import SamModel

    from ..models import tiny_sam_config
    from ..models.embedded import BASE_ARCHITECTURE
    from ..tuner.config import ConvLoraConfig

    if result["config"].get("model") != "convlora-tiny" or result.get("overrides", {}).get("model"):
        return None
    counts = {}
    for arm in result["config"]["arms"]:
        with torch.device("meta"):
            base = SamModel(tiny_sam_config(**BASE_ARCHITECTURE))
        with warnings.catch_warnings():  # the adapters are made off the meta device: BOFT reads values as it builds
            warnings.simplefilter("ignore")  # PEFT's notes on layer types and CUDA kernels say nothing here
            method = METHODS[arm["method"]]
            model = method.build(base, ConvLoraConfig(**arm.get("conv_lora", {})) if method.uses_adapter else None)
        counts[arm.get("name") or arm["method"]] = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and ".mask_decoder." not in f".{n}"
        )
    return counts


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and count of finite values.

    >>> mean_std([1.0, 2.0, 3.0])
    {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def summarize(
    experiment: QualityExperiment, runs: list[dict[str, Any]], zero_shots: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per domain and arm: mean ± std of every reported metric over seeds, and the difference to ``baseline``.

    The difference of means comes with its standard error ``sqrt(s1^2/n1 + s2^2/n2)``; with three seeds,
    a difference within about two standard errors is not evidence either way.

    Args:
        experiment: the experiment (domains, arms, reported metrics, baseline arm).
        runs: the run records.
        zero_shots: the base model's test metrics per domain (reported beside the arms), if measured.
    """
    baseline = experiment.baseline
    rows = []
    for domain in experiment.domains:
        metrics = experiment.metrics_for(domain)
        stats: dict[str, dict[str, Any]] = {}
        for arm in experiment.arms:
            chosen = [r for r in runs if r["domain"] == domain and r["arm"] == arm.name]
            if not chosen:
                continue
            stats[arm.name] = {
                "method": arm.method,
                "conv_lora": dict(arm.conv_lora),
                "train": dict(arm.train),
                "seeds": sorted(r["seed"] for r in chosen),
                "metrics": {m: mean_std([_reported(r).get(m) for r in chosen]) for m in metrics},
                "trainable_parameters": chosen[0]["trainable_parameters"],
                "adapter_bytes": chosen[0]["adapter_bytes"],
                "wall_seconds": mean_std([r["wall_seconds"] for r in chosen]),
            }
        for entry in stats.values():
            entry["vs_baseline"] = {}
            if baseline not in stats:
                continue
            for m in metrics:
                a, b = entry["metrics"][m], stats[baseline]["metrics"][m]
                if a["n"] == 0 or b["n"] == 0:
                    continue
                delta = a["mean"] - b["mean"]
                se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
                sign = 1 if _higher_is_better(m) else -1
                if a["n"] < 2 or b["n"] < 2:
                    verdict = "single seed"
                elif abs(delta) <= 2 * se:
                    verdict = "tie"
                else:
                    verdict = "better" if sign * delta > 0 else "worse"
                entry["vs_baseline"][m] = {"delta": delta, "se": se, "verdict": verdict}
        row = {"domain": domain, "metrics": metrics, "baseline": baseline, "arms": stats}
        if zero_shots and domain in zero_shots:
            row["zero_shot"] = {m: zero_shots[domain]["test_metrics"].get(m) for m in metrics}
        rows.append(row)
    return rows


def run_quality(
    experiment: QualityExperiment,
    work_dir: Path,
    *,
    model: str | None = None,
    data_dir: Path | None = None,
    max_steps: int | None = None,
    seeds: list[int] | None = None,
    domains: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run (or reuse) every run of a quality experiment and summarise it.

    Args:
        experiment: the experiment.
        work_dir: working folder (datasets and run folders); reruns reuse what it holds.
        model: base SAM instead of the recipe's / experiment's.
        data_dir: real datasets, one folder per domain; the recipes' real-data settings are used then.
        max_steps: step budget instead of the experiment's; 0 means the recipe's epochs.
        seeds: seeds instead of the experiment's.
        domains: run only these of the experiment's domains.
        log: where progress lines go.

    Returns:
        ``{"runs": [...], "zero_shot": {domain: metrics}, "summary": [...]}`` for the domains that ran.
    """
    seeds = seeds or experiment.seeds
    chosen = experiment.domains if domains is None else [d for d in experiment.domains if d in domains]
    if domains is not None and len(chosen) != len(set(domains)):
        raise ValueError(f"--domains {sorted(set(domains) - set(chosen))} are not domains of {experiment.name}")
    runs = []
    zero_shots = {}
    total = len(chosen) * len(experiment.arms) * len(seeds)
    after = AfterTraining(experiment.retention_after) if experiment.retention_after else None
    for domain in chosen:
        budget = experiment.steps_for(domain) if max_steps is None else (max_steps or None)
        data = dataset_for(experiment, domain, work_dir, data_dir)
        fields = train_fields(
            experiment, domain, experiment.arms[0], 0, data, real=data_dir is not None, model=model, max_steps=budget
        )
        reference = zero_shot(fields, work_dir / "quality" / domain, domain)
        zero_shots[domain] = reference
        main = experiment.metrics_for(domain)[0]
        state = "reused" if reference["reused"] else f"{reference['wall_seconds']:.0f} s"
        log(f"{domain} zero-shot: {main}={reference['test_metrics'].get(main, float('nan')):.4f} ({state})")
        for arm in experiment.arms:
            for seed in seeds:
                fields = train_fields(
                    experiment, domain, arm, seed, data, real=data_dir is not None, model=model, max_steps=budget
                )
                run_dir = work_dir / "quality" / domain / f"{arm.method}-{run_key(fields, domain)}" / f"seed{seed}"
                record = run_one(fields, run_dir, domain, arm)
                if after is not None:
                    record = after.add(record, run_dir, data)
                runs.append(record)
                main = experiment.metrics_for(domain)[0]
                state = "reused" if record["reused"] else f"{record['wall_seconds']:.0f} s"
                log(
                    f"[{len(runs)}/{total}] {domain} {arm.name} seed {seed}: {main}="
                    f"{record['test_metrics'].get(main, float('nan')):.4f} ({state})"
                )
    for record in [*runs, *zero_shots.values()]:
        record.pop("fields", None)
    zero = {domain: record["test_metrics"] for domain, record in zero_shots.items()}
    return {"runs": runs, "zero_shot": zero, "summary": summarize(experiment, runs, zero_shots)}


def merge_domains(experiment: QualityExperiment, earlier: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The results of ``new`` (some domains re-run) laid over an ``earlier`` result of the same experiment.

    The other domains' runs and zero-shot scores are kept as they were; the summary is recomputed over all.
    """
    ran = {record["domain"] for record in new["runs"]}
    runs = [r for r in earlier["runs"] if r["domain"] not in ran] + new["runs"]
    zero = {d: m for d, m in earlier.get("zero_shot", {}).items() if d not in ran} | new["zero_shot"]
    order = {d: i for i, d in enumerate(experiment.domains)}
    runs.sort(key=lambda r: order.get(r["domain"], len(order)))
    zero_shots = {d: {"test_metrics": m} for d, m in zero.items()}
    return {"runs": runs, "zero_shot": zero, "summary": summarize(experiment, runs, zero_shots)}
