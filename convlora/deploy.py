"""Export a trained model to ONNX for ONNX Runtime: prompt-free, and SAM-style image encoder + prompt decoder.

The model is merged first (``merge_and_unload``): LoRA folds into the weights, Conv-LoRA keeps its conv
experts as a small side branch, and every expert mixture is set to dense routing (every expert on every
sample, selected by a per-sample weight), which has no data-dependent shapes and so traces into a
static graph. Every graph is traced with the TorchScript-based exporter at batch 2, with a dynamic batch,
and checked in onnxruntime at batch 2 and 1. Files and a description go to the output folder:

- ``model.onnx`` (every exportable family: SAM, SAM-HQ, SAM 2, SAM 3; binary, multi-class and instances):
  ``pixel_values`` ``(batch, 3, S, S)`` float32, exactly what :func:`convlora.models.processing.preprocess`
  produces with the family's input format, to ``logits`` ``(batch, k, m, m)`` (``k = 1`` for binary tasks,
  one map per class for multi-class ones, the instance decoder's foreground, centre and boundary maps for
  instance ones, whose watershed stays outside the graph; ``m`` is four times the encoder's final grid,
  ``S / 4`` for SAM and SAM 2);
- ``image_encoder.onnx``: ``pixel_values`` to the image features the prompt decoder needs, run once per
  image: ``image_embeddings`` ``(batch, c, g, g)``; SAM-HQ adds ``intermediate_embeddings``
  ``(batch, g, g, d)`` (the first global-attention block's output, which the HQ decoder fuses in); SAM 2
  and SAM 3 add their feature pyramid's two finer levels, ``high_resolution_features_0``
  ``(batch, c / 8, 4g, 4g)`` and ``high_resolution_features_1`` ``(batch, c / 4, 2g, 2g)``, already
  projected by the decoder's ``conv_s0`` / ``conv_s1`` as transformers precomputes them;
- ``prompt_decoder.onnx``: the encoder's outputs (by name), ``point_coords`` ``(batch, n, 2)`` (x, y in
  input pixels) and ``point_labels`` ``(batch, n)`` to ``masks`` ``(batch, 1, m, m)`` and ``iou_scores``
  ``(batch, 1)`` (SAM 2 and SAM 3 add ``object_score_logits`` ``(batch, 1)``), as segment-anything deploys
  its decoder: label 1 a foreground point, 0 a background point, 2 and 3 a box's top-left and bottom-right
  corners, -1 a padding point. SAM and SAM-HQ need one padding point ``(0, 0)`` at the end when there is no
  box; SAM 2 and SAM 3 always end with one, after a box too (:data:`PADDING`). Binary and instance tasks and
  base models only: a multi-class decoder has no prompt input;
- ``deploy.json``: the files written and every input and output (name, shape, dtype), the files not written
  and why, input size, normalisation, classes and how to post-process the logits.

``sam3_concept`` (``Sam3Model``) is refused: it segments from text or exemplar prompts and has no
prompt-free mask call; export its promptable image model (``Sam3TrackerModel``, family ``sam3``).

>>> info = export_onnx("runs/polyp/adapter", "runs/polyp/onnx")  # doctest: +SKIP
>>> info["check"]["model.onnx"]  # max |onnxruntime - PyTorch|, random batch of 2 and of 1  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ._io import atomic_dir, check_apart, check_owned, write_json
from .artifact import TaskInfo, load_trained
from .instances.model import instance_logits
from .models import family_of, find_sam, segmentation_logits
from .tuner.moe import set_routing

# Families whose export is tested (see tests/test_onnx.py); others are refused by name.
EXPORTABLE_FAMILIES = ("sam", "sam_hq", "sam2", "sam3")
# Why a known family cannot export at all.
REFUSED: dict[str, str] = {
    "sam3_concept": (
        "Sam3Model segments from text or exemplar prompts and has no prompt-free or point/box mask call to "
        "trace; export the promptable SAM 3 image model (Sam3TrackerModel, family sam3) instead"
    ),
}
DEPLOY_FILE = "deploy.json"
DEPLOY_FORMAT_VERSION = 2
DEFAULT_OPSET = 17
TRACE_BATCH = 2  # tracing at batch 1 would record SAM-HQ's "repeat a batch of one" branch, wrong at other sizes
POINT_LABELS = {
    "-1": "padding (not a point)",
    "0": "background point",
    "1": "foreground point",
    "2": "box top-left corner",
    "3": "box bottom-right corner",
}
PADDING = {
    "box": "without a box, append one padding point (0, 0) with label -1, as segment-anything does",
    "always": "always end the points with one padding point (0, 0) labelled -1, after a box too, as SAM 2 does",
}
TENSORS = {
    "pixel_values": "normalised images at the input size (see preprocess)",
    "logits": "prompt-free mask logits, one map per class (k = 1 for binary tasks; instance models: foreground, "
    "centre and boundary logits)",
    "image_embeddings": "the image encoder's output after its neck (SAM 2 / SAM 3: the coarsest pyramid level)",
    "intermediate_embeddings": "SAM-HQ: output of the first global-attention ViT block, channels last",
    "high_resolution_features_0": "SAM 2 / SAM 3: the finest pyramid level (stride 4), after the decoder's conv_s0",
    "high_resolution_features_1": "SAM 2 / SAM 3: the middle pyramid level (stride 8), after the decoder's conv_s1",
    "point_coords": "x, y in input pixels (the frame of the resized image)",
    "point_labels": "one label per point, see point_labels",
    "masks": "mask logits of the single-mask output (multimask_output=False)",
    "iou_scores": "the decoder's IoU estimate of that mask",
    "object_score_logits": "SAM 2 / SAM 3: logit that the prompted object is in the image",
}


class PromptFreeModel(nn.Module):
    """``pixel_values`` ``(b, 3, S, S)`` to prompt-free mask logits ``(b, k, m, m)``.

    Args:
        model: a (merged) model of any promptable family, or a module containing one.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> PromptFreeModel(random_sam(tiny_sam_config()))(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 1, 32, 32])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The logits :func:`convlora.models.segmentation_logits` gives."""
        return segmentation_logits(self.model, pixel_values)


class InstanceMapsModel(PromptFreeModel):
    """``pixel_values`` ``(b, 3, S, S)`` to the instance decoder's logits ``(b, 3, m, m)`` (an instance model).

    The watershed that turns the maps into ids (:func:`convlora.instances.ids_from_logits`) is not part of the
    graph: it is a flooding algorithm on the CPU, not a tensor program.
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Foreground, centre and boundary logits, as :func:`convlora.instances.instance_logits` gives them."""
        return instance_logits(self.model, pixel_values)


class ImageEncoder(nn.Module):
    """SAM: ``pixel_values`` ``(b, 3, S, S)`` to ``image_embeddings`` ``(b, c, g, g)``.

    Args:
        sam: the SAM model (``find_sam`` of a merged model).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> ImageEncoder(random_sam(tiny_sam_config()))(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 16, 8, 8])
    """

    output_names: ClassVar[tuple[str, ...]] = ("image_embeddings",)

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = sam.vision_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last hidden state of the image encoder (after its neck)."""
        return self.vision_encoder(pixel_values).last_hidden_state


