"""What a run shows a person: curves, overlay grids and the model card of the exported model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_file
from .methods import METHODS


def _subplots(rows: int, columns: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
    """A figure and its axes, drawn off-screen without pyplot (no global backend switch)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _figure_to_png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())


def plot_curves(progress: dict[str, Any], path: str | Path) -> None:
    """Training loss per logged step and validation metrics per evaluation, side by side, as a PNG."""
    figure, (loss_ax, metric_ax) = _subplots(1, 2, figsize=(10, 3.6))
    losses = progress.get("train_loss", [])
    if losses:
        steps = [entry["step"] for entry in losses]
        loss_ax.plot(steps, [entry["loss"] for entry in losses], label="total")
        loss_ax.plot(steps, [entry["task"] for entry in losses], label="task", alpha=0.7)
        loss_ax.legend()
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    history = progress.get("history", [])
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
            and not k.startswith("ber_")
            and all(abs(entry[k]) <= 1.0 for entry in history) == main_is_fraction
        ]
        names = [main, *others[:5]]
        for name in names:
            values = [entry.get(name, float("nan")) for entry in history]
            metric_ax.plot(steps, values, marker="o", label=name, linewidth=2.5 if name == main else 1.0)
        metric_ax.legend(fontsize=7)
    value = best.get("value")
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    metric_ax.set(xlabel="optimizer step", title=f"validation (best {main}: {shown})")
    _figure_to_png(figure, Path(path))


@torch.no_grad()
def predict_masks(model: nn.Module, dataset: Any, indices: list[int]) -> list[np.ndarray]:
    """Class-id masks at each image's original size (binary: 0/1) for some samples of a dataset."""
    from ..models import segmentation_logits

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    masks = []
    for index in indices:
        pixel_values = dataset[index]["pixel_values"].unsqueeze(0).to(device)
        logits = dataset.postprocess(segmentation_logits(model, pixel_values).float().cpu(), index)
        masks.append(logits_to_mask(logits)[0].numpy())
    model.train(was_training)
    return masks


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """``(b, 1, h, w)`` binary logits → 0/1; ``(b, k, h, w)`` class logits → class ids. Returns ``(b, h, w)``."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def save_overlay_grid(model: nn.Module, dataset: Any, path: str | Path, count: int = 8) -> None:
    """A PNG grid of validation samples: image, ground truth overlay, prediction overlay."""
    from ..models.processing import overlay

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


def model_card(task: Any, config: Any, scores: dict[str, float]) -> str:
    """The README.md written beside an exported model."""
    metric_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in scores.items())
    classes = ", ".join(f"{i}: {name}" for i, name in enumerate(task.class_names))
    load = (
        "from convlora import load_trained\n"
        'model, task = load_trained("path/to/this/folder")\n'
        "logits = model(pixel_values=pixel_values).pred_masks[:, 0]"
    )
    peft_note = ""
    if METHODS[task.method].uses_adapter:
        peft_note = (
            "\nThe folder is a regular PEFT adapter. With stock PEFT, `import convlora` first (it registers the "
            "Conv-LoRA method), prepare the base model as convlora does (image size"
            + (", class decoder" if task.mode == "multiclass" else "")
            + "), then `PeftModel.from_pretrained(base, folder)`.\n"
        )
    return f"""# convlora fine-tuned SAM

- Base model: `{task.base_model}`
- Method: `{task.method}`
- Task: {task.mode} segmentation, classes {classes}
- Input size: {task.image_size} x {task.image_size}, prompt-free
- Trained on: `{config.data}` ({config.epochs} epochs, lr {config.lr}, seed {config.seed})

## Validation metrics (at the original image resolution)

| metric | value |
|---|---:|
{metric_rows}

## Use

```python
{load}
```

or from the command line: `convlora predict --model path/to/this/folder --images DIR --output OUT`.
{peft_note}"""
