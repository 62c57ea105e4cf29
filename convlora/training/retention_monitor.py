"""Retention during training: the run's keep sets, the base's scores (once), the model's at every evaluation.

A binary or instance run measures, next to its target metric, how much of the base model's prompted quality
the model keeps (:mod:`convlora.evaluation.retention`): on a keep set (``keep_data``, or the generic one of
the embedded ``convlora-tiny``) as ``retention``, and on the run's own validation objects (connected
components of binary masks; each instance id of an instance run) as ``retention_val``, each per prompt
protocol (``retention/box`` ...) and as their mean. An instance run keeps SAM's prompt encoder and mask
decoder frozen beside its instance decoder, so its retention is what the adapted image encoder costs SAM's
prompts (exactly 1 for method ``decoder``, which adapts nothing SAM's prompts go through); with
``joint_prompted`` its prompted steps train SAM's mask decoder on the run's instances, and retention measures
that decoder as it is measured in a binary joint run. A multi-class run
replaces SAM's decoder by a class-query decoder and measures none. The base is scored once, before the
method's adapters go in; every evaluation then scores the model and stores the ratios in its history entry.
:func:`select_checkpoint` is the rule (``TrainConfig.select``) that names the evaluation whose model is kept.

Under several processes the main process measures and the others receive its numbers, so that every process
holds the same history and makes the same choice.

>>> select_checkpoint([{"epoch": 0, "iou": 0.5}, {"epoch": 1, "iou": 0.6}], "iou", "best").reason
'epoch 1: iou 0.6 (the best of the 2 evaluations)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from torch import nn

from ..evaluation.metrics import is_better
from ..evaluation.retention import (
    DEFAULT_CLICKS,
    PROTOCOLS,
    Choice,
    KeepSet,
    choose_checkpoint,
    choose_weighted,
    default_mask_input,
    generic_keep_set,
    keep_set_from_dataset,
    keep_set_from_folder,
    object_kind_of,
    prompted_quality,
    retention,
)
from ..models.embedded import BASE_ARCHITECTURE, EMBEDDED_MODELS

# the history keys of a measurement: the mean ratio, then one per protocol (``retention/box`` ...)
KEEP_KEY = "retention"
VAL_KEY = "retention_val"
# the modes whose model answers prompts with SAM's own decoder (multiclass installs a class-query decoder)
PROMPTED_MODES = ("binary", "instances")


def check_keep_data(keep_data: str | None) -> None:
    """Refuse, before any work, a ``keep_data`` that is not there (one line naming it).

    >>> check_keep_data(None)
    """
    if keep_data is not None and not Path(keep_data).exists():
        raise ValueError(
            f"keep_data: {keep_data} does not exist; expected a labelled dataset folder (images/ + masks/) or a "
            "CSV of image,mask paths holding objects the base should keep segmenting"
        )


def flat_retention(key: str, result: Mapping[str, Any]) -> dict[str, float]:
    """A :func:`~convlora.evaluation.retention.retention` result as history entries: the mean, then per protocol.

    >>> flat_retention("retention", {"mean": 0.9, "box": 1.0, "point": 0.8, "clicks": 0.9})["retention/point"]
    0.8
    """
    return {key: float(result["mean"]), **{f"{key}/{p}": float(result[p]) for p in PROTOCOLS}}


def _on_main(accelerator: Any, compute: Any) -> Any:
    """``compute()`` on the main process, its result (or its error) on every process."""
    outcome: Any = None
    if accelerator is None or accelerator.is_main_process:
        try:
            outcome = compute()
        except ValueError as error:
            outcome = error
    if accelerator is not None and accelerator.num_processes > 1:
        box = [outcome if not isinstance(outcome, ValueError) else ("error", str(outcome))]
        broadcast_object_list(box, from_process=0)
        outcome = box[0]
        if isinstance(outcome, tuple) and outcome[:1] == ("error",):
            outcome = ValueError(outcome[1])
    if isinstance(outcome, ValueError):
        raise outcome
    return outcome


@dataclass
class RetentionMonitor:
    """The keep sets of a run and the base's scores on them; :meth:`measure` scores a model against them.

    Args:
        keep: the keep set (``keep_data`` or the generic one).
        base_scores: the base's :func:`~convlora.evaluation.retention.prompted_quality` on ``keep``.
        val_keep: the run's validation objects as a keep set, or ``None`` when it has none.
        val_base_scores: the base's scores on ``val_keep``.
        options: ``num_clicks`` and ``mask_input`` of the ``clicks`` protocol (the base was scored alike).

    >>> monitor = RetentionMonitor(keep, prompted_quality(base, keep))  # doctest: +SKIP
    >>> monitor.measure(model)["retention"]  # doctest: +SKIP
    0.97
    """

    keep: KeepSet
    base_scores: dict[str, float]
    val_keep: KeepSet | None = None
    val_base_scores: dict[str, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def measure(self, model: nn.Module, accelerator: Any = None) -> dict[str, float]:
        """``retention`` (and ``retention_val``): the mean ratio and one per protocol, as history entries.

        Args:
            model: the model as it is now (unwrapped; binary or instances: SAM's prompted path is scored).
            accelerator: the run's accelerator: the main process measures, every process gets the numbers.
        """

        def compute() -> dict[str, float]:
            device = accelerator.device if accelerator is not None else None
            found = flat_retention(
                KEEP_KEY, retention(model, self.base_scores, self.keep, **self.options, device=device)
            )
            if self.val_keep is not None and self.val_base_scores is not None:
                val = retention(model, self.val_base_scores, self.val_keep, **self.options, device=device)
                found |= flat_retention(VAL_KEY, val)
            return found

        return _on_main(accelerator, compute)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records: the keep sets, the base's scores and the protocols."""
        record: dict[str, Any] = {
            "keep_set": {**self.keep.summary(), "objects": int(self.base_scores["objects"])},
            "base_scores": self.base_scores,
            "protocols": list(PROTOCOLS),
            "num_clicks": self.options.get("num_clicks", DEFAULT_CLICKS),
            "mask_input": self.options.get("mask_input") is not False,
        }
        if self.val_keep is not None and self.val_base_scores is not None:
            record["val_keep_set"] = {**self.val_keep.summary(), "objects": int(self.val_base_scores["objects"])}
            record["val_base_scores"] = self.val_base_scores
        return record


def plan_keep_set(config: Any, mode: str) -> tuple[KeepSet | None, str]:
    """The keep set a run measures retention on, or ``None``, and the line saying which or why not.

    Args:
        config: the run's :class:`~convlora.training.config.TrainConfig` (``retention``, ``keep_data``,
            ``keep_images``, ``model``, ``select``).
        mode: the task's mode, as the data resolved it.

    Raises:
        ValueError: ``retention on`` without a keep set, or a ``select`` rule that needs retention where none
            is measured.

    >>> from types import SimpleNamespace
    >>> plan_keep_set(SimpleNamespace(retention="off", select="best"), "binary")
    (None, 'retention: off (--retention off)')
    """
    keep: KeepSet | None = None
    if config.retention == "off":
        reason = "retention: off (--retention off)"
    elif mode not in PROMPTED_MODES:
        reason = (
            f"retention: skipped: a {mode} run's model answers with a class-query decoder, one mask per class, in "
            "place of SAM's prompted mask decoder, so it has no prompted quality to measure"
        )
    elif config.keep_data is not None:
        check_keep_data(config.keep_data)
        keep = keep_set_from_folder(config.keep_data, max_images=config.keep_images)
        reason = f"retention: keep set {keep.name!r}: {keep.description}"
    elif config.model in EMBEDDED_MODELS:
        keep = generic_keep_set(config.keep_images, size=int(BASE_ARCHITECTURE["image_size"]))
        reason = f"retention: generic keep set: {keep.description}"
    elif config.retention == "on":
        raise ValueError(
            f"retention 'on' needs keep_data: the base model {config.model!r} has no built-in keep set (only "
            "convlora-tiny has one); give --keep_data DIR, a labelled folder of objects it should keep segmenting"
        )
    else:
        reason = "retention: off: no keep set (give --keep_data DIR to measure what the model keeps of SAM's prompts)"
    if keep is not None and mode == "instances" and getattr(config, "joint_prompted", 0) > 0:
        reason += "; instance run: SAM's mask decoder, trained by the joint prompted steps, reads the adapted encoder"
    elif keep is not None and mode == "instances":
        reason += "; instance run: SAM's own prompt encoder and mask decoder (untrained here) read the adapted encoder"
    if keep is None and config.select != "best":
        raise ValueError(f"select={config.select!r} needs retention, which this run does not measure ({reason})")
    return keep, reason


def start_retention(
    config: Any, mode: str, base: nn.Module, val_data: Any, accelerator: Any = None
) -> tuple[RetentionMonitor | None, str]:
    """Plan the run's retention and score the base on its keep sets (before adapters go into ``base``).

    The base is scored once, at the run's input size, on the accelerator's device and moved back after.
    The run's validation objects become a second keep set (``retention_val``) when they hold any: the connected
    components of a binary run's masks, each instance id of an instance run (touching objects stay apart).

    Args:
        config: the run's settings.
        mode: the task's mode, as the data resolved it.
        base: the loaded base SAM, task settings applied, no method built into it yet.
        val_data: the run's validation dataset.
        accelerator: the run's accelerator (the main process scores, every process gets the scores).

    Returns:
        the monitor (``None`` without retention) and the line saying what is measured or why not.

    >>> monitor, note = start_retention(config, "binary", base, data.val, accelerator)  # doctest: +SKIP
    """
    keep, reason = plan_keep_set(config, mode)
    if keep is None:
        return None, reason
    options = {"num_clicks": DEFAULT_CLICKS, "mask_input": default_mask_input(config.model)}
    val_keep = None
    if len(val_data):  # the objects of the run's mode: each instance id of an instance run, not components
        kind = object_kind_of(mode)
        val_keep = keep_set_from_dataset(val_data, "val", max_images=config.keep_images, object_kind=kind)

    def compute() -> tuple[dict[str, float], dict[str, float] | None]:
        device = accelerator.device if accelerator is not None else next(base.parameters()).device
        was = next(base.parameters()).device
        base.to(device)
        try:
            scores = prompted_quality(base, keep, **options)
            try:
                val_scores = prompted_quality(base, val_keep, **options) if val_keep is not None else None
            except ValueError:  # no object in the validation masks
                val_scores = None
        finally:
            base.to(was)
        return scores, val_scores

    scores, val_scores = _on_main(accelerator, compute)
    val_note = (
        f"; and the {int(val_scores['objects'])} validation objects (retention_val)"
        if val_scores is not None
        else "; the validation split has no object to prompt (no retention_val)"
    )
    monitor = RetentionMonitor(keep, scores, val_keep if val_scores is not None else None, val_scores, options)
    base_line = ", ".join(f"{p} {scores[p]:.3f}" for p in PROTOCOLS)
    return monitor, f"{reason}; {int(scores['objects'])} objects, base IoU {base_line}{val_note}"


def _best_by_metric(history: Sequence[Mapping[str, Any]], metric: str) -> Choice | None:
    """The engine's original rule: the first evaluation that no later one improves on (NaN never wins)."""
    index = None
    for i, entry in enumerate(history):
        value = entry.get(metric)
        best = None if index is None else history[index][metric]
        if isinstance(value, (int, float)) and is_better(metric, value, best):
            index = i
    if index is None:
        return None
    entry = history[index]
    kept = entry.get(KEEP_KEY)
    extra = f" with retention {kept:.4g}" if isinstance(kept, (int, float)) else ""
    count = len(history)
    reason = f"epoch {entry.get('epoch')}: {metric} {entry[metric]:.4g}{extra} (the best of the {count} evaluations)"
    return Choice(index, entry, reason, True)


def select_checkpoint(
    history: Sequence[Mapping[str, Any]],
    metric: str,
    rule: str = "best",
    min_retention: float = 0.95,
    retention_weight: float = 0.5,
) -> Choice | None:
    """The evaluation whose model a run keeps, by ``TrainConfig.select`` (``None``: no finite metric yet).

    ``best``: the best ``metric`` (the earliest of equals); ``retention``:
    :func:`~convlora.evaluation.retention.choose_checkpoint` with ``min_retention``; ``weighted``:
    :func:`~convlora.evaluation.retention.choose_weighted` with ``retention_weight``. Adding an evaluation
    changes the choice only to that evaluation, so a run exports the model whenever the newest is chosen.

    Args:
        history: the run's evaluations so far (``epoch``, ``step``, the metrics, ``retention``).
        metric: the target metric.
        rule: ``"best"``, ``"retention"`` or ``"weighted"``.
        min_retention: the bound of ``retention``.
        retention_weight: the weight of ``weighted``.

    >>> history = [{"epoch": 0, "iou": 0.5, "retention": 0.99}, {"epoch": 1, "iou": 0.6, "retention": 0.9}]
    >>> select_checkpoint(history, "iou", "retention").entry["epoch"]
    0
    """
    if not history:
        return None
    if rule == "retention":
        return choose_checkpoint(history, metric, min_retention=min_retention, retention_key=KEEP_KEY)
    if rule == "weighted":
        return choose_weighted(history, metric, retention_weight, retention_key=KEEP_KEY)
    if rule != "best":
        raise ValueError(f"select must be one of ['best', 'retention', 'weighted'], got {rule!r}")
    return _best_by_metric(history, metric)


def selection_record(choice: Choice | None, config: Any, metric: str) -> dict[str, Any]:
    """What ``metrics.json`` records under ``"selection"``: the rule, its setting, the chosen evaluation and why.

    >>> from types import SimpleNamespace
    >>> settings = SimpleNamespace(select="best", min_retention=0.95, retention_weight=0.5)
    >>> selection_record(None, settings, "iou")["reason"]
    'no evaluation with a finite iou'
    """
    record: dict[str, Any] = {"rule": config.select, "metric": metric}
    if config.select == "retention":
        record["min_retention"] = config.min_retention
    elif config.select == "weighted":
        record["retention_weight"] = config.retention_weight
    if choice is None:
        return {**record, "reason": f"no evaluation with a finite {metric}"}
    entry = choice.entry
    kept = entry.get(KEEP_KEY)
    return {
        **record,
        "epoch": entry.get("epoch"),
        "step": entry.get("step"),
        "value": entry.get(metric),
        "retention": None if isinstance(kept, float) and math.isnan(kept) else kept,
        "retention_val": entry.get(VAL_KEY),
        "met_bound": choice.met_bound,
        "reason": choice.reason,
    }
