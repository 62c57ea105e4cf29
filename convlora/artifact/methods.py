"""Training methods by name: a plain-dict registry, one entry per method with build / export / load.

Every method shares one engine; they differ in which weights train and in what the run exports to its
``adapter/`` folder:

- ``conv_lora`` and PEFT's own methods (``lora``, ``dora``, ``loha``, ``lokr``, ``ia3``, ``boft``, ``vera``,
  ``ln_tuning``; configured by :mod:`convlora.artifact.peft_methods`): PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors`` (the method's tensors and the trained mask decoder), loaded onto the base
  model with ``PeftModel.from_pretrained``.
- ``bitfit``: ``bitfit_model.safetensors``, every bias of the image encoder and the trained mask decoder.
- ``decoder``: ``decoder_model.safetensors``, the trained mask decoder only.
- ``full``: a complete checkpoint (``config.json`` + weights), loaded without the base model.

>>> sorted(METHODS)
['bitfit', 'boft', 'conv_lora', 'decoder', 'dora', 'full', 'ia3', 'ln_tuning', 'loha', 'lokr', 'lora', 'vera']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from peft import PeftModel
from torch import nn

from .._compat import keep_trained_modules_on_unload, quiet_peft_deprecations
from ..instances.model import HEAD_ATTRIBUTE, InstanceSettings, has_instance_head, install_instance_head, trained_head
from ..models import apply_conv_lora, find_sam, install_class_decoder
from ..models.adapter_check import check_adapter_complete, check_adapter_matches, read_safetensors_shapes
from ..models.merged_io import write_merged
from .peft_methods import PEFT_METHODS, apply_peft_method, check_peft_options

DECODER_WEIGHTS = "decoder_model.safetensors"
BITFIT_WEIGHTS = "bitfit_model.safetensors"


@dataclass(frozen=True)
class Method:
    """One training method.

    Args:
        name: the method's name (``TrainConfig.method``).
        uses_adapter: whether it reads the adapter settings (``TrainConfig.conv_lora``).
        build: ``(base, adapter_config) -> model`` with exactly the method's weights trainable; PEFT's methods
            also take ``options=`` (their config's other fields, ``--peft.KEY``).
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


def _peft_build(name: str) -> Callable[..., nn.Module]:
    def build(base: nn.Module, adapter_config: Any, options: dict[str, Any] | None = None) -> nn.Module:
        return apply_peft_method(base, name, adapter_config, options=options)

    build.__name__ = build.__qualname__ = f"build_{name}"
    return build


def _bitfit_tensors(model: nn.Module) -> dict[str, Any]:
    """What BitFit trains and exports: every bias of the image encoder and the whole mask decoder, by SAM name."""
    sam = find_sam(model)
    biases = {f"vision_encoder.{n}": p for n, p in sam.vision_encoder.named_parameters() if n.split(".")[-1] == "bias"}
    return biases | {f"mask_decoder.{n}": t for n, t in sam.mask_decoder.state_dict().items()}


def _build_bitfit(base: nn.Module, adapter_config: Any) -> nn.Module:
    base.requires_grad_(False)
    sam = find_sam(base)
    for name, param in sam.vision_encoder.named_parameters():
        param.requires_grad_(name.split(".")[-1] == "bias")
    sam.mask_decoder.requires_grad_(True)
    return base


def _export_bitfit(model: nn.Module, folder: Path) -> None:
    tensors = {name: t.detach().contiguous().clone() for name, t in _bitfit_tensors(model).items()}
    safetensors.torch.save_file(tensors, str(folder / BITFIT_WEIGHTS), metadata={"format": "pt"})


def _load_bitfit(base: nn.Module, folder: Path, source: str) -> nn.Module:
    weights = folder / BITFIT_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder} has no {BITFIT_WEIGHTS}")
    expected = {name: tuple(t.shape) for name, t in _bitfit_tensors(base).items()}
    found = read_safetensors_shapes(weights)
    for name, shape in found.items():
        if name not in expected:
            raise ValueError(
                f"{weights}: tensor {name} is no bias of the image encoder or tensor of the mask decoder of {source}; "
                "it was trained on a different architecture"
            )
        if shape != expected[name]:
            raise ValueError(
                f"{weights}: tensor {name} has shape {list(shape)} but {source} expects {list(expected[name])}; it "
                "was trained on a different base model"
            )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{weights} lacks {len(missing)} tensors {source} has, e.g. {missing[:3]}")
    find_sam(base).load_state_dict(safetensors.torch.load_file(str(weights)), strict=False)
    return base


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
    return keep_trained_modules_on_unload(model)


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
        "lora", True, _peft_build("lora"), _export_adapter, _load_adapter,
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
    # PEFT's own methods (convlora.artifact.peft_methods says how each is configured), merged into a plain model
    "dora": Method(
        "dora", True, _peft_build("dora"), _export_adapter, _load_adapter,
        "PEFT's DoRA (LoRA with a learned magnitude per output) on the same targets + the mask decoder",
        peft_type="LORA", label="DoRA", colour="#ff7f0e", mergeable=True, card_tags=("dora", "lora"), library="peft",
    ),
    "loha": Method(
        "loha", True, _peft_build("loha"), _export_adapter, _load_adapter,
        "PEFT's LoHa (Hadamard product of two low-rank pairs) on the same targets + the mask decoder",
        peft_type="LOHA", label="LoHa", colour="#2ca02c", mergeable=True, card_tags=("loha",), library="peft",
    ),
    "lokr": Method(
        "lokr", True, _peft_build("lokr"), _export_adapter, _load_adapter,
        "PEFT's LoKr (Kronecker product, low-rank factor) on the same targets + the mask decoder",
        peft_type="LOKR", label="LoKr", colour="#98df8a", mergeable=True, card_tags=("lokr",), library="peft",
    ),
    "ia3": Method(
        "ia3", True, _peft_build("ia3"), _export_adapter, _load_adapter,
        "PEFT's (IA)3 (learned scaling vectors) on the same targets + the mask decoder",
        peft_type="IA3", label="(IA)3", colour="#8c564b", mergeable=True, card_tags=("ia3",), library="peft",
    ),
    "boft": Method(
        "boft", True, _peft_build("boft"), _export_adapter, _load_adapter,
        "PEFT's BOFT (butterfly orthogonal rotation) on the same targets + the mask decoder",
        peft_type="BOFT", label="BOFT", colour="#e377c2", mergeable=True, card_tags=("boft",), library="peft",
    ),
    "vera": Method(
        "vera", True, _peft_build("vera"), _export_adapter, _load_adapter,
        "PEFT's VeRA (shared frozen random projections, trained scaling vectors) on the same targets + the "
        "mask decoder", peft_type="VERA", label="VeRA", colour="#9467bd", mergeable=True, card_tags=("vera",),
        library="peft",
    ),
    "ln_tuning": Method(
        "ln_tuning", True, _peft_build("ln_tuning"), _export_adapter, _load_adapter,
        "PEFT's LN tuning (the LayerNorms of the encoder blocks) + the mask decoder", peft_type="LN_TUNING",
        label="LN tuning", colour="#c5b0d5", mergeable=True, card_tags=("ln-tuning",), library="peft",
    ),
    "bitfit": Method(
        "bitfit", False, _build_bitfit, _export_bitfit, _load_bitfit,
        "BitFit: every bias of the image encoder + the mask decoder", label="BitFit", colour="#17becf",
        card_tags=("bitfit",),
    ),
}  # fmt: skip


