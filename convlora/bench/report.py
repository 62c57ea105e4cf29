"""Markdown tables and PNG plots generated from benchmark result JSON files, and from nothing else.

For every ``<name>.json`` in the results folder this writes ``<name>.md`` (tables) and ``<name>.png``
(quality: one bar chart per domain with the spread over seeds; cost: the reference point per method),
plus ``<name>_scaling.png`` for cost sweeps, and ``README.md`` collecting every table.

>>> write_report("benchmarks/results")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .._io import atomic_file
from .cost import TRAIN_KEYS
from .runner import SCHEMA

ARROWS = {True: "↑", False: "↓"}
COST_HEADER = (
    "| method | trainable params | of which LoRA / Conv-LoRA | saved artifact | step time | peak memory "
    "| merged inference |"
)
COLOURS = {"full": "#7f7f7f", "decoder": "#bcbd22", "lora": "#1f77b4", "conv_lora": "#d62728"}


def load_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every benchmark result file in ``results_dir`` (files with the benchmark schema): quality, then cost, by name."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            found.append(data)
    order = {"quality": 0, "cost": 1}
    return sorted(found, key=lambda r: (order.get(r["kind"], 2), r["name"]))


# ----------------------------------------------------------------------------------------------- formats


def fmt_count(value: int | None) -> str:
    """``1234567 -> '1.23 M'``.

    >>> fmt_count(163616), fmt_count(912)
    ('163.6 k', '912')
    """
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(value)


def fmt_bytes(value: float | None) -> str:
    """Bytes in KiB, MiB or GiB.

    >>> fmt_bytes(3 * 2**20)
    '3.0 MiB'
    """
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value: float | None) -> str:
    """Seconds as ms below one second.

    >>> fmt_seconds(0.01234), fmt_seconds(12.3)
    ('12.3 ms', '12.30 s')
    """
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_ratio(value: float | None) -> str:
    """``2.5 -> '2.50×'``, ``None`` (no value) as a dash."""
    return "–" if value is None else f"{value:.2f}×"


def fmt_stat(stat: dict[str, Any]) -> str:
    """``mean ± std`` with a precision that suits the metric's scale."""
    if not stat or stat.get("mean") is None:
        return "–"
    digits = 3 if abs(stat["mean"]) < 2 else 2
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def fmt_value(value: float | None) -> str:
    """One metric value with the precision of :func:`fmt_stat`, a dash when missing."""
    if value is None:
        return "–"
    return f"{value:.{3 if abs(value) < 2 else 2}f}"


def fmt_delta(entry: dict[str, Any] | None) -> str:
    """A difference to the baseline: ``Δ ± standard error (verdict)``."""
    if not entry:
        return "–"
    digits = 3 if abs(entry["delta"]) < 2 else 2
    return f"{entry['delta']:+.{digits}f} ± {entry['se']:.{digits}f} ({entry['verdict']})"


def metric_label(metric: str) -> str:
    """The metric's name with an arrow saying which direction is better."""
    from ..training.metrics import higher_is_better

    try:
        return f"{metric} {ARROWS[higher_is_better(metric)]}"
    except (KeyError, ValueError):
        return metric


def environment_line(result: dict[str, Any]) -> str:
    """One line: machine, threads, versions, commit, wall time and load."""
    env = result["environment"]
    m, v, c = env["machine"], env["versions"], env["commit"]
    gpu = f", GPU {m['gpu']['name']}" if m.get("gpu") else ""
    sha = (c.get("sha") or "unknown")[:10]
    dirty = " + uncommitted changes" if c.get("dirty") else ""
    loads = f"load (1 min) {_first(result.get('load_before'))} before, {_first(result.get('load_after'))} after"
    return (
        f"Machine: {m['cpu']} ({m['cores']} cores{gpu}), device {env['device']}, {env['threads']} torch thread(s); "
        f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"convlora {v['convlora']}; commit {sha}{dirty}; wall time {result['wall_seconds'] / 60:.1f} min; {loads}."
    )


def _first(values: list[float] | None) -> str:
    return "?" if not values else f"{values[0]:.2f}"


def _load_range(entries: list[dict[str, Any]]) -> str:
    loads = [e[k][0] for e in entries for k in ("load_before", "load_after") if e.get(k)]
    return "unknown" if not loads else f"{min(loads):.2f}–{max(loads):.2f}"


# ----------------------------------------------------------------------------------------------- quality


