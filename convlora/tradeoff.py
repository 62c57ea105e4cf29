"""The strength trade-off of a fine-tune: its target metric against what it keeps of SAM, strength by strength.

``convlora tradeoff`` puts a trained LoRA / Conv-LoRA adapter at each strength
(:func:`~convlora.artifact.strength.set_strength`), scores the target metric on the validation data and the
retention on a keep set (:mod:`convlora.evaluation.retention`), and writes ``tradeoff.json``,
``tradeoff.md`` (a table) and ``tradeoff.png`` (metric against retention, each point labelled with its
strength) into an output folder it owns. Strength 0 is SAM's own model: its keep-set scores are the base
scores, so its retention is exactly 1.

>>> tradeoff("runs/polyp/adapter", "data/polyp", "runs/polyp/tradeoff")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_dir, check_apart, check_owned, write_json
from .artifact import TASK_FILE, TaskInfo, load_trained
from .artifact.strength import set_strength
from .data import SegmentationDataset, check_dataset
from .data.prompts import PromptConfig
from .evaluation.evaluate import evaluate_split
from .evaluation.metrics import default_metric, higher_is_better
from .evaluation.prompted import evaluate_prompted
from .evaluation.retention import (
    DEFAULT_CLICKS,
    DEFAULT_MIN_RETENTION,
    PROTOCOLS,
    KeepSet,
    choose_checkpoint,
    default_mask_input,
    generic_keep_set,
    keep_set_from_folder,
    object_kind_of,
    pick_split,
    prompted_quality,
    retention,
)
from .models import family_of
from .models.embedded import BASE_ARCHITECTURE, EMBEDDED_MODELS

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GENERIC_KEEP_IMAGES = 32


def check_strengths(strengths: Sequence[float]) -> list[float]:
    """The strengths to sweep, ascending and without repeats; a clear error for one outside [0, 1].

    >>> check_strengths([1, 0.5, 0, 0.5])
    [0.0, 0.5, 1.0]
    """
    if not strengths:
        raise ValueError("--strengths needs at least one strength in [0, 1]")
    for value in strengths:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"--strengths takes numbers in [0, 1], got {value!r}")
    return sorted({float(value) for value in strengths})


def default_keep_set(base_model: str, keep_images: int = GENERIC_KEEP_IMAGES) -> KeepSet:
    """The keep set of a base without ``--keep_data``: the generic one for ``convlora-tiny``, else an error.

    Args:
        base_model: the base the fine-tune started from.
        keep_images: images of the generic keep set.

    >>> default_keep_set("convlora-tiny", 2).name
    'generic'
    """
    if base_model in EMBEDDED_MODELS:
        return generic_keep_set(keep_images, size=int(BASE_ARCHITECTURE["image_size"]))
    raise ValueError(
        f"--keep_data is required: the base model {base_model!r} has no built-in keep set (only convlora-tiny, "
        "pretrained on convlora's generic objects, has one); give a labelled folder of images the base should "
        "still segment"
    )


def _base_name(model_path: str | Path, base_model: str | None) -> str | None:
    if base_model is not None:
        return base_model
    if (Path(model_path) / TASK_FILE).is_file():
        return TaskInfo.read(model_path).base_model
    return None


def _target(
    model: torch.nn.Module, dataset: SegmentationDataset, task: TaskInfo, prompt: str, batch_size: int
) -> dict[str, float]:
    if prompt == "none":
        return evaluate_split(model, dataset, task, None, batch_size=batch_size)
    object_kind = object_kind_of(task.mode)  # instance maps: one object per id
    return evaluate_prompted(model, dataset, PromptConfig(kind=prompt), object_kind=object_kind)


def _finite(value: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has no such numbers), inside dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def tradeoff(
    model_path: str | Path,
    data: str | Path,
    output_dir: str | Path,
    *,
    keep_data: str | Path | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    base_model: str | None = None,
    metric: str | None = None,
    split: str | None = "auto",
    prompt: str | None = None,
    min_retention: float = DEFAULT_MIN_RETENTION,
    keep_images: int | None = None,
    num_clicks: int = DEFAULT_CLICKS,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Sweep a fine-tune's strength: target metric on ``data``, retention on the keep set; write the folder.

    Args:
        model_path: a trained LoRA / Conv-LoRA adapter folder (``RUN/adapter``).
        data: the labelled target data (its ``val`` split when it has one, see ``split``).
        output_dir: a new or empty folder, or a trade-off folder convlora wrote (replaced whole).
        keep_data: a labelled folder of what the base should keep segmenting; by default the generic keep
            set when the base is the embedded ``convlora-tiny`` (required otherwise).
        strengths: the strengths, in [0, 1].
        base_model: see :meth:`~convlora.inference.Segmenter.from_pretrained`.
        metric: the target metric (by default the task's main metric, e.g. ``s_measure`` for polyps).
        split: the split of ``data``: ``"auto"`` (``val``, else ``test``, else every sample), a name, or ``None``.
        prompt: score the target prompted (``box``, ``point``, ``box_point``) or ``"none"``; by default as the
            model was trained (``mixed`` scores boxes).
        min_retention: the bound of the selection rule that names a strength (see
            :func:`~convlora.evaluation.retention.choose_checkpoint`).
        keep_images: at most this many keep images (the generic set: 32 by default; a folder: all).
        num_clicks: clicks of the ``clicks`` protocol.
        batch_size: images per forward pass of the prompt-free target evaluation.
        device: where to run (CUDA when available by default).

    Returns:
        what ``tradeoff.json`` holds: the settings, ``base_keep_scores``, one row per strength (``strength``,
        the metric, ``retention`` (the mean ratio), ``retention_by_protocol``, ``keep_scores``, ``target``:
        every target metric) and ``choice`` (the strength the selection rule names and why).
    """
    strengths = check_strengths(strengths)
    check_apart(
        output_dir, {"--model": model_path, "--data": data, "--keep_data": keep_data, "--base-model": base_model}
    )
    check_owned(output_dir, "tradeoff", option="--output")
    base_name = _base_name(model_path, base_model)
    if keep_data is not None:
        keep = keep_set_from_folder(keep_data, max_images=keep_images)
    elif base_name is None:
        raise ValueError(f"--keep_data is required: {model_path} does not record its base model (give --base-model)")
    else:
        keep = default_keep_set(base_name, keep_images or GENERIC_KEEP_IMAGES)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, task = load_trained(model_path, base_model=base_model)
    model = model.to(device).eval()
    set_strength(model, task, 0.0)  # refuses, before any work, a method without a base to return to
    report = check_dataset(data, mode=task.mode, num_classes=task.num_classes, reading=task.image_reading)
    chosen_split = pick_split(report, split)
    dataset = SegmentationDataset.from_report(
        report, chosen_split, image_size=task.image_size, input_format=family_of(model).input_format
    )
    if prompt is None:
        prompt = {"mixed": "box"}.get(task.prompt, task.prompt)
    metric = metric or default_metric(task.mode, report.domain if task.mode == "binary" else None).name
    higher = higher_is_better(metric)
    clicks = {"num_clicks": num_clicks, "mask_input": default_mask_input(base_name)}
    base_scores = prompted_quality(model, keep, **clicks)  # strength 0 is SAM's own model
    rows: list[dict[str, Any]] = []
    for strength in strengths:
        set_strength(model, task, strength)
        target = _target(model, dataset, task, prompt, batch_size)
        if metric not in target:
            raise ValueError(f"--metric {metric!r} is not computed for this task; available: {sorted(target)}")
        kept = retention(model, base_scores, keep, **clicks) if strength else retention_at_zero(base_scores)
        rows.append(
            {
                "strength": strength,
                metric: target[metric],
                "retention": kept["mean"],
                "retention_by_protocol": {p: kept[p] for p in PROTOCOLS},
                "keep_scores": kept["model"],
                "target": target,
            }
        )
    choice = choose_checkpoint(rows, metric, higher, min_retention, what="strengths")
    result = _finite(
        {
            "model": str(model_path),
            "method": task.method,
            "base_model": base_name,
            "data": str(data),
            "split": chosen_split or "all",
            "images": len(dataset),
            "prompt": prompt,
            "metric": metric,
            "higher_is_better": higher,
            "keep_set": {**keep.summary(), "objects": int(base_scores["objects"])},
            "protocols": list(PROTOCOLS),
            "num_clicks": num_clicks,
            "mask_input": clicks["mask_input"] is not False,
            "min_retention": min_retention,
            "base_keep_scores": base_scores,
            "rows": rows,
            "choice": {"strength": choice.entry["strength"], "reason": choice.reason, "met_bound": choice.met_bound},
        }
    )
    with atomic_dir(output_dir, "tradeoff", option="--output") as tmp:
        write_json(tmp / "tradeoff.json", result)
        (tmp / "tradeoff.md").write_text(tradeoff_markdown(result))
        plot_tradeoff(result, tmp / "tradeoff.png")
    return result


