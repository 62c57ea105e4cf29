"""Instance runs: one mask per object, four ways, for every arm on every instance domain and seed.

Each arm trains twice per domain and seed from the same base, with the same epochs and augmentation: an
instance run (``mode="instances"``: the instance decoder trained jointly with the arm's adapters) and a
binary foreground run. The held-out test images are then segmented four ways and scored with the instance
metrics (mSA over IoU 0.5:0.95, F1 and AP at 0.5, objects found), each way timed per image
(:func:`~convlora.evaluation.instance_files.score_instance_files`):

- ``ais``: the instance decoder's maps and a seeded watershed;
- ``apg``: each AIS object's box and seed point as prompts to SAM's prompted decoder;
- ``binary_cc``: the connected components of the binary run's mask;
- ``amg``: SAM's automatic mask generation on the untouched base (once per domain: it has no seed).

With ``retention_after`` each run's model is also scored for what it keeps of SAM's prompted quality
(:mod:`convlora.bench.retention_after`): an instance run's adapted encoder under SAM's own prompted decoder,
a binary run's fine-tuned encoder and decoder.

Runs are reused like quality runs: a run folder whose ``result.json`` was made with the same settings is
read back, not trained again.

>>> run_instances(load_experiment("benchmarks/configs/instances.json"), Path("runs/bench"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .._io import write_json
from ..artifact.methods import METHODS
from ..evaluation import connected_components
from ..evaluation.instance_files import held_out_samples, score_instance_files
from ..inference import Segmenter
from ..instances import AmgConfig
from ..synthetic import write_dataset
from ..training import load_config, train
from .environment import load_average
from .experiments import Arm, InstanceExperiment
from .quality import earlier_record, fresh_train_dir, mean_std
from .retention_after import AfterTraining

# Bump when what a run trains or measures changes, so older results are not reused.
RUN_FORMAT = 1
REPORTED = ("msa", "f1_50", "sa50", "n_pred", "n_true", "seconds_per_image")


def _key(payload: dict[str, Any]) -> str:
    text = json.dumps({"format": RUN_FORMAT, **payload, "seed": None}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def dataset(experiment: InstanceExperiment, domain: str, work_dir: Path) -> Path:
    """The synthetic dataset of ``domain``, written once under ``work_dir/data``."""
    s = experiment.data_settings()
    name = f"{domain}-size{s['size']}-seed{s['seed']}-{s['train']}-{s['val']}-{s['test']}"
    return write_dataset(domain, work_dir / "data" / name, **s)


def run_fields(experiment: InstanceExperiment, arm: Arm, mode: str, seed: int, data: Path) -> dict[str, Any]:
    """``TrainConfig`` fields of one run: the experiment's settings, the mode's learning rate, then the arm's."""
    lr = experiment.lr if mode == "instances" else experiment.binary_lr
    fields: dict[str, Any] = {
        "data": str(data), "model": experiment.model, "mode": mode, "method": arm.method, "epochs": experiment.epochs,
        "batch_size": experiment.batch_size, "augment": dict(experiment.augment), "overlay_samples": 0,
        "retention": "off", "seed": seed,
    }  # fmt: skip
    if lr is not None:
        fields["lr"] = lr
    if METHODS[arm.method].uses_adapter:
        fields["conv_lora"] = dict(arm.conv_lora)
    fields.update(arm.train)
    return fields


def score_run(adapter_dir: Path, mode: str, data: Path) -> dict[str, dict[str, Any]]:
    """The ways a trained model is scored by: AIS and APG for an instance run, binary-CC for a binary one."""
    segmenter = Segmenter.from_pretrained(adapter_dir)
    samples, reading = held_out_samples(data, segmenter.task.image_reading)
    if mode == "instances":
        ways = {
            "ais": lambda image: segmenter.predict_instances(image, "ais")[0],
            "apg": lambda image: segmenter.predict_instances(image, "apg")[0],
        }
    else:
        ways = {"binary_cc": lambda image: connected_components(segmenter.predict(image) > 0)}
    return {way: score_instance_files(segment, samples, reading, where=data) for way, segment in ways.items()}


def run_one(fields: dict[str, Any], run_dir: Path, domain: str, arm: Arm) -> dict[str, Any]:
    """Train and score one run (unless its ``result.json`` already holds it); returns its record."""
    result_file = run_dir / "result.json"
    earlier = earlier_record(result_file, fields)
    if earlier is not None:
        return {**earlier, "arm": arm.name, "reused": True}
    train_dir = fresh_train_dir(run_dir)
    load_before = load_average()
    started = time.time()
    result = train(load_config(**fields, output_dir=str(train_dir)), show_progress=False)
    wall = time.time() - started
    record = {
        "domain": domain,
        "arm": arm.name,
        "method": arm.method,
        "mode": fields["mode"],
        "seed": fields["seed"],
        "steps": result.steps,
        "val_best": {"metric": result.metric, "value": result.best_value, "epoch": result.best_epoch},
        "ways": score_run(result.adapter_dir, fields["mode"], Path(fields["data"])),
        "trainable_parameters": result.trainable_parameters,
        "wall_seconds": round(wall, 2),
        "load_before": load_before,
        "load_after": load_average(),
        "fields": fields,
    }
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    write_json(result_file, record)
    return {**record, "reused": False}


