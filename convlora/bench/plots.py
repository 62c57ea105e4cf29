"""The benchmark plots (PNG), drawn from result JSON alone, off-screen without pyplot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .._io import atomic_file
from ..artifact.methods import METHODS
from .formatting import INSTANCE_WAYS, metric_label

OTHER_COLOUR = "#9467bd"


def colour(name: str) -> str:
    """The plot colour of a method (``Method.colour``); an arm named after a method gets its colour too."""
    return METHODS[name].colour if name in METHODS else OTHER_COLOUR


def plot_quality(result: dict[str, Any], path: str | Path) -> None:
    """One bar chart per domain: each arm's mean main metric, the sample std as error bar, seeds as dots."""
    summary = result["summary"]
    arms = [a["name"] for a in result["config"]["arms"]]
    methods = {a["name"]: a["method"] for a in result["config"]["arms"]}
    columns = min(4, len(summary))
    rows = -(-len(summary) // columns)
    width = max(3.2, 0.55 * len(arms) + 1.2)
    figure, axes = _subplots(rows, columns, figsize=(width * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(summary) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, summary, strict=False):
        main = row["metrics"][0]
        present = [a for a in arms if a in row["arms"]]
        means = [row["arms"][a]["metrics"][main]["mean"] or 0.0 for a in present]
        stds = [row["arms"][a]["metrics"][main]["std"] or 0.0 for a in present]
        colours = [colour(a) if a in METHODS else colour(methods[a]) for a in present]
        ax.bar(range(len(present)), means, yerr=stds, capsize=4, color=colours, alpha=0.85)
        for i, arm in enumerate(present):
            runs = [r for r in result["runs"] if r["domain"] == row["domain"] and r["arm"] == arm]
            values = [r["test_metrics"].get(main) for r in runs]
            ax.scatter([i] * len(values), values, s=10, color="black", zorder=3)
        crowded = len(present) > 4
        ax.set_xticks(range(len(present)), present, rotation=30 if crowded else 0, ha="right" if crowded else "center")
        ax.set_title(f"{row['domain']} ({metric_label(main)})", fontsize=10)
        # bars start at zero: a cut axis would make small differences look large; the values are printed
        for i, mean in enumerate(means):
            ax.annotate(f"{mean:.3g}", (i, mean), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")  # fmt: skip
        top = max([m + s for m, s in zip(means, stds, strict=True)] + [1e-9])
        ax.set_ylim(0, top * 1.15)
    figure.suptitle(f"{result['name']}: test metric, mean ± std over seeds (dots: single seeds)", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def plot_instances(result: dict[str, Any], path: str | Path) -> None:
    """One bar chart per domain: mSA of each way (groups) and arm (bars), std as error bar; AMG as a line."""
    summary = result["summary"]
    arms = [a["name"] for a in result["config"]["arms"]]
    methods = {a["name"]: a["method"] for a in result["config"]["arms"]}
    ways = list(INSTANCE_WAYS)
    figure, axes = _subplots(1, len(summary), figsize=(4.2 * len(summary), 3.4), squeeze=False)
    width = 0.8 / max(1, len(arms))
    for ax, row in zip(axes.flat, summary, strict=False):
        for j, arm in enumerate(arms):
            found = row["arms"].get(arm, {}).get("ways", {})
            means = [found.get(w, {}).get("msa", {}).get("mean") or 0.0 for w in ways]
            stds = [found.get(w, {}).get("msa", {}).get("std") or 0.0 for w in ways]
            xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(ways))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=colour(methods[arm]), alpha=0.85, label=arm)
        if "amg" in row:
            ax.axhline(row["amg"]["msa"], color="grey", linestyle="--", linewidth=1, label="AMG (base)")
        ax.set_xticks(range(len(ways)), [INSTANCE_WAYS[w] for w in ways])
        ax.set_title(f"{row['domain']} (mSA)", fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    figure.suptitle(f"{result['name']}: instance mSA, mean ± std over seeds", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def plot_params(result: dict[str, Any], params: dict[str, int], path: str | Path) -> None:
    """Each domain's main metric (mean ± std over seeds) against each arm's own trainable parameters (log scale).

    Args:
        result: a quality result.
        params: per arm, the parameters it trains besides the mask decoder every arm trains.
        path: the PNG to write.
    """
    summary = result["summary"]
    methods = {a["name"]: a["method"] for a in result["config"]["arms"]}
    columns = min(4, len(summary))
    rows = -(-len(summary) // columns)
    figure, axes = _subplots(rows, columns, figsize=(4.0 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(summary) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, summary, strict=False):
        main = row["metrics"][0]
        for arm, entry in row["arms"].items():
            if arm not in params:
                continue
            stat = entry["metrics"][main]
            shade = colour(arm) if arm in METHODS else colour(methods[arm])
            ax.errorbar(params[arm], stat["mean"], yerr=stat["std"] or 0.0, fmt="o", color=shade, capsize=3)
            ax.annotate(arm, (params[arm], stat["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel="own trainable parameters (besides the mask decoder)", ylabel=metric_label(main))
        ax.set_title(row["domain"], fontsize=10)
    figure.suptitle(f"{result['name']}: quality against trainable parameters (mean ± std over seeds)", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def plot_cost(result: dict[str, Any], path: str | Path) -> None:
    """Bars per method at the reference point: step time, peak memory and merged inference latency."""
    rows = result["reference"]["methods"]
    methods = list(rows)
    panels = [("step_seconds", "train step (s)", 1), ("peak_memory_bytes", "peak memory (MiB)", 2**20)]
    if all(rows[m].get("merged_latency_seconds") is not None for m in methods):
        panels.append(("merged_latency_seconds", "merged inference (s)", 1))
    figure, axes = _subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels, strict=True):
        values = [(rows[m].get(key) or 0) / scale for m in methods]
        ax.bar(methods, values, color=[colour(m) for m in methods])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20)
    figure.suptitle(f"{result['name']}: cost per method", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def plot_scaling(result: dict[str, Any], path: str | Path) -> None:
    """Step time and peak memory against each swept axis, one line per method."""
    from matplotlib import ticker

    sweeps = {axis: points for axis, points in result["sweeps"].items() if "methods" in points[0]}
    if not sweeps:
        return
    figure, axes = _subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6.0), squeeze=False)
    for column, (axis, points) in enumerate(sweeps.items()):
        xs = [p[axis] for p in points]
        for method in points[0]["methods"]:
            shade = colour(method)
            steps = [p["methods"][method]["step_seconds"] for p in points]
            axes[0][column].plot(xs, steps, "o-", color=shade, label=method)
            memory = [(p["methods"][method]["peak_memory_bytes"] or 0) / 2**20 for p in points]
            axes[1][column].plot(xs, memory, "o-", color=shade, label=method)
        for row, label in ((0, "train step (s)"), (1, "peak memory (MiB)")):
            ax = axes[row][column]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set(xlabel=axis.replace("_", " "), ylabel=label)
            ax.legend(fontsize=8)
    figure.suptitle(f"{result['name']}: how cost grows", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def _subplots(rows: int, columns: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
    """A figure and its axes, drawn off-screen without pyplot (no global backend switch)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())
