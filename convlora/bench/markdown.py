"""The benchmark tables (Markdown) of each result, and the summary block the README embeds."""

from __future__ import annotations

from typing import Any

from ..evaluation.metrics import higher_is_better
from .cost import TRAIN_KEYS
from .formatting import (
    INSTANCE_WAYS,
    _load_range,
    environment_line,
    fmt_bytes,
    fmt_count,
    fmt_delta,
    fmt_ratio,
    fmt_seconds,
    fmt_stat,
    fmt_value,
    metric_label,
)

COST_HEADER = (
    "| method | trainable params | of which LoRA / Conv-LoRA | saved artifact | step time | peak memory "
    "| merged inference |"
)


def _heading(result: dict[str, Any]) -> list[str]:
    lines = [f"## {result['name']}", ""]
    return lines + ([result["description"], ""] if result.get("description") else [])


def _footer(result: dict[str, Any]) -> list[str]:
    """Machine, command and plot of a result, the end of its section."""
    command = result.get("command") or "unknown"
    return ["", environment_line(result), "", f"Command: `{command}`", "", f"![{result['name']}]({result['name']}.png)"]


def _runs_footer(result: dict[str, Any]) -> list[str]:
    """How many runs a result holds, how many were reused, their mean time and the load; then the footer."""
    runs = result["runs"]
    return [
        "",
        f"{len(runs)} runs, {sum(1 for r in runs if r.get('reused'))} reused from earlier runs of the same settings; "
        f"mean run time {sum(r['wall_seconds'] for r in runs) / max(1, len(runs)):.0f} s; "
        f"load (1 min) during runs {_load_range(runs)}.",
        *_footer(result),
    ]


def _setting(result: dict[str, Any], key: str) -> Any:
    """A setting of the run: the command-line override if one was given, else the config's value."""
    return result.get("overrides", {}).get(key) or result["config"][key]


def _steps_text(result: dict[str, Any]) -> str:
    """The step budget of a quality result's runs, with the domains that had their own."""
    text = f"{_setting(result, 'max_steps')} optimiser steps"
    own = {} if result.get("overrides", {}).get("max_steps") else result["config"].get("domain_steps", {})
    if own:
        text += " (" + ", ".join(f"{domain}: {steps}" for domain, steps in own.items()) + ")"
    return text


def quality_markdown(result: dict[str, Any]) -> str:
    """Tables of a quality result: main metric per domain and arm, every reported metric, run facts."""
    summary = result["summary"]
    arms = [a["name"] for a in result["config"]["arms"]]
    seeds = _setting(result, "seeds")
    steps = _steps_text(result)
    lines = _heading(result)
    lines += [
        f"Test-split metrics, mean ± sample std over seeds {seeds}; {steps} per run; the best "
        "checkpoint on the validation split is scored. Δ is the difference of means to the baseline arm with its "
        "standard error; it says *better*/*worse* only when |Δ| > 2 SE, else *tie*.",
        "",
    ]
    baseline = summary[0]["baseline"] if summary else None
    if len(summary) > 1:
        lines += _by_domain_table(summary, arms, baseline, _prompt(result))
    for row in summary:
        lines += ["", f"**{row['domain']}**: every reported metric (Δ against {baseline})", ""]
        lines += _by_arm_table(row, arms)
    return "\n".join(lines + _runs_footer(result)) + "\n"


RUN_OF = {"ais": "instances", "apg": "instances", "binary_cc": "binary"}  # the run each way's model comes from


