"""Using a trained model: segment images at their original resolution, evaluate, predict a folder, merge.

>>> from convlora import Segmenter
>>> segmenter = Segmenter.from_pretrained("runs/polyp/adapter")  # doctest: +SKIP
>>> mask = segmenter.predict("image.jpg")  # (h, w) class ids at the image's own size  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_dir, write_json
from .models import segmentation_logits
from .models.processing import overlay, postprocess_masks, preprocess, save_mask_png
from .training.artifact import TaskInfo, load_trained
from .training.methods import METHODS
from .training.report import logits_to_mask


@dataclass
class Segmenter:
    """A trained model with its pre- and post-processing: images in, masks out, no prompts.

    Args:
        model: the trained model (``load_trained`` gives one).
        task: what it segments.
        device: where to run it.
    """

    model: nn.Module
    task: TaskInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, base_model: str | None = None, device: str | torch.device | None = None
    ) -> Segmenter:
        """Load the ``adapter/`` folder of a run (any method) or a merged model folder, in one call.

        Args:
            path: the folder.
            base_model: SAM checkpoint to put the adapter on, if not the one recorded at training time.
            device: ``"cpu"``, ``"cuda"``...; CUDA when available by default.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, task = load_trained(path, base_model=base_model)
        return cls(model.to(device).eval(), task, device)

    @torch.no_grad()
    def predict_logits(self, image: np.ndarray | str | Path) -> torch.Tensor:
        """Logits ``(k, h, w)`` at the image's original size (``k = 1`` for binary tasks)."""
        from .data import read_image

        pixels = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        pixel_values, info = preprocess(pixels, self.task.image_size)
        logits = segmentation_logits(self.model, pixel_values.unsqueeze(0).to(self.device))
        return postprocess_masks(logits.float().cpu(), info)[0]

    def predict_proba(self, image: np.ndarray | str | Path) -> np.ndarray:
        """Probabilities ``(k, h, w)``: foreground probability (binary) or class probabilities."""
        logits = self.predict_logits(image)
        probs = logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(dim=0)
        return probs.numpy()

    def predict(self, image: np.ndarray | str | Path) -> np.ndarray:
        """Class ids ``(h, w)`` at the image's original size (binary: 0/1)."""
        return logits_to_mask(self.predict_logits(image).unsqueeze(0))[0].numpy().astype(np.uint8)


def evaluate(
    model_path: str | Path, data: str | Path, *, base_model: str | None = None, batch_size: int = 4
) -> dict[str, float]:
    """Metrics of a trained model on a labelled dataset folder or CSV (every image, original resolution).

    Args:
        model_path: the trained model folder.
        data: the labelled data (its ``test/`` split when it has one, else every sample).
        base_model: see :meth:`Segmenter.from_pretrained`.
        batch_size: images per forward pass.
    """
    from .data import SegmentationDataset, check_dataset
    from .training.evaluate import evaluate_split

    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model)
    task = segmenter.task
    report = check_dataset(data, mode=task.mode, num_classes=task.num_classes)
    split = "test" if "test" in report.samples else None
    dataset = SegmentationDataset.from_report(report, split, image_size=task.image_size)
    return evaluate_split(segmenter.model, dataset, task, None, batch_size=batch_size)


def predict_folder(
    model_path: str | Path,
    images: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    overlays: bool = True,
) -> dict[str, Any]:
    """Segment every image of a folder; write mask PNGs (and overlays) at each image's original size.

    Masks are written to ``OUTPUT/masks/<stem>.png`` (binary: 0/255; multi-class: class ids), overlays to
    ``OUTPUT/overlays/<stem>.png``, and ``OUTPUT/predictions.json`` lists what was done.

    Args:
        model_path: the trained model folder.
        images: a folder of images (ground truth not needed) or a CSV with an ``image`` column.
        output_dir: where to write.
        base_model: see :meth:`Segmenter.from_pretrained`.
        overlays: also write coloured overlays.
    """
    from .data import check_dataset, read_image

    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model)
    report = check_dataset(images)
    paths = [Path(sample.image) for sample in report.usable_samples()]
    binary = segmenter.task.mode == "binary"
    output_dir = Path(output_dir)
    records = []
    with atomic_dir(output_dir) as tmp:
        for path in paths:
            image = read_image(path)
            mask = segmenter.predict(image)
            save_mask_png(mask, tmp / "masks" / f"{path.stem}.png", binary=binary)
            if overlays:
                from PIL import Image

                (tmp / "overlays").mkdir(exist_ok=True)
                Image.fromarray(overlay(image, mask)).save(tmp / "overlays" / f"{path.stem}.png")
            fractions = np.bincount(mask.ravel(), minlength=segmenter.task.num_classes) / mask.size
            records.append({"image": str(path), "size": list(mask.shape), "class_fractions": fractions.tolist()})
        write_json(
            tmp / "predictions.json", {"model": str(model_path), "task": segmenter.task.to_dict(), "images": records}
        )
    return {"count": len(records), "output_dir": str(output_dir)}


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
    from .models.merged_io import merged_extra_parameters, write_merged
    from .training.artifact import load_trained, write_task_file

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
