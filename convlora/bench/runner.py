"""The benchmark runner: experiment configs in, one JSON result file per experiment out, then the report.

``convlora benchmark run CONFIG...`` runs each experiment and writes ``<results>/<name>.json`` holding the
machine, the library versions, the git commit, the thread count, the command, the resolved config and
every measurement; ``convlora benchmark report`` turns the JSON files into Markdown tables and PNG plots.

>>> main(["run", "benchmarks/configs/cost_tiny.json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._io import write_json
from .cost import run_cost
from .environment import environment, load_average, set_threads
from .experiments import (
    CostExperiment,
    Experiment,
    InstanceExperiment,
    QualityExperiment,
    experiment_to_dict,
    load_experiment,
)
from .instances import run_instances
from .quality import merge_domains, run_quality
from .report import write_report
from .schema import SCHEMA

DEFAULT_RESULTS = "benchmarks/results"
DEFAULT_WORK = "runs/bench"
DESCRIPTION = "Quality and cost benchmarks of Conv-LoRA against LoRA, decoder-only and full fine-tuning."


def run_experiment(
    experiment: Experiment,
    *,
    results_dir: str | Path = DEFAULT_RESULTS,
    work_dir: str | Path = DEFAULT_WORK,
    model: str | None = None,
    data_dir: str | Path | None = None,
    max_steps: int | None = None,
    seeds: list[int] | None = None,
    domains: list[str] | None = None,
    device: str | None = None,
    fresh: bool = False,
    command: str | None = None,
    log: Any = print,
) -> Path:
    """Run one experiment and write its result JSON; returns the file's path.

    Args:
        experiment: a quality or cost experiment (see ``convlora.bench.experiments``).
        results_dir: where ``<name>.json`` goes.
        work_dir: working files (datasets, training runs, cached measurements).
        model: base SAM instead of the config's (quality and cost).
        data_dir: real datasets, one folder per domain (quality).
        max_steps: step budget instead of the config's (quality).
        seeds: seeds instead of the config's (quality).
        domains: re-run only these domains (quality) and merge them into the existing result file, whose
            other domains are kept; the record says which domains came from which commit.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (cost; quality runs use the engine's device choice).
        fresh: measure cost again instead of reusing cached measurements.
        command: the command line to record.
        log: where progress lines go.
    """
    work_dir = Path(work_dir)
    set_threads(experiment.threads)
    started = time.time()
    load_before = load_average()
    env = environment(experiment.threads, device or getattr(experiment, "device", "auto"))
    if isinstance(experiment, CostExperiment):
        results = run_cost(experiment, work_dir, model=model, device=device, fresh=fresh, log=log)
    elif isinstance(experiment, InstanceExperiment):
        unsupported = {"--model": model, "--data-dir": data_dir, "--max-steps": max_steps, "--domains": domains}
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(
                f"{experiment.name}: an instance experiment takes no {', '.join(given)} (set it in the config)"
            )
        results = run_instances(experiment, work_dir, seeds=seeds, log=log)
    else:
        results = run_quality(
            experiment,
            work_dir,
            model=model,
            data_dir=Path(data_dir) if data_dir is not None else None,
            max_steps=max_steps,
            seeds=seeds,
            domains=domains,
            log=log,
        )
    path = Path(results_dir) / f"{experiment.name}.json"
    provenance: dict[str, Any] = {}
    if domains is not None and isinstance(experiment, QualityExperiment):
        if not path.is_file():
            raise ValueError(f"--domains re-runs part of an experiment: {path} must already hold the rest")
        earlier = json.loads(path.read_text())
        results = merge_domains(experiment, earlier, results)
        kept = {d: c for d, c in earlier.get("domain_commits", {}).items() if d not in domains}
        previous = (earlier.get("environment", {}).get("commit") or {}).get("sha")
        provenance["domain_commits"] = {
            d: kept.get(d, previous) if d not in domains else (env.get("commit") or {}).get("sha")
            for d in experiment.domains
        }
    overrides = {"model": model, "data_dir": str(data_dir) if data_dir else None, "max_steps": max_steps,
                 "seeds": seeds, "device": device}  # fmt: skip
    record = {
        "schema": SCHEMA,
        "name": experiment.name,
        "kind": experiment.kind,
        "description": experiment.description,
        "command": command,
        "config": experiment_to_dict(experiment),
        "overrides": {k: v for k, v in overrides.items() if v is not None},
        "environment": env,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "load_before": load_before,
        "load_after": load_average(),
        **results,
        **provenance,
    }
    write_json(path, record)
    log(f"wrote {path}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` and ``report`` subcommands to ``parser`` (this module's and ``convlora benchmark``'s)."""
    sub = parser.add_subparsers(dest="benchmark_command", required=True, metavar="{run,report}")
    run = sub.add_parser(
        "run",
        help="run experiment configs and write their JSON results (and the report)",
        description="Run each experiment config and write <results-dir>/<name>.json (machine, versions, commit, "
        "measurements), then regenerate the tables and plots. Finished quality runs and cached cost measurements "
        "are reused, so an interrupted benchmark continues where it stopped.",
    )
    run.add_argument("configs", nargs="+", help="experiment config files, e.g. benchmarks/configs/quality.json")
    run.add_argument("--results-dir", default=DEFAULT_RESULTS, help="where result JSON, tables and plots go")
    run.add_argument("--work-dir", default=DEFAULT_WORK, help="datasets, training runs and cached measurements")
    run.add_argument("--model", default=None, help="base SAM: embedded name, folder, hub id or random:vit-b")
    run.add_argument("--data-dir", default=None, help="real datasets, one folder per domain (<dir>/<domain>)")
    run.add_argument(
        "--max-steps", type=int, default=None, help="optimiser steps per quality run (0: the recipe's epochs)"
    )
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the quality runs")
    run.add_argument(
        "--domains",
        nargs="+",
        default=None,
        help="re-run only these quality domains; the others are kept from the existing result file",
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="device of cost runs")
    run.add_argument("--fresh", action="store_true", help="measure cost again instead of reusing cached results")
    run.add_argument("--no-report", action="store_true", help="do not regenerate the tables and plots")
    report = sub.add_parser(
        "report",
        help="regenerate Markdown tables and PNG plots from the result JSON",
        description="Write <name>.md and <name>.png for every result JSON in the folder, README.md collecting "
        "every table, and summary.md (the README's benchmark block).",
    )
    report.add_argument("--results-dir", default=DEFAULT_RESULTS, help="folder of the result JSON files")
    report.add_argument(
        "--readme", default=None, help="also replace the benchmark-summary block of this file (e.g. README.md)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convlora benchmark", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``convlora benchmark``.

    Args:
        argv: arguments after ``benchmark``, e.g. ``["run", "benchmarks/configs/quality.json"]``.

    >>> main(["report", "--results-dir", "benchmarks/results"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.benchmark_command == "report":
        try:
            written = write_report(args.results_dir, readme=args.readme)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("\n".join(str(p) for p in written))
        return 0
    try:
        experiments = [load_experiment(path) for path in args.configs]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "convlora benchmark " + shlex.join(argv)
    for experiment in experiments:
        run_experiment(
            experiment,
            results_dir=args.results_dir,
            work_dir=args.work_dir,
            model=args.model,
            data_dir=args.data_dir,
            max_steps=args.max_steps,
            seeds=args.seeds,
            domains=args.domains,
            device=args.device,
            fresh=args.fresh,
            command=command,
        )
    if not args.no_report:
        write_report(args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
