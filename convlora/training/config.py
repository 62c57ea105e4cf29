"""``TrainConfig``: everything a fine-tuning run needs, as one validated dataclass.

A run is described by a JSON or TOML file and/or ``--key value`` overrides on the command line
(``--conv_lora.r 4`` reaches into the nested adapter settings). The resolved config is written to the
run folder, so a run can always be repeated or resumed from what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..artifact.methods import METHODS

MODES = ("auto", "binary", "multiclass")
PRECISIONS = ("no", "bf16", "fp16")
# the sections of `convlora train --help` and of the configuration reference, in order
GROUPS = ("data", "model", "method", "optimisation", "schedule", "checkpoints", "logging")
# what a changed value does when a run is resumed: applied (and named), refused, or ignored
RESUME_RULES = ("apply", "refuse", "ignore")
_REFUSED_GROUPS = ("data", "model", "method")


def option(
    default: Any = dataclasses.MISSING,
    *,
    group: str,
    help: str,
    factory: Callable[[], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    resume: str | None = None,
) -> Any:
    """A :class:`TrainConfig` field whose metadata drives validation, ``convlora train --help`` and the docs.

    Args:
        default: the default value (``None``: unset, resolved at the start of a run or never used).
        group: the section listing it, one of ``GROUPS``.
        help: one line saying what it does, and what unset means.
        factory: a default factory, for mutable defaults.
        choices: the allowed values (``None`` is always allowed where the type says so).
        resume: what a different value does on ``--resume``: ``"apply"`` (named at the start), ``"refuse"``
            (the resume would be meaningless) or ``"ignore"``; by default ``data``, ``model`` and ``method``
            fields refuse and the others apply.

    >>> option(0.5, group="optimisation", help="A share.").metadata["group"]
    'optimisation'
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {list(GROUPS)}, got {group!r}")
    resume = resume or ("refuse" if group in _REFUSED_GROUPS else "apply")
    if resume not in RESUME_RULES:
        raise ValueError(f"resume must be one of {list(RESUME_RULES)}, got {resume!r}")
    metadata = {"help": help, "group": group, "choices": choices, "resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Configuration of a fine-tuning run.

    Each field is declared with :func:`option`, whose ``help``, ``group`` and ``choices`` are the one
    source of ``convlora train --help``, of the configuration reference and of the validation here; the
    fields are listed, grouped, with their types and defaults by ``convlora train --help``. Fields left
    unset (``None``) are resolved when a run starts: ``lr`` by the base model's size class
    (:func:`resolve_defaults`). Construct it with one keyword per field.

    >>> config = TrainConfig(data="data/polyp", epochs=3)
    >>> config.lr is None, TrainConfig.__dataclass_fields__["lr"].metadata["group"]
    (True, 'optimisation')
    """

    # To add a field: `name: type = option(default, group=..., help="One line.")`; it appears in --help and the
    # docs by itself; add `resume="refuse"` when a changed value makes resuming a run meaningless.
    data: str = option(
        "",
        group="data",
        help="Dataset folder (images/ + masks/, optionally in train/ val/ test/ subfolders) or a CSV of image,mask "
        "paths.",
    )
    val_data: str | None = option(
        None, group="data", help="A separate validation dataset; unset: data's val/ split or a seeded split."
    )
    test_data: str | None = option(
        None, group="data", resume="apply", help="A labelled test set, evaluated with the best model at the end."
    )
    mode: str = option("auto", group="data", choices=MODES, help="Task: binary, multiclass, or auto (from the masks).")
    num_classes: int | None = option(
        None, group="data", help="Classes including the background (multi-class); unset: inferred from the masks."
    )
    val_fraction: float = option(
        0.2, group="data", help="Share of data held out for validation when it has no val/ split."
    )
    skip_bad: bool = option(
        False,
        group="data",
        resume="apply",
        help="Drop samples that fail validation (and say how many) instead of refusing to train.",
    )
    intensity: str = option(
        "percentile",
        group="data",
        choices=("percentile", "minmax", "fixed", "none"),
        help="Images of more than 8 bits per sample onto 0..255: percentile (1st..99.8th, per image), minmax, fixed "
        "(intensity_range) or none; 8-bit images are kept.",
    )
    intensity_range: list[float] | None = option(  # noqa: RUF009 (option() is a field specifier)
        None, group="data", help="[low, high] mapped to 0..255 by intensity fixed, e.g. 0,4095 for a 12-bit camera."
    )
    channels: list[int] | None = option(  # noqa: RUF009 (option() is a field specifier)
        None,
        group="data",
        help="Channel indices to use, e.g. 0,2 (1 to 3; needed for images with more than 3 channels); unset: all.",
    )
    mask_reading: str = option(
        "auto",
        group="data",
        choices=("auto", "instances", "classes"),
        help="auto (instance-id masks read as binary, nonzero = foreground), instances (always) or classes (class "
        "ids or 0/255, 0/1).",
    )
    augment: dict[str, Any] = option(  # noqa: RUF009 (option() is a field specifier)
        group="data",
        factory=dict,
        resume="apply",
        help="Augmentation settings, nested: --augment.hflip 0.5, --augment.scale [0.8,1.2] (see AugmentConfig).",
    )
    num_workers: int = option(0, group="data", resume="apply", help="DataLoader worker processes.")
    model: str = option(
        "convlora-tiny",
        group="model",
        help="SAM checkpoint: an embedded name (convlora-tiny), a local directory or a Hugging Face Hub id.",
    )
    image_size: int | None = option(None, group="model", help="Square input size; unset: the checkpoint's own size.")
    init_adapter: str | None = option(
        None,
        group="model",
        help="Continue training an exported model (RUN/adapter) of the same method, base model and task.",
    )
    method: str = option(
        "conv_lora",
        group="method",
        choices=tuple(METHODS),
        help="conv_lora, lora (same targets and rank), decoder (mask decoder only) or full (every weight).",
    )
    conv_lora: dict[str, Any] = option(  # noqa: RUF009 (option() is a field specifier)
        group="method",
        factory=dict,
        help="Adapter settings (ConvLoraConfig fields), nested: --conv_lora.r 4; lora reads its rank, alpha, "
        "dropout and targets.",
    )
    freeze_iou_head: bool = option(
        True, group="method", help="Keep SAM's IoU head (unused by mask losses) frozen, as the paper does."
    )
    prompt: str = option(
        "none",
        group="method",
        choices=("none", "box", "point", "box_point", "mixed"),
        help="Prompted fine-tuning with prompts drawn from the masks: box, point, box_point or mixed (one kind per "
        "step); none: prompt-free.",
    )
    prompting: dict[str, Any] = option(  # noqa: RUF009 (option() is a field specifier)
        group="method",
        factory=dict,
        help="Prompt settings, nested: --prompting.max_objects 8, --prompting.box_jitter 0.1, "
        "--prompting.correction_rounds 2 (see PromptConfig).",
    )
    loss: str | None = option(
        None,
        group="method",
        resume="apply",
        help="Loss from convlora.training.losses; unset: bce_dice (binary) or ce_dice (multi-class).",
    )
    batch_size: int = option(4, group="optimisation", resume="refuse", help="Images per process and step.")
    grad_accum: int = option(1, group="optimisation", help="Batches accumulated per optimiser step.")
    lr: float | None = option(
        None,
        group="optimisation",
        help="Peak learning rate of AdamW; unset: by the base model's size class (2e-3 for small bases such as "
        "convlora-tiny, the paper's 1e-4 for SAM ViT-B/L/H).",
    )
    weight_decay: float = option(1e-4, group="optimisation", help="AdamW weight decay.")
    grad_clip: float = option(1.0, group="optimisation", help="Maximum gradient norm (0 disables clipping).")
    mixed_precision: str | None = option(
        None,
        group="optimisation",
        choices=PRECISIONS,
        help="no, bf16 or fp16 (CUDA only); unset: what accelerate launch / accelerate config says, else no.",
    )
    gradient_checkpointing: bool = option(
        False, group="optimisation", help="Recompute encoder activations in the backward pass to save memory."
    )
    seed: int = option(
        0,
        group="optimisation",
        resume="refuse",
        help="Seed of everything random (data order, augmentation, gate noise, initialisation).",
    )
    epochs: int = option(10, group="schedule", help="Passes over the training set.")
    max_steps: int | None = option(
        None, group="schedule", help="Stop after this many optimiser steps (when fewer than the epochs give)."
    )
    warmup_ratio: float = option(
        0.05, group="schedule", help="Share of the optimiser steps spent warming up linearly; cosine decay after."
    )
    metric: str | None = option(
        None,
        group="schedule",
        resume="refuse",
        help="Validation metric that picks the best checkpoint; unset: the task's main metric.",
    )
    early_stopping_patience: int | None = option(
        None, group="schedule", help="Stop after this many evaluations without improvement; unset: never."
    )
    eval_every_epochs: int = option(1, group="schedule", help="Evaluate every this many epochs.")
    output_dir: str = option("runs/run", group="checkpoints", resume="ignore", help="The run folder.")
    resume: str | None = option(
        None, group="checkpoints", resume="ignore", help="Continue a run: latest, or a checkpoint folder."
    )
    save_every_steps: int = option(
        0, group="checkpoints", help="Write a resumable checkpoint every this many optimiser steps (0: every epoch)."
    )
    keep_checkpoints: int = option(2, group="checkpoints", help="How many resumable checkpoints to keep.")
    log_every_steps: int = option(
        10,
        group="logging",
        help="Optimiser steps between logged losses (TensorBoard; a plain line when output is not a terminal).",
    )
    overlay_samples: int = option(8, group="logging", help="Validation images drawn in the overlay grid.")

    def __post_init__(self) -> None:
        _split_lists(self)
        _check_types(self)
        if not self.data:
            raise ValueError("data is required: a dataset folder or a CSV file of image,mask paths")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) is not None:
                _choice(f.name, getattr(self, f.name), choices)
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
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not METHODS[self.method].uses_adapter and self.conv_lora:
            raise ValueError(f"conv_lora settings do not apply to method {self.method!r}")
        if self.init_adapter is not None and self.method == "full":
            raise ValueError(
                f"init_adapter does not apply to method 'full'; start from the exported model with --model "
                f"{self.init_adapter}"
            )
        self.adapter_config()  # validates the nested adapter settings early
        self.augment_config()
        self.prompt_config()
        self.image_reading()
        if self.mask_reading == "instances" and (self.mode == "multiclass" or (self.num_classes or 2) != 2):
            raise ValueError("mask_reading 'instances' makes a binary task (nonzero = foreground); mode must be binary")

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

    def prompt_config(self) -> Any:
        """The :class:`~convlora.data.prompts.PromptConfig` of ``prompt`` and the nested ``prompting`` settings."""
        from ..data.prompts import PromptConfig

        if "kind" in self.prompting:
            raise ValueError("prompting.kind: choose the prompt kind with prompt (--prompt box)")
        if self.prompting and self.prompt == "none":
            raise ValueError(f"prompting settings {sorted(self.prompting)} need a prompt kind (--prompt box, ...)")
        try:
            return PromptConfig(kind=self.prompt, **self.prompting)
        except (TypeError, ValueError) as error:
            raise ValueError(f"prompting: {error}") from error

    def image_reading(self) -> Any:
        """The :class:`~convlora.data.ImageReading` of ``intensity``, ``intensity_range`` and ``channels``."""
        from ..data import reading_of

        return reading_of(self)

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
    config = TrainConfig.from_dict(data, source=source)
    config._given = frozenset(data)  # what the user set, so that a resume keeps the saved values of the rest
    return config


# Defaults that depend on the base model's size, by its parameter count. The embedded convlora-tiny
# (0.75M parameters) reaches test IoU 0.54 on a generated polyp set in 6 epochs at 2e-3 and 0.09 at the
# paper's 1e-4, the value for SAM ViT-B/L/H (94M-641M).
SIZE_CLASSES: dict[str, dict[str, Any]] = {
    "small": {"max_parameters": 10_000_000, "lr": 2e-3},
    "large": {"max_parameters": None, "lr": 1e-4},
}


def size_class(base_model: Any) -> tuple[str, int]:
    """The size class (a key of ``SIZE_CLASSES``) of a loaded base model, and its parameter count.

    Args:
        base_model: the loaded SAM (any family; the meta device is fine: nothing is read).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> size_class(random_sam(tiny_sam_config()))[0]
    'small'
    """
    from ..models import count_parameters

    count = count_parameters(base_model)
    for name, values in SIZE_CLASSES.items():
        if values["max_parameters"] is None or count <= values["max_parameters"]:
            return name, count
    raise AssertionError("the last size class has no upper bound")


def resolve_defaults(config: TrainConfig, base_model: Any) -> tuple[TrainConfig, list[str]]:
    """Fill the unset fields that depend on the base model's size; returns the config and one note per value.

    Explicit values win; the notes name every value and where it came from, to be printed at the start.

    Args:
        config: the run's settings.
        base_model: the loaded base SAM (see :func:`size_class`).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> config, notes = resolve_defaults(TrainConfig(data="data/polyp"), random_sam(tiny_sam_config()))
    >>> config.lr
    0.002
    """
    name, count = size_class(base_model)
    changes: dict[str, Any] = {}
    notes = []
    for key, value in SIZE_CLASSES[name].items():
        if key == "max_parameters":
            continue
        if getattr(config, key) is None:
            changes[key] = value
            notes.append(
                f"{key} = {value:g}: the default for a {name} base model ({config.model} has {count / 1e6:.2f}M "
                f"parameters); set --{key} to choose another"
            )
        else:
            notes.append(f"{key} = {getattr(config, key):g} (as set)")
    resolved = dataclasses.replace(config, **changes) if changes else config
    resolved._given = getattr(config, "_given", None)
    return resolved, notes


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Compare a resumed run's settings with those it was started with (``RUN/config.json``).

    Every difference that is applied is named in the returned notes; differences that would make the
    resume meaningless (the fields declared with ``resume="refuse"``: data, model, method, adapter
    settings, batch size, seed, metric) raise. ``output_dir`` and ``resume`` are never compared.

    Args:
        saved: the run's saved config (``json.load`` of ``RUN/config.json``).
        config: the settings of the resumed run (after :func:`resolve_defaults`).

    Raises:
        ValueError: naming every refused difference, with both values.

    >>> saved = TrainConfig(data="d", lr=1e-3).to_dict()
    >>> resume_differences(saved, TrainConfig(data="d", lr=5e-4, max_steps=100))
    ['lr: 0.001 -> 0.0005', 'max_steps: None -> 100']
    """
    current = config.to_dict()
    applied, refused = [], []
    for f in dataclasses.fields(TrainConfig):
        rule = f.metadata.get("resume", "apply")
        if rule == "ignore":
            continue
        new = current[f.name]
        if f.name in saved:
            old = saved[f.name]
        elif new == _default(f):  # a field this run's checkpoint predates, left at its default
            continue
        else:
            old = "(not recorded)"
        if _same_setting(f.name, old, new):
            continue
        text = f"{f.name}: {old!r} -> {new!r}"
        (refused if rule == "refuse" else applied).append(text)
    if refused:
        raise ValueError(
            f"cannot resume {config.output_dir} with changed {'; '.join(refused)}: the checkpoint was trained with "
            "the first values and would not mean the same run. Restore them, or start a new run in another "
            "output_dir (init_adapter continues from an exported model with new settings)"
        )
    return applied


def resume_config(saved: dict[str, Any], config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The settings of a resumed run: the saved ones, with what the user set this time applied on top.

    A config from :func:`load_config` knows which keys the user gave (file, command line, keywords); the
    others keep their saved values instead of falling back to the defaults. A config built directly counts
    as given in full. The differences are checked and named by :func:`resume_differences`.

    Args:
        saved: the run's saved config (``RUN/config.json``).
        config: the settings given for the resumed run.

    >>> saved = TrainConfig(data="d", epochs=30, lr=1e-3).to_dict()
    >>> config, notes = resume_config(saved, load_config(overrides=["--data", "d", "--lr", "5e-4"]))
    >>> config.epochs, config.lr, notes
    (30, 0.0005, ['lr: 0.001 -> 0.0005'])
    """
    given = getattr(config, "_given", None)
    if given is None:
        # unset size-class values would be resolved again; the run keeps the ones it was started with
        later = {key for values in SIZE_CLASSES.values() for key in values if key != "max_parameters"}
        kept = {k: saved[k] for k in later if getattr(config, k) is None and saved.get(k) is not None}
        merged = dataclasses.replace(config, **kept) if kept else config
    else:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        current = config.to_dict()
        values = {k: v for k, v in saved.items() if k in known}
        for key in given | {"resume", "output_dir"}:
            nested = isinstance(current[key], dict) and isinstance(values.get(key), dict)
            # `--conv_lora.r 4` on a resume changes r, not the whole adapter
            values[key] = {**values[key], **current[key]} if nested else current[key]
        merged = TrainConfig.from_dict(values, source="saved run config + this run's settings")
        merged._given = given
    return merged, resume_differences(saved, merged)


def apply_resumed_settings(optimizer: Any, scheduler: Any, config: TrainConfig) -> None:
    """After loading a checkpoint, give its optimiser and schedule this run's ``lr`` and ``weight_decay``.

    A checkpoint's optimiser and scheduler state carry the learning rate they were created with; loading
    them would silently keep it. The schedule's shape (warm-up, ``max_steps``) comes from the new
    scheduler, which keeps its own lambdas when loaded.

    Args:
        optimizer: the optimiser, after ``load_state_dict``.
        scheduler: its ``LambdaLR`` schedule, after ``load_state_dict``.
        config: the resumed run's settings (``lr`` resolved).

    >>> import torch
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    >>> apply_resumed_settings(opt, sched, TrainConfig(data="d", lr=0.1))
    >>> opt.param_groups[0]["lr"]
    0.05
    """
    if config.lr is None:
        raise ValueError("lr is unset; call resolve_defaults before apply_resumed_settings")
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = config.lr
        group["weight_decay"] = config.weight_decay
        group["lr"] = config.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _same_setting(name: str, old: Any, new: Any) -> bool:
    """Equal settings, comparing nested adapter and augmentation settings by what they resolve to."""
    if name in ("conv_lora", "augment") and isinstance(old, dict) and isinstance(new, dict):
        try:
            return _resolved_nested(name, old) == _resolved_nested(name, new)
        except (TypeError, ValueError):
            return False
    return _plain(old) == _plain(new)


def _resolved_nested(name: str, values: dict[str, Any]) -> Any:
    if name == "conv_lora":
        from ..tuner.config import ConvLoraConfig

        return _plain(ConvLoraConfig(**values).to_dict())
    from ..data import AugmentConfig

    return _plain(dataclasses.asdict(AugmentConfig(**values)))


def _plain(value: Any) -> Any:
    """As JSON would store it (tuples as lists, str subclasses as str)."""
    return json.loads(json.dumps(value, default=str))


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


def _split_lists(config: TrainConfig) -> None:
    """``--channels 0,2`` arrives as the text "0,2" (and ``--channels 1`` as 1): make them lists."""
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        if not any(get_origin(option) is list for option in _flatten(hints[f.name])):
            continue
        value = getattr(config, f.name)
        if isinstance(value, str) and value.strip():
            setattr(config, f.name, [_parse_value(part.strip()) for part in value.split(",")])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, f.name, [value])


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
        if origin is list and isinstance(value, list) and all(_matches(v, get_args(option)[0]) for v in value):
            return True
    return False


def _describe(tp: Any) -> str:
    names = {
        type(None): "null", float: "a number", int: "an integer", str: "a string", bool: "true or false",
        list: "a list such as 0,2",
    }  # fmt: skip
    return " or ".join(names.get(get_origin(o) or o, "a mapping") for o in _flatten(tp))


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