def _instance_main_table(result: dict[str, Any]) -> list[str]:
    """mSA per domain, way (rows) and arm (columns); AMG on the base as one more row."""
    arms = [a["name"] for a in result["config"]["arms"]]
    lines = ["| domain | way | " + " | ".join(arms) + " | s / image |", "|---|---|" + "---:|" * (len(arms) + 1)]
    for row in result["summary"]:
        for way, label in INSTANCE_WAYS.items():
            stats = {a: row["arms"].get(a, {}).get("ways", {}).get(way, {}).get("msa", {}) for a in arms}
            best = _best({a: v for a, v in stats.items() if v}, "msa")
            cells = [f"**{fmt_stat(v)}**" if a == best else fmt_stat(v) for a, v in stats.items()]
            times = [
                row["arms"][a]["ways"][way]["seconds_per_image"]["mean"]
                for a in arms
                if way in row["arms"].get(a, {}).get("ways", {})
            ]
            timing = fmt_seconds(sum(times) / len(times)) if times else "–"
            lines.append(f"| {row['domain']} | {label} | " + " | ".join(cells) + f" | {timing} |")
        if "amg" in row:
            amg = row["amg"]
            cells = [fmt_value(amg["msa"])] + ["″"] * (len(arms) - 1)
            lines.append(
                f"| {row['domain']} | AMG (base) | "
                + " | ".join(cells)
                + f" | {fmt_seconds(amg['seconds_per_image'])} |"
            )
    return lines


def _instance_detail_table(row: dict[str, Any]) -> list[str]:
    kept = any(e.get("retention", {}).get(m, {}).get("n") for e in row["arms"].values() for m in RUN_OF.values())
    header = "| way | arm | mSA | F1@0.5 | SA@0.5 | objects found | true objects | s / image |"
    header += " retention |" if kept else ""
    lines = [header, "|---|---|" + "---:|" * (header.count("|") - 3)]
    for arm, entry in row["arms"].items():
        for way, stats in entry["ways"].items():
            cells = [INSTANCE_WAYS[way], arm, *(fmt_stat(stats[k]) for k in ("msa", "f1_50", "sa50"))]
            cells += [f"{stats['n_pred']['mean']:.0f}", f"{stats['n_true']['mean']:.0f}"]
            cells.append(fmt_seconds(stats["seconds_per_image"]["mean"]))
            cells += [fmt_stat(entry.get("retention", {}).get(RUN_OF[way], {}))] if kept else []
            lines.append("| " + " | ".join(cells) + " |")
    if "amg" in row:
        amg = row["amg"]
        cells = ["AMG", "base", fmt_value(amg["msa"]), fmt_value(amg["f1_50"]), fmt_value(amg["sa50"])]
        cells += [f"{amg['n_pred']:.0f}", f"{amg['n_true']:.0f}", fmt_seconds(amg["seconds_per_image"])]
        cells += ["1 (the base)"] if kept else []
        lines.append("| " + " | ".join(cells) + " |")
    if kept:
        lines += [
            "",
            "Retention: the model's prompted IoU (box, point, 3 clicks) on the generic keep set over the base's.",
        ]
    base = row.get("base_prompted_val")
    if base:
        lines += [
            "",
            f"The base's own prompted IoU on {base['objects']:.0f} validation objects of {row['domain']} (what APG's "
            f"refinement draws on): box {base['box']:.3f}, point {base['point']:.3f}, 3 clicks {base['clicks']:.3f}.",
        ]
    return lines


def instance_goals(result: dict[str, Any], arm: str = "conv_lora") -> list[dict[str, Any]]:
    """Per domain, ``arm``'s AIS mSA against AMG's and binary-CC's, and AIS's time against AMG's.

    >>> row = {"domain": "d", "amg": {"msa": 0.1, "seconds_per_image": 1.0}, "arms": {"conv_lora": {"ways": {
    ...     "ais": {"msa": {"mean": 0.4}, "seconds_per_image": {"mean": 0.1}}, "binary_cc": {"msa": {"mean": 0.2}}}}}}
    >>> instance_goals({"summary": [row]})[0]["ais_minus_amg"]
    0.30000000000000004
    """
    goals = []
    for row in result["summary"]:
        ways = row["arms"].get(arm, {}).get("ways", {})
        if "ais" not in ways or "amg" not in row:
            continue
        ais = ways["ais"]["msa"]["mean"]
        goal = {"domain": row["domain"], "arm": arm, "ais_msa": ais, "ais_minus_amg": ais - row["amg"]["msa"]}
        if "binary_cc" in ways:
            goal["ais_minus_binary_cc"] = ais - ways["binary_cc"]["msa"]["mean"]
        goal["ais_time_vs_amg"] = ways["ais"]["seconds_per_image"]["mean"] / row["amg"]["seconds_per_image"]
        goals.append(goal)
    return goals


