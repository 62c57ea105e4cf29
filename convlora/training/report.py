"""What a run shows a person: curves, overlay grids and the model card of the exported model."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from .._io import atomic_file
from ..artifact.methods import METHODS
from ..instances.decoder import ids_from_logits
from ..instances.model import has_instance_head, instance_logits
from ..models import segmentation_logits
from ..models.processing import logits_to_mask, overlay


def _subplots(rows: int, columns: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
    """A figure and its axes, drawn off-screen without pyplot (no global backend switch)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _figure_to_png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())


def plot_curves(progress: dict[str, Any], path: str | Path) -> None:
    """Training loss per logged step and validation metrics per evaluation, side by side, as a PNG.

    A run that measured retention gets a third panel: retention per evaluation (the mean and each protocol,
    on the keep set and on the validation objects), the base's level (1) and the kept checkpoint
    (``progress["selection"]``, see :func:`~convlora.training.retention_monitor.selection_record`).
    """
    history = progress.get("history", [])
    kept_keys = [k for k in (history[0] if history else {}) if k.startswith("retention")]
    figure, axes = _subplots(1, 3 if kept_keys else 2, figsize=(15 if kept_keys else 10, 3.6))
    loss_ax, metric_ax = axes[0], axes[1]
    losses = progress.get("train_loss", [])
    if losses:
        steps = [entry["step"] for entry in losses]
        loss_ax.plot(steps, [entry["loss"] for entry in losses], label="total")
        loss_ax.plot(steps, [entry["task"] for entry in losses], label="task", alpha=0.7)
        loss_ax.legend()
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    best = progress.get("best", {})
    main = best.get("metric")
    if history:
        steps = [entry["step"] for entry in history]
        # the main metric, plus other metrics on the same scale (fractions, or percentages for BER)
        main_is_fraction = all(abs(entry.get(main, 0.0)) <= 1.0 for entry in history)
        others = [
            k
            for k in history[0]
            if k not in ("epoch", "step", main)
            and "/" not in k
            and not k.startswith(("ber_", "retention"))
            and all(abs(entry[k]) <= 1.0 for entry in history) == main_is_fraction
        ]
        names = [main, *others[:5]]
        for name in names:
            values = [entry.get(name, float("nan")) for entry in history]
            metric_ax.plot(steps, values, marker="o", label=name, linewidth=2.5 if name == main else 1.0)
        metric_ax.legend(fontsize=7)
    value = best.get("value")
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    chosen = "best" if (progress.get("selection") or {}).get("rule", "best") == "best" else "kept"
    metric_ax.set(xlabel="optimizer step", title=f"validation ({chosen} {main}: {shown})")
    if kept_keys:
        _plot_retention(axes[2], history, kept_keys, progress.get("selection") or {})
    _figure_to_png(figure, Path(path))


def _plot_retention(axes: Any, history: list[dict[str, Any]], keys: list[str], selection: dict[str, Any]) -> None:
    """Retention per evaluation: the means bold, each protocol thin; the base's level and the kept checkpoint."""
    steps = [entry["step"] for entry in history]
    for key in keys:
        values = [entry.get(key, float("nan")) for entry in history]
        mean = "/" not in key
        axes.plot(steps, values, marker="o" if mean else None, label=key, linewidth=2.5 if mean else 0.8,
                  linestyle="-" if mean else "--")  # fmt: skip
    axes.axhline(1.0, color="grey", linewidth=0.8)
    if selection.get("min_retention") is not None and selection["min_retention"] <= 2:  # else off the scale
        bound = selection["min_retention"]
        axes.axhline(bound, color="grey", linestyle=":", label=f"min_retention {bound:g}")
    if selection.get("step") is not None:
        axes.axvline(selection["step"], color="darkorange", linewidth=1.0, label=f"kept (epoch {selection['epoch']})")
    axes.legend(fontsize=7)
    axes.set(xlabel="optimizer step", title="retention (model / base prompted IoU)")