def _heading(result: dict[str, Any]) -> list[str]:
    lines = [f"## {result['name']}", ""]
    return lines + ([result["description"], ""] if result.get("description") else [])


def _footer(result: dict[str, Any]) -> list[str]:
    """Machine, command and plot of a result, the end of its section."""
    command = result.get("command") or "unknown"
    return ["", environment_line(result), "", f"Command: `{command}`", "", f"![{result['name']}]({result['name']}.png)"]


def _setting(result: dict[str, Any], key: str) -> Any:
    """A setting of the run: the command-line override if one was given, else the config's value."""
    return result.get("overrides", {}).get(key) or result["config"][key]


def quality_markdown(result: dict[str, Any]) -> str:
    """Tables of a quality result: main metric per domain and arm, every reported metric, run facts."""
    summary = result["summary"]
    arms = [a["name"] for a in result["config"]["arms"]]
    seeds = _setting(result, "seeds")
    steps = _setting(result, "max_steps")
    lines = _heading(result)
    lines += [
        f"Test-split metrics, mean ± sample std over seeds {seeds}; {steps} optimiser steps per run; the best "
        "checkpoint on the validation split is scored. Δ is the difference of means to the baseline arm with its "
        "standard error; it says *better*/*worse* only when |Δ| > 2 SE, else *tie*.",
        "",
    ]
    baseline = summary[0]["baseline"] if summary else None
    if len(summary) > 1:
        lines += _by_domain_table(summary, arms, baseline)
    for row in summary:
        lines += ["", f"**{row['domain']}**: every reported metric (Δ against {baseline})", ""]
        lines += _by_arm_table(row, arms)
    runs = result["runs"]
    lines += [
        "",
        f"{len(runs)} runs, {sum(1 for r in runs if r.get('reused'))} reused from earlier runs of the same settings; "
        f"mean run time {sum(r['wall_seconds'] for r in runs) / max(1, len(runs)):.0f} s; "
        f"load (1 min) during runs {_load_range(runs)}.",
        *_footer(result),
    ]
    return "\n".join(lines) + "\n"


def _by_domain_table(summary: list[dict[str, Any]], arms: list[str], baseline: str | None) -> list[str]:
    contrast = "conv_lora" if "conv_lora" in arms and baseline and baseline != "conv_lora" else None
    zero = any("zero_shot" in row for row in summary)
    header = ["domain", "metric", *(["zero-shot"] if zero else []), *arms]
    header += [f"conv_lora − {baseline}"] if contrast else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in summary:
        main = row["metrics"][0]
        cells = [row["domain"], metric_label(main)]
        if zero:
            cells.append(fmt_value(row.get("zero_shot", {}).get(main)))
        values = {a: row["arms"][a]["metrics"][main] for a in arms if a in row["arms"]}
        best = _best(values, main)
        for arm in arms:
            text = fmt_stat(values.get(arm, {}))
            cells.append(f"**{text}**" if arm == best else text)
        if contrast:
            cells.append(fmt_delta(row["arms"].get(contrast, {}).get("vs_baseline", {}).get(main)))
        lines.append("| " + " | ".join(cells) + " |")
    first = summary[0]["arms"]
    params = ["trainable params", "", *([""] if zero else [])]
    params += [fmt_count(first[a]["trainable_parameters"]) if a in first else "–" for a in arms]
    sizes = ["saved artifact", "", *([""] if zero else [])]
    sizes += [fmt_bytes(first[a]["adapter_bytes"]) if a in first else "–" for a in arms]
    extra = [""] if contrast else []
    lines.append("| " + " | ".join(params + extra) + " |")
    lines.append("| " + " | ".join(sizes + extra) + " |")
    lines.append("")
    note = "Zero-shot: the base model before fine-tuning, prompt-free. " if zero else ""
    lines.append(f"{note}Bold: best mean per domain. Parameter counts and artifact sizes of {summary[0]['domain']}.")
    return lines


def _best(values: dict[str, dict[str, Any]], metric: str) -> str | None:
    from ..training.metrics import higher_is_better

    scored = {a: s["mean"] for a, s in values.items() if s.get("mean") is not None}
    if not scored:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(scored, key=scored.get)