def retention_at_zero(base_scores: dict[str, float]) -> dict[str, Any]:
    """The :func:`~convlora.evaluation.retention.retention` of strength 0: the base itself, 1 by construction.

    >>> retention_at_zero({"box": 0.7, "point": 0.6, "clicks": 0.65, "objects": 3.0})["mean"]
    1.0
    """
    return {**dict.fromkeys(PROTOCOLS, 1.0), "mean": 1.0, "model": base_scores, "base": base_scores}


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def tradeoff_markdown(result: dict[str, Any]) -> str:
    """The table of ``tradeoff.md``: one row per strength, then the strength the selection rule names.

    >>> row = {"strength": 0.0, "iou": 0.5, "retention": 1.0, "retention_by_protocol": {"box": 1.0, "point": 1.0,
    ...        "clicks": 1.0}}
    >>> print(tradeoff_markdown({"model": "m", "data": "d", "split": "val", "images": 2, "metric": "iou",
    ...     "keep_set": {"name": "generic", "description": "x", "objects": 5}, "num_clicks": 3, "rows": [row],
    ...     "choice": {"reason": "strength 0: ..."}}).splitlines()[-3])
    | 0 | 0.5000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |
    """
    metric, keep = result["metric"], result["keep_set"]
    lines = [
        f"# Strength trade-off of {result['model']}",
        "",
        f"- target: `{metric}` on {result['data']} ({result['split']} split, {result['images']} images)",
        f"- keep set `{keep['name']}`: {keep['description']}; {keep['objects']} objects",
        f"- retention: the model's mean per-object IoU on the keep set divided by the base's (strength 0), "
        f"prompted by one box, one centre point and {result['num_clicks']} correction clicks per object",
        "",
        f"| strength | {metric} | retention (mean) | box | point | clicks |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        by = row["retention_by_protocol"]
        cells = [f"{row['strength']:g}", _number(row[metric]), _number(row["retention"])]
        cells += [_number(by.get(p)) for p in PROTOCOLS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Chosen: {result['choice']['reason']}"]
    return "\n".join(lines) + "\n"


def plot_tradeoff(result: dict[str, Any], path: str | Path) -> None:
    """``tradeoff.png``: the target metric against retention, each point labelled with its strength.

    Args:
        result: what :func:`tradeoff` returns.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    rows = [r for r in result["rows"] if r["retention"] is not None and r[metric] is not None]
    figure, axes = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    x = [r["retention"] for r in rows]
    y = [r[metric] for r in rows]
    axes.plot(x, y, "-o", color="teal")
    for row in rows:
        axes.annotate(
            f"{row['strength']:g}", (row["retention"], row[metric]), textcoords="offset points", xytext=(5, 5)
        )
    chosen = result["choice"]["strength"]
    axes.scatter(
        [r["retention"] for r in rows if r["strength"] == chosen],
        [r[metric] for r in rows if r["strength"] == chosen],
        s=160, facecolors="none", edgecolors="darkorange", linewidths=2, label=f"chosen: strength {chosen:g}",
    )  # fmt: skip
    axes.axvline(result["min_retention"], color="grey", linestyle=":", label=f"retention {result['min_retention']:g}")
    axes.set_xlabel(f"retention on {result['keep_set']['name']} (fine-tune / base prompted IoU)")
    axes.set_ylabel(f"{metric} on {Path(result['data']).name}")
    axes.set_title("Strength trade-off (points: strength)")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
