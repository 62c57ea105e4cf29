"""The trained artifact a run exports (``RUN/adapter``), and loading it back in one call.

Every export holds the method's weights (see :mod:`convlora.artifact.methods`), ``convlora_task.json`` (mode,
classes, image size, base model, method, weight hashes) so that :func:`load_trained` rebuilds the exact
model, and a model card ``README.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_dir, read_versioned_json, sha256_file, write_json
from ..data import ImageReading
from ..instances.model import (
    HEAD_WEIGHTS,
    InstanceSettings,
    has_instance_head,
    head_apart,
    install_instance_head,
    instance_head,
    load_head,
    save_head,
    trained_head,
)
from ..models import family_of, install_class_decoder, load_sam
from ..models.adapter_check import ADAPTER_CONFIG, read_adapter_config
from ..models.family import prepare_model
from .methods import get_method, method_for_adapter

TASK_FILE = "convlora_task.json"
TASK_FORMAT_VERSION = 1


@dataclass
class TaskInfo:
    """What a trained model segments and how to rebuild it.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"instances"`` (one id per object, from the instance decoder).
        num_classes: classes including the background (2 for binary and instances).
        class_names: one name per class.
        image_size: square input size of the model.
        base_model: the SAM checkpoint the run started from (embedded name, directory or hub id).
        method: the training method.
        metrics: final metrics, for the model card.
        merged: the folder holds a merged model (``convlora merge``), loaded without the base model.
        image_reading: how images were read in training (``ImageReading.to_dict()``: intensity mapping of
            high-bit-depth images, channels); prediction and evaluation read images the same way. Files
            without it get the defaults, under which 8-bit images are read as they always were.
        prompt: the prompt kind the model was trained with (``"none"``: prompt-free; ``"box"``, ``"point"``,
            ``"box_point"``, ``"mixed"``). Any model answers prompts; this records how it was trained.
        instance_head: ``mode="instances"`` only: the instance decoder's shape and watershed settings
            (``convlora.instances.InstanceSettings.to_dict()``); ``None`` for the other modes.
        single_mask_token: SAM 2 / SAM 3 give their single-mask output from mask token 0 in evaluation too,
            as in training (transformers' eval-time ``dynamic_multimask_via_stability`` fallback off); applied
            by the training engine and :func:`load_trained`, never by ``load_sam`` / ``apply_conv_lora``. No
            effect on SAM and SAM-HQ. Files without it (earlier convlora, which always did this) get ``True``.
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
    image_reading: dict[str, Any] = field(default_factory=lambda: ImageReading().to_dict())
    prompt: str = "none"
    single_mask_token: bool = True
    instance_head: dict[str, Any] | None = None
    format_version: int = TASK_FORMAT_VERSION

    @property
    def out_channels(self) -> int:
        """Channels of the model's logits: 1 for binary, ``num_classes`` for multi-class, 3 for instances."""
        if self.mode == "instances":
            return 3  # foreground, centre, boundary (convlora.instances.decoder.CHANNELS)
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
        data = read_versioned_json(
            path, known=set(cls.__dataclass_fields__), version=TASK_FORMAT_VERSION, what="a convlora task file"
        )
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path} is incomplete: {error}") from error


def export_trained(model: nn.Module, task: TaskInfo, directory: str | Path, model_card: str | None = None) -> Path:
    """Write a trained model's artifact (see the module docstring) atomically into ``directory``.

    Args:
        model: the trained model (a ``PeftModel`` for ``conv_lora``/``lora``).
        task: the task description written to ``convlora_task.json``.
        directory: the output folder, replaced as a whole.
        model_card: text of the ``README.md`` written beside the weights.
    """
    directory = Path(directory)
    with atomic_dir(directory, "model") as tmp:
        write_weights(model, tmp, get_method(task.method).export)
        write_task_file(tmp, task)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
    return directory


def write_weights(model: nn.Module, folder: Path, write: Any) -> None:
    """``write(model, folder)``, with an instance decoder the writer would not carry written beside it.

    PEFT's own export carries the head when it is one of the adapter's ``modules_to_save``; any other writer
    (decoder-only, BitFit, a full or merged checkpoint) gets the model without it, and the head goes to
    ``instance_head.safetensors`` (read back by :func:`load_trained`).

    Args:
        model: the model to write.
        folder: an existing (temporary) folder.
        write: ``(model, folder) -> None``, e.g. a method's ``export`` or ``write_merged``.
    """
    if not has_instance_head(model) or trained_head(model) is not instance_head(model):
        write(model, folder)
        return
    save_head(model, folder)
    with head_apart(model):
        write(model, folder)