def _by_arm_table(row: dict[str, Any], arms: list[str]) -> list[str]:
    metrics = row["metrics"]
    header = ["arm", "settings", *(metric_label(m) for m in metrics), f"Δ {metrics[0]}"]
    header += ["trainable", "artifact", "run time"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    if "zero_shot" in row:
        cells = ["zero-shot", "base model, no training", *(fmt_value(row["zero_shot"].get(m)) for m in metrics)]
        lines.append("| " + " | ".join([*cells, "", "0", "–", "–"]) + " |")
    for arm in arms:
        entry = row["arms"].get(arm)
        if entry is None:
            continue
        settings = ", ".join(f"{k}={v}" for k, v in entry["conv_lora"].items())
        if not settings and entry["method"] in ("lora", "conv_lora"):
            settings = "defaults"
        cells = [arm, f"{entry['method']} {settings}".strip()]
        cells += [fmt_stat(entry["metrics"][m]) for m in metrics]
        cells.append("baseline" if arm == row["baseline"] else fmt_delta(entry["vs_baseline"].get(metrics[0])))
        cells += [fmt_count(entry["trainable_parameters"]), fmt_bytes(entry["adapter_bytes"])]
        cells.append(f"{entry['wall_seconds']['mean']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
        colours = [COLOURS.get(a, COLOURS.get(methods[a], "#9467bd")) for a in present]
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


# -------------------------------------------------------------------------------------------------- cost


def cost_markdown(result: dict[str, Any]) -> str:
    """Tables of a cost result: absolute values, ratios to LoRA, latency side by side, sweeps."""
    config = result["config"]
    reference = result["reference"]
    rows = reference["methods"]
    any_row = next(iter(rows.values()))
    model = _setting(result, "model")
    lines = _heading(result)
    lines += [
        f"Model `{model}` at {any_row['image_size']}×{any_row['image_size']}, batch {reference['batch_size']}, "
        f"{any_row['device']} {any_row['dtype']}, {any_row['threads']} thread(s). Step time: median of "
        f"{config['timed_steps']} timed optimiser steps after {config['warmup_steps']} warm-up steps (forward, loss, "
        f"backward, clipping, AdamW). Peak memory: {any_row['memory_source']}, each configuration in a fresh process. "
        "Saved artifact: what the run exports (adapter, decoder weights, or the full model), without the model card.",
        "",
        COST_HEADER,
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in rows.items():
        lines.append(
            f"| {method} | {fmt_count(row['trainable_parameters'])} | {fmt_count(row.get('adapter_parameters'))} | "
            f"{fmt_bytes(row['artifact_bytes'])} | "
            f"{fmt_seconds(row['step_seconds'])} | {fmt_bytes(row['peak_memory_bytes'])} | "
            f"{fmt_seconds(row.get('merged_latency_seconds'))} |"
        )
    ratios = reference.get("ratios_to_lora") or {}
    if ratios:
        lines += ["", "Ratios to LoRA:", "", COST_HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
        for method, row in ratios.items():
            cells = [fmt_ratio(row.get(k)) for k in (*TRAIN_KEYS, "merged_latency_seconds")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    latency = result.get("latency")
    if latency:
        lines += [
            "",
            f"Inference latency, batch {latency['batch_size']}, eval mode, no_grad; median of {config['latency_runs']} "
            f"runs after {config['latency_warmup']} warm-up runs, the five models interleaved run by run. Conv-LoRA's "
            "gate has random weights so that windows are spread over the experts as a load-balanced trained gate "
            "spreads them (a zero gate would send all of them to the cheapest, scale-1 expert). Full and decoder-only "
            "fine-tuning run the base architecture.",
            "",
            "| model | latency | vs base | vs LoRA merged | extra params after merge |",
            "|---|---:|---:|---:|---:|",
        ]
        extra = latency.get("merged_extra_parameters", {})
        for name, seconds in latency["seconds"].items():
            lines.append(
                f"| {name} | {fmt_seconds(seconds)} | {fmt_ratio(latency['vs_base'][name])} | "
                f"{fmt_ratio(latency.get('vs_lora_merged', {}).get(name))} | "
                f"{fmt_count(extra[name]) if name in extra else '–'} |"
            )
    for axis, points in result.get("sweeps", {}).items():
        methods = list(points[0]["methods"])
        header = [axis] + [f"{m} step" for m in methods] + [f"{m} memory" for m in methods]
        if "lora" in methods and "conv_lora" in methods:
            header += ["conv_lora/lora step", "conv_lora/lora memory"]
        lines += ["", f"Scaling with {axis.replace('_', ' ')} (the other value at the reference point):", "",
                  "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]  # fmt: skip
        for point in points:
            cells = [str(point[axis])]
            cells += [fmt_seconds(point["methods"][m]["step_seconds"]) for m in methods]
            cells += [fmt_bytes(point["methods"][m]["peak_memory_bytes"]) for m in methods]
            if "lora" in methods and "conv_lora" in methods:
                r = point["ratios_to_lora"]["conv_lora"]
                cells += [fmt_ratio(r["step_seconds"]), fmt_ratio(r["peak_memory_bytes"])]
            lines.append("| " + " | ".join(cells) + " |")
    entries = list(rows.values()) + ([latency] if latency else [])
    entries += [r for points in result.get("sweeps", {}).values() for p in points for r in p["methods"].values()]
    lines += [
        "",
        f"Load (1 min) around the measurements: {_load_range(entries)} on {result['environment']['machine']['cores']} "
        "cores; timings on a shared machine are noisy, compare ratios within one table rather than across tables.",
        *_footer(result),
    ]
    if result.get("sweeps"):
        lines += ["", f"![{result['name']} scaling]({result['name']}_scaling.png)"]
    return "\n".join(lines) + "\n"


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
        ax.bar(methods, values, color=[COLOURS.get(m, "#9467bd") for m in methods])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20)
    figure.suptitle(f"{result['name']}: cost per method", fontsize=11)
    figure.tight_layout()
    _save(figure, Path(path))


def plot_scaling(result: dict[str, Any], path: str | Path) -> None:
    """Step time and peak memory against each swept axis, one line per method."""
    from matplotlib import ticker

    sweeps = result["sweeps"]
    figure, axes = _subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6.0), squeeze=False)
    for column, (axis, points) in enumerate(sweeps.items()):
        xs = [p[axis] for p in points]
        for method in points[0]["methods"]:
            colour = COLOURS.get(method, "#9467bd")
            steps = [p["methods"][method]["step_seconds"] for p in points]
            axes[0][column].plot(xs, steps, "o-", color=colour, label=method)
            memory = [(p["methods"][method]["peak_memory_bytes"] or 0) / 2**20 for p in points]
            axes[1][column].plot(xs, memory, "o-", color=colour, label=method)
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


# ----------------------------------------------------------------------------------------------- summary

SUMMARY_START = "<!-- benchmark-summary:start (generated by `convlora benchmark report`; do not edit) -->"
SUMMARY_END = "<!-- benchmark-summary:end -->"


def summary_markdown(results: list[dict[str, Any]]) -> str:
    """The few tables a reader needs first, from every result: main metric per method, cost against LoRA.

    This is the block between the ``benchmark-summary`` markers of the project's README (and
    ``summary.md``); links point into ``benchmarks/results/`` relative to the repository root.
    """
    lines: list[str] = []
    for result in results:
        if result["kind"] == "quality" and len(result["summary"]) > 1:
            lines += _quality_summary(result)
    for result in results:
        if result["kind"] == "quality" and len(result["summary"]) == 1:
            lines += _ablation_summary(result)
    cost = [r for r in results if r["kind"] == "cost"]
    if cost:
        lines += _cost_summary(cost)
    machines = sorted({environment_line(r).split(";")[0].removeprefix("Machine: ") for r in results})
    lines += [f"Measured on {' and '.join(machines)}. Every table with its seeds, standard errors, load and "
              "commit: [`benchmarks/results/README.md`](benchmarks/results/README.md); what is measured and how: "
              "[`benchmarks/README.md`](benchmarks/README.md)."]  # fmt: skip
    return "\n".join(lines).strip() + "\n"


def _quality_summary(result: dict[str, Any]) -> list[str]:
    config = result["config"]
    arms = [a["name"] for a in config["arms"]]
    baseline = result["summary"][0]["baseline"]
    seeds = _setting(result, "seeds")
    steps = _setting(result, "max_steps")
    lines = [
        f"**Quality** (`{result['name']}`): test split, mean ± std over {len(seeds)} seeds, {steps} optimiser steps "
        f"per run, base `{_setting(result, 'model')}`. The last column says whether "
        f"Conv-LoRA differs from {baseline} by more than two standard errors.",
        "",
    ]
    lines += _by_domain_table(result["summary"], arms, baseline)
    return [*lines, ""]


def _ablation_summary(result: dict[str, Any]) -> list[str]:
    row = result["summary"][0]
    main = row["metrics"][0]
    arms = row["arms"]
    deltas = ["–" if arm == row["baseline"] else fmt_delta(arms[arm]["vs_baseline"].get(main)) for arm in arms]
    lines = [
        f"**Conv-LoRA's choices** (`{result['name']}`, {row['domain']}, {metric_label(main)}, Δ against "
        f"{row['baseline']}):",
        "",
        "| arm | " + " | ".join(row["arms"]) + " |",
        "|---|" + "---:|" * len(row["arms"]),
        f"| {main} | " + " | ".join(fmt_stat(e["metrics"][main]) for e in row["arms"].values()) + " |",
        "| Δ | " + " | ".join(deltas) + " |",
        "",
    ]
    return lines


def _cost_summary(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "**Cost of Conv-LoRA against LoRA** (same targets and rank; train step with loss, backward and AdamW; "
        "inference with both adapters merged into the base):",
        "",
        "| experiment | model, input, batch | Conv-LoRA step | vs LoRA | peak memory | vs LoRA | merged inference "
        "vs LoRA merged | adapter tensors vs LoRA |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        rows = result["reference"]["methods"]
        if "conv_lora" not in rows or "lora" not in rows:
            continue
        conv, ratio = rows["conv_lora"], result["reference"]["ratios_to_lora"]["conv_lora"]
        model = _setting(result, "model")
        latency = (result.get("latency") or {}).get("vs_lora_merged", {}).get("conv_lora_merged")
        lines.append(
            f"| {result['name']} | `{model}`, {conv['image_size']} px, {result['reference']['batch_size']} | "
            f"{fmt_seconds(conv['step_seconds'])} | {fmt_ratio(ratio.get('step_seconds'))} | "
            f"{fmt_bytes(conv['peak_memory_bytes'])} | {fmt_ratio(ratio.get('peak_memory_bytes'))} | "
            f"{fmt_ratio(latency)} | {fmt_ratio(ratio.get('adapter_parameters'))} |"
        )
    return [*lines, ""]


def replace_summary(text: str, summary: str, *, where: str = "README.md") -> str:
    """``text`` with the block between the summary markers replaced by ``summary``.

    >>> replace_summary(f"a\\n{SUMMARY_START}\\nold\\n{SUMMARY_END}\\nb", "new\\n").splitlines()[2]
    'new'
    """
    if SUMMARY_START not in text or SUMMARY_END not in text:
        raise ValueError(f"{where} has no benchmark summary markers ({SUMMARY_START!r} ... {SUMMARY_END!r})")
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    return f"{head}{SUMMARY_START}\n{summary}{SUMMARY_END}{tail}"


# ------------------------------------------------------------------------------------------------ output


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


def write_report(results_dir: str | Path, readme: str | Path | None = None) -> list[Path]:
    """Write ``<name>.md`` and the plots of every result in ``results_dir``, a ``README.md`` index and ``summary.md``.

    Args:
        results_dir: folder of result JSON files (written by ``convlora benchmark run``).
        readme: a Markdown file whose benchmark-summary block is replaced by ``summary.md``'s text (the
            project's README), or ``None``.

    Returns:
        The files written.
    """
    results_dir = Path(results_dir)
    results = load_results(results_dir)
    written: list[Path] = []
    sections = []
    for result in results:
        name = result["name"]
        if result["kind"] == "quality":
            text = quality_markdown(result)
            plot_quality(result, results_dir / f"{name}.png")
        else:
            text = cost_markdown(result)
            plot_cost(result, results_dir / f"{name}.png")
            if result.get("sweeps"):
                plot_scaling(result, results_dir / f"{name}_scaling.png")
                written.append(results_dir / f"{name}_scaling.png")
        with atomic_file(results_dir / f"{name}.md", "w") as handle:
            handle.write(text)
        written += [results_dir / f"{name}.md", results_dir / f"{name}.png"]
        sections.append(text)
    index = (
        "# Benchmark results\n\nGenerated by `convlora benchmark report` from the JSON files in this folder; "
        "do not edit by hand. See `benchmarks/README.md` for what is measured and how.\n\n" + "\n".join(sections)
    )
    with atomic_file(results_dir / "README.md", "w") as handle:
        handle.write(index)
    written.append(results_dir / "README.md")
    if results:
        summary = summary_markdown(results)
        with atomic_file(results_dir / "summary.md", "w") as handle:
            handle.write(summary)
        written.append(results_dir / "summary.md")
        if readme is not None:
            readme = Path(readme)
            text = replace_summary(readme.read_text(), summary, where=str(readme))
            with atomic_file(readme, "w") as handle:
                handle.write(text)
            written.append(readme)
    return written
