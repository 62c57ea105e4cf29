"""Check a saved PEFT adapter against a base model before loading it, so that it is refused whole.

``PeftModel.from_pretrained`` reports a shape mismatch only once it has started copying tensors, and
cannot tell a truncated file from a tampered one. This module reads the safetensors header (no tensor
data), checks that the file is intact, and compares every saved tensor with the module it belongs to in
the base model, naming both shapes on a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# saved key fragment -> (expected shape from the adapted nn.Linear and the rank)
_ADAPTER_TENSORS = {
    "conv_lora_A.weight": lambda linear, r: (r, linear.in_features),
    "conv_lora_B.weight": lambda linear, r: (linear.out_features, r),
    "lora_A.weight": lambda linear, r: (r, linear.in_features),
    "lora_B.weight": lambda linear, r: (linear.out_features, r),
}


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header, after checking the file is complete.

    Raises:
        ValueError: the file is missing, truncated, or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several error types for broken files
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    _check_payload_size(path)
    return shapes


def _check_payload_size(path: Path) -> None:
    """The header's offsets must cover exactly the bytes after it (catches truncation and appended data)."""
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    actual = path.stat().st_size - 8 - header_size
    if actual != end:
        raise ValueError(
            f"{path} is damaged: its header describes {end} bytes of tensor data but the file holds {actual}"
        )


def check_adapter_matches(base: nn.Module, directory: str | Path) -> None:
    """Refuse an adapter folder that does not fit ``base``, naming the tensor and both shapes.

    Args:
        base: the model the adapter will be loaded onto (with any class decoder already installed).
        directory: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    >>> check_adapter_matches(sam, "runs/polyp/adapter")  # doctest: +SKIP
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    rank = config.get("r")
    weights = directory / ADAPTER_WEIGHTS
    shapes = read_safetensors_shapes(weights)
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    for key, shape in shapes.items():
        name = key.removeprefix(_PREFIX)
        for fragment, expected_for in _ADAPTER_TENSORS.items():
            if name.endswith("." + fragment):
                module_name = name[: -len(fragment) - 1]
                linear = modules.get(module_name)
                if not isinstance(linear, nn.Linear):
                    raise ValueError(
                        f"{weights}: tensor {key} adapts {module_name!r}, which is not a linear layer of the base "
                        "model; the adapter was trained on a different architecture"
                    )
                expected = expected_for(linear, rank)
                if shape != expected:
                    raise ValueError(
                        f"{weights}: tensor {key} has shape {list(shape)} but the base model expects "
                        f"{list(expected)} for {module_name}; the adapter was trained on a different base model"
                    )
                break
        else:
            if ".modules_to_save." in name or "conv_lora_experts" in name:
                continue
            target = params.get(name)
            if target is None and ".mask_decoder." in f".{name}":
                raise ValueError(
                    f"{weights}: tensor {key} has no counterpart {name!r} in the base model's mask decoder; "
                    "the adapter was trained on a different architecture (or number of classes)"
                )
            if target is not None and tuple(target.shape) != shape:
                raise ValueError(
                    f"{weights}: tensor {key} has shape {list(shape)} but the base model's {name} has shape "
                    f"{list(target.shape)}; the adapter was trained on a different base model"
                )


def tensors_equal_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts have the same keys and shapes."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
