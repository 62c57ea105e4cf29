"""Export a trained model to ONNX for ONNX Runtime: prompt-free, and SAM-style encoder + prompt decoder.

The model is merged first (``merge_and_unload``): LoRA folds into the weights, Conv-LoRA keeps its conv
experts as a small side branch, and every expert mixture is set to dense routing (every expert on every
sample, selected by a per-sample weight), which has no data-dependent shapes and so traces into a
static graph. Three files and a description go to the output folder:

- ``model.onnx``: ``pixel_values`` ``(batch, 3, S, S)`` float32, exactly what
  :func:`convlora.models.processing.preprocess` produces, to ``logits`` ``(batch, k, m, m)`` (``k = 1``
  for binary tasks, one map per class otherwise; ``m`` is four times the encoder's grid, ``S / 4`` for SAM);
- ``image_encoder.onnx``: ``pixel_values`` to ``image_embeddings``, run once per image;
- ``prompt_decoder.onnx``: ``image_embeddings``, ``point_coords`` ``(batch, n, 2)`` (x, y in input
  pixels) and ``point_labels`` ``(batch, n)`` to ``masks`` ``(batch, 1, m, m)`` and ``iou_scores``
  ``(batch, 1)``, as segment-anything deploys its decoder: label 1 a foreground point, 0 a background
  point, 2 and 3 a box's top-left and bottom-right corners, -1 a padding point (append one ``(0, 0)``
  with label -1 when there is no box, as SAM does); binary tasks and base models only;
- ``deploy.json``: input size, normalisation, classes and how to post-process the logits.

>>> info = export_onnx("runs/polyp/adapter", "runs/polyp/onnx")  # doctest: +SKIP
>>> info["check"]["model.onnx"]  # max |onnxruntime - PyTorch| on a random batch  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_dir, write_json
from .models import family_of, find_sam, segmentation_logits
from .training.artifact import TaskInfo, load_trained
from .tuner.moe import set_routing

# Families whose export is tested (see tests/test_onnx.py); others are refused by name.
EXPORTABLE_FAMILIES = ("sam",)
DEPLOY_FILE = "deploy.json"
DEPLOY_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
POINT_LABELS = {
    "-1": "padding (not a point)",
    "0": "background point",
    "1": "foreground point",
    "2": "box top-left corner",
    "3": "box bottom-right corner",
}


class PromptFreeModel(nn.Module):
    """``pixel_values`` ``(b, 3, S, S)`` to prompt-free mask logits ``(b, k, m, m)``.

    Args:
        model: a (merged) SAM model, or a module containing one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The logits :func:`convlora.models.segmentation_logits` gives."""
        return segmentation_logits(self.model, pixel_values)


class ImageEncoder(nn.Module):
    """``pixel_values`` ``(b, 3, S, S)`` to SAM's ``image_embeddings`` ``(b, c, g, g)``.

    Args:
        sam: the SAM model (``find_sam`` of a merged model).
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = sam.vision_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last hidden state of the image encoder (after its neck)."""
        return self.vision_encoder(pixel_values)[0]


class PromptDecoder(nn.Module):
    """Image embeddings and labelled points to one mask and its IoU estimate, as segment-anything's ONNX decoder.

    Boxes are two corner points with labels 2 and 3, which gives the same embedding as transformers'
    ``input_boxes``; -1 marks padding points.

    Args:
        sam: the SAM model (``find_sam`` of a merged model).
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_positional_embeddings = nn.Buffer(sam.get_image_wide_positional_embeddings().detach())

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``masks`` ``(b, 1, m, m)`` logits and ``iou_scores`` ``(b, 1)``.

        Args:
            image_embeddings: ``(b, c, g, g)`` from :class:`ImageEncoder`.
            point_coords: ``(b, n, 2)`` x, y in input pixels.
            point_labels: ``(b, n)`` labels, see :data:`POINT_LABELS`.
        """
        encoder = self.prompt_encoder
        batch = image_embeddings.shape[0]
        size = encoder.input_image_size
        labels = point_labels[:, None, :, None]  # (b, 1, n, 1)
        points = encoder.shared_embedding((point_coords + 0.5)[:, None], (size, size))  # (b, 1, n, c)
        points = torch.where(labels == -1, encoder.not_a_point_embed.weight, points)
        for label, embed in enumerate(encoder.point_embed):
            points = points + (labels == label).to(points.dtype) * embed.weight
        grid = image_embeddings.shape[-2:]
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *grid)
        masks, iou = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.image_positional_embeddings.expand(batch, -1, -1, -1),
            sparse_prompt_embeddings=points,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )[:2]
        return masks[:, 0], iou[:, 0]


def exportable(model: nn.Module) -> nn.Module:
    """A merged, frozen copy of ``model`` in eval mode whose expert mixtures route densely.

    Args:
        model: a trained model (a ``PeftModel`` with LoRA / Conv-LoRA adapters, a merged or a plain SAM).

    Raises:
        ValueError: for a family whose export is not supported.
    """
    family = family_of(model)
    if family.name not in EXPORTABLE_FAMILIES:
        raise ValueError(
            f"ONNX export supports the {', '.join(EXPORTABLE_FAMILIES)} family, not {family.name!r} "
            f"({family.description or family.name}): its graph has not been checked against onnxruntime yet"
        )
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    set_routing(model, "dense")
    return model.eval().requires_grad_(False)


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, names: dict[str, Any], opset: int) -> None:
    """Trace ``module`` with the TorchScript-based exporter (no onnxscript needed; SamModel traces cleanly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=list(names["inputs"]),
            output_names=list(names["outputs"]),
            dynamic_axes={**names["inputs"], **names["outputs"]},
            opset_version=opset,
            dynamo=False,
        )


