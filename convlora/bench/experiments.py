"""Benchmark experiment configs: what to run, read from ``benchmarks/configs/*.json``, validated.

Two kinds of experiment share one runner:

- ``quality``: fine-tune every *arm* (a method, optionally with Conv-LoRA settings) on every domain for
  every seed, with the same data and the same optimiser-step budget, and score the held-out test split;
- ``cost``: trainable parameters, artifact size, train-step time, peak memory and merged inference
  latency of each method at one reference point, plus optional sweeps over image size and batch size;
- ``instances``: one mask per object: every arm fine-tuned twice per instance domain and seed (``--mode
  instances`` and a binary foreground model), then AIS, APG, AMG and the binary model's connected components
  scored with the instance metrics and timed per image (:mod:`convlora.bench.instances`).

>>> exp = experiment_from_dict({"name": "q", "kind": "quality", "domains": ["polyp"], "arms": [{"method": "lora"}]})
>>> exp.arms[0].name, exp.seeds
('lora', [0, 1, 2])
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifact.methods import METHODS
from ..instances import AmgConfig
from ..recipes import RECIPES, recipe
from ..synthetic import DOMAINS

KINDS = ("quality", "cost", "instances")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Arm:
    """One contestant of a quality experiment: a training method with optional Conv-LoRA settings.

    Args:
        method: ``"conv_lora"``, ``"lora"``, ``"decoder"`` or ``"full"``.
        name: label in tables and run folders; the method's name when unset.
        conv_lora: fields of ``ConvLoraConfig`` for ``conv_lora``/``lora`` (rank, experts, ...).
        train: ``TrainConfig`` fields of this arm's runs, applied after the experiment's ``train``
            (e.g. ``{"joint_prompted": 0.25}``).

    >>> Arm("conv_lora", "experts_4", {"num_experts": 4}).name
    'experts_4'
    """

    method: str
    name: str = ""
    conv_lora: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"arm method must be one of {list(METHODS)}, got {self.method!r}")
        self.name = self.name or self.method
        if not _NAME.match(self.name):
            raise ValueError(f"arm name must use letters, digits, '_', '-' or '.', got {self.name!r}")
        if not isinstance(self.conv_lora, dict):
            raise ValueError(f"arm {self.name!r}: conv_lora must be a mapping, got {self.conv_lora!r}")
        if self.conv_lora and not METHODS[self.method].uses_adapter:
            raise ValueError(f"arm {self.name!r}: conv_lora settings do not apply to method {self.method!r}")
        if not isinstance(self.train, dict):
            raise ValueError(f"arm {self.name!r}: train must be a mapping of TrainConfig fields, got {self.train!r}")
        reserved = sorted(set(self.train) & {"data", "method", "seed", "max_steps", "conv_lora", "output_dir"})
        if reserved:
            raise ValueError(f"arm {self.name!r}: train cannot set {reserved} (the experiment and the arm decide them)")


@dataclass
class QualityExperiment:
    """Fine-tuning quality of several arms on synthetic (or real) domains, over seeds.

    Args:
        name: experiment name; results go to ``<results>/<name>.json``.
        kind: ``"quality"``.
        description: one line for the report.
        domains: keys of ``convlora.recipes.RECIPES``.
        arms: the contestants (dicts with ``method``, optional ``name`` and ``conv_lora``).
        seeds: training seeds (data order, augmentation, initialisation, gate noise).
        max_steps: optimiser steps of every run (the same budget for every arm).
        domain_steps: per domain, a step budget instead of ``max_steps`` (still the same for every arm), for
            domains that need longer to converge (the multi-class scene).
        model: base SAM for the synthetic data; ``None`` uses the recipe's (the embedded ``convlora-tiny``). Runs on
            real data (``--data-dir``) use the recipe's real checkpoint unless ``--model`` says otherwise.
        data: synthetic data settings: ``train``/``val``/``test`` counts, ``size``, ``seed``, ``square``.
        train: extra ``TrainConfig`` fields applied to every run (after the recipe).
        report_metrics: per domain, the test metrics shown in the tables; the domain's main metric first.
        baseline: the arm the others are compared with; ``"lora"`` when there is one, else the first arm.
        threads: torch CPU threads for the runs.
        title: what the README's summary calls the experiment (e.g. "Where the adapters sit"); its name when unset.
        params_plot: also plot each domain's main metric against the arms' own trainable parameters
            (``<name>_params.png``).
        retention_after: score every finished run that did not measure retention while training: its kept
            model's retention on this many generic keep images and validation images
            (:mod:`convlora.bench.retention_after`); 0 (the default) measures nothing after training.
    """

    name: str
    kind: str = "quality"
    description: str = ""
    domains: list[str] = field(default_factory=list)
    arms: list[Arm] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int | None = 120
    domain_steps: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    report_metrics: dict[str, list[str]] = field(default_factory=dict)
    baseline: str | None = None
    threads: int = 1
    title: str = ""
    params_plot: bool = False
    retention_after: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.kind != "quality":
            raise ValueError(f"{self.name}: kind must be 'quality' for a QualityExperiment, got {self.kind!r}")
        if not self.domains:
            raise ValueError(f"{self.name}: domains must list at least one domain of {sorted(RECIPES)}")
        unknown = [d for d in self.domains if d not in RECIPES]
        instances = [d for d in unknown if d in DOMAINS and DOMAINS[d].mode == "instances"]
        if instances:
            raise ValueError(
                f"{self.name}: the {instances[0]} domain holds instance masks and has no recipe; train it with "
                "--mode instances (examples/nuclei.py)"
            )
        if unknown:
            raise ValueError(f"{self.name}: unknown domains {unknown}; choose from {sorted(RECIPES)}")
        self.arms, self.baseline = _check_arms(self.name, self.arms, self.baseline, self.seeds)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"{self.name}: max_steps must be >= 1 or null (the recipe's epochs), got {self.max_steps}")
        outside = sorted(set(self.domain_steps) - set(self.domains))
        if outside:
            raise ValueError(f"{self.name}: domain_steps names domains that are not in domains: {outside}")
        bad = {d: s for d, s in self.domain_steps.items() if not isinstance(s, int) or isinstance(s, bool) or s < 1}
        if bad:
            raise ValueError(f"{self.name}: domain_steps must map domains to step counts >= 1, got {bad}")
        unknown_data = sorted(set(self.data) - {"train", "val", "test", "size", "seed", "square"})
        if unknown_data:
            raise ValueError(
                f"{self.name}: unknown data keys {unknown_data}; known: train, val, test, size, seed, square"
            )
        _check_threads(self.name, self.threads)
        _check_retention_after(self.name, self.retention_after)

    def data_settings(self, domain: str) -> dict[str, Any]:
        """``write_dataset`` arguments for ``domain``: the recipe's split sizes, then ``data``."""
        settings: dict[str, Any] = {**recipe(domain).synthetic_sizes, "size": 128, "seed": 0, "square": False}
        settings.update(self.data)
        return settings

    def steps_for(self, domain: str) -> int | None:
        """The step budget of ``domain``'s runs: ``domain_steps[domain]``, else ``max_steps``."""
        return self.domain_steps.get(domain, self.max_steps)

    def metrics_for(self, domain: str) -> list[str]:
        """Metrics reported for ``domain``: ``report_metrics[domain]``, else the recipe's main metric."""
        return list(self.report_metrics.get(domain) or [recipe(domain).metric])


