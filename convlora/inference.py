"""Using a trained model: segment images at their original resolution, evaluate, predict a folder, merge.

Prompt-free, a fine-tune gives its task's masks; with boxes or points any binary fine-tune (prompted or
not) and the base SAM itself give one mask per prompt, the image encoded once for all of them. Images far
larger than the model's input can be segmented tile by tile (``tile`` / ``overlap``).

>>> from convlora import Segmenter
>>> segmenter = Segmenter.from_pretrained("runs/polyp/adapter")  # doctest: +SKIP
>>> mask = segmenter.predict("image.jpg")  # (h, w) class ids at the image's own size  # doctest: +SKIP
>>> masks = segmenter.predict("image.jpg", boxes=[[40, 30, 200, 180]])  # (1, h, w), one per box  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ._io import atomic_dir, write_json
from .data import SegmentationDataset, check_dataset, read_image, read_image_size, to_rgb8
from .data.prompt_files import build_prompts, load_prompts
from .data.prompts import PAD_LABEL, PromptConfig
from .models import family_of, load_sam, segmentation_logits
from .models.merged_io import merged_extra_parameters, write_merged
from .models.processing import PALETTE, InputFormat, overlay, postprocess_masks, preprocess, save_mask_png
from .training.artifact import TASK_FILE, TaskInfo, load_trained, write_task_file
from .training.evaluate import evaluate_split
from .training.methods import METHODS
from .training.metrics import build_metrics
from .training.prompted import evaluate_prompted, predict_prompts
from .training.report import logits_to_mask

ImageInput = np.ndarray | str | Path


@dataclass
class Segmenter:
    """A trained (or base) model with its pre- and post-processing: images (and prompts) in, masks out.

    Args:
        model: the model (``load_trained`` or ``load_sam`` gives one).
        task: what it segments.
        device: where to run it.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    >>> segmenter.predict(np.zeros((40, 50, 3), np.uint8), boxes=[[5, 5, 30, 20], [0, 0, 49, 39]]).shape
    (2, 40, 50)
    """

    model: nn.Module
    task: TaskInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        base_model: str | None = None,
        device: str | torch.device | None = None,
    ) -> Segmenter:
        """Load a run's ``adapter/`` folder (any method), a merged model, or a plain SAM for prompting.

        A folder without ``convlora_task.json`` (a SAM checkpoint directory), an embedded name such as
        ``"convlora-tiny"`` or a hub id gives the base SAM as a binary segmenter: meant for prompts (the
        vanilla side of a vanilla-vs-fine-tuned comparison).

        Args:
            path: the folder or name.
            base_model: SAM checkpoint to put the adapter on, if not the one recorded at training time.
            device: ``"cpu"``, ``"cuda"``...; CUDA when available by default.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (Path(path) / TASK_FILE).is_file():
            model, task = load_trained(path, base_model=base_model)
        else:
            model = load_sam(path)
            task = base_task(family_of(model).image_size(model), str(path))
        return cls(model.to(device).eval(), task, device)

    @property
    def input_format(self) -> InputFormat:
        """How this model's family wants its images normalised and fitted (see ``ModelFamily.input_format``)."""
        return family_of(self.model).input_format

    def _pixels(self, image: ImageInput) -> np.ndarray:
        if isinstance(image, (str, Path)):
            return read_image(image, self.task.image_reading)
        pixels = np.asarray(image)
        is_rgb8 = pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3
        return pixels if is_rgb8 else to_rgb8(pixels, self.task.image_reading)

    @torch.no_grad()
    def _whole_logits(self, pixels: np.ndarray) -> torch.Tensor:
        pixel_values, info = preprocess(pixels, self.task.image_size, self.input_format)
        logits = segmentation_logits(self.model, pixel_values.unsqueeze(0).to(self.device))
        return postprocess_masks(logits.float().cpu(), info)[0]

    @torch.no_grad()
    def predict_logits(self, image: ImageInput, *, tile: int | None = None, overlap: int = 0) -> torch.Tensor:
        """Prompt-free logits ``(k, h, w)`` at the image's original size (``k = 1`` for binary tasks).

        Args:
            image: a path or a uint8 ``(h, w, 3)`` RGB array.
            tile: segment in ``tile x tile`` windows of the original image (see :func:`tiled_logits`) instead
                of shrinking the whole image to the model's input; ``None``: whole image.
            overlap: pixels shared by neighbouring windows, blended smoothly.
        """
        pixels = self._pixels(image)
        if tile is None:
            return self._whole_logits(pixels)
        return tiled_logits(self._whole_logits, pixels, tile, overlap)

    def predict_proba(self, image: ImageInput, *, tile: int | None = None, overlap: int = 0) -> np.ndarray:
        """Probabilities ``(k, h, w)``: foreground probability (binary) or class probabilities."""
        logits = self.predict_logits(image, tile=tile, overlap=overlap)
        probs = logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(dim=0)
        return probs.numpy()

    @torch.no_grad()
    def predict_prompted(
        self, image: ImageInput, prompts: Any, *, multimask: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(n, h, w)`` and IoU estimates ``(n,)`` for checked :class:`~convlora.data.prompts.Prompts`.

        The image encoder runs once for all ``n`` prompts.

        Args:
            image: a path or a uint8 ``(h, w, 3)`` RGB array.
            prompts: prompts in the image's original pixels (see :func:`~convlora.data.build_prompts`).
            multimask: see :meth:`predict`.
        """

        pixels = self._pixels(image)
        pixel_values, info = preprocess(pixels, self.task.image_size, self.input_format)
        return predict_prompts(self.model, pixel_values.to(self.device), info, prompts, multimask=multimask)

    def predict(
        self,
        image: ImageInput,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Any] | None = None,
        point_labels: Sequence[Any] | None = None,
        *,
        multimask: bool | None = None,
        return_scores: bool = False,
        tile: int | None = None,
        overlap: int = 0,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Masks at the image's original size: prompt-free class ids, or one mask per prompt.

        Without prompts: class ids ``(h, w)`` (binary: 0/1). With prompts: bool ``(n, h, w)``, one mask per
        prompt; coordinates are in the original image's pixels. See :mod:`convlora.data.prompt_files`
        for how boxes and points combine into prompts.

        Args:
            image: a path or a uint8 ``(h, w, 3)`` RGB array.
            boxes: ``[[x0, y0, x1, y1], ...]``, one prompt each.
            points: ``[[x, y], ...]`` (one prompt of all these points) or a list of such lists (one each).
            point_labels: 1 (on the object) or 0 (not on it) per point; all 1 by default.
            multimask: SAM's three masks per prompt, keeping the best rated; by default only for prompts that
                are a single point (ambiguous), as SAM's predictor does.
            return_scores: also return the model's IoU estimate of each mask ``(n,)`` (prompted only).
            tile: prompt-free only: segment in windows of this size (see :meth:`predict_logits`).
            overlap: pixels shared by neighbouring windows.
        """
        prompted = any(value is not None and len(value) > 0 for value in (boxes, points))
        if not prompted:
            if point_labels is not None and len(point_labels) > 0:
                raise ValueError("predict: point_labels given without points")
            logits = self.predict_logits(image, tile=tile, overlap=overlap)
            if logits.shape[0] == 1:  # binary: no int64 map of the (possibly huge) image
                return (logits[0] > 0).numpy().astype(np.uint8)
            return logits_to_mask(logits.unsqueeze(0))[0].numpy().astype(np.uint8)
        if tile is not None:
            raise ValueError("predict: tile is for prompt-free prediction; prompts already say where to look")

        pixels = self._pixels(image)
        prompts = build_prompts(boxes, points, point_labels, image_size=pixels.shape[:2], source="predict")
        logits, scores = self.predict_prompted(pixels, prompts, multimask=multimask)
        masks = (logits > 0).numpy()
        return (masks, scores.numpy()) if return_scores else masks


def base_task(image_size: int, name: str) -> TaskInfo:
    """The :class:`TaskInfo` of a base SAM used as is: binary, one object class, method ``"base"``.

    >>> base_task(1024, "facebook/sam-vit-base").method
    'base'
    """
    return TaskInfo(
        mode="binary",
        num_classes=2,
        class_names=["background", "object"],
        image_size=int(image_size),
        base_model=name,
        method="base",
    )


def _ramp(length: int, overlap: int, before: bool, after: bool) -> torch.Tensor:
    """1-d window weight: rises smoothly over ``overlap`` pixels on each side that has a neighbour."""
    weight = torch.ones(length, dtype=torch.float64)
    if overlap > 0:
        position = torch.arange(length, dtype=torch.float64) + 0.5
        rise = torch.sin(0.5 * math.pi * (position / overlap).clamp(max=1.0)) ** 2  # > 0 everywhere
        if before:
            weight = torch.minimum(weight, rise)
        if after:
            weight = torch.minimum(weight, rise.flip(0))
    return weight


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels covering ``length`` with at least ``overlap`` shared.

    >>> tile_starts(1000, 400, 100)
    [0, 300, 600]
    >>> tile_starts(300, 400, 100)
    [0]
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # spread the windows evenly so the last one ends at the border
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tiled_logits(
    predict: Callable[[np.ndarray], torch.Tensor], pixels: np.ndarray, tile: int, overlap: int = 0
) -> torch.Tensor:
    """Sliding-window logits of a large image, blended where windows overlap.

    Each ``tile x tile`` window (smaller at a small image side) is predicted on its own at the model's input
    size, so memory beyond the output map is bounded by the window. Overlaps are averaged with a smooth
    weight that rises from the window's inner edges (sin^2 over ``overlap`` pixels), so seams do not show.
    An image that fits one window gives exactly the whole-image prediction.

    Args:
        predict: window pixels ``(th, tw, 3)`` -> logits ``(k, th, tw)`` at the window's size.
        pixels: uint8 ``(h, w, 3)`` image.
        tile: window side in original pixels.
        overlap: pixels shared by neighbouring windows, ``0 <= overlap < tile``.

    >>> image = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
    >>> same = tiled_logits(lambda crop: torch.from_numpy(crop[..., 0]).float()[None], image, tile=16, overlap=4)
    >>> bool(torch.allclose(same[0], torch.from_numpy(image[..., 0]).float(), atol=1e-4))
    True
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer (pixels), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer in [0, tile), got {overlap!r} for tile {tile}")
    height, width = pixels.shape[:2]
    if height <= tile and width <= tile:
        return predict(pixels)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    # The window weight is a product of a row and a column weight over a grid of windows, so the summed
    # weight is the outer product of the summed row and column weights: no (h, w) weight map is kept.
    row_sum = torch.zeros(height, dtype=torch.float64)
    col_sum = torch.zeros(width, dtype=torch.float64)
    row_weights = [
        _ramp(min(height, top + tile) - top, overlap, r > 0, r < len(rows) - 1) for r, top in enumerate(rows)
    ]
    col_weights = [
        _ramp(min(width, left + tile) - left, overlap, c > 0, c < len(cols) - 1) for c, left in enumerate(cols)
    ]
    for top, weight in zip(rows, row_weights, strict=True):
        row_sum[top : top + len(weight)] += weight
    for left, weight in zip(cols, col_weights, strict=True):
        col_sum[left : left + len(weight)] += weight
    total: torch.Tensor | None = None
    for top, row_weight in zip(rows, row_weights, strict=True):
        bottom = top + len(row_weight)
        for left, col_weight in zip(cols, col_weights, strict=True):
            right = left + len(col_weight)
            window = (row_weight[:, None] * col_weight[None, :]).float()  # (th, tw)
            logits = predict(np.ascontiguousarray(pixels[top:bottom, left:right])).float()  # (k, th, tw)
            if total is None:
                total = torch.zeros(logits.shape[0], height, width, dtype=torch.float32)
            total[:, top:bottom, left:right] += logits * window
    assert total is not None
    total.div_(row_sum.float()[None, :, None]).div_(col_sum.float()[None, None, :])
    return total


def evaluate(
    model_path: str | Path,
    data: str | Path,
    *,
    base_model: str | None = None,
    batch_size: int = 4,
    tile: int | None = None,
    overlap: int = 0,
    prompt: str | None = None,
    prompt_settings: dict[str, Any] | None = None,
    compare_base: bool = False,
) -> dict[str, Any]:
    """Metrics of a trained model on a labelled dataset folder or CSV (every image, original resolution).

    Prompt-free by default. With ``prompt`` (``box``, ``point``, ``box_point``) every object of the ground
    truth is prompted with prompts derived under a fixed seed and scored per object (``object_iou``,
    ``object_dice``); ``compare_base`` scores the base SAM zero-shot under exactly the same prompts.

    Args:
        model_path: the trained model folder (or a SAM checkpoint / embedded name, for prompts).
        data: the labelled data (its ``test/`` split when it has one, else every sample).
        base_model: see :meth:`Segmenter.from_pretrained`.
        batch_size: images per forward pass (prompt-free, untiled).
        tile: prompt-free: evaluate with sliding windows of this size (see :func:`tiled_logits`).
        overlap: pixels shared by neighbouring windows.
        prompt: the prompt kind, or ``None`` for prompt-free evaluation.
        prompt_settings: fields of :class:`~convlora.data.prompts.PromptConfig` (``seed``, ``num_points``...).
        compare_base: with ``prompt``: return ``{"model": ..., "base": ...}`` metrics of both models.

    >>> evaluate("runs/polyp/adapter", "data/polyp", prompt="box", compare_base=True)  # doctest: +SKIP
    """

    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model)
    task = segmenter.task
    report = check_dataset(data, mode=task.mode, num_classes=task.num_classes, reading=task.image_reading)
    split = "test" if "test" in report.samples else None
    dataset = SegmentationDataset.from_report(
        report, split, image_size=task.image_size, input_format=segmenter.input_format
    )
    if prompt is not None and prompt != "none":
        if tile is not None:
            raise ValueError("evaluate: tile is for prompt-free evaluation, not with prompt")
        config = PromptConfig(**{**(prompt_settings or {}), "kind": prompt})
        object_kind = "classes" if task.mode == "multiclass" else "binary"
        scores = evaluate_prompted(segmenter.model, dataset, config, object_kind=object_kind)
        if not compare_base:
            return scores
        base = Segmenter.from_pretrained(base_model or task.base_model, device=segmenter.device)
        base_dataset = SegmentationDataset.from_report(
            report, split, image_size=base.task.image_size, input_format=base.input_format
        )
        return {"model": scores, "base": evaluate_prompted(base.model, base_dataset, config, object_kind=object_kind)}
    if compare_base:
        raise ValueError("evaluate: compare_base compares prompted models; give a prompt kind too")
    if tile is None:
        return evaluate_split(segmenter.model, dataset, task, None, batch_size=batch_size)
    extra = {"class_names": list(task.class_names)} if task.mode == "multiclass" else {}
    metrics = build_metrics(task.mode, task.num_classes, **extra)
    for index in range(len(dataset)):
        logits = segmenter.predict_logits(dataset.original_image(index), tile=tile, overlap=overlap)
        target = torch.as_tensor(dataset.original_mask(index)).long().unsqueeze(0)
        metrics.update(logits.unsqueeze(0), target)
    return metrics.compute()


def _draw_prompts(image: np.ndarray, masks: np.ndarray, prompts: Any) -> np.ndarray:
    """An overlay of one mask per prompt (a colour each) with its box and points drawn on top."""

    ids = np.zeros(image.shape[:2], dtype=np.int64)
    for i, mask in enumerate(masks):
        ids[mask] = i + 1
    picture = Image.fromarray(overlay(image, ids))
    draw = ImageDraw.Draw(picture)
    radius = max(2, round(max(image.shape[:2]) / 150))
    for i in range(len(masks)):
        colour = tuple(int(v) for v in PALETTE[i % len(PALETTE)])
        if prompts.boxes is not None:
            draw.rectangle([float(v) for v in prompts.boxes[i]], outline=colour, width=max(1, radius // 2))
        if prompts.points is not None:
            for (x, y), label in zip(prompts.points[i], prompts.point_labels[i], strict=True):
                if label == PAD_LABEL:
                    continue
                fill = (0, 220, 0) if label == 1 else (230, 0, 0)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
    return np.asarray(picture)


def _image_names(paths: list[Path], images: str | Path) -> dict[str, Path]:
    """Every name a prompts file may use for an image: its file name, and its path relative to the folder."""
    names: dict[str, Path] = {}
    root = Path(images)
    for path in paths:
        names.setdefault(path.name, path)
        if root.is_dir():
            with contextlib.suppress(ValueError):
                names.setdefault(path.relative_to(root).as_posix(), path)
    return names


def predict_folder(
    model_path: str | Path,
    images: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    overlays: bool = True,
    prompts: str | Path | None = None,
    tile: int | None = None,
    overlap: int = 0,
) -> dict[str, Any]:
    """Segment every image of a folder; write mask PNGs (and overlays) at each image's original size.

    Prompt-free, masks go to ``OUTPUT/masks/<stem>.png`` (binary: 0/255; multi-class: class ids). With a
    prompts file (see :mod:`convlora.data.prompt_files`) each prompt gives ``OUTPUT/masks/<stem>_<i>.png``
    (0/255, ``i`` counting the image's prompts from 0) and the overlay shows the masks with their boxes
    and points; images the file does not name are left out. Overlays go to ``OUTPUT/overlays/<stem>.png``,
    and ``OUTPUT/predictions.json`` lists what was done (scores included).

    Args:
        model_path: the trained model folder (or a SAM checkpoint / embedded name, for prompts).
        images: a folder of images (ground truth not needed) or a CSV with an ``image`` column.
        output_dir: where to write.
        base_model: see :meth:`Segmenter.from_pretrained`.
        overlays: also write coloured overlays.
        prompts: a prompts JSON or COCO file naming images of the folder.
        tile: prompt-free: segment in windows of this size (see :func:`tiled_logits`).
        overlap: pixels shared by neighbouring windows.
    """

    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model)
    report = check_dataset(images, reading=segmenter.task.image_reading)
    paths = [Path(sample.image) for sample in report.usable_samples()]
    binary = segmenter.task.mode == "binary"
    prompt_sets = None
    if prompts is not None:
        if tile is not None:
            raise ValueError("predict: --tile is for prompt-free prediction; it cannot be combined with --prompts")
        names = _image_names(paths, images)
        prompt_sets = {names[name]: entry for name, entry in load_prompts(prompts, _sizes(names)).items()}
        paths = [path for path in paths if path in prompt_sets]
    output_dir = Path(output_dir)
    records = []
    with atomic_dir(output_dir) as tmp:
        (tmp / "masks").mkdir(exist_ok=True)
        if overlays:
            (tmp / "overlays").mkdir(exist_ok=True)
        for path in paths:
            image = read_image(path, segmenter.task.image_reading)
            if prompt_sets is not None:
                entry = prompt_sets[path]
                logits, scores = segmenter.predict_prompted(image, entry)
                masks = (logits > 0).numpy()
                files = []
                for i, mask in enumerate(masks):
                    save_mask_png(mask, tmp / "masks" / f"{path.stem}_{i}.png", binary=True)
                    files.append(f"masks/{path.stem}_{i}.png")
                if overlays:
                    Image.fromarray(_draw_prompts(image, masks, entry)).save(tmp / "overlays" / f"{path.stem}.png")
                records.append(
                    {
                        "image": str(path),
                        "size": list(image.shape[:2]),
                        "prompts": len(masks),
                        "masks": files,
                        "scores": [round(float(s), 4) for s in scores],
                        "mask_fractions": [round(float(m.mean()), 6) for m in masks],
                    }
                )
                continue
            mask = segmenter.predict(image, tile=tile, overlap=overlap)
            save_mask_png(mask, tmp / "masks" / f"{path.stem}.png", binary=binary)
            if overlays:
                Image.fromarray(overlay(image, mask)).save(tmp / "overlays" / f"{path.stem}.png")
            fractions = np.bincount(mask.ravel(), minlength=segmenter.task.num_classes) / mask.size
            records.append({"image": str(path), "size": list(mask.shape), "class_fractions": fractions.tolist()})
        write_json(
            tmp / "predictions.json",
            {
                "model": str(model_path),
                "task": segmenter.task.to_dict(),
                "prompts": None if prompts is None else str(prompts),
                "tile": None if tile is None else {"tile": tile, "overlap": overlap},
                "images": records,
            },
        )
    return {"count": len(records), "output_dir": str(output_dir)}


def _sizes(names: dict[str, Path]) -> dict[str, tuple[int, int]]:
    cache: dict[Path, tuple[int, int]] = {}
    sizes = {}
    for name, path in names.items():
        if path not in cache:
            cache[path] = tuple(int(v) for v in read_image_size(path))  # type: ignore[assignment]
        sizes[name] = cache[path]
    return sizes


def merge_model(model_path: str | Path, output_dir: str | Path, *, base_model: str | None = None) -> dict[str, Any]:
    """Fold a trained LoRA / Conv-LoRA adapter into its base model and save one self-contained checkpoint.

    Conv-LoRA's linear part is folded into the weights exactly; its conv experts stay as a small frozen
    side branch (reported as ``extra_parameters``). The output loads with ``Segmenter.from_pretrained``
    and ``convlora.load_sam``.

    Args:
        model_path: the trained adapter folder.
        output_dir: where the merged model goes (replaced atomically).
        base_model: see :meth:`Segmenter.from_pretrained`.
    """

    model, task = load_trained(model_path, base_model=base_model)
    if not METHODS[task.method].uses_adapter:
        raise ValueError(f"{model_path} was trained with method {task.method!r}; only adapters can be merged")
    merged = model.merge_and_unload().eval()
    extra = merged_extra_parameters(merged)
    merged_task = TaskInfo(**{**task.to_dict(), "merged": True})
    with atomic_dir(output_dir) as tmp:
        write_merged(merged, tmp)
        write_task_file(tmp, merged_task)
    return {"output_dir": str(output_dir), "extra_parameters": extra, "method": task.method}
