"""Resumable training checkpoints, written as safetensors and JSON only (nothing is ever pickled).

A checkpoint folder ``RUN/checkpoints/step-00000120/`` holds:

- ``trainable.safetensors``: the trainable tensors only (adapters and mask decoder), not the frozen SAM;
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moment tensors and its parameter groups;
- ``rng.safetensors`` + ``progress.json``: every process's torch (and CUDA) random state, the scheduler
  state, the epoch, the position in the epoch, the best metric so far and the history.

Together with data order and augmentations derived from ``(seed, epoch, index)``, this makes a resumed
run bitwise identical to an uninterrupted one on CPU. Folders are written under a temporary name and
renamed, so a run killed while saving never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import atomic_dir, write_json

CHECKPOINT_PREFIX = "step-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name (contiguous CPU copies, ready for safetensors)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable tensors back; refuses a checkpoint that does not match the model exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing = sorted(params.keys() - state.keys())[:5]
        extra = sorted(state.keys() - params.keys())[:5]
        raise ValueError(
            f"{source} does not match this run's model (missing {missing}, unexpected {extra}); was it written "
            "by a run with other settings?"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise ValueError(
                    f"{source}: {name} has shape {list(state[name].shape)}, the model has {list(param.shape)}"
                )
            param.copy_(state[name])


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: dict[str, torch.Tensor],
    progress: dict[str, Any],
) -> Path:
    """Write one checkpoint folder atomically (call on the main process only).

    Args:
        directory: the checkpoint folder to create or replace.
        model: the unwrapped model; only its trainable tensors are saved.
        optimizer: the optimizer (its moments are saved as tensors).
        rng_states: random states of every process, e.g. ``{"torch.0": ..., "cuda.0": ...}``.
        progress: JSON-able progress: epoch, step in epoch, global step, scheduler state, best metric ...
    """
    directory = Path(directory)
    with atomic_dir(directory, "checkpoint") as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "optimizer.json", meta)
        save_file({k: v.contiguous() for k, v in rng_states.items()}, tmp / "rng.safetensors")
        write_json(tmp / "progress.json", progress)
    return directory


def load_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model and optimizer from a checkpoint folder; returns ``(rng_states, progress)``."""
    directory = Path(directory)
    needed = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "progress.json"]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory} is not a complete convlora checkpoint: {missing} missing")
    load_trainable_state(model, _read(directory / "trainable.safetensors"), str(directory))
    meta = _read(directory / "optimizer.json")
    optimizer.load_state_dict(_optimizer_from_files(_read(directory / "optimizer.safetensors"), meta))
    return _read(directory / "rng.safetensors"), _read(directory / "progress.json")


def _read(path: Path) -> Any:
    """A checkpoint file's contents; a damaged file is a ValueError naming it."""
    try:
        return load_file(path) if path.suffix == ".safetensors" else json.loads(path.read_text())
    except Exception as error:  # safetensors and json raise several types for damaged files
        raise ValueError(
            f"{path} is damaged ({error}); resume from an earlier checkpoint in {path.parent.parent}"
        ) from error


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    complete = [p for p in folders if (p / "progress.json").is_file()]
    return sorted(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after optimiser step ``step``."""
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``"latest"`` → the newest complete checkpoint of the run (``None`` if there is none yet); a path → itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise ValueError(f"resume: {path} is not a convlora checkpoint folder (no progress.json)")
    return path


def rotate_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and the temporary folders of saves a kill interrupted."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for stale in [*root.glob(f".{CHECKPOINT_PREFIX}*.tmp"), *root.glob(f".{CHECKPOINT_PREFIX}*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
