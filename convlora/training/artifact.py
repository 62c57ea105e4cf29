"""The trained artifact a run exports (``RUN/adapter``), and loading it back in one call.

Every export holds the method's weights (see :mod:`convlora.training.methods`), ``convlora_task.json`` (mode,
classes, image size, base model, method, weight hashes) so that :func:`load_trained` rebuilds the exact
model, and a model card ``README.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_dir, sha256_file, write_json
from ..models import install_class_decoder, load_sam
from .methods import get_method

TASK_FILE = "convlora_task.json"
TASK_FORMAT_VERSION = 1


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


def export_trained(model: nn.Module, task: TaskInfo, directory: str | Path, model_card: str | None = None) -> Path:
    """Write a trained model's artifact (see the module docstring) atomically into ``directory``.

    Args:
        model: the trained model (a ``PeftModel`` for ``conv_lora``/``lora``).
        task: the task description written to ``convlora_task.json``.
        directory: the output folder, replaced as a whole.
        model_card: text of the ``README.md`` written beside the weights.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        get_method(task.method).export(model, tmp)
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
    method = get_method(task.method)
    if method.load is None or task.merged:
        model = load_sam(directory)
        return model.eval(), task
    source = base_model or task.base_model
    try:
        base = load_sam(source, image_size=task.image_size)
    except ValueError as error:
        if base_model is not None:
            raise
        raise ValueError(f"{error} ({directory} was trained on it; pass base_model / --base-model)") from error
    if task.mode == "multiclass":
        install_class_decoder(base, task.num_classes)
    model = method.load(base, directory, source)
    return model.eval(), task