def _goal_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for goal in instance_goals(result):
        text = (
            f"{goal['domain']}: {goal['arm']} AIS mSA {goal['ais_msa']:.3f}, {goal['ais_minus_amg']:+.3f} against AMG"
        )
        if "ais_minus_binary_cc" in goal:
            text += f", {goal['ais_minus_binary_cc']:+.3f} against binary-CC"
        lines.append(f"- {text}; AIS takes {goal['ais_time_vs_amg']:.3f}x AMG's time per image.")
    return lines


def instances_markdown(result: dict[str, Any]) -> str:
    """Tables of an instance result: mSA per domain, way and arm; every number per domain; the goals."""
    config = result["config"]
    seeds = _setting(result, "seeds")
    amg = ", ".join(f"{k}={v}" for k, v in config.get("amg", {}).items()) or "SAM's defaults"
    lines = _heading(result)
    lines += [
        f"Instance metrics on the test split, mean ± sample std over seeds {seeds}; every run {config['epochs']} "
        f"epochs from `{config['model']}` (instance runs lr {config['lr']}, binary runs lr "
        f"{config.get('binary_lr') or 'the default'}); the best checkpoint on the validation split is scored. "
        f"mSA: mean segmentation accuracy over IoU 0.5:0.05:0.95. AMG ({amg}) runs on the untouched base and has no "
        "seed (″: the same value). Seconds per image: the way's own call on one CPU thread (reading the file and "
        "scoring excluded), averaged over arms.",
        "",
        *_instance_main_table(result),
        "",
        *_goal_lines(result),
    ]
    for row in result["summary"]:
        lines += ["", f"**{row['domain']}**: every number (mean over seeds)", "", *_instance_detail_table(row)]
    return "\n".join(lines + _runs_footer(result)) + "\n"


def _instance_summary(result: dict[str, Any]) -> list[str]:
    title = result["config"].get("title") or "Instances"
    seeds = _setting(result, "seeds")
    lines = [
        f"**{title}** (`{result['name']}`): mSA on the test split, mean ± std over {len(seeds)} seeds, "
        f"{result['config']['epochs']} epochs per run, base `{result['config']['model']}`; AMG on the untouched base.",
        "",
        *_instance_main_table(result),
        "",
    ]
    return lines


def _prompt(result: dict[str, Any]) -> str | None:
    """The prompt kind a quality result's runs were trained and tested with, ``None`` when prompt-free."""
    prompt = result["config"].get("train", {}).get("prompt", "none")
    return None if prompt == "none" else prompt


def _by_domain_table(
    summary: list[dict[str, Any]], arms: list[str], baseline: str | None, prompt: str | None = None
) -> list[str]:
    contrast = "conv_lora" if "conv_lora" in arms and baseline and baseline != "conv_lora" else None
    zero = any("zero_shot" in row for row in summary)
    header = ["domain", "metric", *(["zero-shot"] if zero else []), *arms]
    header += [f"conv_lora − {baseline}"] if contrast else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in summary:
        # the main metric, and retention on the keep set where the experiment measures it (the base keeps 1)
        for metric in [row["metrics"][0], *(["retention"] if "retention" in row["metrics"][1:] else [])]:
            cells = [row["domain"], metric_label(metric) if metric != "retention" else "retention (keep set) ↑"]
            if zero:
                cells.append("1" if metric == "retention" else fmt_value(row.get("zero_shot", {}).get(metric)))
            values = {a: row["arms"][a]["metrics"][metric] for a in arms if a in row["arms"]}
            best = _best(values, metric)
            for arm in arms:
                text = fmt_stat(values.get(arm, {}))
                cells.append(f"**{text}**" if arm == best else text)
            if contrast:
                cells.append(fmt_delta(row["arms"].get(contrast, {}).get("vs_baseline", {}).get(metric)))
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
    if prompt is None:
        note = "Zero-shot: the base model before fine-tuning, prompt-free. " if zero else ""
    else:
        note = f"Zero-shot: vanilla SAM (the base model) under the same {prompt} prompts. " if zero else ""
    lines.append(f"{note}Bold: best mean per domain. Parameter counts and artifact sizes of {summary[0]['domain']}.")
    return lines


