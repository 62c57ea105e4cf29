"""Writing and reading convlora artifacts: adapters and merged checkpoints, always atomically.

A Conv-LoRA adapter is PEFT's own pair of files (``adapter_config.json`` + ``adapter_model.safetensors``).
A merged Conv-LoRA model is one self-contained checkpoint: transformers' ``config.json`` with a
``convlora_merged`` block describing the conv side branches, and the weights in
``convlora_model.safetensors``. The weights file deliberately does not use transformers' name
``model.safetensors``: stock ``SamModel.from_pretrained`` would otherwise load the folded weights,
silently drop the side branches and produce different masks. Pointed at a merged Conv-LoRA directory it
fails instead; :func:`load_merged` (and ``convlora.load_sam``) rebuild the branches. A merged plain-LoRA
(or decoder-only) binary model has no side branch and is saved as a vanilla transformers checkpoint; a
multi-class model (see ``convlora.models.semantic``) always uses the convlora layout, since its decoder has
class tokens that stock transformers does not know.

The ordinary ``save_pretrained`` of such a model writes the same layout, as :func:`save_merged` does: importing
this module registers that writer behind the ``save_pretrained`` that ``merge_and_unload``, :func:`load_merged`
and ``install_class_decoder`` give those models (``convlora.tuner.merged``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from .._io import atomic_dir, write_json
from ..tuner import ConvLoraMergedLinear
from ..tuner.merged import guard_save_pretrained, register_merged_saver
from .family import model_class
from .semantic import class_decoder_classes, install_class_decoder

MERGED_WEIGHTS_NAME = "convlora_model.safetensors"
MERGED_FORMAT_VERSION = 1


def merged_layers(model: nn.Module) -> dict[str, ConvLoraMergedLinear]:
    """The layers of a merged model that carry conv side branches, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ConvLoraMergedLinear)}


def merged_extra_parameters(model: nn.Module) -> int:
    """Parameters a merged Conv-LoRA model has beyond its base architecture (the side branches).

    Args:
        model: a model returned by ``merge_and_unload()``.

    >>> merged_extra_parameters(nn.Linear(2, 2))
    0
    """
    return sum(p.numel() for layer in merged_layers(model).values() for p in layer.side_branches.parameters())


def save_adapter(peft_model: Any, directory: str | Path, **kwargs: Any) -> Path:
    """``peft_model.save_pretrained(directory)``, written to a temporary directory and renamed into place.

    Args:
        peft_model: a ``PeftModel``.
        directory: target directory; replaced as a whole once the new files are complete.
        kwargs: passed to ``save_pretrained``.
    """
    directory = Path(directory)
    with atomic_dir(directory, "adapter") as tmp:
        peft_model.save_pretrained(str(tmp), **kwargs)
    return directory


def save_merged(model: nn.Module, directory: str | Path) -> Path:
    """Save a model returned by ``merge_and_unload()`` as one self-contained checkpoint.

    Args:
        model: a merged ``SamModel`` / ``SamHQModel`` (with or without conv side branches).
        directory: output directory, replaced atomically.

    >>> save_merged(peft_model.merge_and_unload(), "out/merged")  # doctest: +SKIP
    """
    directory = Path(directory)
    with atomic_dir(directory, "merged") as tmp:
        write_merged(model, tmp)
    return directory


def write_merged(model: nn.Module, directory: Path) -> None:
    """Write the files of :func:`save_merged` into an existing (temporary) directory."""
    layers = merged_layers(model)
    num_classes = class_decoder_classes(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"save_merged needs a transformers model with a config, got {type(model).__name__}")
    if not layers and num_classes is None:
        type(model).save_pretrained(model, str(directory))  # transformers' own, past any per-instance override
        return
    config_dict = config.to_dict()
    config_dict["convlora_merged"] = {
        "format_version": MERGED_FORMAT_VERSION,
        "layers": {name: layer.branch_specs() for name, layer in layers.items()},
        "num_classes": num_classes,
    }
    write_json(directory / "config.json", config_dict)
    safetensors.torch.save_model(model, str(directory / MERGED_WEIGHTS_NAME), metadata={"format": "pt"})


def load_merged(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_merged`, side branches included.

    Args:
        directory: the folder written by :func:`save_merged`.

    Raises:
        ValueError: when the directory is not a merged convlora checkpoint, or its weights do not match
            its config (names the missing or unexpected tensors).
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    weights = directory / MERGED_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"{directory} is not a merged convlora checkpoint: config.json is missing")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    block = config_dict.pop("convlora_merged", None)
    if block is None or not weights.is_file():
        raise ValueError(
            f"{directory} is not a merged Conv-LoRA checkpoint (expected config.json with a 'convlora_merged' "
            f"block and {MERGED_WEIGHTS_NAME}); load vanilla checkpoints with convlora.load_sam"
        )
    if int(block.get("format_version", 0)) > MERGED_FORMAT_VERSION:
        raise ValueError(
            f"{config_file} was written by a newer convlora (merged format {block['format_version']}); "
            f"this convlora reads format <= {MERGED_FORMAT_VERSION}. Upgrade convlora."
        )
    model_cls = model_class(config_dict.get("model_type"), config_file)
    model = model_cls(model_cls.config_class.from_dict(config_dict))
    if block.get("num_classes") is not None:
        install_class_decoder(model, int(block["num_classes"]))
    for name, specs in block["layers"].items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child_name, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{config_file}: merged layer {name!r} is not an nn.Linear in this architecture")
        new = ConvLoraMergedLinear(old.in_features, old.out_features, specs, bias=old.bias is not None)
        setattr(parent, child_name, new.requires_grad_(False))
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except Exception as error:  # safetensors raises several types for corrupt files
        raise ValueError(f"Could not read {weights}: {error}") from error
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config.json: missing tensors {sorted(missing)[:5]}, "
            f"unexpected tensors {sorted(unexpected)[:5]}"
        )
    return guard_save_pretrained(model).eval()


def _save_pretrained_merged(model: nn.Module, directory: Path) -> None:
    with atomic_dir(directory, "merged", option="save_pretrained") as tmp:
        write_merged(model, tmp)


register_merged_saver(_save_pretrained_merged)