@dataclass
class CostExperiment:
    """Cost of each method on one model: parameters, artifact size, step time, memory, latency.

    Args:
        name: experiment name; results go to ``<results>/<name>.json``.
        kind: ``"cost"``.
        description: one line for the report.
        model: an embedded name, a SAM folder or hub id, or ``"random:<variant>"`` for randomly initialised
            weights (``vit-b``, ``vit-l``, ``vit-h``, ``convlora-tiny``'s architecture, or ``tiny``).
        methods: methods measured at the reference point.
        conv_lora: ``ConvLoraConfig`` fields used by ``conv_lora`` and ``lora`` (same targets and rank).
        image_size: reference input size; the model's own when unset.
        batch_size: reference batch size.
        warmup_steps: untimed optimiser steps before timing.
        timed_steps: timed optimiser steps; the median is reported.
        latency_runs: timed forward passes per model; the median is reported (0 skips latency).
        latency_warmup: untimed forward passes per model first.
        latency_batch_size: images per forward pass in the latency measurement.
        sweep_methods: methods measured along the sweeps.
        sweeps: ``{"image_size": [...], "batch_size": [...], "prompts": [...]}``: each list is swept with the
            other values held at the reference point; ``prompts`` times prompted prediction of one image (the
            encoder once, then that many box prompts) with the sweep methods merged.
        sweep_predict: also time prompt-free prediction (forward per image, peak memory; merged models) at
            every image-size and batch-size point.
        threads: torch CPU threads.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"``.
    """

    name: str
    kind: str = "cost"
    description: str = ""
    model: str = "convlora-tiny"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    conv_lora: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    batch_size: int = 1
    warmup_steps: int = 2
    timed_steps: int = 5
    latency_runs: int = 10
    latency_warmup: int = 2
    latency_batch_size: int = 1
    sweep_methods: list[str] = field(default_factory=lambda: ["lora", "conv_lora"])
    sweeps: dict[str, list[int]] = field(default_factory=dict)
    sweep_predict: bool = False
    threads: int = 1
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.kind != "cost":
            raise ValueError(f"{self.name}: kind must be 'cost' for a CostExperiment, got {self.kind!r}")
        for label, methods in (("methods", self.methods), ("sweep_methods", self.sweep_methods)):
            bad = [m for m in methods if m not in METHODS]
            if bad:
                raise ValueError(f"{self.name}: {label} has unknown methods {bad}; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError(f"{self.name}: methods must not be empty")
        for label in ("batch_size", "timed_steps", "latency_batch_size"):
            if not isinstance(getattr(self, label), int) or getattr(self, label) < 1:
                raise ValueError(f"{self.name}: {label} must be an integer >= 1, got {getattr(self, label)!r}")
        for label in ("warmup_steps", "latency_runs", "latency_warmup"):
            if not isinstance(getattr(self, label), int) or getattr(self, label) < 0:
                raise ValueError(f"{self.name}: {label} must be an integer >= 0, got {getattr(self, label)!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"{self.name}: image_size must be positive or null, got {self.image_size}")
        unknown = sorted(set(self.sweeps) - {"image_size", "batch_size", "prompts"})
        if unknown:
            raise ValueError(f"{self.name}: sweeps may vary image_size, batch_size and prompts, got {unknown}")
        if (self.sweeps.get("prompts") or self.sweep_predict) and self.latency_runs < 1:
            raise ValueError(f"{self.name}: prediction sweeps (prompts, sweep_predict) need latency_runs >= 1")
        for axis, values in self.sweeps.items():
            if not values or not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError(f"{self.name}: sweeps.{axis} must be a non-empty list of positive integers")
        if self.sweeps.get("image_size") and self.image_size is None:
            raise ValueError(f"{self.name}: an image_size sweep needs the reference image_size to be set")
        if self.device not in DEVICES:
            raise ValueError(f"{self.name}: device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        _check_threads(self.name, self.threads)


@dataclass
class InstanceExperiment:
    """One mask per object: AIS, APG, AMG and binary-CC of several arms on instance domains, over seeds.

    Every arm trains twice per domain and seed, both from ``model`` with the same epochs and augmentation: an
    instance run (``mode="instances"``, learning rate ``lr``) scored by AIS and APG, and a binary foreground run
    (``binary_lr``) scored by the connected components of its mask. AMG runs on the untouched base once per
    domain (it does not depend on the seed).

    Args:
        name: experiment name; results go to ``<results>/<name>.json``.
        kind: ``"instances"``.
        description: one line for the report.
        domains: synthetic domains with instance masks (``nuclei``, ``cells``).
        arms: the contestants (dicts with ``method`` and optional ``name``, ``conv_lora``, ``train``).
        seeds: training seeds.
        epochs: epochs of every run.
        batch_size: images per optimiser step.
        lr: peak learning rate of the instance runs.
        binary_lr: peak learning rate of the binary runs; ``None``: the engine's default.
        augment: augmentation of every run (``TrainConfig.augment``).
        model: the base SAM.
        data: synthetic data settings: ``train``/``val``/``test`` counts, ``size``, ``seed``.
        amg: :class:`~convlora.instances.AmgConfig` fields of the AMG row.
        baseline: the arm the others are compared with (``"lora"`` when there is one, else the first arm).
        threads: torch CPU threads for the runs.
        title: what the README's summary calls the experiment; its name when unset.
        retention_after: score every finished run's retention of SAM's prompted quality on this many generic keep
            images and validation images (:mod:`convlora.bench.retention_after`); 0: not measured.
    """

    name: str
    kind: str = "instances"
    description: str = ""
    domains: list[str] = field(default_factory=lambda: ["nuclei"])
    arms: list[Arm] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 24
    batch_size: int = 4
    lr: float = 1e-2
    binary_lr: float | None = None
    augment: dict[str, Any] = field(default_factory=lambda: {"hflip": 0.5, "vflip": 0.5})
    model: str = "convlora-tiny"
    data: dict[str, Any] = field(default_factory=lambda: {"train": 48, "val": 8, "test": 16, "size": 128, "seed": 0})
    amg: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    threads: int = 1
    title: str = ""
    retention_after: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.kind != "instances":
            raise ValueError(f"{self.name}: kind must be 'instances' for an InstanceExperiment, got {self.kind!r}")
        instance_domains = sorted(d for d, spec in DOMAINS.items() if spec.mode == "instances")
        bad = [d for d in self.domains if d not in instance_domains]
        if not self.domains or bad:
            raise ValueError(f"{self.name}: domains must be instance domains of {instance_domains}, got {self.domains}")
        self.arms, self.baseline = _check_arms(self.name, self.arms, self.baseline, self.seeds)
        for label in ("epochs", "batch_size"):
            if not isinstance(getattr(self, label), int) or getattr(self, label) < 1:
                raise ValueError(f"{self.name}: {label} must be an integer >= 1, got {getattr(self, label)!r}")
        for label in ("lr", "binary_lr"):
            value = getattr(self, label)
            if (value is not None or label == "lr") and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{self.name}: {label} must be a positive number, got {value!r}")
        unknown_data = sorted(set(self.data) - {"train", "val", "test", "size", "seed"})
        if unknown_data:
            raise ValueError(f"{self.name}: unknown data keys {unknown_data}; known: train, val, test, size, seed")
        try:
            AmgConfig(**self.amg)
        except TypeError as error:
            raise ValueError(f"{self.name}: amg: {error}") from error
        _check_threads(self.name, self.threads)
        _check_retention_after(self.name, self.retention_after)

    def data_settings(self) -> dict[str, Any]:
        """``write_dataset`` arguments of every domain."""
        return {"train": 48, "val": 8, "test": 16, "size": 128, "seed": 0, **self.data}


Experiment = QualityExperiment | CostExperiment | InstanceExperiment


def experiment_from_dict(data: dict[str, Any], source: str = "config") -> Experiment:
    """Build a quality or cost experiment from a mapping (its ``kind`` decides), refusing unknown keys.

    Args:
        data: the parsed JSON.
        source: where it came from, for error messages.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: an experiment config must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{source}: kind must be one of {list(KINDS)}, got {kind!r}")
    cls = {"quality": QualityExperiment, "cost": CostExperiment, "instances": InstanceExperiment}[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} for a {kind} experiment; known keys: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ValueError(f"{source}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment config file (JSON).

    Args:
        path: e.g. ``benchmarks/configs/quality.json``.

    >>> load_experiment("benchmarks/configs/quality.json").kind  # doctest: +SKIP
    'quality'
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment config {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"experiment config {path} is not valid JSON: {error}") from error
    return experiment_from_dict(data, source=str(path))


def experiment_to_dict(experiment: Experiment) -> dict[str, Any]:
    """A JSON-able copy of an experiment (recorded in its results)."""
    return dataclasses.asdict(experiment)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"experiment name must use letters, digits, '_', '-' or '.', got {name!r}")


def _check_arms(name: str, arms: list[Any], baseline: str | None, seeds: list[Any]) -> tuple[list[Arm], str]:
    """The arms as :class:`Arm` objects and the baseline arm's name (``lora`` when there is one, else the first).

    >>> _check_arms("q", [{"method": "decoder"}, {"method": "lora"}], None, [0])[1]
    'lora'
    """
    arms = [a if isinstance(a, Arm) else Arm(**a) for a in arms]
    if not arms:
        raise ValueError(f"{name}: arms must list at least one method")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: arm names must be unique, got {names}")
    if baseline is None:
        baseline = "lora" if "lora" in names else names[0]
    elif baseline not in names:
        raise ValueError(f"{name}: baseline {baseline!r} is not one of the arms {names}")
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"{name}: seeds must be a non-empty list of non-negative integers, got {seeds}")
    return arms, baseline


def _check_retention_after(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: retention_after must be a number of keep images >= 0, got {value!r}")


def _check_threads(name: str, threads: Any) -> None:
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{name}: threads must be an integer >= 1, got {threads!r}")
