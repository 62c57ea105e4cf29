"""``TrainConfig``: everything a fine-tuning run needs, as one validated dataclass.

A run is described by a JSON or TOML file and/or ``--key value`` overrides on the command line
(``--conv_lora.r 4`` reaches into the nested adapter settings). The resolved config is written to the
run folder, so a run can always be repeated or resumed from what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .methods import METHODS

MODES = ("auto", "binary", "multiclass")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Configuration of a fine-tuning run.

    Args:
        data: dataset folder (``images/`` + ``masks/``, optionally in ``train/``/``val/``/``test/``
            subfolders) or a CSV file with ``image,mask`` columns.
        val_data: a separate validation dataset; otherwise ``data``'s ``val/`` split or a seeded split.
        test_data: an optional labelled test set, evaluated with the best model at the end.
        mode: ``"binary"``, ``"multiclass"`` or ``"auto"`` (inferred from the masks).
        num_classes: number of classes including the background (multi-class); inferred when unset.
        val_fraction: share of ``data`` held out for validation when it has no ``val/`` split.
        skip_bad: drop samples that fail validation (and say how many) instead of refusing to train.
        model: SAM checkpoint: an embedded name (``"convlora-tiny"``), a local directory or a hub id.
        image_size: square input size; the checkpoint's own size when unset.
        method: ``"conv_lora"``, ``"lora"`` (same targets and rank), ``"decoder"`` (mask decoder only) or
            ``"full"`` (every weight).
        conv_lora: fields of :class:`~convlora.ConvLoraConfig` (``r``, ``num_experts``, ...), also used by
            ``"lora"`` for its rank, alpha, dropout and targets.
        freeze_iou_head: keep SAM's IoU-prediction head frozen (unused by mask losses), as the paper does.
        epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (overrides ``epochs`` when smaller).
        batch_size: images per process and step.
        grad_accum: batches accumulated per optimiser step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the optimiser steps spent warming up linearly; cosine decay afterwards.
        grad_clip: maximum gradient norm (0 disables clipping).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (fp16 needs a CUDA GPU); unset: what
            ``accelerate launch --mixed_precision`` (or ``accelerate config``) says, else ``"no"``.
        gradient_checkpointing: recompute encoder activations in the backward pass to save memory.
        loss: loss name from ``convlora.training.losses``; ``bce_dice`` (binary) or ``ce_dice`` (multi-class)
            by default.
        augment: fields of the augmentation settings (``hflip``, ``scale``, ``color_jitter`` ...).
        num_workers: DataLoader worker processes.
        seed: seed of everything random (data order, augmentation, gate noise, initialisation).
        metric: validation metric that picks the best checkpoint; the task's main metric by default.
        early_stopping_patience: stop after this many evaluations without improvement (unset: never).
        eval_every_epochs: evaluate every this many epochs.
        save_every_steps: write a resumable checkpoint every this many optimiser steps (0: once per epoch).
        keep_checkpoints: how many resumable checkpoints to keep.
        output_dir: the run folder.
        resume: ``"latest"`` or a checkpoint folder to continue from.
        log_every_steps: steps between TensorBoard scalars.
        overlay_samples: validation images drawn in the overlay grid.
    """

    data: str = ""
    val_data: str | None = None
    test_data: str | None = None
    mode: str = "auto"
    num_classes: int | None = None
    val_fraction: float = 0.2
    skip_bad: bool = False
    model: str = "convlora-tiny"
    image_size: int | None = None
    method: str = "conv_lora"
    conv_lora: dict[str, Any] = field(default_factory=dict)
    freeze_iou_head: bool = True
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    loss: str | None = None
    augment: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    seed: int = 0
    metric: str | None = None
    early_stopping_patience: int | None = None
    eval_every_epochs: int = 1
    save_every_steps: int = 0
    keep_checkpoints: int = 2
    output_dir: str = "runs/run"
    resume: str | None = None
    log_every_steps: int = 10
    overlay_samples: int = 8

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.data:
            raise ValueError("data is required: a dataset folder or a CSV file of image,mask paths")
        _choice("mode", self.mode, MODES)
        _choice("method", self.method, METHODS)
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every_epochs", "keep_checkpoints", "log_every_steps"):
            _positive(name, getattr(self, name))
        for name in ("num_workers", "save_every_steps", "overlay_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.early_stopping_patience is not None:
            _positive("early_stopping_patience", self.early_stopping_patience)
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {self.num_classes}")
        if self.image_size is not None:
            _positive("image_size", self.image_size)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not METHODS[self.method].uses_adapter and self.conv_lora:
            raise ValueError(f"conv_lora settings do not apply to method {self.method!r}")
        self.adapter_config()  # validates the nested adapter settings early
        self.augment_config()

    def adapter_config(self) -> Any:
        """The :class:`~convlora.ConvLoraConfig` described by ``conv_lora``."""
        from ..tuner.config import ConvLoraConfig

        try:
            return ConvLoraConfig(**self.conv_lora)
        except (TypeError, ValueError) as error:
            raise ValueError(f"conv_lora: {error}") from error

    def augment_config(self) -> Any:
        """The augmentation settings described by ``augment``."""
        from ..data import AugmentConfig

        try:
            return AugmentConfig(**self.augment)
        except (TypeError, ValueError) as error:
            raise ValueError(f"augment: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping, refusing unknown keys with a message naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> TrainConfig:
    """Read a JSON/TOML config file, apply ``--key value`` overrides and keyword fields, and validate.

    Args:
        path: a ``.json`` or ``.toml`` file, or ``None``.
        overrides: command-line style pairs, e.g. ``["--lr", "3e-4", "--conv_lora.r", "4"]``.
        fields: more fields, applied last.

    >>> load_config(overrides=["--data", "data/polyp", "--conv_lora.r", "4"]).conv_lora
    {'r': 4}
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = _toml_loads(text, path)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ValueError(f"config file {path} must end in .json or .toml")
        except (json.JSONDecodeError, ValueError) as error:
            if isinstance(error, ValueError) and "must end in" in str(error):
                raise
            raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
    for key, value in _parse_overrides(overrides or []):
        _set_dotted(data, key, value, source="command line")
        source = f"{source} + command line"
    data.update(fields)
    return TrainConfig.from_dict(data, source=source)


def _toml_loads(text: str, path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as error:
            raise ValueError(f"reading {path} needs Python 3.11+ or the tomli package; or use a JSON config") from error
    return tomllib.loads(text)


def _parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    index = 0
    while index < len(items):
        key = items[index]
        if not key.startswith("--") or len(key) <= 2:
            raise ValueError(f"expected --key value pairs, got {key!r}")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            index += 1
        else:
            if index + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            raw = items[index + 1]
            index += 2
        pairs.append((key, _parse_value(raw)))
    return pairs


def _parse_value(raw: str) -> Any:
    """JSON where it parses (numbers, true/false, null, lists), else the plain string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"{source}: {key} goes through {part!r}, which is not a mapping")
    target[parts[-1]] = value


def _check_types(config: TrainConfig) -> None:
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = hints[f.name]
        if not _matches(value, expected):
            raise ValueError(f"{f.name} must be {_describe(expected)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and float in _flatten(expected):
            setattr(config, f.name, float(value))


def _flatten(tp: Any) -> tuple[Any, ...]:
    args = get_args(tp)
    return args if args and get_origin(tp) is not dict else (tp,)


def _matches(value: Any, tp: Any) -> bool:
    for option in _flatten(tp):
        if option is type(None) and value is None:
            return True
        origin = get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin in (str, bool, dict) and isinstance(value, origin):
            return True
    return False


def _describe(tp: Any) -> str:
    names = {type(None): "null", float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    return " or ".join(names.get(get_origin(o) or o, "a mapping") for o in _flatten(tp))


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
