"""Check a saved PEFT adapter against a base model before loading it, so that it is refused whole.

``PeftModel.from_pretrained`` reports a shape mismatch only once it has started copying tensors, and
cannot tell a truncated file from a tampered one. This module validates ``adapter_config.json``, reads
the safetensors header (no tensor data), checks that the file is intact, and compares every saved tensor
with the module it belongs to in the base model, naming both shapes on a mismatch (LoRA's and Conv-LoRA's
tensors by their shapes; other PEFT methods' tensors by the module they adapt, their shapes then by PEFT
itself when loading); after loading,
:func:`check_adapter_complete` refuses a model some of whose adapter tensors were not in the file.

A damaged header or a truncated file is caught here; altered tensor bytes are not (safetensors has no
checksum): ``load_trained`` checks those against the SHA-256 recorded in ``convlora_task.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftConfig, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors import safe_open
from torch import nn

from .family import find_sam

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# saved key fragment -> (expected shape from the adapted nn.Linear and the rank)
_ADAPTER_TENSORS = {
    "conv_lora_A.weight": lambda linear, r: (r, linear.in_features),
    "conv_lora_B.weight": lambda linear, r: (linear.out_features, r),
    "lora_A.weight": lambda linear, r: (r, linear.in_features),
    "lora_B.weight": lambda linear, r: (linear.out_features, r),
    "lora_magnitude_vector": lambda linear, r: (linear.out_features,),  # DoRA
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
    try:
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path} is damaged: its header is malformed ({error!r} missing)") from error
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
    config = read_adapter_config(directory)
    if hasattr(config, "resolve_targets"):  # a Conv-LoRA adapter: refuse another family's, naming both
        sam = find_sam(base)
        config.resolve_targets(sam.config.model_type, f"{type(sam).__name__} (loading {directory})")
    rank = getattr(config, "r", None)
    # the name every tensor of the method's layers starts with ("hada_", "ia3_", "vera_lambda_"), None if unknown
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type)
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
            if ".conv_lora_experts." in name:
                module_name = name.split(".conv_lora_experts.")[0]
                if not isinstance(modules.get(module_name), nn.Linear):
                    raise ValueError(
                        f"{weights}: tensor {key} adapts {module_name!r}, which is not a linear layer of the base "
                        "model; the adapter was trained on a different architecture"
                    )
                continue
            if prefix is not None and _method_tensor(name, prefix, modules, weights, key):
                continue
            target = params.get(name)
            if target is None:
                raise ValueError(
                    f"{weights}: tensor {key} has no counterpart {name!r} in the base model; the adapter was "
                    "trained on a different architecture (or number of classes), or the file was altered"
                )
            if tuple(target.shape) != shape:
                raise ValueError(
                    f"{weights}: tensor {key} has shape {list(shape)} but the base model's {name} has shape "
                    f"{list(target.shape)}; the adapter was trained on a different base model"
                )


def _method_tensor(name: str, prefix: str, modules: dict[str, nn.Module], weights: Path, key: str) -> bool:
    """Whether a saved tensor belongs to the adapter method's layers (refusing one whose module is missing).

    PEFT saves a layer's tensors as ``<module>.<prefix>...`` (``...attn.qkv.hada_w1_a``) and a method's shared
    tensors at the top (VeRA's ``base_model.vera_A``); their shapes are checked by PEFT when loading.
    """
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "base_model" and parts[1].split("_")[0] == prefix.split("_")[0]:
        return True
    index = next((i for i, part in enumerate(parts) if part.startswith(prefix)), None)
    if index is None or index == 0:
        return False
    module_name = ".".join(parts[:index])
    if module_name not in modules:
        raise ValueError(
            f"{weights}: tensor {key} adapts {module_name!r}, which is not a module of the base model; the adapter "
            "was trained on a different architecture"
        )
    return True


def read_adapter_config(directory: str | Path) -> Any:
    """The validated ``PeftConfig`` of an adapter folder; any problem is a ValueError naming the file.

    >>> config = read_adapter_config("runs/polyp/adapter")  # doctest: +SKIP
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        return PeftConfig.from_pretrained(str(directory))
    except Exception as error:  # json, PEFT and our own validation raise several types
        raise ValueError(f"{path}: {error}") from error


def check_adapter_complete(model: nn.Module, directory: str | Path) -> None:
    """After loading: every adapter tensor the model expects must have come from the file.

    PEFT only warns about adapter tensors missing from a file (say, an adapter trained on a shallower
    encoder) and leaves them at their initial values; this refuses such a partly loaded model.
    """
    weights = Path(directory) / ADAPTER_WEIGHTS
    missing = sorted(set(get_peft_model_state_dict(model)) - set(read_safetensors_shapes(weights)))
    if missing:
        raise ValueError(
            f"{weights} lacks {len(missing)} tensors the base model needs, e.g. {missing[:3]}; the adapter was "
            "trained on a different architecture (e.g. fewer encoder layers)"
        )