@torch.no_grad()
def predict_masks(model: nn.Module, dataset: Any, indices: list[int]) -> list[np.ndarray]:
    """Class-id masks at each image's original size (binary: 0/1) for some samples of a dataset."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    masks = []
    for index in indices:
        pixel_values = dataset[index]["pixel_values"].unsqueeze(0).to(device)
        if has_instance_head(model):  # one colour per object, as the watershed splits them
            logits = instance_logits(model, pixel_values).float().cpu()
            masks.append(ids_from_logits(logits, dataset.resize_info(index)))
            continue
        logits = dataset.postprocess(segmentation_logits(model, pixel_values).float().cpu(), index)
        masks.append(logits_to_mask(logits)[0].numpy())
    model.train(was_training)
    return masks


def save_overlay_grid(model: nn.Module, dataset: Any, path: str | Path, count: int = 8) -> None:
    """A PNG grid of validation samples: image, ground truth overlay, prediction overlay."""
    indices = list(range(min(count, len(dataset))))
    if not indices:
        return
    predictions = predict_masks(model, dataset, indices)
    figure, axes = _subplots(len(indices), 3, figsize=(7.5, 2.5 * len(indices)), squeeze=False)
    for row, (index, prediction) in enumerate(zip(indices, predictions, strict=True)):
        image = dataset.original_image(index)
        truth = dataset.original_mask(index)
        panels = [image, overlay(image, truth), overlay(image, prediction)]
        for col, (panel, title) in enumerate(zip(panels, ["image", "ground truth", "prediction"], strict=True)):
            axes[row][col].imshow(panel)
            axes[row][col].set_axis_off()
            if row == 0:
                axes[row][col].set_title(title)
    _figure_to_png(figure, Path(path))


# a fine-tuned model inherits its base model's licence; these bases are Apache-2.0
_APACHE_BASES = ("facebook/sam-", "convlora-")


def card_metadata(task: Any, *, domain: str | None = None, license: str | None = None) -> dict[str, Any]:
    """The Hugging Face Hub metadata of an exported model, written as the YAML header of its model card.

    Args:
        task: the exported model's :class:`~convlora.artifact.TaskInfo`.
        domain: what the data shows (``"polyp"``, ``"aerial"`` ...), added to the tags.
        license: the model's licence id; the base model's (Apache-2.0 for SAM and convlora's bases) or
            ``"unknown"`` when unset.

    ``base_model`` is given only for a Hub id (an embedded name or a local folder is no Hub model).

    >>> from convlora.artifact import TaskInfo
    >>> meta = card_metadata(TaskInfo("binary", 2, ["bg", "polyp"], 256, "facebook/sam-vit-base", "conv_lora"))
    >>> meta["library_name"], meta["base_model"], meta["pipeline_tag"], meta["license"]
    ('peft', 'facebook/sam-vit-base', 'mask-generation', 'apache-2.0')
    """
    base = str(task.base_model)
    if license is None:
        license = "apache-2.0" if base.startswith(_APACHE_BASES) else "unknown"
    method = METHODS.get(task.method)
    tags = [*(method.card_tags if method else ()), "segment-anything", "sam", "image-segmentation", "convlora"]
    tags.append("binary-segmentation" if task.mode == "binary" else "semantic-segmentation")
    if domain:
        tags.append(domain)
    meta: dict[str, Any] = {}
    if method is not None and method.library is not None:
        meta["library_name"] = method.library
    if _is_hub_id(base):
        meta["base_model"] = base
    meta |= {"license": license, "pipeline_tag": "mask-generation", "tags": list(dict.fromkeys(tags))}
    return meta


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists() and not name.startswith((".", "~"))


def _front_matter(meta: dict[str, Any]) -> str:
    # JSON strings and lists are valid YAML flow values: no YAML writer needed, and nothing to escape by hand
    lines = [f"{key}: {json.dumps(value)}" for key, value in meta.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n"


def _retention_section(retention: dict[str, float], selection: str | None) -> str:
    """The model card's section on what the model kept of SAM's prompted skill, and why it was chosen."""
    if not retention and not selection:
        return ""
    lines = ["", "## Retention of SAM's prompted skill", ""]
    if retention:
        lines += [
            "Prompted mean per-object IoU of this model divided by the base model's (1: nothing forgotten), one box, "
            "one point and three clicks per object:",
            "",
            "| keep set | mean | box | point | clicks |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, name in (("retention", "keep set"), ("retention_val", "validation objects")):
            if key in retention:
                protocols = (retention.get(f"{key}/{p}", float("nan")) for p in ("box", "point", "clicks"))
                cells = [retention[key], *protocols]
                lines.append(f"| {name} | " + " | ".join(f"{value:.4f}" for value in cells) + " |")
        lines.append("")
    if selection:
        lines += [f"Kept: {selection}", ""]
    return "\n".join(lines)


def model_card(
    task: Any,
    config: Any,
    scores: dict[str, float],
    *,
    domain: str | None = None,
    license: str | None = None,
    retention: dict[str, float] | None = None,
    selection: str | None = None,
) -> str:
    """The README.md written beside an exported model: Hub metadata header, what it is, its metrics, how to use it.

    Args:
        task: the exported model's :class:`~convlora.artifact.TaskInfo`.
        config: the run's (resolved) :class:`~convlora.training.config.TrainConfig`.
        scores: validation metrics of the exported model.
        domain: what the data shows, added to the Hub tags.
        license: the model's licence id (see :func:`card_metadata`).
        retention: the model's retention at its evaluation (``retention``, ``retention/box`` ...,
            ``retention_val`` ...), shown in a section of its own.
        selection: why this evaluation's model was kept (the selection rule's reason).

    >>> from types import SimpleNamespace
    >>> from convlora.artifact import TaskInfo
    >>> task = TaskInfo("binary", 2, ["bg", "polyp"], 64, "convlora-tiny", "conv_lora")
    >>> card = model_card(task, SimpleNamespace(data="data/polyp", epochs=3, lr=2e-3, seed=0), {"iou": 0.5})
    >>> card.splitlines()[:3]
    ['---', 'library_name: "peft"', 'license: "apache-2.0"']
    """
    metric_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in scores.items())
    kept = _retention_section(retention or {}, selection)
    classes = ", ".join(f"{i}: {name}" for i, name in enumerate(task.class_names))
    load = (
        "from convlora import load_trained\n"
        'model, task = load_trained("path/to/this/folder")\n'
        "logits = model(pixel_values=pixel_values).pred_masks[:, 0]"
    )
    peft_note = ""
    if METHODS[task.method].uses_adapter:
        peft_note = (
            "\nThe folder is a regular PEFT adapter. With stock PEFT"
            + (", `import convlora` first (it registers the Conv-LoRA method)," if task.method == "conv_lora" else ",")
            + " prepare the base model as convlora does (image size"
            + (", class decoder" if task.mode == "multiclass" else "")
            + "), then `PeftModel.from_pretrained(base, folder)`"
            + ("" if task.mode == "multiclass" else ", or transformers' `base.load_adapter(folder)`")
            + ".\n"
        )
    return (
        _front_matter(card_metadata(task, domain=domain, license=license))
        + f"""# convlora fine-tuned SAM

- Base model: `{task.base_model}`
- Method: `{task.method}`
- Task: {task.mode} segmentation, classes {classes}
- Input size: {task.image_size} x {task.image_size}, prompt-free
- Trained on: `{config.data}` ({config.epochs} epochs, lr {config.lr}, seed {config.seed})

## Validation metrics (at the original image resolution)

| metric | value |
|---|---:|
{metric_rows}
{kept}
## Use

```python
{load}
```

or from the command line: `convlora predict --model path/to/this/folder --images DIR --output OUT`.
{peft_note}"""
    )
