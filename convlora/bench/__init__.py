"""Benchmarks of Conv-LoRA against LoRA, decoder-only and full fine-tuning: quality and cost, as data.

Experiment configs (``benchmarks/configs/*.json``) go in, one JSON result file per experiment comes out
(with the machine, versions and commit it ran on), and Markdown tables and PNG plots are generated from
the JSON alone. ``convlora benchmark run CONFIG...`` and ``convlora benchmark report`` call :func:`main`.

>>> from convlora.bench import main
>>> main(["run", "benchmarks/configs/cost_tiny.json"])  # doctest: +SKIP
"""

from .experiments import Arm, CostExperiment, QualityExperiment, experiment_from_dict, load_experiment
from .report import write_report
from .runner import main, run_experiment
from .schema import SCHEMA

__all__ = [
    "SCHEMA",
    "Arm",
    "CostExperiment",
    "QualityExperiment",
    "experiment_from_dict",
    "load_experiment",
    "main",
    "run_experiment",
    "write_report",
]