def get_method(name: str) -> Method:
    """The registered method called ``name``, with a clear error otherwise."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_for_adapter(peft_type: Any, where: str, config: Any = None) -> Method:
    """The adapter method whose adapters have ``peft_type`` (``"CONV_LORA"``, ``"LORA"``), with a clear error.

    Args:
        peft_type: ``PeftConfig.peft_type`` (a ``PeftType`` member or its string).
        where: what to name in the error (the adapter folder).
        config: the adapter's ``PeftConfig``, when known: of several methods with one ``peft_type`` (``lora``,
            ``dora``), the one whose fixed settings it has (``use_dora=True``: ``dora``).

    >>> method_for_adapter("CONV_LORA", "adapter").name, method_for_adapter("LOHA", "adapter").name
    ('conv_lora', 'loha')
    """
    value = str(getattr(peft_type, "value", peft_type))
    candidates = [m for m in METHODS.values() if m.peft_type is not None and m.peft_type == value]
    for method in candidates:
        fixed = PEFT_METHODS[method.name].fixed if method.name in PEFT_METHODS else {}
        if fixed and config is not None and all(getattr(config, k, None) == v for k, v in fixed.items()):
            return method
    for method in candidates:
        fixed = PEFT_METHODS[method.name].fixed if method.name in PEFT_METHODS else {}
        if not fixed:
            return method
    if candidates:
        return candidates[0]
    known = sorted({method.peft_type for method in METHODS.values() if method.peft_type is not None})
    raise ValueError(f"{where} holds a {value} adapter; convlora loads {', '.join(known)} adapters")


def freeze_unused_decoder_parts(model: nn.Module, mode: str) -> list[str]:
    """Freeze the mask-decoder parts that prompt-free segmentation never uses; returns their names.

    Args:
        model: the task model (PEFT-wrapped or not).
        mode: ``"binary"``, ``"multiclass"`` or ``"instances"``.

    SAM's IoU head is not used by mask losses; binary runs use only the first mask token's hypernetwork
    MLP; multi-class runs use the class tokens and class MLP instead of SAM's mask tokens; instance runs
    train their own decoder (``instance_head``) and no loss reaches SAM's mask decoder, prompt encoder or the
    decoder's positional encoding (``shared_image_embedding``) at all. Frozen, these
    parts keep their pretrained values (no weight decay drift) and distributed training needs no
    unused-parameter search for them.
    """
    # SAM 2 / 3 also score whether an object is there at all (pred_obj_score_head): no mask loss reaches it
    unused = ["iou_prediction_head", "iou_token", "pred_obj_score_head"]
    if mode == "instances":
        unused = [""]  # every part of the mask decoder
    elif mode == "binary":
        unused += ["output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3."]
    else:
        unused += ["mask_tokens", "output_hypernetworks_mlps."]
    # instance runs never prompt: SAM's prompt encoder and the decoder's positional encoding get no loss either
    owners = ("mask_decoder", "prompt_encoder", "shared_image_embedding") if mode == "instances" else ("mask_decoder",)
    frozen = []
    for name, param in model.named_parameters():
        if any(owner in name for owner in owners) and any(part in name for part in unused) and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_task_model(
    base: nn.Module,
    task: Any,
    adapter_config: Any = None,
    *,
    freeze_iou_head: bool = True,
    peft_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a loaded SAM for ``task.method``: class decoder, adapters, and which weights train.

    Args:
        base: a ``SamModel`` at ``task.image_size``.
        task: the task; ``task.method`` picks the method.
        adapter_config: a ``ConvLoraConfig`` for the adapter methods (``conv_lora``, ``lora``, ``dora``, ...).
        freeze_iou_head: freeze the decoder parts prompt-free training never uses.
        peft_options: more fields of a PEFT method's config (``TrainConfig.peft``); refused for other methods.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> from convlora.artifact import TaskInfo
    >>> task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "decoder")
    >>> model = build_task_model(random_sam(tiny_sam_config()), task)
    """
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    method = get_method(task.method)
    if task.mode == "instances":
        task.instance_head = install_instance_head(base, InstanceSettings.from_dict(task.instance_head)).to_dict()
        if method.uses_adapter:
            adapter_config = _saving_head(adapter_config)
    options = check_peft_options(task.method, peft_options or {})
    if options:
        model = method.build(base, adapter_config, options=options)  # type: ignore[call-arg]
    else:
        model = method.build(base, adapter_config)
    train_instance_head(model)
    if freeze_iou_head:
        freeze_unused_decoder_parts(model, task.mode)
    return model


def _saving_head(adapter_config: Any) -> Any:
    """A copy of an adapter config whose ``modules_to_save`` also lists the instance decoder."""
    import copy

    from ..tuner.config import ConvLoraConfig

    config = copy.copy(adapter_config) if adapter_config is not None else ConvLoraConfig()
    kept = list(config.modules_to_save or [])
    config.modules_to_save = kept if HEAD_ATTRIBUTE in kept else [*kept, HEAD_ATTRIBUTE]
    return config


def train_instance_head(model: nn.Module) -> None:
    """Make a model's instance decoder trainable (under PEFT its trained copy, never the frozen original).

    Every method freezes all but its own weights; the instance decoder always trains with them. No-op for a
    model without one.
    """
    if has_instance_head(model):
        trained_head(model).requires_grad_(True)