def restore_instance_head(model: nn.Module, task: TaskInfo, directory: Path) -> None:
    """Put the instance decoder of an instance task back on a loaded model (from the folder's head file)."""
    if task.mode != "instances":
        return
    if not has_instance_head(model):
        install_instance_head(model, InstanceSettings.from_dict(task.instance_head))
    if (directory / HEAD_WEIGHTS).is_file():
        load_head(model, directory)


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

    A plain PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` as
    ``peft_model.save_pretrained`` writes them, no ``convlora_task.json``) loads too, onto ``base_model``
    (see :func:`load_peft_folder`).

    Args:
        directory: the folder written by a training run (``RUN/adapter``) or by :func:`export_trained`, or
            a plain PEFT adapter folder.
        base_model: load the adapter onto this SAM instead of the one recorded at training time (for
            example the same checkpoint at another path); required for a plain PEFT folder.

    Returns:
        ``(model, task)``; ``model(pixel_values=x).pred_masks[:, 0]`` gives ``task.out_channels`` logits.

    >>> model, task = load_trained("runs/polyp/adapter")  # doctest: +SKIP
    """
    directory = Path(directory)
    if not (directory / TASK_FILE).is_file() and (directory / ADAPTER_CONFIG).is_file():
        return load_peft_folder(directory, base_model=base_model)
    task = TaskInfo.read(directory)
    verify_weights(directory, task)
    method = get_method(task.method)
    if method.load is None or task.merged:
        model = load_sam(directory)
        restore_instance_head(model, task, directory)
        return apply_task_settings(model, task).eval(), task
    source = base_model or task.base_model
    try:
        base = load_sam(source, image_size=task.image_size)
    except ValueError as error:
        if base_model is not None:
            raise
        raise ValueError(f"{error} ({directory} was trained on it; pass base_model / --base-model)") from error
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    if task.mode == "instances":  # before the adapter: PEFT loads the head it carries into this one
        install_instance_head(base, InstanceSettings.from_dict(task.instance_head))
    model = method.load(base, directory, source)
    restore_instance_head(model, task, directory)
    return apply_task_settings(model, task).eval(), task


def apply_task_settings(model: nn.Module, task: TaskInfo) -> nn.Module:
    """Put a model in the state its task file records (in place): the single mask token for SAM 2 / SAM 3.

    Args:
        model: the base or trained model (a ``PeftModel`` too).
        task: the task; ``task.single_mask_token`` turns SAM 2's / SAM 3's eval-time multimask fallback off.

    >>> from convlora.models import random_sam, tiny_sam2_config
    >>> task = TaskInfo("binary", 2, ["background", "object"], 256, "random", "decoder")
    >>> apply_task_settings(random_sam(tiny_sam2_config()), task).mask_decoder.dynamic_multimask_via_stability
    False
    """
    if task.single_mask_token:
        prepare_model(model)
    return model


def load_peft_folder(directory: str | Path, *, base_model: str | None) -> tuple[nn.Module, TaskInfo]:
    """A plain PEFT adapter folder (no ``convlora_task.json``) on ``base_model``, as a binary prompt-free task.

    ``CONV_LORA`` and ``LORA`` adapters load with PEFT's ``PeftModel.from_pretrained`` after the same checks
    as a run's export (every tensor must fit the base); the mask decoder saved with them
    (``modules_to_save``) comes along. The task is binary at the base's image size, method ``conv_lora``
    or ``lora``; nothing else is known about what the adapter was trained for.

    Args:
        directory: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: the SAM the adapter was trained on (embedded name, directory or hub id). The base
            recorded in ``adapter_config.json`` is only named in the error when this is missing.

    >>> model, task = load_peft_folder("my_adapter", base_model="facebook/sam-vit-base")  # doctest: +SKIP
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    method = method_for_adapter(config.peft_type, str(directory), config)
    if base_model is None:
        recorded = getattr(config, "base_model_name_or_path", None)
        said = f"records base_model_name_or_path {recorded!r}" if recorded else "records no base model"
        raise ValueError(
            f"{directory} is a plain PEFT adapter folder (no {TASK_FILE}); pass base_model / --base-model, "
            f"the SAM it was trained on (its {ADAPTER_CONFIG} {said})"
        )
    base = load_sam(base_model)
    task = TaskInfo(
        mode="binary",
        num_classes=2,
        class_names=["background", "object"],
        image_size=family_of(base).image_size(base),
        base_model=str(base_model),
        method=method.name,
        single_mask_token=False,  # nothing records convlora's task setting: the model behaves as stock PEFT loads it
    )
    model = method.load(base, directory, str(base_model))  # type: ignore[misc]  # adapter methods have a load
    return model.eval(), task


def continue_from_export(
    base: nn.Module,
    task: TaskInfo,
    directory: str | Path,
    *,
    freeze_iou_head: bool = True,
    adapter_settings: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a loaded SAM to continue training an exported model (``--init_adapter``), like ``build_task_model``.

    The export's weights are loaded onto ``base`` and left trainable (``PeftModel.from_pretrained(...,
    is_trainable=True)`` for adapters; the mask decoder's weights for ``decoder``); an export of another
    method, base model or task is refused.

    Args:
        base: a ``SamModel`` at ``task.image_size`` (the run's ``--model``).
        task: this run's task; its ``method``, ``mode``, ``num_classes`` and ``base_model`` must match the export.
        directory: an exported model folder (``RUN/adapter``) or a plain PEFT adapter folder.
        freeze_iou_head: freeze the decoder parts prompt-free training never uses.
        adapter_settings: this run's ``conv_lora`` settings; a value that differs from the saved adapter's is
            refused (the saved adapter decides its own shape).

    >>> model = continue_from_export(sam, task, "runs/polyp/adapter")  # doctest: +SKIP
    """
    from peft import PeftModel

    from ..models.adapter_check import check_adapter_complete, check_adapter_matches, read_adapter_config
    from .methods import freeze_unused_decoder_parts, train_instance_head

    directory = Path(directory)
    where = f"init_adapter {directory}"
    if not directory.is_dir():
        raise ValueError(f"{where} is not a folder (expected the adapter/ folder of a convlora run)")
    if task.method == "full":
        raise ValueError(
            f"{where}: a full fine-tune exports a complete model; continue from it with --model {directory}"
        )
    if (directory / TASK_FILE).is_file():
        saved = TaskInfo.read(directory)
        verify_weights(directory, saved)
        found = {"method": saved.method, "mode": saved.mode, "num_classes": saved.num_classes}
        wanted = {"method": task.method, "mode": task.mode, "num_classes": task.num_classes}
        for key, value in found.items():
            if value != wanted[key]:
                raise ValueError(f"{where} holds a {key}={value!r} model but this run has {key}={wanted[key]!r}")
        if saved.merged:
            raise ValueError(f"{where} holds a merged model; continue from the adapter folder it was merged from")
        if not _same_model(saved.base_model, task.base_model):
            raise ValueError(
                f"{where} was trained on base model {saved.base_model!r} but this run uses {task.base_model!r}; "
                f"pass --model {saved.base_model}"
            )
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    if task.mode == "instances":
        saved_head = TaskInfo.read(directory).instance_head if (directory / TASK_FILE).is_file() else None
        task.instance_head = install_instance_head(
            base, InstanceSettings.from_dict(saved_head or task.instance_head)
        ).to_dict()
    method = get_method(task.method)
    if method.uses_adapter:
        config = read_adapter_config(directory)
        expected, found = method.peft_type, str(getattr(config.peft_type, "value", config.peft_type))
        if found != expected:  # str(PeftType.LORA) is "PeftType.LORA": compare the value
            raise ValueError(f"{where} is a {found} adapter but method {task.method!r} needs a {expected} adapter")
        for key, value in (adapter_settings or {}).items():
            if hasattr(config, key) and getattr(config, key) != value:
                raise ValueError(
                    f"{where}: conv_lora.{key}={value!r} differs from the saved adapter's {getattr(config, key)!r}; "
                    "drop the setting (the saved adapter decides its own shape)"
                )
        check_adapter_matches(base, directory)
        try:
            model = PeftModel.from_pretrained(base, str(directory), is_trainable=True)
        except (RuntimeError, KeyError) as error:
            raise ValueError(f"{where} does not fit base model {task.base_model}: {error}") from error
        check_adapter_complete(model, directory)
    else:
        model = method.build(method.load(base, directory, task.base_model), None)
    restore_instance_head(model, task, directory)
    train_instance_head(model)
    if freeze_iou_head:
        freeze_unused_decoder_parts(model, task.mode)
    return model


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
