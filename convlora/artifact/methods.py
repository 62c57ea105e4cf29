"""Training methods by name: a plain-dict registry, one entry per method with build / export / load.

``conv_lora``, ``lora``, ``decoder`` and ``full`` share one engine; they differ in which weights train and
in what the run exports to its ``adapter/`` folder:

- ``conv_lora`` / ``lora``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (adapters and
  the trained mask decoder), loaded onto the base model with ``PeftModel.from_pretrained``.
- ``decoder``: ``decoder_model.safetensors``, the trained mask decoder only.
- ``full``: a complete checkpoint (``config.json`` + weights), loaded without the base model.

>>> sorted(METHODS)
['conv_lora', 'decoder', 'full', 'lora']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from peft import PeftModel
from torch import nn

from .._compat import quiet_peft_deprecations
from ..models import apply_conv_lora, find_sam, install_class_decoder
from ..models.adapter_check import check_adapter_complete, check_adapter_matches, read_safetensors_shapes
from ..models.adapters import apply_lora
from ..models.merged_io import write_merged

DECODER_WEIGHTS = "decoder_model.safetensors"


@dataclass(frozen=True)
class Method:
    """One training method.

    Args:
        name: the method's name (``TrainConfig.method``).
        uses_adapter: whether it reads the adapter settings (``TrainConfig.conv_lora``).
        build: ``(base, adapter_config) -> model`` with exactly the method's weights trainable.
        export: ``(model, folder)`` writes the trained weights into an existing (temporary) folder.
        load: ``(base, folder, source) -> model`` puts exported weights back onto ``base``; ``None`` for a
            method whose export is a whole model (loaded without a base).
        description: one line for help texts.
        peft_type: the ``peft_type`` its ``adapter_config.json`` records (adapter methods only); a plain PEFT
            adapter folder of that type loads as this method.
        label: how tables and plots name it (``"Conv-LoRA"``).
        colour: its colour in benchmark plots.
        mergeable: whether ``convlora merge`` folds it into the base model.
        merged_model: the architecture it runs at inference once merged (the cost benchmark's latency model):
            ``"base"`` for methods that only change weights.
        card_tags: Hub tags of its model card.
        library: what loads its export (``"peft"``, ``"transformers"``), for the model card; ``None``: convlora.
    """

    name: str
    uses_adapter: bool
    build: Callable[[nn.Module, Any], nn.Module]
    export: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path, str], nn.Module] | None
    description: str
    peft_type: str | None = None
    label: str = ""
    colour: str = "#9467bd"
    mergeable: bool = False
    merged_model: str = "base"
    card_tags: tuple[str, ...] = ()
    library: str | None = None


def _build_decoder(base: nn.Module, adapter_config: Any) -> nn.Module:
    base.requires_grad_(False)
    find_sam(base).mask_decoder.requires_grad_(True)
    return base


def _build_full(base: nn.Module, adapter_config: Any) -> nn.Module:
    return base.requires_grad_(True)


def _export_adapter(model: nn.Module, folder: Path) -> None:
    model.save_pretrained(str(folder))


def _export_decoder(model: nn.Module, folder: Path) -> None:
    decoder = find_sam(model).mask_decoder
    safetensors.torch.save_model(decoder, str(folder / DECODER_WEIGHTS), metadata={"format": "pt"})


def _load_adapter(base: nn.Module, folder: Path, source: str) -> nn.Module:
    check_adapter_matches(base, folder)
    try:
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(base, str(folder))
    except (RuntimeError, KeyError) as error:  # PEFT's own refusals of a mismatched state dict
        raise ValueError(f"{folder} does not fit base model {source}: {error}") from error
    check_adapter_complete(model, folder)
    return model


def _load_decoder(base: nn.Module, folder: Path, source: str) -> nn.Module:
    weights = folder / DECODER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder} has no {DECODER_WEIGHTS}")
    decoder = find_sam(base).mask_decoder
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
    return base


METHODS: dict[str, Method] = {
    "conv_lora": Method(
        "conv_lora", True, apply_conv_lora, _export_adapter, _load_adapter,
        "Conv-LoRA adapters on the image encoder + the mask decoder", peft_type="CONV_LORA", label="Conv-LoRA",
        colour="#d62728", mergeable=True, merged_model="conv_lora_merged", card_tags=("conv-lora", "lora"),
        library="peft",
    ),
    "lora": Method(
        "lora", True, apply_lora, _export_adapter, _load_adapter,
        "PEFT's LoRA with the same targets and rank + the mask decoder", peft_type="LORA", label="LoRA",
        colour="#1f77b4", mergeable=True, merged_model="lora_merged", card_tags=("lora",), library="peft",
    ),
    "decoder": Method(
        "decoder", False, _build_decoder, _export_decoder, _load_decoder, "the mask decoder only",
        label="decoder-only", colour="#bcbd22", card_tags=("mask-decoder",),
    ),
    "full": Method(
        "full", False, _build_full, write_merged, None, "every weight", label="full fine-tuning", colour="#7f7f7f",
        library="transformers",
    ),
}  # fmt: skip


def get_method(name: str) -> Method:
    """The registered method called ``name``, with a clear error otherwise."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_for_adapter(peft_type: Any, where: str) -> Method:
    """The adapter method whose adapters have ``peft_type`` (``"CONV_LORA"``, ``"LORA"``), with a clear error.

    Args:
        peft_type: ``PeftConfig.peft_type`` (a ``PeftType`` member or its string).
        where: what to name in the error (the adapter folder).

    >>> method_for_adapter("CONV_LORA", "adapter").name
    'conv_lora'
    """
    value = str(getattr(peft_type, "value", peft_type))
    for method in METHODS.values():
        if method.peft_type is not None and method.peft_type == value:
            return method
    known = sorted(method.peft_type for method in METHODS.values() if method.peft_type is not None)
    raise ValueError(f"{where} holds a {value} adapter; convlora loads {' and '.join(known)} adapters")


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
    # SAM 2 / 3 also score whether an object is there at all (pred_obj_score_head): no mask loss reaches it
    unused = ["iou_prediction_head", "iou_token", "pred_obj_score_head"]
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
    task: Any,
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

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.artifact import TaskInfo
    >>> task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "decoder")
    >>> model = build_task_model(random_sam(tiny_sam_config()), task)
    """
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    model = get_method(task.method).build(base, adapter_config)
    if freeze_iou_head:
        freeze_unused_decoder_parts(model, task.mode)
    return model
