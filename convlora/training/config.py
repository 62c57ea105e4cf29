"""``TrainConfig``: everything a fine-tuning run needs, as one validated dataclass.

A run is described by a JSON or TOML file and/or ``--key value`` overrides on the command line
(``--conv_lora.r 4`` reaches into the nested settings). The nested settings are typed dataclasses:
``conv_lora`` (:class:`AdapterSettings`), ``augment`` (:class:`~convlora.data.AugmentConfig`) and
``prompting`` (:class:`~convlora.data.prompts.PromptConfig`); ``peft`` is a mapping of the chosen PEFT
method's config fields (``--peft.use_rslora true``), checked against that config class by
:func:`~convlora.artifact.peft_methods.check_peft_options`. One checker, :func:`check_fields`, holds
every field to its type hint. The resolved config is written to the run folder, so a run can always be
repeated or resumed from what it wrote; :func:`load_config_given` also says which settings the user gave,
and a resume (:func:`resume_config`) keeps the saved values of the others.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .._compat import set_last_lr
from ..artifact.methods import METHODS
from ..artifact.peft_methods import check_peft_options
from ..data.prompts import PromptConfig
from ..data.transforms import AugmentConfig
from ..tuner.config import ConvLoraConfig
from .embedding_cache import CACHE_MODES

MODES = ("auto", "binary", "multiclass", "instances")
RETENTION_MODES = ("auto", "off", "on")
SELECT_RULES = ("best", "retention", "weighted")
PRECISIONS = ("no", "bf16", "fp16")
# the sections of `convlora train --help` and of the configuration reference, in order
GROUPS = ("data", "model", "method", "optimisation", "schedule", "checkpoints", "logging")
# what a changed value does when a run is resumed: applied (and named), refused, or ignored
RESUME_RULES = ("apply", "refuse", "ignore")
_REFUSED_GROUPS = ("data", "model", "method")
# the name of the optimiser's parameter group of SAM's mask decoder, when it trains at its own rate (decoder_lr)
DECODER_GROUP = "mask_decoder"


def option(
    default: Any = dataclasses.MISSING,
    *,
    group: str,
    help: str,
    factory: Callable[[], Any] | None = None,
    choices: Collection[str] | None = None,
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


def _adapter_field(name: str) -> Any:
    """An unset :class:`AdapterSettings` field with the help of the ConvLoraConfig field ``name`` and its default."""
    source = ConvLoraConfig.__dataclass_fields__[name]
    default = source.default if source.default_factory is dataclasses.MISSING else source.default_factory()
    text = source.metadata["help"] + ("" if default is None else f" Unset: {default!r}.")
    return field(default=None, metadata={"help": text})


@dataclass
class AdapterSettings:
    """The adapter a run trains (``TrainConfig.conv_lora``, ``--conv_lora.r 4``): ConvLoraConfig's choices.

    Each field is the :class:`~convlora.ConvLoraConfig` field of that name; unset (``None``) means
    ConvLoraConfig's default, so a run records only what it chose and :meth:`build` makes a new
    ConvLoraConfig each time (applying one resolves its targets in place). Left out are the fields that
    describe a saved adapter file rather than a run: ``peft.PeftConfig``'s own (``peft_type``, ``task_type``,
    ``base_model_name_or_path``, ...) and ``format_version``; and ``target_parameters`` (unsupported).
    Method ``lora`` reads the rank, alpha, dropout, targets and ``modules_to_save``; PEFT's other methods what
    :func:`~convlora.artifact.peft_methods.reads` lists (a setting a method does not read is named at the start).

    >>> AdapterSettings(r=4).build().r, AdapterSettings().build().r, AdapterSettings(layers="0,2").layers
    (4, 3, [0, 2])
    """

    r: int | None = _adapter_field("r")
    lora_alpha: float | None = _adapter_field("lora_alpha")
    lora_dropout: float | None = _adapter_field("lora_dropout")
    target_modules: list[str] | str | None = _adapter_field("target_modules")  # noqa: RUF009 (a field specifier)
    target_preset: str | None = _adapter_field("target_preset")
    layers: list[int] | None = _adapter_field("layers")  # noqa: RUF009 (a field specifier)
    family: str | None = _adapter_field("family")
    exclude_modules: list[str] | str | None = _adapter_field("exclude_modules")  # noqa: RUF009 (a field specifier)
    num_experts: int | None = _adapter_field("num_experts")
    expert_scales: list[float] | None = _adapter_field("expert_scales")  # noqa: RUF009 (a field specifier)
    top_k: int | None = _adapter_field("top_k")
    expert_conv: str | None = _adapter_field("expert_conv")
    interpolation: str | None = _adapter_field("interpolation")
    weighted_combine: bool | None = _adapter_field("weighted_combine")
    noisy_gating: bool | None = _adapter_field("noisy_gating")
    aux_loss_weight: float | None = _adapter_field("aux_loss_weight")
    modules_to_save: list[str] | None = _adapter_field("modules_to_save")  # noqa: RUF009 (a field specifier)
    init_lora_weights: bool | None = _adapter_field("init_lora_weights")

    def __post_init__(self) -> None:
        check_fields(self)
        self.build()  # ConvLoraConfig checks the values and how they combine

    def build(self) -> ConvLoraConfig:
        """A new :class:`~convlora.ConvLoraConfig` with the values set here and its defaults for the rest."""
        return ConvLoraConfig(**self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The values set, as ``RUN/config.json`` stores them (unset ones left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class TrainConfig:
    """Configuration of a fine-tuning run.

    Each field is declared with :func:`option`, whose ``help``, ``group`` and ``choices`` are the one
    source of ``convlora train --help``, of the configuration reference and of the validation here; the
    fields are listed, grouped, with their types and defaults by ``convlora train --help``. Fields left
    unset (``None``) are resolved when a run starts: ``lr`` by the base model's size class, and ``decoder_lr``
    of an instance run with ``joint_prompted`` from it (:func:`resolve_defaults`). Construct it with one keyword
    per field; the nested settings take their dataclass or a mapping of its fields. ``prompting.kind`` is always
    the ``prompt`` field.

    >>> config = TrainConfig(data="data/polyp", epochs=3, augment={"hflip": 0})
    >>> config.lr is None, TrainConfig.__dataclass_fields__["lr"].metadata["group"], config.augment.hflip
    (True, 'optimisation', 0.0)
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
    mode: str = option(
        "auto",
        group="data",
        choices=MODES,
        help="Task: binary, multiclass, instances (one id per object: an instance decoder + watershed), or auto "
        "(binary or multiclass, from the masks; never instances).",
    )
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
    augment: AugmentConfig = option(  # noqa: RUF009 (option() is a field specifier)
        group="data",
        factory=AugmentConfig,
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
        choices=METHODS.keys(),  # a live view: a method registered later is a choice too
        help="conv_lora; PEFT's lora, dora, loha, lokr, ia3, boft, vera (same targets, rank), ln_tuning; bitfit "
        "(biases); decoder (mask decoder only); full (every weight).",
    )
    conv_lora: AdapterSettings = option(  # noqa: RUF009 (option() is a field specifier)
        group="method",
        factory=AdapterSettings,
        help="Adapter settings (ConvLoraConfig fields, see AdapterSettings), nested: --conv_lora.r 4; lora reads its "
        "rank, alpha, dropout and targets.",
    )
    peft: dict[str, Any] = option(  # noqa: RUF009 (option() is a field specifier)
        group="method",
        factory=dict,
        help="Options of a PEFT method: other fields of its PEFT config, nested: --peft.use_rslora true (lora, dora), "
        "--peft.boft_block_size 8 (boft).",
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
    prompting: PromptConfig = option(  # noqa: RUF009 (option() is a field specifier)
        group="method",
        factory=PromptConfig,
        help="Prompt settings, nested: --prompting.max_objects 8, --prompting.box_jitter 0.1, "
        "--prompting.correction_rounds 2 (see PromptConfig).",
    )
    joint_prompted: float = option(
        0.0,
        group="method",
        help="Share of the steps (in [0, 1]) trained under box / point prompts on the training objects (binary "
        "runs: mask components; instance runs: each id), training SAM's prompted decoder; the rest stay prompt-free.",
    )
    instance_channels: int = option(
        64,
        group="method",
        help="Width of the instance decoder trained by --mode instances (a multiple of 4; ~170k weights on ViT-B).",
    )
    instance_image_channels: int = option(
        16,
        group="method",
        help="Width of the instance decoder's image stem (it reads the image too; maps at half the input size); "
        "0: the embedding only (maps at a quarter).",
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
    decoder_lr: float | None = option(
        None,
        group="optimisation",
        help="Peak learning rate of SAM's mask decoder in an instance run with --joint_prompted (its prompted steps "
        "train it); unset: the base model's default lr (of its size class, as a binary run trains it), at most lr.",
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
    embedding_cache: str = option(
        "auto",
        group="optimisation",
        choices=CACHE_MODES,
        resume="apply",
        help="Reuse a frozen image encoder's outputs (method decoder) from epoch to epoch: auto (in memory up to "
        "embedding_cache_mib, else on disk in RUN/embedding_cache), memory, disk or off; training images need "
        "augmentation off.",
    )
    embedding_cache_mib: int = option(
        4096, group="optimisation", resume="apply", help="Memory embedding_cache auto may use before it goes to disk."
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
    retention: str = option(
        "auto",
        group="schedule",
        choices=RETENTION_MODES,
        resume="refuse",
        help="Measure at every evaluation how much of the base's prompted quality the model keeps (binary and "
        "instance tasks): on, off, or auto (on when there is a keep set: keep_data, or convlora-tiny's generic one).",
    )
    keep_data: str | None = option(
        None,
        group="schedule",
        resume="refuse",
        help="Labelled folder of objects SAM should keep segmenting under prompts (retention's keep set); unset: "
        "the generic keep set of convlora-tiny, none for other bases.",
    )
    keep_images: int = option(
        32, group="schedule", resume="refuse", help="Most keep-set images (and validation images) retention prompts."
    )
    select: str = option(
        "best",
        group="schedule",
        choices=SELECT_RULES,
        help="Which evaluation's model is kept: best (target metric), retention (best metric with retention >= "
        "min_retention, else the highest retention) or weighted (retention_weight).",
    )
    min_retention: float = option(
        0.95, group="schedule", help="Least retention a checkpoint needs under select retention."
    )
    retention_weight: float = option(
        0.5, group="schedule", help="w of select weighted: (1 - w) x metric + w x retention picks the checkpoint."
    )
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
        if isinstance(self.prompting, dict) and "kind" in self.prompting:
            raise ValueError("prompting.kind: choose the prompt kind with prompt (--prompt box)")
        check_fields(self)
        self.prompting = dataclasses.replace(self.prompting, kind=self.prompt)
        if not self.data:
            raise ValueError("data is required: a dataset folder or a CSV file of image,mask paths")
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "eval_every_epochs",
            "keep_checkpoints",
            "log_every_steps",
            "embedding_cache_mib",
        ):
            _positive(name, getattr(self, name))
        for name in ("num_workers", "save_every_steps", "overlay_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "early_stopping_patience", "image_size"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {self.num_classes}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.decoder_lr is not None and self.decoder_lr <= 0:
            raise ValueError(f"decoder_lr must be > 0, got {self.decoder_lr}")
        if self.decoder_lr is not None and not (self.mode == "instances" and self.joint_prompted > 0):
            raise ValueError(
                f"decoder_lr={self.decoder_lr:g} sets the rate of SAM's mask decoder in an instance run with "
                "--joint_prompted (--mode instances); other runs train it at lr (drop decoder_lr)"
            )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not METHODS[self.method].uses_adapter and self.conv_lora.to_dict():
            raise ValueError(f"conv_lora settings do not apply to method {self.method!r}")
        self.peft = check_peft_options(self.method, self.peft)
        if self.peft and self.init_adapter is not None:
            raise ValueError(
                f"peft options {sorted(self.peft)} do not apply with init_adapter: the saved adapter's own "
                "adapter_config.json decides them"
            )
        if self.init_adapter is not None and self.method == "full":
            raise ValueError(
                f"init_adapter does not apply to method 'full'; start from the exported model with --model "
                f"{self.init_adapter}"
            )
        if self.prompt == "none" and self.prompting != PromptConfig():
            default = _resolved("prompting", PromptConfig())
            changed = [k for k, v in _resolved("prompting", self.prompting).items() if v != default[k]]
            raise ValueError(f"prompting settings {changed} need a prompt kind (--prompt box, ...)")
        self.image_reading()
        self._check_retention()
        if self.mode == "instances":
            self._check_instances()
        if self.mask_reading == "instances" and (self.mode == "multiclass" or (self.num_classes or 2) != 2):
            raise ValueError("mask_reading 'instances' makes a binary task (nonzero = foreground); mode must be binary")

    def _check_retention(self) -> None:
        """The retention, selection and joint-training settings, each refused by name."""
        if self.keep_images < 1:
            raise ValueError(f"keep_images must be >= 1, got {self.keep_images}")
        if self.min_retention < 0:
            raise ValueError(f"min_retention must be >= 0, got {self.min_retention}")
        for name in ("retention_weight", "joint_prompted"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.retention == "off" and self.keep_data is not None:
            raise ValueError(
                "keep_data is measured only with retention on or auto; drop --keep_data or --retention off"
            )
        if self.retention == "off" and self.select != "best":
            raise ValueError(f"select={self.select!r} weighs retention, which --retention off does not measure")
        if self.joint_prompted > 0 and self.prompt != "none":
            raise ValueError(
                f"joint_prompted mixes prompted steps into prompt-free training; with prompt={self.prompt!r} every "
                "step is prompted already (drop one of them)"
            )
        if self.joint_prompted > 0 and self.mode == "multiclass":
            raise ValueError(
                f"joint_prompted={self.joint_prompted:g} trains SAM's own prompted decoder on binary or instance "
                "objects; mode 'multiclass' replaces it by a class-query decoder and has no promptable model to keep "
                "(drop joint_prompted)"
            )

    def _check_instances(self) -> None:
        """The settings ``mode="instances"`` cannot take, each refused by name."""
        if self.instance_channels < 4 or self.instance_channels % 4:
            raise ValueError(f"instance_channels must be a positive multiple of 4, got {self.instance_channels}")
        if self.instance_image_channels < 0:
            raise ValueError(f"instance_image_channels must be >= 0, got {self.instance_image_channels}")
        if self.prompt != "none":
            raise ValueError(
                f"prompt={self.prompt!r}: --mode instances trains its instance decoder prompt-free; drop --prompt"
            )
        if self.loss is not None:
            raise ValueError(f"loss={self.loss!r}: --mode instances has its own loss (instance_loss); drop --loss")
        if self.num_classes not in (None, 2):
            raise ValueError(f"num_classes={self.num_classes}: --mode instances segments objects of one kind")
        if self.mask_reading == "classes":
            raise ValueError("mask_reading 'classes' contradicts --mode instances (masks hold one id per object)")

    def augment_config(self) -> AugmentConfig:
        """The same as ``augment``; kept for callers written when it was a mapping."""
        return self.augment

    def prompt_config(self) -> PromptConfig:
        """The same as ``prompting`` (whose ``kind`` is ``prompt``); kept for callers written when it was a mapping."""
        return self.prompting

    def image_reading(self) -> Any:
        """The :class:`~convlora.data.ImageReading` of ``intensity``, ``intensity_range`` and ``channels``."""
        from ..data import reading_of

        return reading_of(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy of every field, the nested settings as mappings (``RUN/config.json``).

        ``conv_lora`` holds the values set (ConvLoraConfig's defaults for the rest), ``augment`` and
        ``prompting`` every value (``prompting`` without ``kind``, which is ``prompt``).
        """
        data = dataclasses.asdict(self)
        data.update({name: _section_dict(name, getattr(self, name)) for name in _NESTED})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping (nested settings as mappings), refusing unknown keys in a message naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except _UnknownKeys as error:
            raise ValueError(f"{source}: {error}") from None


# the nested settings, and what each leaves to an outer field (prompting.kind is prompt)
_NESTED = {"conv_lora": (), "augment": (), "prompting": ("kind",)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> TrainConfig:
    """Read a JSON/TOML config file, apply ``--key value`` overrides and keyword fields, and validate.

    A resume keeps the saved values of the settings not given again only when it is told which were
    given: :func:`load_config_given` returns them too (``convlora train`` uses it).

    Args:
        path: a ``.json`` or ``.toml`` file, or ``None``.
        overrides: command-line style pairs, e.g. ``["--lr", "3e-4", "--conv_lora.r", "4"]``.
        fields: more fields, applied last (nested settings as mappings or as their dataclass).

    >>> load_config(overrides=["--data", "data/polyp", "--conv_lora.r", "4"]).conv_lora.to_dict()
    {'r': 4}
    """
    return load_config_given(path, overrides, **fields)[0]


def load_config_given(
    path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any
) -> tuple[TrainConfig, frozenset[str]]:
    """:func:`load_config`, and the dotted keys the user gave (file, command line, keywords).

    Pass the keys to :func:`resume_config` (or ``train(config, given=...)``): a resumed run takes those
    from this config and keeps the saved values of the rest. A nested setting given as a whole dataclass
    counts as given in full (``"conv_lora"``).

    Args:
        path: a ``.json`` or ``.toml`` file, or ``None``.
        overrides: command-line style pairs, e.g. ``["--lr", "3e-4", "--conv_lora.r", "4"]``.
        fields: more fields, applied last.

    >>> config, given = load_config_given(overrides=["--data", "d", "--augment.hflip", "0"], epochs=3)
    >>> sorted(given), config.augment.hflip
    (['augment.hflip', 'data', 'epochs'], 0.0)
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
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
    pairs = _parse_overrides(overrides or [])
    for key, value in pairs:
        _set_dotted(data, key, value, source="command line")
    data.update(fields)
    named = (str(path) if path is not None else "", "command line" if pairs else "", "keyword fields" if fields else "")
    source = " + ".join(part for part in named if part) or "config"
    given = {f"{key}.{inner}" for key, value in data.items() if isinstance(value, dict) for inner in value}
    given |= {key for key, value in data.items() if not isinstance(value, dict)}
    return TrainConfig.from_dict(data, source=source), frozenset(given)


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
    if config.mode == "instances" and config.joint_prompted > 0:
        # the instance head learns at rates that wreck SAM's pretrained decoder in a few prompted steps
        lr = changes.get("lr", config.lr)
        if config.decoder_lr is None:
            changes["decoder_lr"] = min(lr, SIZE_CLASSES[name]["lr"])
            notes.append(
                f"decoder_lr = {changes['decoder_lr']:g}: SAM's mask decoder trains at the default lr of a {name} "
                "base model, at most lr; set --decoder_lr to choose another"
            )
        else:
            notes.append(f"decoder_lr = {config.decoder_lr:g} (as set)")
    return (dataclasses.replace(config, **changes) if changes else config), notes


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Compare a resumed run's settings with those it was started with (``RUN/config.json``).

    Every difference that is applied is named in the returned notes; differences that would make the
    resume meaningless (the fields declared with ``resume="refuse"``: data, model, method, adapter
    settings, batch size, seed, metric) raise. ``output_dir`` and ``resume`` are never compared. Nested
    settings are compared key by key, by the values they take effect with (``conv_lora.r: 3 -> 8``).

    Args:
        saved: the run's saved config (``json.load`` of ``RUN/config.json``, of this or an earlier version).
        config: the settings of the resumed run (after :func:`resolve_defaults`).

    Raises:
        ValueError: naming every refused difference, with both values.

    >>> saved = TrainConfig(data="d", lr=1e-3).to_dict()
    >>> resume_differences(saved, TrainConfig(data="d", lr=5e-4, max_steps=100, augment={"hflip": 0}))
    ['augment.hflip: 0.5 -> 0.0', 'lr: 0.001 -> 0.0005', 'max_steps: None -> 100']
    """
    applied, refused = [], []
    for f in dataclasses.fields(TrainConfig):
        rule = f.metadata.get("resume", "apply")
        if rule != "ignore":
            (refused if rule == "refuse" else applied).extend(_differences(f, saved, getattr(config, f.name)))
    if refused:
        raise ValueError(
            f"cannot resume {config.output_dir} with changed {'; '.join(refused)}: the checkpoint was trained with "
            "the first values and would not mean the same run. Restore them, or start a new run in another "
            "output_dir (init_adapter continues from an exported model with new settings)"
        )
    return applied


def resume_config(
    saved: dict[str, Any], config: TrainConfig, given: frozenset[str] | None = None
) -> tuple[TrainConfig, list[str]]:
    """The settings of a resumed run: the saved ones, with what the user set this time applied on top.

    The differences are checked and named by :func:`resume_differences`.

    Args:
        saved: the run's saved config (``RUN/config.json``, of this or an earlier version).
        config: the settings given for the resumed run.
        given: the dotted keys the user gave (from :func:`load_config_given`): those come from ``config``,
            the others keep their saved values. ``None``: ``config`` counts as given in full, except the
            values resolved by the base model's size (``lr``) it leaves unset.

    >>> saved = TrainConfig(data="d", epochs=30, lr=1e-3).to_dict()
    >>> config, notes = resume_config(saved, *load_config_given(overrides=["--data", "d", "--lr", "5e-4"]))
    >>> config.epochs, config.lr, notes
    (30, 0.0005, ['lr: 0.001 -> 0.0005'])
    """
    if given is None:
        # unset size-class values would be resolved again; the run keeps the ones it was started with
        later = {key for values in SIZE_CLASSES.values() for key in values if key != "max_parameters"}
        later.add("decoder_lr")
        kept = {k: saved[k] for k in later if getattr(config, k) is None and saved.get(k) is not None}
        merged = dataclasses.replace(config, **kept) if kept else config
    else:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        values = json.loads(json.dumps({k: v for k, v in saved.items() if k in known}))  # a copy
        for key in sorted(given | {"resume", "output_dir"}):
            name, _, inner = key.partition(".")
            value = getattr(config, name)
            if name in _NESTED:
                value = getattr(value, inner) if inner else _section_dict(name, value)
            elif inner and isinstance(value, dict):  # --peft.KEY: that key of the mapping
                value = value[inner]
            # `--conv_lora.r 4` on a resume changes r, not the whole adapter
            _set_dotted(values, key, _plain(value), source="saved run config")
        merged = TrainConfig.from_dict(values, source="saved run config + this run's settings")
    return merged, resume_differences(saved, merged)


def apply_resumed_settings(optimizer: Any, scheduler: Any, config: TrainConfig) -> None:
    """After loading a checkpoint, give its optimiser and schedule this run's ``lr`` (``decoder_lr`` for the group
    of SAM's mask decoder, where it has one) and ``weight_decay``.

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
    rates = [
        config.decoder_lr if group.get("name") == DECODER_GROUP and config.decoder_lr is not None else config.lr
        for group in optimizer.param_groups
    ]
    scheduler.base_lrs = rates
    for group, factor, rate in zip(optimizer.param_groups, scheduler.lr_lambdas, rates, strict=True):
        group["initial_lr"] = rate
        group["weight_decay"] = config.weight_decay
        group["lr"] = rate * factor(scheduler.last_epoch)
    set_last_lr(scheduler, [group["lr"] for group in optimizer.param_groups])


def _differences(f: dataclasses.Field, saved: dict[str, Any], new: Any) -> list[str]:
    """``name: old -> new`` for a field of a resumed run; nested settings key by key."""
    if f.name not in saved:  # a field this run's checkpoint predates: a difference unless left at its default
        return [] if new == _default(f) else [f"{f.name}: (not recorded) -> {_plain(new)!r}"]
    old = saved[f.name]
    if f.name not in _NESTED:
        return [] if _plain(old) == _plain(new) else [f"{f.name}: {old!r} -> {_plain(new)!r}"]
    now = _resolved(f.name, new)
    try:
        before = _resolved(f.name, _coerce(old, type(new), f.name))
    except ValueError:  # saved by hand, or by a version that knew other keys
        return [f"{f.name}: {old!r} -> {_section_dict(f.name, new)!r}"]
    return [f"{f.name}.{key}: {before[key]!r} -> {value!r}" for key, value in now.items() if before[key] != value]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _section_dict(name: str, value: Any) -> dict[str, Any]:
    """A nested setting as ``RUN/config.json`` stores it."""
    data = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return {key: _plain(item) for key, item in data.items() if key not in _NESTED[name]}


def _resolved(name: str, value: Any) -> dict[str, Any]:
    """Every value of a nested setting as it takes effect (unset adapter settings: ConvLoraConfig's values)."""
    source = value.build() if isinstance(value, AdapterSettings) else value
    return {f.name: _plain(getattr(source, f.name)) for f in dataclasses.fields(value) if f.name not in _NESTED[name]}


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


def check_fields(obj: Any) -> None:
    """Hold every field of a config dataclass to its type hint and its ``choices`` metadata, in place.

    Values come as JSON, TOML and the command line give them: an integer where a number is expected, a
    list for a tuple, ``"0,2"`` or one value for a list (text stays text where the type also allows text),
    a mapping of its fields for a nested dataclass (errors in it start with the field's name: ``conv_lora:
    r must be >= 1, got 0``). Range checks stay with each class.

    Args:
        obj: a dataclass instance, from its ``__post_init__``.

    Raises:
        ValueError: naming the field, what was found and what was expected.

    >>> settings = AdapterSettings(lora_alpha=16, layers="0,2")
    >>> settings.lora_alpha, settings.layers
    (16.0, [0, 2])
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(getattr(obj, f.name), hints[f.name], f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        setattr(obj, f.name, value)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` takes it (see :func:`check_fields`), or a ValueError naming ``key``.

    Args:
        value: the value as read (JSON, TOML, command line or Python).
        hint: a type: ``int``, ``float``, ``bool``, ``str``, ``None``, their unions, ``list[...]`` and
            ``tuple[...]`` of them, or a dataclass.
        key: how to name the value in errors.

    >>> _coerce("0,4095", list[float] | None, "intensity_range"), _coerce([0.8, 1], tuple[float, float], "scale")
    ([0.0, 4095.0], (0.8, 1.0))
    """
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    for loose in (False, True):  # a value of one of the types first; "0,2" or 1 only then as a list
        for option in options:
            found = _take(value, option, key, loose)
            if found is not _NO:
                return found
    raise ValueError(f"{key} must be {' or '.join(dict.fromkeys(_describe(o) for o in options))}, got {value!r}")


_NO = object()  # "this type does not take the value"


class _UnknownKeys(ValueError):
    pass


def _take(value: Any, tp: Any, key: str, loose: bool) -> Any:
    origin = get_origin(tp) or tp
    if origin is dict:  # a mapping of named values (TrainConfig.peft); its owner checks the values
        return dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _NO
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        known = sorted(f.name for f in dataclasses.fields(tp) if f.init)
        unknown = [f"{key}.{name}" for name in sorted(set(value) - set(known))]
        if unknown:
            raise _UnknownKeys(f"unknown keys {unknown}; known keys of {key}: {known}")
        values = {name: _coerce(item, _hints(tp)[name], f"{key}: {name}") for name, item in value.items()}
        try:
            return tp(**values)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from error
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif loose and isinstance(value, (str, int, float)) and not isinstance(value, bool):  # --channels 0,2 or 1
            items = [_parse_value(part.strip()) for part in value.split(",")] if isinstance(value, str) else [value]
        else:
            return _NO
        kinds = get_args(tp) if origin is tuple else get_args(tp)[:1] * len(items)
        try:
            taken = [_coerce(item, kind, key) for item, kind in zip(items, kinds, strict=True)]
        except ValueError:  # an item of another type, or another count
            return _NO
        return taken if origin is list else tuple(taken)
    if isinstance(value, bool) and tp is not bool:
        return _NO
    if tp is float and isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    return value if isinstance(value, tp) else _NO  # also None for NoneType


def _describe(tp: Any) -> str:
    origin = get_origin(tp) or tp
    if origin is tuple:
        return f"a list of {len(get_args(tp))} values"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if origin is dict:
        return "a mapping"
    names = {type(None): "null", float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    return names.get(origin, "a list such as 0,2")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
