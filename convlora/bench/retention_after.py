"""Retention measured after training: what a finished run's kept model keeps of the base's prompted quality.

A run trained with retention on records it at every evaluation (:mod:`convlora.training.retention_monitor`);
the benchmark's earlier runs did not. Rather than train them again, a quality experiment with
``retention_after`` scores each finished run's exported model (its kept, best-on-validation checkpoint) with
the same protocols, keep sets and base scores the engine would have used: the generic keep set of
``convlora-tiny`` (``retention``) and the objects of the domain's first validation images (``retention_val``:
connected components of binary masks, one object per id of instance maps, as the run's mode reads them).
The numbers land in the run's ``result.json`` (``retention``, with ``retention_measured: "after training"`` and
the base's own prompted IoU on each keep set, ``retention_base_scores``),
so a rerun reads them instead of measuring again.

>>> measurer = AfterTraining(keep_images=16)  # doctest: +SKIP
>>> measurer.add(record, run_dir, data)["retention"]["retention"]  # doctest: +SKIP
0.41
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._io import write_json
from ..artifact import load_trained
from ..artifact.folder import apply_task_settings
from ..data import load_datasets
from ..evaluation.retention import (
    DEFAULT_CLICKS,
    KeepSet,
    default_mask_input,
    generic_keep_set,
    keep_set_from_dataset,
    prompted_quality,
    retention,
)
from ..models import load_sam
from ..models.embedded import BASE_ARCHITECTURE, EMBEDDED_MODELS
from ..training.retention_monitor import KEEP_KEY, VAL_KEY, flat_retention

MEASURED_AFTER = "after training"


class AfterTraining:
    """Scores finished runs' exported models against the base on the generic and validation keep sets.

    The base's scores are computed once per keep set and reused for every run of the experiment.

    Args:
        keep_images: images of the generic keep set and of each domain's validation keep set.
    """

    def __init__(self, keep_images: int) -> None:
        if keep_images < 1:
            raise ValueError(f"retention_after must be a number of keep images >= 1, got {keep_images}")
        self.keep_images = keep_images
        self._generic: KeepSet | None = None
        self._val: dict[str, KeepSet] = {}
        self._base_scores: dict[tuple[str, str], dict[str, float]] = {}
        self.base_scores: dict[str, dict[str, float]] = {}  # of the last measurement, per keep set

    def _keep_sets(self, data: Path, task: Any, key: str) -> dict[str, KeepSet]:
        if self._generic is None:
            self._generic = generic_keep_set(self.keep_images, size=int(BASE_ARCHITECTURE["image_size"]))
        if key not in self._val:  # the validation split as the run's engine loaded it (same mode, same reading)
            loaded = load_datasets(
                data, mode=task.mode, num_classes=task.num_classes if task.mode != "instances" else None,
                image_size=task.image_size, reading=task.image_reading,
            )  # fmt: skip
            if not len(loaded.val):
                raise ValueError(
                    f"retention_after: {data} has no validation samples to draw the validation keep set from"
                )
            self._val[key] = keep_set_from_dataset(loaded.val, "val", max_images=self.keep_images)
        return {KEEP_KEY: self._generic, VAL_KEY: self._val[key]}

    def measure(self, adapter_dir: Path, data: Path) -> dict[str, float]:
        """``retention`` and ``retention_val`` (mean and per protocol) of the model in ``adapter_dir``.

        Args:
            adapter_dir: a finished run's exported model (``RUN/adapter``).
            data: the dataset the run trained on (its ``val`` split gives ``retention_val``).
        """
        model, task = load_trained(adapter_dir)
        if task.mode == "multiclass":  # its class-query decoder replaced SAM's prompted one
            raise ValueError(f"retention_after: {adapter_dir} is a multiclass model, without SAM's prompted decoder")
        if task.base_model not in EMBEDDED_MODELS:
            raise ValueError(
                f"retention_after: {adapter_dir} was trained from {task.base_model!r}; the generic keep set belongs to "
                f"{sorted(EMBEDDED_MODELS)}"
            )
        options = {"num_clicks": DEFAULT_CLICKS, "mask_input": default_mask_input(task.base_model)}
        val_key = f"{data}|{task.mode}"  # a binary run splits instance maps into components, an instance run by id
        keep_sets = self._keep_sets(data, task, val_key)
        self.base_scores = {}
        found: dict[str, float] = {}
        with torch.no_grad():
            for key, keep in keep_sets.items():
                cache = (key, val_key if key == VAL_KEY else "")
                if cache not in self._base_scores:
                    base = apply_task_settings(load_sam(task.base_model, image_size=task.image_size), task).eval()
                    self._base_scores[cache] = prompted_quality(base, keep, **options)
                self.base_scores[key] = self._base_scores[cache]
                found |= flat_retention(key, retention(model.eval(), self._base_scores[cache], keep, **options))
        return found

    def add(self, record: dict[str, Any], run_dir: Path, data: Path) -> dict[str, Any]:
        """``record`` with its kept model's retention, measured now unless it has one; ``result.json`` updated.

        Args:
            record: the run's record (:func:`~convlora.bench.quality.run_one`).
            run_dir: the run's folder (``result.json`` and ``train/adapter``).
            data: the dataset the run trained on.
        """
        if record.get("retention"):
            return record
        found = self.measure(run_dir / "train" / "adapter", data)
        stored = {k: v for k, v in record.items() if k not in ("reused",)}
        added = {"retention": found, "retention_measured": MEASURED_AFTER}
        added["retention_base_scores"] = dict(self.base_scores)
        write_json(run_dir / "result.json", stored | added)
        return {**record, **added}