class HQImageEncoder(ImageEncoder):
    """SAM-HQ: ``pixel_values`` to ``image_embeddings`` and ``intermediate_embeddings`` ``(b, g, g, d)``.

    The HQ decoder reads only the first of the encoder's intermediate embeddings (the output of its first
    global-attention block), so only that one is an output.

    Args:
        sam: the SAM-HQ model (``find_sam`` of a merged model).
    """

    output_names: ClassVar[tuple[str, ...]] = ("image_embeddings", "intermediate_embeddings")

    def __init__(self, sam: nn.Module) -> None:
        super().__init__(sam)
        if not any(getattr(layer, "window_size", None) == 0 for layer in sam.vision_encoder.layers):
            raise ValueError(
                "SAM-HQ's encoder / decoder split needs a global-attention block (vision_config."
                f"global_attn_indexes), found none in {type(sam).__name__}; export with prompted=False"
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embeddings and the first global block's output."""
        output = self.vision_encoder(pixel_values)
        return output.last_hidden_state, output.intermediate_embeddings[0]


class PyramidImageEncoder(nn.Module):
    """SAM 2 / SAM 3: ``pixel_values`` to the three levels of the feature pyramid the mask decoder reads.

    Outputs ``image_embeddings`` ``(b, c, g, g)`` and ``high_resolution_features_0`` / ``_1``
    ``(b, c / 8, 4g, 4g)`` / ``(b, c / 4, 2g, 2g)``, exactly as ``get_image_embeddings`` computes them
    (the finer levels already projected by the decoder's ``conv_s0`` / ``conv_s1``).

    Args:
        sam: the ``Sam2Model`` or ``Sam3TrackerModel`` (``find_sam`` of a merged model).
    """

    output_names: ClassVar[tuple[str, ...]] = (
        "image_embeddings",
        "high_resolution_features_0",
        "high_resolution_features_1",
    )

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The coarsest level, then the finest and the middle one."""
        finest, middle, coarsest = self.sam.get_image_embeddings(pixel_values)
        return coarsest, finest, middle


def point_embeddings(prompt_encoder: nn.Module, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Sparse prompt embeddings ``(b, 1, n, c)`` of labelled points, for the prompt encoder of any family.

    Boxes are two corner points with labels 2 and 3, which gives the same embedding as transformers'
    ``input_boxes``; -1 marks padding points. SAM and SAM-HQ keep one ``nn.Embedding`` per label, SAM 2
    and SAM 3 one table with a row per label; both add the row of the point's label.

    Args:
        prompt_encoder: the model's ``prompt_encoder``.
        point_coords: ``(b, n, 2)`` x, y in input pixels.
        point_labels: ``(b, n)`` labels, see :data:`POINT_LABELS`.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> encoder = random_sam(tiny_sam_config()).prompt_encoder
    >>> point_embeddings(encoder, torch.zeros(2, 3, 2), torch.ones(2, 3)).shape
    torch.Size([2, 1, 3, 16])
    """
    size = prompt_encoder.input_image_size
    labels = point_labels[:, None, :, None]  # (b, 1, n, 1)
    points = prompt_encoder.shared_embedding((point_coords + 0.5)[:, None], (size, size))  # (b, 1, n, c)
    points = torch.where(labels == -1, prompt_encoder.not_a_point_embed.weight, points)
    table = prompt_encoder.point_embed
    rows = [embed.weight for embed in table] if isinstance(table, nn.ModuleList) else list(table.weight)
    for label, row in enumerate(rows):
        points = points + (labels == label).to(points.dtype) * row
    return points


class PromptDecoder(nn.Module):
    """SAM: image embeddings and labelled points to one mask and its IoU estimate, as segment-anything's decoder.

    Args:
        sam: the SAM model (``find_sam`` of a merged model).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> decoder = PromptDecoder(random_sam(tiny_sam_config()))
    >>> points, labels = torch.tensor([[[9.0, 9.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]])
    >>> masks, iou = decoder(torch.zeros(1, 16, 8, 8), points, labels)
    >>> masks.shape, iou.shape
    (torch.Size([1, 1, 32, 32]), torch.Size([1, 1]))
    """

    input_names: ClassVar[tuple[str, ...]] = ("image_embeddings", "point_coords", "point_labels")
    output_names: ClassVar[tuple[str, ...]] = ("masks", "iou_scores")
    padding: ClassVar[str] = PADDING["box"]

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_positional_embeddings = nn.Buffer(sam.get_image_wide_positional_embeddings().detach())

    def decoder_inputs(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> dict[str, Any]:
        """The keyword arguments every family's mask decoder shares, for one prompt set per image."""
        batch = image_embeddings.shape[0]
        grid = image_embeddings.shape[-2:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *grid)
        return {
            "image_embeddings": image_embeddings,
            "image_positional_embeddings": self.image_positional_embeddings.expand(batch, -1, -1, -1),
            "sparse_prompt_embeddings": point_embeddings(self.prompt_encoder, point_coords, point_labels),
            "dense_prompt_embeddings": dense,
            "multimask_output": False,
        }

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``masks`` ``(b, 1, m, m)`` logits and ``iou_scores`` ``(b, 1)``.

        Args:
            image_embeddings: ``(b, c, g, g)`` from :class:`ImageEncoder`.
            point_coords: ``(b, n, 2)`` x, y in input pixels.
            point_labels: ``(b, n)`` labels, see :data:`POINT_LABELS`.
        """
        masks, iou = self.mask_decoder(**self.decoder_inputs(image_embeddings, point_coords, point_labels))[:2]
        return masks[:, 0], iou[:, 0]


class HQPromptDecoder(PromptDecoder):
    """SAM-HQ: :class:`PromptDecoder` that also takes the encoder's ``intermediate_embeddings``.

    The mask is SAM-HQ's default one, the SAM token's mask plus the HQ token's (``hq_token_only=False``).

    Args:
        sam: the SAM-HQ model (``find_sam`` of a merged model).
    """

    input_names: ClassVar[tuple[str, ...]] = (
        "image_embeddings",
        "intermediate_embeddings",
        "point_coords",
        "point_labels",
    )

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        intermediate_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``masks`` ``(b, 1, m, m)`` and ``iou_scores`` ``(b, 1)`` (inputs from :class:`HQImageEncoder`)."""
        masks, iou = self.mask_decoder(
            **self.decoder_inputs(image_embeddings, point_coords, point_labels),
            hq_token_only=False,
            intermediate_embeddings=[intermediate_embeddings],
        )[:2]
        return masks[:, 0], iou[:, 0]


class PyramidPromptDecoder(PromptDecoder):
    """SAM 2 / SAM 3: :class:`PromptDecoder` over the feature pyramid, with the object score as a third output.

    Args:
        sam: the ``Sam2Model`` or ``Sam3TrackerModel`` (``find_sam`` of a merged model).
    """

    input_names: ClassVar[tuple[str, ...]] = (*PyramidImageEncoder.output_names, "point_coords", "point_labels")
    output_names: ClassVar[tuple[str, ...]] = ("masks", "iou_scores", "object_score_logits")
    padding: ClassVar[str] = PADDING["always"]

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        high_resolution_features_0: torch.Tensor,
        high_resolution_features_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``masks`` ``(b, 1, m, m)``, ``iou_scores`` ``(b, 1)``, ``object_score_logits`` ``(b, 1)``."""
        masks, iou, _, object_score = self.mask_decoder(
            **self.decoder_inputs(image_embeddings, point_coords, point_labels),
            high_resolution_features=[high_resolution_features_0, high_resolution_features_1],
        )
        return masks[:, 0], iou[:, 0], object_score[:, 0]


# ModelFamily.export_split -> (image encoder, prompt decoder) of the SAM-style split; a family without one
# exports model.onnx only.
SPLITS: dict[str, tuple[type[nn.Module], type[PromptDecoder]]] = {
    "vit": (ImageEncoder, PromptDecoder),
    "vit_hq": (HQImageEncoder, HQPromptDecoder),
    "pyramid": (PyramidImageEncoder, PyramidPromptDecoder),
}


def exportable(model: nn.Module) -> nn.Module:
    """A merged, frozen copy of ``model`` in eval mode whose expert mixtures route densely.

    Args:
        model: a trained model (a ``PeftModel`` with LoRA / Conv-LoRA adapters, a merged or a plain model of
            an exportable family).

    Raises:
        ValueError: for a family whose export is not supported, naming it and why.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> exportable(random_sam(tiny_sam_config())).training
    False
    """
    family = family_of(model)
    if family.name not in EXPORTABLE_FAMILIES:
        reason = REFUSED.get(family.name, "its graph has not been checked against onnxruntime yet")
        raise ValueError(
            f"ONNX export supports the {', '.join(EXPORTABLE_FAMILIES)} families, not {family.name!r} "
            f"({family.description or family.name}): {reason}"
        )
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    set_routing(model, "dense")
    return model.eval().requires_grad_(False)


@dataclass
class _Graph:
    """One file to write: the module, example inputs by name, output names and the dynamic axes."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]

    def run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """PyTorch's outputs on ``inputs``."""
        with torch.no_grad():
            found = self.module(*inputs.values())
        return found if isinstance(found, tuple) else (found,)

    def signature(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """Each input's and output's shape (dynamic axes by name) and dtype, for ``deploy.json``."""

        def describe(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
            return {
                name: {
                    "shape": [self.axes.get(name, {}).get(axis, int(size)) for axis, size in enumerate(tensor.shape)],
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                }
                for name, tensor in tensors.items()
            }

        return {"inputs": describe(self.inputs), "outputs": describe(dict(zip(self.outputs, outputs, strict=True)))}


def _export(graph: _Graph, path: Path, opset: int) -> None:
    """Trace ``graph`` with the TorchScript-based exporter (no onnxscript needed; every family traces cleanly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes
        torch.onnx.export(
            graph.module.eval(),
            tuple(graph.inputs.values()),
            str(path),
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            dynamic_axes=graph.axes,
            opset_version=opset,
            dynamo=False,
        )


def _max_diff(path: Path, graph: _Graph, expected: tuple[torch.Tensor, ...]) -> float:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch over all outputs, on the traced batch
    and on its first sample alone (a graph that kept the traced batch size fails there)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first = {name: value[:1] for name, value in graph.inputs.items()}
    diffs = []
    for inputs, wanted in ((graph.inputs, expected), (first, graph.run(first))):
        try:
            found = session.run(None, {name: value.numpy() for name, value in inputs.items()})
        except Exception as error:  # onnxruntime raises its own exception types
            raise RuntimeError(
                f"{path.name}, traced at batch {TRACE_BATCH}, fails in onnxruntime at batch "
                f"{len(next(iter(inputs.values())))}; part of the graph has a fixed batch size: {error}"
            ) from error
        diffs += [float(np.abs(f - e.numpy()).max()) for f, e in zip(found, wanted, strict=True)]
    return max(diffs)


def _split_graphs(sam: nn.Module, split: str, pixels: torch.Tensor, size: int) -> dict[str, _Graph]:
    """The image encoder and prompt decoder of a SAM-style ``split`` (a key of ``SPLITS``), with example inputs."""
    encoder_cls, decoder_cls = SPLITS[split]
    encoder = encoder_cls(sam).eval()
    with torch.no_grad():
        features = encoder(pixels)
    features = features if isinstance(features, tuple) else (features,)
    batch = pixels.shape[0]
    available = dict(zip(encoder.output_names, features, strict=True))
    available["point_coords"] = torch.tensor([[[10.0, 12.0], [size * 0.7, size * 0.6]]] * batch)  # a box
    available["point_labels"] = torch.tensor([[2.0, 3.0]] * batch)
    batch_axis = {0: "batch"}
    points_axes = {0: "batch", 1: "points"}
    return {
        "image_encoder": _Graph(
            encoder,
            {"pixel_values": pixels},
            encoder.output_names,
            {"pixel_values": batch_axis} | {name: batch_axis for name in encoder.output_names},
        ),
        "prompt_decoder": _Graph(
            decoder_cls(sam).eval(),
            {name: available[name] for name in decoder_cls.input_names},
            decoder_cls.output_names,
            {name: batch_axis for name in (*decoder_cls.input_names, *decoder_cls.output_names)}
            | {"point_coords": points_axes, "point_labels": points_axes},
        ),
    }


def _preprocess_steps(size: int, pad_to_square: bool) -> list[str]:
    resize = (
        f"resize (bilinear, antialiased when shrinking) so that the longest side is {size}"
        if pad_to_square
        else f"resize (bilinear, antialiased when shrinking) to {size} x {size}, not keeping the aspect ratio"
    )
    steps = ["RGB uint8 (h, w, 3) -> float in [0, 1] (divide by 255)", resize]
    steps.append("normalise each channel: (x - mean) / std")
    if pad_to_square:
        steps.append(f"pad bottom and right with 0 to {size} x {size}")
    return [*steps, "channels first: (3, S, S); stack images into a batch"]


def _postprocess_steps(size: int, pad_to_square: bool, mode: str = "binary") -> list[str]:
    steps = [f"upsample the logits bilinearly (align_corners=False) to {size} x {size}"]
    if pad_to_square:
        steps.append("crop the padding: keep the top-left resized_size (the image after the longest-side resize)")
    steps.append("resize bilinearly to the original (h, w)")
    if mode == "instances":
        steps.append(
            "sigmoid, then the seeded watershed of convlora.instances.ids_from_maps(foreground, centre, boundary) "
            "with the task's instance_head settings: one id per object"
        )
    else:
        steps.append("binary: foreground where logit > 0; multi-class: argmax over the class axis")
    return steps


def deploy_description(
    model: nn.Module,
    task: TaskInfo,
    files: dict[str, str],
    opset: int,
    io: dict[str, Any] | None = None,
    not_exported: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What ``deploy.json`` says: the files, their inputs and outputs, pre- and post-processing.

    Args:
        model: the exported model (for its family).
        task: what it segments.
        files: graph name -> file name of every file written.
        opset: the ONNX opset.
        io: file name -> its ``inputs`` and ``outputs`` (name -> shape and dtype).
        not_exported: file name -> why it was not written.
    """
    family = family_of(model)
    size = task.image_size
    pad = family.input_format.pad_to_square
    used = {name for signature in (io or {}).values() for part in signature.values() for name in part}
    decoder = SPLITS[family.export_split][1] if family.export_split in SPLITS else PromptDecoder
    return {
        "format": "convlora-onnx",
        "format_version": DEPLOY_FORMAT_VERSION,
        "family": family.name,
        "method": task.method,
        "base_model": task.base_model,
        "mode": task.mode,
        "num_classes": task.num_classes,
        "class_names": list(task.class_names),
        "instance_head": task.instance_head,
        "files": files,
        "io": io or {},
        "not_exported": not_exported or {},
        "tensors": {name: text for name, text in TENSORS.items() if name in used},
        "opset": opset,
        "routing": "dense",
        "preprocess": {
            "input_name": "pixel_values",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "image_size": size,
            "pad_to_square": pad,
            "steps": _preprocess_steps(size, pad),
            "mean": list(family.image_mean),
            "std": list(family.image_std),
            "same_as": "convlora.models.processing.preprocess",
        },
        "postprocess": {
            "output_name": "logits",
            "shape": ["batch", task.out_channels, "m", "m"],
            "steps": _postprocess_steps(size, pad, task.mode),
            "same_as": "convlora.models.processing.postprocess_masks",
        },
        "prompt_decoder": {
            "inputs": list(decoder.input_names),
            "outputs": list(decoder.output_names),
            "point_labels": POINT_LABELS,
            "note": decoder.padding,
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
        model: the trained model (adapter ``PeftModel``, merged or plain model of an exportable family).
        task: what it segments (``TaskInfo``; its ``image_size`` must be the model's input size).
        output_dir: the output folder (replaced atomically).
        prompted: also write the image encoder and prompt decoder (not for multi-class tasks).
        opset: ONNX opset (17 or later).
        check: run every file in onnxruntime on a random batch of two and on its first image alone, and
            record the largest difference from PyTorch in ``deploy.json`` (needs ``onnxruntime``:
            ``pip install convlora[onnx]``).

    Returns:
        the contents of ``deploy.json``.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> task = TaskInfo("binary", 2, ["background", "object"], 64, "random:tiny", "base")
    >>> export_model(random_sam(tiny_sam_config()), task, "onnx")["files"]  # doctest: +SKIP
    {'model': 'model.onnx', 'image_encoder': 'image_encoder.onnx', 'prompt_decoder': 'prompt_decoder.onnx'}
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
    family = family_of(model)
    size = task.image_size
    if family.image_size(sam) != size:
        raise ValueError(
            f"task image_size is {size} but the {family.name} model takes {family.image_size(sam)} px inputs; "
            "resize the model (convlora.models.resize_model) or fix the task"
        )
    pixels = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompt_free = InstanceMapsModel if task.mode == "instances" else PromptFreeModel
    graphs = {
        "model": _Graph(
            prompt_free(model),
            {"pixel_values": pixels},
            ("logits",),
            {"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )
    }
    skipped = None
    if not prompted:
        skipped = "prompted=False (--no-prompted): the prompt-free model.onnx only"
    elif task.mode == "multiclass":
        skipped = "a multiclass model's class-query decoder has no prompt input (binary and instance tasks only)"
    elif family.export_split not in SPLITS:
        skipped = f"family {family.name!r} has no SAM-style encoder / prompt decoder split"
    else:
        graphs |= _split_graphs(sam, family.export_split, pixels, size)
    not_exported = {} if skipped is None else dict.fromkeys(("image_encoder.onnx", "prompt_decoder.onnx"), skipped)
    files = {name: f"{name}.onnx" for name in graphs}
    io: dict[str, Any] = {}
    checks: dict[str, float] = {}
    with atomic_dir(output_dir, "onnx", option="--output") as tmp:
        for name, graph in graphs.items():
            path = tmp / files[name]
            expected = graph.run(graph.inputs)
            io[files[name]] = graph.signature(expected)
            _export(graph, path, opset)
            if check:
                checks[files[name]] = _max_diff(path, graph, expected)
        info = deploy_description(model, task, files, opset, io, not_exported)
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
        base_model: checkpoint to put the adapter on, if not the one recorded at training time.
        prompted: also write the SAM-style image encoder and prompt decoder (not for multi-class tasks).
        opset: ONNX opset, 17 or later.
        check: compare every file with PyTorch in onnxruntime and record the differences.

    Returns:
        the contents of ``deploy.json``.

    >>> export_onnx("runs/polyp/adapter", "runs/polyp/onnx")["files"]["model"]  # doctest: +SKIP
    'model.onnx'
    """
    check_apart(output_dir, {"--model": model_dir, "--base-model": base_model})
    check_owned(output_dir, "onnx", option="--output")
    model, task = load_trained(model_dir, base_model=base_model)
    return export_model(model, task, output_dir, prompted=prompted, opset=opset, check=check)