def amg_on_base(experiment: InstanceExperiment, domain: str, data: Path, domain_dir: Path) -> dict[str, Any]:
    """AMG of the untouched base on the test images, once per domain and setting; cached like a run."""
    fields = {"data": str(data), "model": experiment.model, "amg": dict(experiment.amg)}
    result_file = domain_dir / f"amg-{_key(fields)}" / "result.json"
    earlier = earlier_record(result_file, fields)
    if earlier is not None:
        return {**earlier, "reused": True}
    base = Segmenter.from_pretrained(experiment.model)
    samples, reading = held_out_samples(data)
    config = AmgConfig(**experiment.amg)
    scores = score_instance_files(lambda image: base.predict_instances(image, "amg", config)[0], samples, reading)
    record = {"domain": domain, "ways": {"amg": scores}, "fields": fields}
    write_json(result_file, record)
    return {**record, "reused": False}


def summarize_instances(experiment: InstanceExperiment, runs: list[dict[str, Any]], amg: dict[str, Any]) -> list[dict]:
    """Per domain: per arm and way, mean ± std over seeds of every reported number; AMG once per domain.

    Args:
        experiment: the experiment (domains, arms).
        runs: the run records (instance and binary runs).
        amg: per domain, the AMG record.
    """
    rows = []
    for domain in experiment.domains:
        arms: dict[str, dict[str, Any]] = {}
        for arm in experiment.arms:
            chosen = [r for r in runs if r["domain"] == domain and r["arm"] == arm.name]
            if not chosen:
                continue
            ways = {}
            for way in ("ais", "apg", "binary_cc"):
                found = [r["ways"][way] for r in chosen if way in r["ways"]]
                if found:
                    ways[way] = {k: mean_std([f.get(k) for f in found]) for k in REPORTED}
            retention = {
                mode: mean_std(
                    [r["retention"]["retention"] for r in chosen if r["mode"] == mode and r.get("retention")]
                )
                for mode in ("instances", "binary")
            }
            arms[arm.name] = {
                "method": arm.method, "seeds": sorted({r["seed"] for r in chosen}), "ways": ways, "retention": retention
            }  # fmt: skip
        row: dict[str, Any] = {"domain": domain, "arms": arms}
        here = [r for r in runs if r["domain"] == domain and r["mode"] == "instances"]
        scored = [r for r in here if r.get("retention_base_scores")]
        if scored:  # the base's own prompted IoU on the validation instances: what APG can draw on
            row["base_prompted_val"] = scored[0]["retention_base_scores"].get("retention_val")
        if domain in amg:
            row["amg"] = {k: amg[domain]["ways"]["amg"].get(k) for k in REPORTED}
        rows.append(row)
    return rows


def run_instances(
    experiment: InstanceExperiment,
    work_dir: Path,
    *,
    seeds: list[int] | None = None,
    domains: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run (or reuse) every run of an instance experiment, score the four ways and summarise.

    Args:
        experiment: the experiment.
        work_dir: working folder (datasets and run folders); reruns reuse what it holds.
        seeds: seeds instead of the experiment's.
        domains: run only these of the experiment's domains.
        log: where progress lines go.

    Returns:
        ``{"runs": [...], "amg": {domain: record}, "summary": [...]}``.
    """
    seeds = seeds or experiment.seeds
    chosen = experiment.domains if domains is None else [d for d in experiment.domains if d in domains]
    runs: list[dict[str, Any]] = []
    amg: dict[str, dict[str, Any]] = {}
    total = len(chosen) * len(experiment.arms) * len(seeds) * 2
    after = AfterTraining(experiment.retention_after) if experiment.retention_after else None
    for domain in chosen:
        data = dataset(experiment, domain, work_dir)
        domain_dir = work_dir / "instances" / domain
        amg[domain] = amg_on_base(experiment, domain, data, domain_dir)
        log(f"{domain} AMG on the base: msa={amg[domain]['ways']['amg']['msa']:.4f}")
        for arm in experiment.arms:
            for seed in seeds:
                for mode in ("instances", "binary"):
                    fields = run_fields(experiment, arm, mode, seed, data)
                    run_dir = domain_dir / f"{arm.method}-{mode}-{_key(fields)}" / f"seed{seed}"
                    record = run_one(fields, run_dir, domain, arm)
                    if after is not None:
                        record = after.add(record, run_dir, data)
                    runs.append(record)
                    state = "reused" if record["reused"] else f"{record['wall_seconds']:.0f} s"
                    scores = ", ".join(f"{w} msa={s['msa']:.4f}" for w, s in record["ways"].items())
                    log(f"[{len(runs)}/{total}] {domain} {arm.name} {mode} seed {seed}: {scores} ({state})")
    for record in [*runs, *amg.values()]:
        record.pop("fields", None)
    return {"runs": runs, "amg": amg, "summary": summarize_instances(experiment, runs, amg)}
