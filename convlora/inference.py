"""Using a trained model: segment images at their original resolution, evaluate, predict a folder, merge.

Prompt-free, a fine-tune gives its task's masks; with boxes or points any binary fine-tune (prompted or
not) and the base SAM itself give one mask per prompt, the image encoded once for all of them. Images far
larger than the model's input can be segmented tile by tile (``tile`` / ``overlap``).

>>> from convlora import Segmenter
>>> segmenter = Segmenter.from_pretrained("runs/polyp/adapter")  # doctest: +SKIP
>>> mask = segmenter.predict("image.jpg")  # (h, w) class ids at the image's own size  # doctest: +SKIP
>>> masks = segmenter.predict("image.jpg", boxes=[[40, 30, 200, 180]])  # (1, h, w), one per box  # doctest: +SKIP
>>> masks = segmenter.predict(["a.jpg", "b.jpg"])  # a list of images: a list of masks  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from ._io import atomic_dir, atomic_file, check_apart, check_owned, owned_folder, write_json
from .artifact import TASK_FILE, TaskInfo, export_trained, load_trained, write_task_file
from .artifact.folder import write_weights
from .artifact.methods import METHODS
from .artifact.strength import set_strength
from .data import ImageReading, SegmentationDataset, check_dataset, read_image, read_image_size, to_rgb8
from .data.prompt_files import PROMPT_KEYS, build_prompts, load_prompts
from .data.prompts import PAD_LABEL, PromptConfig
from .evaluation.evaluate import evaluate_split
from .evaluation.instance_files import held_out_samples, score_instance_files
from .evaluation.metrics import build_metrics
from .evaluation.prompted import evaluate_prompted
from .evaluation.retention import object_kind_of
from .instances import AmgConfig, GeneratedMasks, generate_masks
from .instances.ais import ais_from_logits, instance_map_logits, objects_from_ids
from .instances.apg import apg
from .instances.files import coco_annotations, save_id_map
from .instances.model import InstanceSettings, has_instance_head, instance_logits
from .instances.tiles import stitch_instances, tile_starts
from .models import family_of, load_sam, segmentation_logits
from .models.adapter_check import ADAPTER_CONFIG
from .models.merged_io import merged_extra_parameters, write_merged
from .models.processing import (
    PALETTE,
    InputFormat,
    logits_to_mask,
    overlay,
    postprocess_masks,
    preprocess,
    preprocess_batch,
    save_mask_png,
)
from .prompting import iter_predict_prompts, predict_prompts

# one image: a file, a PIL image, or an array (h, w) / (h, w, 3) / (h, w, 4); a list or tuple of them is a batch
ImageInput = np.ndarray | str | Path | Image.Image
Images = ImageInput | Sequence[ImageInput]


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
        strength: float | None = None,
    ) -> Segmenter:
        """Load a run's ``adapter/`` folder (any method), a merged model, or a plain SAM for prompting.

        A plain PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
        ``peft_model.save_pretrained`` writes them) loads onto ``base_model`` as a binary prompt-free
        segmenter (see :func:`~convlora.artifact.load_peft_folder`). Any other folder without
        ``convlora_task.json`` (a SAM checkpoint directory), an embedded name such as ``"convlora-tiny"``
        or a hub id gives the base SAM as a binary segmenter: meant for prompts (the vanilla side of a
        vanilla-vs-fine-tuned comparison).

        Args:
            path: the folder or name.
            base_model: SAM checkpoint to put the adapter on, if not the one recorded at training time
                (required for a plain PEFT adapter folder).
            device: ``"cpu"``, ``"cuda"``...; CUDA when available by default.
            strength: a LoRA / Conv-LoRA fine-tune at this strength in [0, 1] (0: SAM's own model, 1: as trained;
                see :func:`~convlora.artifact.strength.set_strength`); ``None``: as trained.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (Path(path) / TASK_FILE).is_file() or (Path(path) / ADAPTER_CONFIG).is_file():
            model, task = load_trained(path, base_model=base_model)
            if strength is not None:
                set_strength(model, task, strength)
        elif strength is not None:
            raise ValueError(f"strength needs a trained adapter folder; {path} is a base model")
        else:
            model = load_sam(path)
            task = base_task(family_of(model).image_size(model), str(path))
        return cls(model.to(device).eval(), task, device)

    @property
    def input_format(self) -> InputFormat:
        """How this model's family wants its images normalised and fitted (see ``ModelFamily.input_format``)."""
        return family_of(self.model).input_format

    def _pixels(self, image: ImageInput) -> np.ndarray:
        """uint8 RGB ``(h, w, 3)`` of one image, read as :func:`~convlora.data.read_image` reads its file."""
        if isinstance(image, (str, Path)):
            return read_image(image, self.task.image_reading)
        pixels = _pil_samples(image) if isinstance(image, Image.Image) else np.asarray(image)
        if pixels.ndim == 4:
            raise ValueError(
                f"image array has shape {pixels.shape}, a stack of images; pass a list of (h, w, 3) images instead"
            )
        if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3:
            return pixels
        rgba = pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 4
        if rgba and ImageReading.of(self.task.image_reading).channels is None:
            return np.ascontiguousarray(pixels[..., :3])  # alpha dropped, not blended, as read_image does
        return to_rgb8(pixels, self.task.image_reading)

    def _iter_logits(
        self, images: Sequence[ImageInput], tile: int | None, overlap: int, batch_size: int
    ) -> Iterator[torch.Tensor]:
        """Prompt-free logits of each image; untiled images go through the model ``batch_size`` at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if tile is not None:
            for image in images:
                yield self.predict_logits(image, tile=tile, overlap=overlap)
            return
        for start in range(0, len(images), batch_size):
            pixels = [self._pixels(image) for image in images[start : start + batch_size]]
            batch, infos = preprocess_batch(pixels, self.task.image_size, self.input_format)
            with torch.no_grad():
                logits = self._prompt_free(batch.to(self.device)).float().cpu()  # (b, k, m, m)
            for i, info in enumerate(infos):
                yield postprocess_masks(logits[i : i + 1], info)[0]

    @torch.no_grad()
    def _whole_logits(self, pixels: np.ndarray) -> torch.Tensor:
        pixel_values, info = preprocess(pixels, self.task.image_size, self.input_format)
        logits = self._prompt_free(pixel_values.unsqueeze(0).to(self.device))
        return postprocess_masks(logits.float().cpu(), info)[0]

    def _prompt_free(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Prompt-free logits ``(b, k, m, m)``; an instance model gives its decoder's foreground logit (``k = 1``)."""
        if self.task.mode == "instances":
            return instance_logits(self.model, pixel_values)[:, :1]
        return segmentation_logits(self.model, pixel_values)

    @torch.no_grad()
    def predict_logits(
        self, image: Images, *, tile: int | None = None, overlap: int = 0, batch_size: int = 4
    ) -> torch.Tensor | list[torch.Tensor]:
        """Prompt-free logits ``(k, h, w)`` at the image's original size (``k = 1`` for binary tasks).

        Args:
            image: one image (see :meth:`predict`), or a list of them: then a list of logits, one per image.
            tile: segment in ``tile x tile`` windows of the original image (see :func:`tiled_logits`) instead
                of shrinking the whole image to the model's input; ``None``: whole image.
            overlap: pixels shared by neighbouring windows, blended smoothly.
            batch_size: images of a list per forward pass (untiled).
        """
        if _is_batch(image):
            return list(self._iter_logits(image, tile, overlap, batch_size))
        pixels = self._pixels(image)
        if tile is None:
            return self._whole_logits(pixels)
        return tiled_logits(self._whole_logits, pixels, tile, overlap)

    def predict_proba(
        self, image: Images, *, tile: int | None = None, overlap: int = 0, batch_size: int = 4
    ) -> np.ndarray | list[np.ndarray]:
        """Probabilities ``(k, h, w)``: foreground probability (binary) or class probabilities.

        A list of images gives a list of arrays, one per image (see :meth:`predict_logits`).
        """
        if _is_batch(image):
            return [_probabilities(logits) for logits in self._iter_logits(image, tile, overlap, batch_size)]
        return _probabilities(self.predict_logits(image, tile=tile, overlap=overlap))

    @torch.no_grad()
    def predict_prompted(
        self, image: ImageInput, prompts: Any, *, multimask: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(n, h, w)`` and IoU estimates ``(n,)`` for checked :class:`~convlora.data.prompts.Prompts`.

        The image encoder runs once for all ``n`` prompts.

        Args:
            image: one image (see :meth:`predict`).
            prompts: prompts in the image's original pixels (see :func:`~convlora.data.build_prompts`).
            multimask: see :meth:`predict`.
        """

        pixels = self._pixels(image)
        pixel_values, info = preprocess(pixels, self.task.image_size, self.input_format)
        return predict_prompts(self.model, pixel_values.to(self.device), info, prompts, multimask=multimask)

    def predict_instances(
        self,
        image: ImageInput,
        method: str = "auto",
        config: AmgConfig | None = None,
        *,
        tile: int | None = None,
        overlap: int = 0,
    ) -> tuple[np.ndarray, GeneratedMasks]:
        """One mask per object: an id map ``(h, w)`` (int32, 0 = background) and the objects with their scores.

        Args:
            image: a path, a uint8 ``(h, w, 3)`` RGB array, or what :meth:`predict` takes for one image.
            method: ``"amg"`` (automatic mask generation: a grid of point prompts, see
                :mod:`convlora.instances.amg`; any model), ``"ais"`` (the trained instance decoder and its
                watershed, :mod:`convlora.instances.ais`), ``"apg"`` (each of those objects refined by SAM's
                prompted decoder, :mod:`convlora.instances.apg`), or ``"auto"`` (``"ais"`` where the model has an
                instance decoder, else ``"amg"``). ``"ais"`` / ``"apg"`` need a model trained with
                ``--mode instances``.
            config: AMG settings (SAM's names); SAM's defaults when ``None``. Not read by AIS and APG, which use
                the watershed settings recorded with the model.
            tile: segment in ``tile x tile`` windows of the original image: AIS blends the decoder's maps over
                the windows and runs one watershed; AMG and APG keep each object from the window holding its
                centre (see :mod:`convlora.instances.tiles`); ``None``: the whole image at once.
            overlap: pixels shared by neighbouring windows (AMG / APG: at least the largest object's diameter).

        Returns:
            ``(ids, objects)``; AMG's objects come best first, AIS's and APG's in id order (object ``i`` is id
            ``i + 1``), scored by their mean foreground probability (AIS) or SAM's predicted IoU (AMG, APG).

        >>> ids, found = segmenter.predict_instances("cells.png", "amg", AmgConfig(16))  # doctest: +SKIP
        >>> found.scores  # the model's IoU estimate of each object, best first  # doctest: +SKIP
        """
        method = choose_instance_method(method, has_decoder=has_instance_head(self.model))
        pixels = self._pixels(image)
        settings = InstanceSettings.from_dict(self.task.instance_head) if method != "amg" else None
        size, fmt, device = self.task.image_size, self.input_format, self.device
        if method == "ais":

            def maps(crop: np.ndarray) -> torch.Tensor:
                return instance_map_logits(self.model, crop, size, fmt, device)

            logits = maps(pixels) if tile is None else tiled_logits(maps, pixels, tile, overlap)
            return ais_from_logits(logits, settings)
        if method == "amg":

            def one(crop: np.ndarray) -> tuple[np.ndarray, GeneratedMasks]:
                found = generate_masks(self.model, crop, config, image_size=size, device=device)
                return found.id_map(), found

        else:

            def one(crop: np.ndarray) -> tuple[np.ndarray, GeneratedMasks]:
                return apg(self.model, crop, size, settings, input_format=fmt, device=device)

        if tile is None:
            return one(pixels)

        def scored(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ids, found = one(crop)
            return ids, found.scores

        ids, scores = stitch_instances(scored, pixels, tile, overlap)
        return ids, objects_from_ids(ids, scores, settings={"method": method, "tile": [tile, overlap]})

    def predict(
        self,
        image: Images,
        boxes: Any = None,
        points: Any = None,
        point_labels: Any = None,
        *,
        multimask: bool | None = None,
        return_scores: bool = False,
        tile: int | None = None,
        overlap: int = 0,
        batch_size: int = 4,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | list[Any]:
        """Masks at the image's original size: prompt-free class ids, or one mask per prompt.

        Without prompts: class ids ``(h, w)`` uint8 (binary: 0/1). With prompts: bool ``(n, h, w)``, one mask
        per prompt (``n = 0`` for empty boxes / points); coordinates are in the original image's pixels.
        See :mod:`convlora.data.prompt_files` for how boxes and points combine into prompts. Boxes, points
        and labels may be lists, tuples, numpy arrays or torch tensors: boxes ``(n, 4)`` (a 1-d array of 4
        is one box), points ``(n, 2)`` (one prompt) or ``(k, n, 2)`` (one prompt each), labels ``(n,)`` or
        ``(k, n)``.

        An image is a file path, a PIL image, or an array: uint8 RGB ``(h, w, 3)``, grey ``(h, w)``, uint8
        RGBA ``(h, w, 4)`` (alpha dropped), or another dtype mapped to 0..255 as the model's
        ``task.image_reading`` says; each is read exactly as its image file would be (a PIL image gets
        its EXIF orientation applied). A list (or tuple) of images gives a list of results, one per
        image, in order; prompt-free, the images go through the model ``batch_size`` at a time (the logits
        agree with one image at a time to float rounding). With a list of images, ``boxes`` / ``points`` /
        ``point_labels`` hold one entry per image (that image's prompts; ``None`` segments that image
        prompt-free).

        Args:
            image: one image, or a list of images.
            boxes: ``[[x0, y0, x1, y1], ...]``, one prompt each.
            points: ``[[x, y], ...]`` (one prompt of all these points) or a list of such lists (one each).
            point_labels: 1 (on the object) or 0 (not on it) per point; all 1 by default.
            multimask: SAM's three masks per prompt, keeping the best rated; by default only for prompts that
                are a single point (ambiguous), as SAM's predictor does.
            return_scores: also return the model's IoU estimate of each mask ``(n,)`` (prompted only):
                ``(masks, scores)``, or a list of such pairs for a list of images.
            tile: prompt-free only: segment in windows of this size (see :meth:`predict_logits`).
            overlap: pixels shared by neighbouring windows.
            batch_size: images of a list per forward pass (prompt-free, untiled).

        >>> from convlora.models import random_sam, tiny_sam_config
        >>> segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
        >>> [mask.shape for mask in segmenter.predict([np.zeros((30, 40), np.uint8), np.zeros((20, 20, 4), np.uint8)])]
        [(30, 40), (20, 20)]
        """
        options = {"multimask": multimask, "return_scores": return_scores, "tile": tile, "overlap": overlap}
        if _is_batch(image):
            return self._predict_batch(image, (boxes, points, point_labels), options, batch_size)
        return self._predict_one(image, boxes, points, point_labels, **options)

    def _predict_one(
        self,
        image: ImageInput,
        boxes: Any,
        points: Any,
        point_labels: Any,
        *,
        multimask: bool | None,
        return_scores: bool,
        tile: int | None,
        overlap: int,
        source: str = "predict",
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        pixels = self._pixels(image)
        if boxes is None and points is None:
            if point_labels is not None:
                build_prompts(None, None, point_labels, source=source)  # refuses labels without points
            return _class_ids(self.predict_logits(pixels, tile=tile, overlap=overlap))
        if tile is not None:
            raise ValueError(f"{source}: tile is for prompt-free prediction; prompts already say where to look")
        prompts = build_prompts(boxes, points, point_labels, image_size=pixels.shape[:2], source=source)
        if len(prompts) == 0:  # e.g. a detector that found nothing: no masks, not a prompt-free map
            masks = np.zeros((0, *pixels.shape[:2]), dtype=bool)
            return (masks, np.zeros(0, np.float32)) if return_scores else masks
        logits, scores = self.predict_prompted(pixels, prompts, multimask=multimask)
        masks = (logits > 0).numpy()
        return (masks, scores.numpy()) if return_scores else masks

    def _predict_batch(
        self, images: Sequence[ImageInput], prompts: tuple[Any, Any, Any], options: dict[str, Any], batch_size: int
    ) -> list[Any]:
        """:meth:`predict` of each image of a list: prompt-free in batches, or with each image's own prompts."""
        given = {name: value for name, value in zip(PROMPT_KEYS, prompts, strict=True) if value is not None}
        if not given:
            logits = self._iter_logits(images, options["tile"], options["overlap"], batch_size)
            return [_class_ids(image_logits) for image_logits in logits]
        per_image = {}
        for name, value in given.items():
            count = len(value) if hasattr(value, "__len__") and getattr(value, "ndim", 1) > 0 else None
            if count != len(images):
                found = f"{name} is not a list" if count is None else f"{name} has {count} entries"
                raise ValueError(
                    f"predict: {len(images)} images but {found}; with a list of images, give {name} as a list "
                    f"with one entry per image (its {name}, or None)"
                )
            per_image[name] = value
        results = []
        for i, image in enumerate(images):
            entry = {name: per_image.get(name, [None] * len(images))[i] for name in PROMPT_KEYS}
            results.append(self._predict_one(image, *entry.values(), **options, source=f"predict: image {i}"))
        return results


def _is_batch(image: Any) -> bool:
    return isinstance(image, (list, tuple))


def _class_ids(logits: torch.Tensor) -> np.ndarray:
    """uint8 ``(h, w)`` class ids of prompt-free logits ``(k, h, w)`` (binary: 0/1)."""
    if logits.shape[0] == 1:  # binary: no int64 map of the (possibly huge) image
        return (logits[0] > 0).numpy().astype(np.uint8)
    return logits_to_mask(logits.unsqueeze(0))[0].numpy().astype(np.uint8)


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    probs = logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(dim=0)
    return probs.numpy()


def _pil_samples(image: Image.Image) -> np.ndarray:
    """A PIL image's samples as :func:`~convlora.data.read_image` takes them from its file: EXIF orientation
    applied, alpha dropped (not blended), palettes expanded; grey and high-bit-depth samples kept as they are."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("LA", "La"):
        return np.asarray(image)[..., 0]
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    if image.mode in ("L", "RGB", "I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # RGBA, P, PA, CMYK ...


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
    instances: str | None = None,
    amg: AmgConfig | None = None,
    strength: float | None = None,
) -> dict[str, Any]:
    """Metrics of a trained model on a labelled dataset folder or CSV (every image, original resolution).

    With ``instances`` (``"amg"``, ``"ais"``, ``"apg"``, ``"auto"``; see :meth:`Segmenter.predict_instances`) the
    model segments every object itself and the instance metrics score its id map against the dataset's
    instance-id masks (mSA, SA@0.5/0.75, F1, precision and recall at 0.5, object counts: see
    :mod:`convlora.evaluation.instances`). A model trained with ``--mode instances`` is scored so by default.

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
        instances: score objects (``"amg"``, ``"ais"``, ``"apg"``, ``"auto"``) instead of pixels; the masks must
            hold instance ids. ``tile`` applies to it too.
        amg: automatic mask generation settings (SAM's names).
        strength: evaluate a LoRA / Conv-LoRA fine-tune at this strength (see :meth:`Segmenter.from_pretrained`).

    >>> evaluate("runs/polyp/adapter", "data/polyp", prompt="box", compare_base=True)  # doctest: +SKIP
    """

    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model, strength=strength)
    task = segmenter.task
    if instances is None and task.mode == "instances" and prompt in (None, "none"):
        instances = "auto"  # an instance model is scored by its objects
    if instances is not None:
        if prompt not in (None, "none") or compare_base:
            raise ValueError("evaluate: --instances scores every object itself; it takes no --prompt or "
                             "--compare-base")  # fmt: skip
        method = choose_instance_method(instances, has_decoder=has_instance_head(segmenter.model))
        return evaluate_instances(segmenter, data, method, amg, tile=tile, overlap=overlap)
    mode = "binary" if task.mode == "instances" else task.mode  # prompted: an instance model's SAM decoder
    report = check_dataset(data, mode=mode, num_classes=task.num_classes, reading=task.image_reading)
    split = "test" if "test" in report.samples else None
    dataset = SegmentationDataset.from_report(
        report, split, image_size=task.image_size, input_format=segmenter.input_format
    )
    if prompt is not None and prompt != "none":
        if tile is not None:
            raise ValueError("evaluate: tile is for prompt-free evaluation, not with prompt")
        config = PromptConfig(**{**(prompt_settings or {}), "kind": prompt})
        object_kind = object_kind_of(task.mode)  # instance maps: one object per id
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


def evaluate_instances(
    segmenter: Segmenter,
    data: str | Path,
    method: str,
    amg: AmgConfig | None,
    *,
    tile: int | None = None,
    overlap: int = 0,
) -> dict[str, Any]:
    """Instance metrics of ``segmenter``'s objects against a dataset's instance-id masks (``test/`` if present).

    Args:
        segmenter: the model.
        data: a labelled folder or CSV whose masks hold one id per object (16-bit PNG/TIFF, or 8-bit with
            255 = ignore).
        method: ``"amg"``, ``"ais"``, ``"apg"`` or ``"auto"`` (see :meth:`Segmenter.predict_instances`).
        amg: AMG's settings.
        tile: segment in windows of this size (see :meth:`Segmenter.predict_instances`).
        overlap: pixels shared by neighbouring windows.
    """
    samples, _ = held_out_samples(data, segmenter.task.image_reading)

    def segment(image: np.ndarray) -> np.ndarray:
        return segmenter.predict_instances(image, method, amg, tile=tile, overlap=overlap)[0]

    return score_instance_files(segment, samples, segmenter.task.image_reading, where=data)


def _draw_prompts(image: np.ndarray, ids: np.ndarray, prompts: Any) -> np.ndarray:
    """An overlay of prompt ``i``'s mask as id ``i + 1`` (a colour each) with its box and points drawn on top."""

    picture = Image.fromarray(overlay(image, ids))
    draw = ImageDraw.Draw(picture)
    radius = max(2, round(max(image.shape[:2]) / 150))
    for i in range(len(prompts)):
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


INSTANCE_METHODS = ("auto", "amg", "ais", "apg")


def choose_instance_method(method: str, *, has_decoder: bool) -> str:
    """The instance method to run for ``method`` (``"auto"``: a trained decoder if any, else AMG), or why not.

    >>> choose_instance_method("auto", has_decoder=False)
    'amg'
    """
    if method not in INSTANCE_METHODS:
        raise ValueError(f"instances must be one of {list(INSTANCE_METHODS)}, got {method!r}")
    if method == "auto":
        return "ais" if has_decoder else "amg"
    if method in ("ais", "apg") and not has_decoder:
        raise ValueError(
            f"instances={method!r} needs a model trained with an instance decoder (convlora train --mode instances); "
            "this model has none: use 'amg' (automatic mask generation from point prompts) instead"
        )
    return method


# predict writes its folder image by image: each image's files atomically, then one line of this file. A
# rerun with the same model and settings skips the images already listed, so a killed predict continues.
PROGRESS_FILE = "predictions.jsonl"
_PREDICTION_ENTRIES = ("masks", "overlays", "instances", "predictions.json", PROGRESS_FILE)


def _file_state(path: str | Path) -> Any:
    """What identifies a file's or folder's content cheaply: sizes and modification times (or the name itself)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        return {p.relative_to(path).as_posix(): _file_state(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return str(path)


def _earlier_predictions(output_dir: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The records of an earlier predict into ``output_dir`` with the same settings; ``None``: start afresh."""
    progress = output_dir / PROGRESS_FILE
    if not progress.is_file():
        others = [name for name in _PREDICTION_ENTRIES if (output_dir / name).exists()]
        return None if others else {}
    records: dict[str, dict[str, Any]] = {}
    with open(progress) as handle:
        header = handle.readline()
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(header) != {"settings": settings}:
                return None
        for line in handle:
            with contextlib.suppress(json.JSONDecodeError):  # the last line of a killed run may be cut short
                record = json.loads(line)
                records[record["image"]] = record
    return records


def _clear_predictions(output_dir: Path) -> None:
    """Remove what an earlier predict wrote into ``output_dir`` (a prediction folder; nothing else is touched)."""
    for name in _PREDICTION_ENTRIES:
        entry = output_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.is_file() or entry.is_symlink():
            entry.unlink()


def _remove_partial_files(output_dir: Path) -> None:
    """Remove the temporary files a killed predict left (``.NAME.XXXX.tmp``, written by ``atomic_file``)."""
    for folder in (output_dir, *(output_dir / name for name in ("masks", "overlays", "instances"))):
        if folder.is_dir():
            for partial in folder.glob(".*.tmp"):
                if partial.is_file() and not partial.is_symlink():
                    partial.unlink()


def _save_png(picture: np.ndarray, path: Path) -> None:
    with atomic_file(path) as handle:  # a preview: zlib's fastest level
        Image.fromarray(picture).save(handle, format="PNG", compress_level=1)


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
    skip_bad: bool = False,
    instances: str | None = None,
    amg: AmgConfig | None = None,
    batch_size: int = 8,
    strength: float | None = None,
) -> dict[str, Any]:
    """Segment every image of a folder; write mask PNGs (and overlays) at each image's original size.

    With ``instances`` (``"amg"``, ``"ais"``, ``"apg"`` or ``"auto"``: see :meth:`Segmenter.predict_instances`;
    ``tile`` applies to it too) one mask per object instead: ``OUTPUT/instances/<stem>.png`` (16-bit ids;
    ``.tif``, 32-bit, above 65,535 objects),
    ``OUTPUT/instances/<stem>.json`` (COCO-style entries with RLE masks, boxes and scores) and an overlay.

    Prompt-free, masks go to ``OUTPUT/masks/<stem>.png`` (binary: 0/255; multi-class: class ids). With a
    prompts file (see :mod:`convlora.data.prompt_files`) each prompt gives ``OUTPUT/masks/<stem>_<i>.png``
    (0/255, ``i`` counting the image's prompts from 0) and the overlay shows the masks with their boxes
    and points; images the file does not name are left out. Overlays go to ``OUTPUT/overlays/<stem>.png``,
    and ``OUTPUT/predictions.json`` lists what was done (scores included).

    Each image's files are written as soon as they are made (atomically) and listed in
    ``OUTPUT/predictions.jsonl``: the same command run again after an interruption skips the images already
    done; with another model or other settings it replaces the folder's earlier predictions. ``output_dir``
    must be new, empty or a prediction folder; it may not contain or lie inside the inputs. Prompts are
    decoded in bounded chunks and each mask written as it comes, so memory does not grow with their number.

    Args:
        model_path: the trained model folder (or a SAM checkpoint / embedded name, for prompts).
        images: a folder of images (ground truth not needed) or a CSV with an ``image`` column.
        output_dir: where to write.
        base_model: see :meth:`Segmenter.from_pretrained`.
        overlays: also write coloured overlays.
        prompts: a prompts JSON or COCO file naming images of the folder.
        tile: prompt-free: segment in windows of this size (see :func:`tiled_logits`).
        overlap: pixels shared by neighbouring windows.
        skip_bad: leave out images that cannot be read (listed in the result and in ``predictions.json``)
            instead of stopping at the first.
        instances: ``"auto"``, ``"amg"``, ``"ais"`` / ``"apg"`` (these need a trained instance decoder), or ``None``.
        amg: automatic mask generation settings (SAM's names); SAM's defaults when ``None``.
        batch_size: prompt-free images per forward pass (files are written in a background thread meanwhile).
        strength: predict with a LoRA / Conv-LoRA fine-tune at this strength (see :meth:`Segmenter.from_pretrained`).

    Returns:
        ``count`` (images with predictions), ``output_dir``, ``reused`` (images an earlier run had done) and
        ``bad`` (``{"image", "error"}`` of each image left out).

    >>> predict_folder("runs/polyp/adapter", "new_images", "predictions", skip_bad=True)  # doctest: +SKIP
    """

    output_dir = Path(output_dir)
    inputs = {"--images": images, "--model": model_path, "--base-model": base_model, "--prompts": prompts}
    check_apart(output_dir, inputs)
    check_owned(output_dir, "predictions", option="--output")
    if prompts is not None and tile is not None:
        raise ValueError("predict: --tile is for prompt-free prediction; it cannot be combined with --prompts")
    if instances is not None:
        if prompts is not None:
            raise ValueError("predict: --instances finds every object itself; it takes no --prompts")
        choose_instance_method(instances, has_decoder=True)  # a wrong name fails before the model loads
    segmenter = Segmenter.from_pretrained(model_path, base_model=base_model, strength=strength)
    if instances is not None:
        instances = choose_instance_method(instances, has_decoder=has_instance_head(segmenter.model))
    reading = segmenter.task.image_reading
    report = check_dataset(images, reading=reading, skip_bad=skip_bad, skip_advice="--skip-bad")
    bad = [{"image": str(p.path or p.sample), "error": p.message} for p in report.problems if p.sample is not None]
    paths = [Path(sample.image) for sample in report.usable_samples()]
    binary = segmenter.task.mode in ("binary", "instances")  # an instance model's prompt-free mask: its foreground
    prompt_sets = None
    if prompts is not None:
        names = _image_names(paths, images)
        prompt_sets = {names[name]: entry for name, entry in load_prompts(prompts, _sizes(names)).items()}
        paths = [path for path in paths if path in prompt_sets]
    settings = {
        "model": str(model_path),
        "model_files": _file_state(model_path),
        "base_model": base_model,
        "prompts": None if prompts is None else [str(prompts), _file_state(prompts)],
        "tile": None if tile is None else [tile, overlap],
        "overlays": overlays,
        "instances": None if instances is None else [instances, asdict(amg or AmgConfig())],
        "strength": strength,
    }
    reused = 0
    with owned_folder(output_dir, "predictions", "predict", option="--output"):
        earlier = _earlier_predictions(output_dir, settings)
        if earlier is None:  # another model or other settings: this folder's earlier predictions go
            _clear_predictions(output_dir)
            earlier = {}
        _remove_partial_files(output_dir)
        (output_dir / ("instances" if instances else "masks")).mkdir(exist_ok=True)
        if overlays:
            (output_dir / "overlays").mkdir(exist_ok=True)
        progress_file = output_dir / PROGRESS_FILE
        fresh = not progress_file.is_file()
        with open(progress_file, "a") as progress, _OrderedWriter(progress) as writer:
            if fresh:
                progress.write(json.dumps({"settings": settings}) + "\n")
            batch: list[tuple[Path, np.ndarray]] = []  # prompt-free, untiled: images through the model together
            for path in paths:
                record = earlier.get(str(path))
                if (
                    record is not None
                    and record.get("file_state") == _file_state(path)
                    and all((output_dir / name).is_file() for name in record["files"])
                ):
                    writer.keep(record)
                    reused += 1
                    continue
                try:
                    image = read_image(path, reading)
                except (ValueError, OSError) as error:
                    if not skip_bad:
                        _write_batch(writer, segmenter, batch, output_dir, overlays, binary, batch_size)
                        raise ValueError(
                            f"{path} cannot be read ({error}); fix or remove it, or pass --skip-bad to leave bad "
                            f"images out. The {writer.finish()} images done are kept: the same command continues "
                            "after them"
                        ) from error
                    bad.append({"image": str(path), "error": str(error)})
                    continue
                if instances is not None:
                    found = segmenter.predict_instances(image, instances, amg, tile=tile, overlap=overlap)
                    record = _write_instances(found, image, path, output_dir, overlays)
                    writer.submit(path, lambda record=record: record)
                elif prompt_sets is not None:
                    record = _predict_prompted(segmenter, image, prompt_sets[path], path, output_dir, overlays)
                    writer.submit(path, lambda record=record: record)
                elif tile is not None:
                    mask = segmenter.predict(image, tile=tile, overlap=overlap)
                    writer.submit(path, _free_writer(segmenter, image, mask, path, output_dir, overlays, binary))
                else:
                    batch.append((path, image))
                    if len(batch) == batch_size:
                        _write_batch(writer, segmenter, batch, output_dir, overlays, binary, batch_size)
            _write_batch(writer, segmenter, batch, output_dir, overlays, binary, batch_size)
        records = writer.records
        write_json(
            output_dir / "predictions.json",
            {
                "model": str(model_path),
                "task": segmenter.task.to_dict(),
                "prompts": None if prompts is None else str(prompts),
                "tile": None if tile is None else {"tile": tile, "overlap": overlap},
                "images": [{k: v for k, v in r.items() if k != "file_state"} for r in records],
                "bad": bad,
            },
        )
    return {"count": len(records), "output_dir": str(output_dir), "reused": reused, "bad": bad}


def _write_batch(
    writer: _OrderedWriter,
    segmenter: Segmenter,
    batch: list[tuple[Path, np.ndarray]],
    output_dir: Path,
    overlays: bool,
    binary: bool,
    batch_size: int,
) -> None:
    """Prompt-free masks of a batch of images in one forward pass; their files are written in the background."""
    if not batch:
        return
    masks = segmenter.predict([image for _, image in batch], batch_size=batch_size)
    for (path, image), mask in zip(batch, masks, strict=True):
        writer.submit(path, _free_writer(segmenter, image, mask, path, output_dir, overlays, binary))
    batch.clear()


def _free_writer(
    segmenter: Segmenter,
    image: np.ndarray,
    mask: np.ndarray,
    path: Path,
    output_dir: Path,
    overlays: bool,
    binary: bool,
) -> Callable[[], dict[str, Any]]:
    """The work of writing one image's prompt-free mask (and overlay); returns its record when done."""

    def write() -> dict[str, Any]:
        files = [f"masks/{path.stem}.png"]
        save_mask_png(mask, output_dir / files[0], binary=binary)
        if overlays:
            files.append(f"overlays/{path.stem}.png")
            _save_png(overlay(image, mask), output_dir / files[-1])
        fractions = np.bincount(mask.ravel(), minlength=segmenter.task.num_classes) / mask.size
        return {"size": list(mask.shape), "class_fractions": fractions.tolist(), "files": files}

    return write


class _OrderedWriter:
    """Writes each image's files on one background thread, then its progress line: in order, never half-listed.

    The model works on the next images while PNG encoding (which releases the GIL) runs here. An image is
    listed in the progress file only once its files are complete, so a kill loses at most the images in
    flight. At most ``limit`` images wait, which bounds the memory their masks and pictures take.

    Args:
        progress: the open progress file (``predictions.jsonl``).
        limit: images queued at most before :meth:`submit` waits for the oldest.
    """

    def __init__(self, progress: Any, limit: int = 16) -> None:
        self.progress = progress
        self.limit = limit
        self.records: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlora-predict-writer")
        self._pending: collections.deque[Future] = collections.deque()

    def __enter__(self) -> _OrderedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def keep(self, record: dict[str, Any]) -> None:
        """List an image an earlier run has done (its record as it was)."""
        self._pending.append(self._pool.submit(self.records.append, record))

    def submit(self, path: Path, write: Callable[[], dict[str, Any]]) -> None:
        """Run ``write`` (which writes the image's files and returns its record) and list the image."""
        while len(self._pending) >= self.limit or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # raises a failed write's error here, in the main thread
        self._pending.append(self._pool.submit(self._write, path, write))

    def finish(self) -> int:
        """Wait for every queued image; returns how many are listed."""
        while self._pending:
            self._pending.popleft().result()
        return len(self.records)

    def _write(self, path: Path, write: Callable[[], dict[str, Any]]) -> None:
        record = {"image": str(path), "file_state": _file_state(path), **write()}
        self.progress.write(json.dumps(record) + "\n")
        self.progress.flush()
        self.records.append(record)


def _write_instances(
    result: tuple[np.ndarray, GeneratedMasks], image: np.ndarray, path: Path, output_dir: Path, overlays: bool
) -> dict[str, Any]:
    """One image's objects: id image, COCO-style JSON, overlay; returns its record."""
    ids, found = result
    files = [save_id_map(ids, output_dir / "instances" / path.stem).relative_to(output_dir).as_posix()]
    method = found.settings.get("method", "amg")
    if method == "amg":
        extra = {"predicted_iou": found.scores, "stability_score": found.stability, "point_coords": found.points}
    elif method == "ais":  # score: mean foreground probability; point: the seed the watershed grew it from
        extra = {"point_coords": found.points}
    else:
        extra = {"predicted_iou": found.scores, "point_coords": found.points}
    entries = coco_annotations(found.masks, found.scores, image_id=path.name, extra=extra)
    files.append(f"instances/{path.stem}.json")
    document = {"image": path.name, "size": list(ids.shape), "method": method, "annotations": entries}
    write_json(output_dir / files[-1], document)
    if overlays:
        files.append(f"overlays/{path.stem}.png")
        _save_png(overlay(image, np.where(ids > 0, (ids - 1) % 254 + 1, 0)), output_dir / files[-1])  # 255: ignore
    return {"size": list(ids.shape), "objects": len(found), "method": method, "files": files}


def _predict_prompted(
    segmenter: Segmenter, image: np.ndarray, prompts: Any, path: Path, output_dir: Path, overlays: bool
) -> dict[str, Any]:
    """One image's masks, one per prompt, written chunk by chunk as they are decoded; returns its record."""
    pixel_values, info = preprocess(image, segmenter.task.image_size, segmenter.input_format)
    ids = np.zeros(image.shape[:2], dtype=np.int32) if overlays else None
    names, scores, fractions = [], [], []
    chunks = iter_predict_prompts(segmenter.model, pixel_values.to(segmenter.device), info, prompts)
    for logits, chunk_scores in chunks:
        for mask, score in zip((logits > 0).numpy(), chunk_scores.tolist(), strict=True):
            names.append(f"masks/{path.stem}_{len(names)}.png")
            save_mask_png(mask, output_dir / names[-1], binary=True)
            scores.append(round(float(score), 4))
            fractions.append(round(float(mask.mean()), 6))
            if ids is not None:
                ids[mask] = len(names)
    files = list(names)
    if ids is not None:
        files.append(f"overlays/{path.stem}.png")
        _save_png(_draw_prompts(image, ids, prompts), output_dir / files[-1])
    return {
        "size": list(image.shape[:2]),
        "prompts": len(names),
        "masks": names,
        "scores": scores,
        "mask_fractions": fractions,
        "files": files,
    }


def _sizes(names: dict[str, Path]) -> dict[str, tuple[int, int]]:
    cache: dict[Path, tuple[int, int]] = {}
    sizes = {}
    for name, path in names.items():
        if path not in cache:
            cache[path] = tuple(int(v) for v in read_image_size(path))  # type: ignore[assignment]
        sizes[name] = cache[path]
    return sizes


def export_at_strength(
    model_path: str | Path, output_dir: str | Path, strength: float, *, base_model: str | None = None
) -> dict[str, Any]:
    """Write a trained LoRA / Conv-LoRA adapter folder with its strength folded into the weights.

    The result is a regular adapter folder (PEFT's files and convlora's task file): stock
    ``PeftModel.from_pretrained`` and ``load_trained`` give the outputs of ``set_strength(model, task, strength)``.

    Args:
        model_path: the trained adapter folder.
        output_dir: a new or empty folder, or a model folder convlora wrote.
        strength: in [0, 1] (see :func:`~convlora.artifact.strength.set_strength`).
        base_model: see :meth:`Segmenter.from_pretrained`.

    >>> export_at_strength("runs/polyp/adapter", "runs/polyp/adapter-0.7", 0.7)  # doctest: +SKIP
    """
    check_apart(output_dir, {"--model": model_path, "--base-model": base_model})
    check_owned(output_dir, "model", option="--output")
    model, task = load_trained(model_path, base_model=base_model)
    set_strength(model, task, strength)
    export_trained(model, task, output_dir)
    return {"output_dir": str(output_dir), "method": task.method, "strength": strength}


def merge_model(model_path: str | Path, output_dir: str | Path, *, base_model: str | None = None) -> dict[str, Any]:
    """Fold a trained adapter into its base model and save one self-contained checkpoint.

    Every method whose ``Method.mergeable`` is true merges (LoRA, DoRA, LoHa, LoKr, (IA)3, BOFT, VeRA, LN tuning
    fold in exactly; Conv-LoRA's linear part folds in exactly and its conv experts stay as a small frozen side
    branch, reported as ``extra_parameters``). The output loads with ``Segmenter.from_pretrained`` and
    ``convlora.load_sam``.

    Args:
        model_path: the trained adapter folder.
        output_dir: where the merged model goes: a new or empty folder, or a model folder convlora wrote
            (replaced atomically); never one holding the adapter.
        base_model: see :meth:`Segmenter.from_pretrained`.
    """

    check_apart(output_dir, {"--model": model_path, "--base-model": base_model})
    check_owned(output_dir, "model", option="--output")
    model, task = load_trained(model_path, base_model=base_model)
    if not METHODS[task.method].mergeable:
        mergeable = sorted(name for name, method in METHODS.items() if method.mergeable)
        raise ValueError(
            f"{model_path} was trained with method {task.method!r}, which has nothing to merge; merge works for "
            f"{mergeable}"
        )
    merged = model.merge_and_unload().eval()
    extra = merged_extra_parameters(merged)
    merged_task = TaskInfo(**{**task.to_dict(), "merged": True})
    with atomic_dir(output_dir, "model", option="--output") as tmp:
        write_weights(merged, tmp, write_merged)  # an instance decoder goes beside the SAM checkpoint
        write_task_file(tmp, merged_task)
    return {"output_dir": str(output_dir), "extra_parameters": extra, "method": task.method}