def _best(values: dict[str, dict[str, Any]], metric: str) -> str | None:

    scored = {a: s["mean"] for a, s in values.items() if s.get("mean") is not None}
    if not scored:
        return None
    pick = max if metric.startswith("retention") or higher_is_better(metric) else min  # retention: no task metric
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
        chosen = {**entry["conv_lora"], **entry.get("train", {})}
        settings = ", ".join(f"{k}={v}" for k, v in chosen.items())
        if not settings and entry["method"] in ("lora", "conv_lora"):
            settings = "defaults"
        cells = [arm, f"{entry['method']} {settings}".strip()]
        cells += [fmt_stat(entry["metrics"][m]) for m in metrics]
        cells.append("baseline" if arm == row["baseline"] else fmt_delta(entry["vs_baseline"].get(metrics[0])))
        cells += [fmt_count(entry["trainable_parameters"]), fmt_bytes(entry["adapter_bytes"])]
        cells.append(f"{entry['wall_seconds']['mean']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
            f"| {method} | {fmt_count(row['trainable_parameters'])} | "
            f"{fmt_count(row.get('adapter_parameters') or None)} | "
            f"{fmt_bytes(row['artifact_bytes'])} | "
            f"{fmt_seconds(row['step_seconds'])} | {fmt_bytes(row['peak_memory_bytes'])} | "
            f"{fmt_seconds(row.get('merged_latency_seconds'))} |"
        )
    ratios = reference.get("ratios_to_lora") or {}
    if ratios:
        lines += ["", "Ratios to LoRA:", "", COST_HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
        for method, row in ratios.items():
            # methods without LoRA tensors (LoHa, (IA)3, ...) have no LoRA column, not a ratio of zero
            cells = [
                "–" if k == "adapter_parameters" and not rows[method].get(k) else fmt_ratio(row.get(k))
                for k in (*TRAIN_KEYS, "merged_latency_seconds")
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    latency = result.get("latency")
    if latency:
        lines += [
            "",
            f"Inference latency, batch {latency['batch_size']}, eval mode, no_grad; median of {config['latency_runs']} "
            f"runs after {config['latency_warmup']} warm-up runs, the models interleaved run by run in rotating order "
            "(per run: the median of each run's ratio to LoRA merged). Conv-LoRA's "
            "gate has random weights so that windows are spread over the experts as a load-balanced trained gate "
            "spreads them (a zero gate would send all of them to the cheapest, scale-1 expert). Full and decoder-only "
            "fine-tuning run the base architecture.",
            "",
            "| model | latency | vs base | vs LoRA merged | vs LoRA merged, per run | extra params after merge |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        extra = latency.get("merged_extra_parameters", {})
        paired = latency.get("paired_ratios_to_lora_merged", {})
        for name, seconds in latency["seconds"].items():
            lines.append(
                f"| {name} | {fmt_seconds(seconds)} | {fmt_ratio(latency['vs_base'][name])} | "
                f"{fmt_ratio(latency.get('vs_lora_merged', {}).get(name))} | {fmt_ratio(paired.get(name))} | "
                f"{fmt_count(extra[name]) if name in extra else '–'} |"
            )
    for axis, points in result.get("sweeps", {}).items():
        lines += _sweep_table(axis, points)
    entries = list(rows.values()) + ([latency] if latency else [])
    entries += [
        r
        for points in result.get("sweeps", {}).values()
        for p in points
        for part in ("methods", "predict", "prompted")
        for r in p.get(part, {}).values()
    ]
    lines += [
        "",
        f"Load (1 min) around the measurements: {_load_range(entries)} on {result['environment']['machine']['cores']} "
        "cores; timings on a shared machine are noisy, compare ratios within one table rather than across tables.",
        *_footer(result),
    ]
    if any("methods" in points[0] for points in result.get("sweeps", {}).values()):
        lines += ["", f"![{result['name']} scaling]({result['name']}_scaling.png)"]
    return "\n".join(lines) + "\n"


def _sweep_table(axis: str, points: list[dict[str, Any]]) -> list[str]:
    """One sweep of a cost result as a Markdown table (training and prediction, or prompted prediction)."""
    if axis == "prompts":
        methods = list(points[0]["prompted"])
        header = ["prompts"] + [f"{m} per image" for m in methods] + [f"{m} decoder per prompt" for m in methods]
        header += [f"{m} memory" for m in methods]
        lines = ["", "Prompted prediction of one image by number of box prompts (merged models; the encoder runs "
                 "once, the prompt decoder 64 prompts at a time):", "",
                 "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]  # fmt: skip
        for point in points:
            rows = point["prompted"]
            cells = [str(point[axis])] + [fmt_seconds(rows[m]["seconds_per_image"]) for m in methods]
            cells += [fmt_seconds(rows[m]["decoder_seconds_per_prompt"]) for m in methods]
            cells += [fmt_bytes(rows[m]["peak_memory_bytes"]) for m in methods]
            lines.append("| " + " | ".join(cells) + " |")
        return lines
    methods = list(points[0]["methods"])
    predict = "predict" in points[0]
    header = [axis] + [f"{m} step" for m in methods] + [f"{m} memory" for m in methods]
    if "lora" in methods and "conv_lora" in methods:
        header += ["conv_lora/lora step", "conv_lora/lora memory"]
    if predict:
        header += [f"{m} predict per image" for m in methods] + [f"{m} predict memory" for m in methods]
    lines = ["", f"Scaling with {axis.replace('_', ' ')} (the other value at the reference point"
             f"{'; prediction with the merged models, no_grad' if predict else ''}):", "",
             "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]  # fmt: skip
    for point in points:
        cells = [str(point[axis])]
        cells += [fmt_seconds(point["methods"][m]["step_seconds"]) for m in methods]
        cells += [fmt_bytes(point["methods"][m]["peak_memory_bytes"]) for m in methods]
        if "lora" in methods and "conv_lora" in methods:
            r = point["ratios_to_lora"]["conv_lora"]
            cells += [fmt_ratio(r["step_seconds"]), fmt_ratio(r["peak_memory_bytes"])]
        if predict:
            cells += [fmt_seconds(point["predict"][m]["seconds_per_image"]) for m in methods]
            cells += [fmt_bytes(point["predict"][m]["peak_memory_bytes"]) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
    for result in results:
        if result["kind"] == "instances":
            lines += _instance_summary(result)
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
    prompt = _prompt(result)
    prompted = "" if prompt is None else f", trained and tested with {prompt} prompts"
    title = result["config"].get("title") or "Quality"
    lines = [
        f"**{title}** (`{result['name']}`{prompted}): test split, mean ± std over {len(seeds)} seeds, "
        f"{_steps_text(result)} "
        f"per run, base `{_setting(result, 'model')}`. The last column says whether "
        f"Conv-LoRA differs from {baseline} by more than two standard errors.",
        "",
    ]
    lines += _by_domain_table(result["summary"], arms, baseline, prompt)
    return [*lines, ""]


def _ablation_summary(result: dict[str, Any]) -> list[str]:
    row = result["summary"][0]
    main = row["metrics"][0]
    arms = row["arms"]
    deltas = ["–" if arm == row["baseline"] else fmt_delta(arms[arm]["vs_baseline"].get(main)) for arm in arms]
    title = result["config"].get("title") or "Conv-LoRA's choices"
    lines = [
        f"**{title}** (`{result['name']}`, {row['domain']}, {metric_label(main)}, Δ against {row['baseline']}):",
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
        timing = result.get("latency") or {}
        # the median of the per-run ratios where measured (robust to load changing between runs)
        latency = timing.get("paired_ratios_to_lora_merged", timing.get("vs_lora_merged", {})).get("conv_lora_merged")
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
