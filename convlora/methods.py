"""Training methods by name, and the trained artifact each one exports and loads back.

``conv_lora``, ``lora``, ``decoder`` and ``full`` share one engine; they differ in which weights train
and in what the run exports to its ``adapter/`` folder:

- ``conv_lora`` / ``lora``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (adapters and
  the trained mask decoder), loaded onto the base model with ``PeftModel.from_pretrained``.
- ``decoder``: ``decoder_model.safetensors``, the trained mask decoder only.
- ``full``: a complete checkpoint (``config.json`` + weights).

Every export also holds ``convlora_task.json`` (mode, classes, image size, base model, method) so that
:func:`load_trained` rebuilds the exact model in one call, and a model card ``README.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
from peft import PeftModel
from torch import nn

from ._io import atomic_dir, sha256_file, write_json
from .sam import find_sam, load_sam
from .semantic import install_class_decoder

TASK_FILE = "convlora_task.json"
TASK_FORMAT_VERSION = 1
DECODER_WEIGHTS = "decoder_model.safetensors"


@dataclass
class TaskInfo:
    """What a trained model segments and how to rebuild it.

    Args:
        mode: ``"binary"`` or ``"multiclass"``.
        num_classes: classes including the background (2 for binary).
        class_names: one name per class.
        image_size: square input size of the model.
        base_model: the SAM checkpoint the run started from (embedded name, directory or hub id).
        method: the training method.
        metrics: final metrics, for the model card.
        merged: the folder holds a merged model (``convlora merge``), loaded without the base model.
        format_version: version of this file's format; files from a newer convlora are refused.
        weights_sha256: SHA-256 of each weights file in the folder, recorded at export and checked by
            :func:`load_trained` (safetensors files carry no checksum of their own).
    """

    mode: str
    num_classes: int
    class_names: list[str]
    image_size: int
    base_model: str
    method: str
    metrics: dict[str, Any] = field(default_factory=dict)
    merged: bool = False
    weights_sha256: dict[str, str] = field(default_factory=dict)
    format_version: int = TASK_FORMAT_VERSION

    @property
    def out_channels(self) -> int:
        """Channels of the model's logits: 1 for binary, ``num_classes`` for multi-class."""
        return 1 if self.mode == "binary" else self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy of every field."""
        return asdict(self)

    @classmethod
    def read(cls, directory: str | Path) -> TaskInfo:
        """Read ``convlora_task.json`` from a trained-model folder, with clear errors."""
        path = Path(directory) / TASK_FILE
        if not path.is_file():
            raise ValueError(
                f"{directory} is not a convlora model folder: {TASK_FILE} is missing "
                "(expected the adapter/ folder of a convlora training run)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        version = data.get("format_version", 0)
        if not isinstance(version, int) or version > TASK_FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer convlora (format {version}); this one reads <= "
                f"{TASK_FORMAT_VERSION}. Upgrade convlora."
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown}; it was probably written by a newer convlora")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path} is incomplete: {error}") from error


def freeze_unused_decoder_parts(model: nn.Module, mode: str) -> list[str]:
    """Freeze the mask-decoder parts that prompt-free segmentation never uses; returns their names.

    Args:
        model: the task model (PEFT-wrapped or not).
        mode: ``"binary"`` or ``"multiclass"``.

    SAM's IoU head is not used by mask losses; binary runs use only the first mask token's hypernetwork
    MLP; multi-class runs use the class tokens and class MLP instead of SAM's mask tokens. Frozen, these
    parts keep their pretrained values (no weight decay drift) and distributed training needs no
    unused-parameter search for them.
    """
    unused = ["iou_prediction_head", "iou_token"]
    if mode == "binary":
        unused += ["output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3."]
    else:
        unused += ["mask_tokens", "output_hypernetworks_mlps."]
    frozen = []
    for name, param in model.named_parameters():
        if "mask_decoder" in name and any(part in name for part in unused) and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_task_model(
    base: nn.Module,
    task: TaskInfo,
    adapter_config: Any = None,
    *,
    freeze_iou_head: bool = True,
) -> nn.Module:
    """Prepare a loaded SAM for ``task.method``: class decoder, adapters, and which weights train.

    Args:
        base: a ``SamModel`` at ``task.image_size``.
        task: the task; ``task.method`` picks the method.
        adapter_config: a ``ConvLoraConfig`` for ``conv_lora`` / ``lora``.
        freeze_iou_head: freeze the decoder parts prompt-free training never uses.

    >>> from convlora.sam import random_sam, tiny_sam_config
    >>> task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "decoder")
    >>> model = build_task_model(random_sam(tiny_sam_config()), task)
    """
    from .sam import apply_conv_lora

    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    if task.method in ("conv_lora", "lora"):
        model = apply_conv_lora(base, adapter_config, plain_lora=task.method == "lora")
    elif task.method == "decoder":
        base.requires_grad_(False)
        find_sam(base).mask_decoder.requires_grad_(True)
        model = base
    elif task.method == "full":
        model = base.requires_grad_(True)
    else:
        raise ValueError(f"Unknown method {task.method!r}; choose conv_lora, lora, decoder or full")
    if freeze_iou_head:
        freeze_unused_decoder_parts(model, task.mode)
    return model


def export_trained(model: nn.Module, task: TaskInfo, directory: str | Path, model_card: str | None = None) -> Path:
    """Write a trained model's artifact (see the module docstring) atomically into ``directory``.

    Args:
        model: the trained model (a ``PeftModel`` for ``conv_lora``/``lora``).
        task: the task description written to ``convlora_task.json``.
        directory: the output folder, replaced as a whole.
        model_card: text of the ``README.md`` written beside the weights.
    """
    from .export import write_merged

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(str(tmp))
        elif task.method == "decoder":
            decoder = find_sam(model).mask_decoder
            safetensors.torch.save_model(decoder, str(tmp / DECODER_WEIGHTS), metadata={"format": "pt"})
        else:
            write_merged(model, tmp)
        write_task_file(tmp, task)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
    return directory


def write_task_file(directory: Path, task: TaskInfo) -> None:
    """Write ``convlora_task.json`` into a (temporary) folder, recording the SHA-256 of its weights files."""
    hashes = {path.name: sha256_file(path) for path in sorted(directory.glob("*.safetensors"))}
    write_json(directory / TASK_FILE, {**task.to_dict(), "weights_sha256": hashes})


def verify_weights(directory: str | Path, task: TaskInfo) -> None:
    """Refuse a model folder whose weights files differ from what was recorded at export.

    Raises:
        ValueError: a recorded file is missing or its SHA-256 differs (truncated, corrupted or altered).
    """
    for name, expected in task.weights_sha256.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ValueError(f"{path} is missing; {TASK_FILE} records it as part of this model")
        found = sha256_file(path)
        if found != expected:
            raise ValueError(
                f"{path} is damaged or was altered after export: its SHA-256 is {found[:12]}..., "
                f"{TASK_FILE} recorded {expected[:12]}..."
            )


def load_trained(directory: str | Path, *, base_model: str | None = None) -> tuple[nn.Module, TaskInfo]:
    """Rebuild a trained model from its ``adapter/`` folder, in evaluation mode.

    Args:
        directory: the folder written by a training run (``RUN/adapter``) or by :func:`export_trained`.
        base_model: load the adapter onto this SAM instead of the one recorded at training time (for
            example the same checkpoint at another path).

    Returns:
        ``(model, task)``; ``model(pixel_values=x).pred_masks[:, 0]`` gives ``task.out_channels`` logits.

    >>> model, task = load_trained("runs/polyp/adapter")  # doctest: +SKIP
    """
    directory = Path(directory)
    task = TaskInfo.read(directory)
    verify_weights(directory, task)
    if task.method == "full" or task.merged:
        model = load_sam(directory)
        return model.eval(), task
    try:
        base = load_sam(base_model or task.base_model, image_size=task.image_size)
    except ValueError as error:
        if base_model is not None:
            raise
        raise ValueError(f"{error} ({directory} was trained on it; pass base_model / --base-model)") from error
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    if task.method in ("conv_lora", "lora"):
        from .adapter_check import check_adapter_complete, check_adapter_matches

        check_adapter_matches(base, directory)
        try:
            model = PeftModel.from_pretrained(base, str(directory))
        except (RuntimeError, KeyError) as error:  # PEFT's own refusals of a mismatched state dict
            raise ValueError(f"{directory} does not fit base model {base_model or task.base_model}: {error}") from error
        check_adapter_complete(model, directory)
    elif task.method == "decoder":
        weights = directory / DECODER_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"{directory} has no {DECODER_WEIGHTS}")
        from .adapter_check import read_safetensors_shapes

        decoder = find_sam(base).mask_decoder
        source = base_model or task.base_model
        expected = {name: tuple(tensor.shape) for name, tensor in decoder.state_dict().items()}
        for name, shape in read_safetensors_shapes(weights).items():
            if name in expected and shape != expected[name]:
                raise ValueError(
                    f"{weights} does not fit the mask decoder of {source}: tensor {name} has shape {list(shape)}, "
                    f"the decoder's has {list(expected[name])}; it was trained on a different base model"
                )
        missing, unexpected = safetensors.torch.load_model(decoder, str(weights), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not fit the mask decoder of {source}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model = base
    else:
        raise ValueError(f"{directory / TASK_FILE}: unknown method {task.method!r}")
    return model.eval(), task


def segmentation_logits(model: nn.Module, pixel_values: Any) -> Any:
    """Prompt-free mask logits ``(b, k, s/4, s/4)``: ``k = 1`` (binary) or one map per class."""
    return model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0]