def _max_diff(path: Path, module: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch on ``inputs``, over all outputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    with torch.no_grad():
        expected = module(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float(np.abs(f - e.numpy()).max()) for f, e in zip(found, expected, strict=True))


def deploy_description(model: nn.Module, task: TaskInfo, files: dict[str, str], opset: int) -> dict[str, Any]:
    """What ``deploy.json`` says: the files, their inputs and outputs, pre- and post-processing."""
    family = family_of(model)
    size = task.image_size
    return {
        "format": "convlora-onnx",
        "format_version": DEPLOY_FORMAT_VERSION,
        "family": family.name,
        "method": task.method,
        "base_model": task.base_model,
        "mode": task.mode,
        "num_classes": task.num_classes,
        "class_names": list(task.class_names),
        "files": files,
        "opset": opset,
        "routing": "dense",
        "preprocess": {
            "input_name": "pixel_values",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "image_size": size,
            "steps": [
                "RGB uint8 (h, w, 3) -> float in [0, 1] (divide by 255)",
                f"resize (bilinear, antialiased when shrinking) so that the longest side is {size}",
                "normalise each channel: (x - mean) / std",
                f"pad bottom and right with 0 to {size} x {size}",
                "channels first: (3, S, S); stack images into a batch",
            ],
            "mean": list(family.image_mean),
            "std": list(family.image_std),
            "same_as": "convlora.models.processing.preprocess",
        },
        "postprocess": {
            "output_name": "logits",
            "shape": ["batch", task.out_channels, "m", "m"],
            "steps": [
                f"upsample the logits bilinearly (align_corners=False) to {size} x {size}",
                "crop the padding: keep the top-left resized_size (the image after the longest-side resize)",
                "resize bilinearly to the original (h, w)",
                "binary: foreground where logit > 0; multi-class: argmax over the class axis",
            ],
            "same_as": "convlora.models.processing.postprocess_masks",
        },
        "prompt_decoder": {
            "inputs": [
                "image_embeddings",
                "point_coords (batch, n, 2) x, y in input pixels",
                "point_labels (batch, n)",
            ],
            "outputs": ["masks (batch, 1, m, m) logits", "iou_scores (batch, 1)"],
            "point_labels": POINT_LABELS,
            "note": "without a box, append one padding point (0, 0) with label -1, as segment-anything does",
        }
        if "prompt_decoder" in files
        else None,
    }


def export_model(
    model: nn.Module,
    task: TaskInfo,
    output_dir: str | Path,
    *,
    prompted: bool = True,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> dict[str, Any]:
    """Export a loaded model (see :func:`export_onnx`, which loads it from its folder).

    Args:
        model: the trained model (adapter ``PeftModel``, merged or plain SAM).
        task: what it segments (``TaskInfo``; its ``image_size`` is the export's input size).
        output_dir: the output folder (replaced atomically).
        prompted: also write the image encoder and prompt decoder (binary tasks only).
        opset: ONNX opset (17 or later).
        check: run every file in onnxruntime on a random batch and record the largest difference from
            PyTorch in ``deploy.json`` (needs ``onnxruntime``: ``pip install convlora[onnx]``).

    Returns:
        the contents of ``deploy.json``.
    """
    if opset < 17:
        raise ValueError(f"opset must be 17 or later (SAM's layer norms and attention need it), got {opset}")
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as error:
            raise ValueError(
                "check=True runs the exported files in onnxruntime, which is not installed: "
                "pip install 'convlora[onnx]' (or pass check=False / --no-check)"
            ) from error
    model = exportable(model)
    sam = find_sam(model)
    size = task.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    graphs: dict[str, tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]] = {
        "model": (
            PromptFreeModel(model),
            {"pixel_values": pixels},
            {"inputs": {"pixel_values": {0: "batch"}}, "outputs": {"logits": {0: "batch"}}},
        ),
    }
    prompted = prompted and task.mode == "binary"
    if prompted:
        encoder = ImageEncoder(sam)
        with torch.no_grad():
            embeddings = encoder(pixels)
        coords = torch.tensor([[[10.0, 12.0], [size * 0.7, size * 0.6]]] * 2)  # a box as two corners
        labels = torch.tensor([[2.0, 3.0]] * 2)
        points_axes = {0: "batch", 1: "points"}
        graphs["image_encoder"] = (
            encoder,
            {"pixel_values": pixels},
            {"inputs": {"pixel_values": {0: "batch"}}, "outputs": {"image_embeddings": {0: "batch"}}},
        )
        graphs["prompt_decoder"] = (
            PromptDecoder(sam),
            {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels},
            {
                "inputs": {"image_embeddings": {0: "batch"}, "point_coords": points_axes, "point_labels": points_axes},
                "outputs": {"masks": {0: "batch"}, "iou_scores": {0: "batch"}},
            },
        )
    files = {name: f"{name}.onnx" for name in graphs}
    info = deploy_description(model, task, files, opset)
    with atomic_dir(output_dir) as tmp:
        checks = {}
        for name, (module, inputs, names) in graphs.items():
            path = tmp / files[name]
            _export(module.eval(), tuple(inputs.values()), path, names, opset)
            if check:
                checks[files[name]] = _max_diff(path, module, inputs)
        info["check"] = checks or None
        write_json(tmp / DEPLOY_FILE, info)
    return info


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    prompted: bool = True,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> dict[str, Any]:
    """Export a trained model folder (``RUN/adapter`` or a merged folder) to ONNX files in ``output_dir``.

    Args:
        model_dir: the folder written by training (``RUN/adapter``) or by ``convlora merge``.
        output_dir: where ``model.onnx``, ``image_encoder.onnx``, ``prompt_decoder.onnx`` and
            ``deploy.json`` go (replaced atomically).
        base_model: SAM checkpoint to put the adapter on, if not the one recorded at training time.
        prompted: also write the SAM-style image encoder and prompt decoder (binary tasks only).
        opset: ONNX opset, 17 or later.
        check: compare every file with PyTorch in onnxruntime and record the differences.

    Returns:
        the contents of ``deploy.json``.

    >>> export_onnx("runs/polyp/adapter", "runs/polyp/onnx")["files"]["model"]  # doctest: +SKIP
    'model.onnx'
    """
    model, task = load_trained(model_dir, base_model=base_model)
    return export_model(model, task, output_dir, prompted=prompted, opset=opset, check=check)
