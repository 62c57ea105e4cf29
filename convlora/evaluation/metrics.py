"""Evaluation metrics for binary and multi-class segmentation, as accumulators that merge across processes.

Predictions are compared at the original image resolution (resize them back before ``update``). Each
accumulator keeps only sums and counts (:meth:`state`), so evaluation split over several processes is
combined by summing the states (an all-reduce), then :meth:`compute` gives the numbers.

Binary tasks (:class:`BinaryMetrics`), logits or probabilities of one channel against ``{0, 1, 255}``:

==========================  ===========  ==========================================================
key                         convention   what it is
==========================  ===========  ==========================================================
``iou``, ``dice``           per image    Jaccard index and Dice (F1) of the mask ``prob > threshold``
                                         (0.5 by default) over the image's valid pixels; 1 when both
                                         masks are empty
``iou_dataset``             dataset      Jaccard index of the pixel counts summed over all images
``ber``                     dataset      balanced error rate in %, ``100 * (1 - (TPR + TNR) / 2)``
                                         from pixel counts (``prob > threshold``) summed over all
                                         images, as in shadow detection (the paper's code averaged a
                                         per-image BER instead); lower is better
``ber_fg``, ``ber_bg``      dataset      error rate in % on foreground (shadow) and background pixels
``mae``                     per image    mean absolute error of the (min-max normalised) probability;
                                         lower is better
``s_measure``               per image    structure measure (Fan et al. 2017), alpha = 0.5
``e_measure_mean``          per image    enhanced-alignment measure (Fan et al. 2018) averaged over the
                                         256 thresholds of the 8-bit map (the "mean E-measure")
``e_measure_max``           per image    maximum over thresholds of the image-averaged E-measure curve
``e_measure_adaptive``      per image    E-measure at the adaptive threshold ``2 * mean(prediction)``
``weighted_f_measure``      per image    weighted F-measure (Margolin et al. 2014) with beta^2 = 1
==========================  ===========  ==========================================================

"Per image" means computed on each image and averaged over images, the convention of salient and
camouflaged object detection. MAE and the S-, E- and weighted F-measures (the "SOD metrics", no
threshold: they score the probability map itself) come from ``py_sod_metrics``, which
reproduces the MATLAB toolboxes used by the polyp and camouflage papers: the probability map is
written as an 8-bit image (``round(255 * prob)``) and, as those toolboxes do, min-max normalised per
image before scoring. Ignored pixels are left out of every count-based metric; the SOD metrics need
whole images, so there ignored pixels are set to background in both maps (they count as correct).

Multi-class tasks (:class:`MulticlassMetrics`): a dataset-level confusion matrix of the argmax labels
(ignored pixels left out) gives ``miou`` (mean IoU over the classes present in the ground truth or the
prediction), ``pixel_accuracy``, ``mean_accuracy`` (mean recall over the classes present in the ground
truth) and one ``iou/<class>`` per present class.

:data:`MAIN_METRICS` names the metric that picks the best checkpoint per task family and
:data:`HIGHER_IS_BETTER` says in which direction each metric improves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.processing import IGNORE_INDEX

E_MEASURE_THRESHOLDS = 256  # thresholds of an 8-bit map, as in py_sod_metrics


@dataclass(frozen=True)
class MainMetric:
    """The metric that selects the best checkpoint of a task family.

    Args:
        name: a key of the dict returned by ``compute()``.
        higher_is_better: whether larger values are better.
    """

    name: str
    higher_is_better: bool


MAIN_METRICS: dict[str, MainMetric] = {
    "binary": MainMetric("iou", True),
    "polyp": MainMetric("s_measure", True),
    "camouflage": MainMetric("s_measure", True),
    "skin": MainMetric("iou", True),
    "road": MainMetric("iou", True),
    "leaf": MainMetric("iou", True),
    "shadow": MainMetric("ber", False),
    "multiclass": MainMetric("miou", True),
    "instances": MainMetric("msa", True),
}

HIGHER_IS_BETTER: dict[str, bool] = {
    "iou": True,
    "dice": True,
    "iou_dataset": True,
    "ber": False,
    "ber_fg": False,
    "ber_bg": False,
    "mae": False,
    "s_measure": True,
    "e_measure_mean": True,
    "e_measure_max": True,
    "e_measure_adaptive": True,
    "weighted_f_measure": True,
    "miou": True,
    "object_iou": True,
    "object_dice": True,
    "pixel_accuracy": True,
    "mean_accuracy": True,
    # instance metrics (convlora.evaluation.instances), per image and pooled
    **{
        f"{key}{pooled}": True
        for key in ("msa", "sa50", "sa75", "ap50", "f1_50", "precision_50", "recall_50")
        for pooled in ("", "_pooled")
    },
    "count_error_abs": False,
}


def main_metric(task: str) -> MainMetric:
    """The checkpoint-selection metric of a task family (a key of ``MAIN_METRICS``).

    Args:
        task: ``"polyp"``, ``"camouflage"``, ``"skin"``, ``"road"``, ``"leaf"``, ``"shadow"``, or the
            generic ``"binary"`` / ``"multiclass"``.

    >>> main_metric("shadow")
    MainMetric(name='ber', higher_is_better=False)
    """
    if task not in MAIN_METRICS:
        raise ValueError(f"unknown task family {task!r}; choose one of {sorted(MAIN_METRICS)}")
    return MAIN_METRICS[task]


def default_metric(mode: str, family: str | None) -> MainMetric:
    """The checkpoint-selection metric of a dataset: its family's when convlora knows it, else its mode's.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"instances"`` (``msa``).
        family: the dataset's domain (``dataset.json``), e.g. ``"polyp"``; any other name or ``None``
            falls back to the mode's metric.

    >>> default_metric("binary", "my-own-cells").name, default_metric("binary", "shadow").name
    ('iou', 'ber')
    """
    if mode == "multiclass":
        return MAIN_METRICS["multiclass"]
    return MAIN_METRICS.get(family or mode, MAIN_METRICS[mode])


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (per-class keys such as ``iou/road`` included).

    >>> higher_is_better("mae"), higher_is_better("iou/person")
    (False, True)
    """
    key = metric.split("/", 1)[0]
    if key not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[key]


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` improves on ``best`` (``None``: nothing yet) for ``metric``; NaN never improves.

    >>> is_better("ber", 4.0, 5.0), is_better("iou", 0.7, None)
    (True, True)
    """
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if higher_is_better(metric) else value < best


class SumState:
    """State made of named tensors that combine by summation (counts and sums), for metrics over processes.

    Subclasses define ``_empty_state``; ``shape_hint`` is added to the message of a state of another shape.
    """

    shape_hint = ""

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] = self._empty_state()

    def _empty_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._state = self._empty_state()

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the accumulated sums and counts (CPU tensors; sum them across processes to merge)."""
        return {key: value.clone() for key, value in self._state.items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the accumulated state, e.g. by the all-reduced sum of every process's ``state()``."""
        self._state = {key: value.clone() for key, value in self._validated(state).items()}

    def merge(self, other: SumState | Mapping[str, torch.Tensor]) -> None:
        """Add another accumulator (or its ``state()``) to this one."""
        state = other.state() if isinstance(other, SumState) else other
        for key, value in self._validated(state).items():
            self._state[key] += value

    def _validated(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expected = self._empty_state()
        if set(state) != set(expected):
            raise ValueError(f"state keys {sorted(state)} do not match this accumulator's {sorted(expected)}")
        result = {}
        for key, reference in expected.items():
            value = torch.as_tensor(state[key]).detach().cpu()
            if value.shape != reference.shape:
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(reference.shape)}{self.shape_hint}"
                )
            result[key] = value.to(reference.dtype)
        return result


def _as_batch(preds: torch.Tensor, target: torch.Tensor, channels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``target`` is ``(b, h, w)`` integer and ``preds`` is ``(b, c, h, w)`` (or ``(b, h, w)``)."""
    if target.ndim != 3:
        raise ValueError(f"target must be (b, h, w), got shape {tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if preds.ndim == 4 and channels is not None and preds.shape[1] != channels:
        raise ValueError(f"preds has {preds.shape[1]} channels, expected {channels}")
    spatial = preds.shape[-2:]
    if preds.ndim not in (3, 4) or preds.shape[0] != target.shape[0] or spatial != target.shape[1:]:
        raise ValueError(
            f"preds {tuple(preds.shape)} does not match target {tuple(target.shape)}: expected (b, c, h, w) "
            "or (b, h, w) at the target's size (resize predictions to the original image size first)"
        )
    return preds, target


@functools.cache
def _sod_evaluators() -> tuple[type, type, type, type]:
    """py_sod_metrics' S-measure, E-measure, weighted F-measure and MAE classes (imported on first use)."""
    from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

    class _Smeasure(Smeasure):
        # The region term splits the image at the foreground centroid; when all the foreground lies in
        # the last row or column a quadrant is empty. Its weight is 0, but its SSIM is NaN (mean of an
        # empty array), which would make the whole S-measure NaN.
        def ssim(self, pred: np.ndarray, gt: np.ndarray) -> float:
            return 0.0 if pred.size == 0 else super().ssim(pred, gt)

    return _Smeasure, Emeasure, WeightedFmeasure, MAE


def _sod_scores(prob: np.ndarray, gt: np.ndarray, normalize: bool) -> dict[str, Any]:
    """S-measure, E-measure (curve and adaptive), weighted F-measure and MAE of one image.

    Args:
        prob: float probabilities ``(h, w)`` in [0, 1].
        gt: boolean ground truth ``(h, w)``.
        normalize: min-max normalise the prediction as the MATLAB toolboxes do.
    """
    s_measure_cls, e_measure_cls, weighted_f_cls, mae_cls = _sod_evaluators()
    pred_u8 = np.rint(prob * 255.0).astype(np.uint8)
    if normalize:  # py_sod_metrics' own preparation: pred / 255 then min-max, gt > 128
        pred, truth = pred_u8, gt.astype(np.uint8) * 255
    else:
        pred, truth = pred_u8.astype(np.float64) / 255.0, gt.astype(bool)
    s_measure, e_measure = s_measure_cls(alpha=0.5), e_measure_cls()
    weighted_f, mae = weighted_f_cls(beta=1), mae_cls()  # beta is beta^2 there: 1 as in Margolin et al.
    for metric in (s_measure, e_measure, weighted_f, mae):
        metric.step(pred, truth, normalize=normalize)
    e_results = e_measure.get_results()["em"]
    return {
        "s_measure": float(s_measure.get_results()["sm"]),
        "e_measure_curve": np.asarray(e_results["curve"], dtype=np.float64),
        "e_measure_adaptive": float(e_results["adp"]),
        "weighted_f_measure": float(weighted_f.get_results()["wfm"]),
        "mae": float(mae.get_results()["mae"]),
    }


class BinaryMetrics(SumState):
    """Accumulator of binary segmentation metrics (see the module docstring for every key).

    Args:
        threshold: probability above which a pixel is foreground for IoU, Dice and BER.
        sod_metrics: also compute MAE, S-measure, E-measure and weighted F-measure with
            ``py_sod_metrics`` (a few ms per image of CPU time); off when only IoU/Dice/BER are needed.
        minmax_normalize: min-max normalise each probability map before the SOD metrics, as the
            MATLAB toolboxes (and ``py_sod_metrics``) do for saved prediction images.
        ignore_index: target value of pixels left out.

    >>> metrics = BinaryMetrics(sod_metrics=False)
    >>> metrics.update(torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]]), torch.tensor([[[1, 0], [0, 0]]]))
    >>> metrics.compute()["iou"]
    0.5
    """

    def __init__(
        self,
        threshold: float = 0.5,
        sod_metrics: bool = True,
        minmax_normalize: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.sod_metrics = sod_metrics
        self.minmax_normalize = minmax_normalize
        self.ignore_index = ignore_index
        super().__init__()

    def _empty_state(self) -> dict[str, torch.Tensor]:
        def zero(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64)

        state = {"images": torch.zeros((), dtype=torch.int64), "iou_sum": zero(), "dice_sum": zero()}
        state.update({key: torch.zeros((), dtype=torch.int64) for key in ("tp", "fp", "fn", "tn")})
        if self.sod_metrics:
            state.update(
                mae_sum=zero(),
                s_measure_sum=zero(),
                e_measure_curve_sum=zero(E_MEASURE_THRESHOLDS),
                e_measure_adaptive_sum=zero(),
                weighted_f_measure_sum=zero(),
            )
        return state

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True) -> None:
        """Add a batch of same-size images.

        Args:
            preds: logits (or probabilities with ``from_logits=False``), ``(b, 1, h, w)`` or ``(b, h, w)``.
            target: ``(b, h, w)`` integer mask with values 0, 1 or ``ignore_index``.
            from_logits: whether ``preds`` are logits (sigmoid applied here) or probabilities.
        """
        preds, target = _as_batch(preds, target, channels=1)
        preds = preds.reshape(target.shape).float()
        valid = target != self.ignore_index
        bad = valid & (target != 0) & (target != 1)
        if bool(bad.any()):
            found = target[bad][:5].tolist()
            raise ValueError(f"binary target holds values {found}; expected 0, 1 or {self.ignore_index} (ignored)")
        if from_logits:
            probs = torch.sigmoid(preds)
            positive = preds > math.log(self.threshold / (1.0 - self.threshold))
        else:
            if bool(((preds < 0) | (preds > 1) | preds.isnan()).any()):
                raise ValueError("preds must be probabilities in [0, 1] with from_logits=False")
            probs, positive = preds, preds > self.threshold
        truth = target == 1
        tp = (positive & truth & valid).sum(dim=(1, 2))
        fp = (positive & ~truth & valid).sum(dim=(1, 2))
        fn = (~positive & truth & valid).sum(dim=(1, 2))
        tn = (~positive & ~truth & valid).sum(dim=(1, 2))
        counted = valid.flatten(1).any(dim=1)  # images without a valid pixel carry no label: skipped
        tp, fp, fn, tn, counted = (x.cpu() for x in (tp, fp, fn, tn, counted))
        union = (tp + fp + fn).double()
        iou = torch.where(union > 0, tp / union.clamp_min(1), 1.0)
        dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).double().clamp_min(1), 1.0)
        state = self._state
        state["images"] += counted.sum()
        state["iou_sum"] += iou[counted].sum()
        state["dice_sum"] += dice[counted].sum()
        for key, value in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)):
            state[key] += value.sum()
        if not self.sod_metrics:
            return
        probs = torch.where(valid, probs, 0.0).double().cpu().numpy()
        truth = (truth & valid).cpu().numpy()
        for index in torch.nonzero(counted).flatten().tolist():
            scores = _sod_scores(probs[index], truth[index], self.minmax_normalize)
            state["mae_sum"] += scores["mae"]
            state["s_measure_sum"] += scores["s_measure"]
            state["e_measure_curve_sum"] += torch.from_numpy(scores["e_measure_curve"])
            state["e_measure_adaptive_sum"] += scores["e_measure_adaptive"]
            state["weighted_f_measure_sum"] += scores["weighted_f_measure"]

    def compute(self) -> dict[str, float]:
        """The metrics of everything accumulated (or loaded/merged) so far, as plain floats."""
        state = self._state
        images = int(state["images"])
        if images == 0:
            raise ValueError("BinaryMetrics.compute(): no image with valid pixels was added (update() first)")
        tp, fp, fn, tn = (int(state[key]) for key in ("tp", "fp", "fn", "tn"))
        # A class with no pixel in the dataset cannot be missed: its accuracy counts as 1.
        tpr = tp / (tp + fn) if tp + fn else 1.0
        tnr = tn / (tn + fp) if tn + fp else 1.0
        results = {
            "iou": float(state["iou_sum"]) / images,
            "dice": float(state["dice_sum"]) / images,
            "iou_dataset": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
            "ber": 100.0 * (1.0 - 0.5 * (tpr + tnr)),
            "ber_fg": 100.0 * (1.0 - tpr),
            "ber_bg": 100.0 * (1.0 - tnr),
        }
        if self.sod_metrics:
            curve = state["e_measure_curve_sum"] / images
            results.update(
                mae=float(state["mae_sum"]) / images,
                s_measure=float(state["s_measure_sum"]) / images,
                e_measure_mean=float(curve.mean()),
                e_measure_max=float(curve.max()),
                e_measure_adaptive=float(state["e_measure_adaptive_sum"]) / images,
                weighted_f_measure=float(state["weighted_f_measure_sum"]) / images,
            )
        return results


class MulticlassMetrics(SumState):
    """Accumulator of a dataset-level confusion matrix: mIoU, per-class IoU, pixel and mean accuracy.

    Args:
        num_classes: number of classes including the background (class 0).
        class_names: optional names for the ``iou/<name>`` keys (class indices otherwise).
        ignore_index: target value of pixels left out.

    >>> metrics = MulticlassMetrics(3)
    >>> metrics.update(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 2, 1]]]))
    >>> metrics.compute()["miou"]  # IoUs 1, 1/2, 1/2
    0.6666666666666666
    """

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
        self.ignore_index = ignore_index
        super().__init__()

    def _empty_state(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of same-size images.

        Args:
            preds: logits or probabilities ``(b, num_classes, h, w)`` (argmax taken here), or integer
                labels ``(b, h, w)``.
            target: ``(b, h, w)`` class indices, ``ignore_index`` for pixels left out.
        """
        preds, target = _as_batch(preds, target, channels=self.num_classes)
        if preds.ndim == 4:
            labels = preds.argmax(dim=1)
        elif preds.is_floating_point():
            raise ValueError("preds of shape (b, h, w) must be integer labels; pass scores as (b, c, h, w)")
        else:
            labels = preds
        valid = target != self.ignore_index
        truth, labels = target[valid], labels[valid]
        bad = (truth < 0) | (truth >= self.num_classes) | (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            found = torch.cat([truth[bad], labels[bad]])[:5].tolist()
            raise ValueError(
                f"target or preds hold labels {found} outside 0..{self.num_classes - 1} "
                f"(and the ignore index {self.ignore_index})"
            )
        counts = torch.bincount(truth * self.num_classes + labels, minlength=self.num_classes**2)
        self._state["confusion"] += counts.reshape(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict[str, float]:
        """mIoU, pixel accuracy, mean accuracy and the IoU of each class present in gt or prediction."""
        confusion = self._state["confusion"].double()  # rows: ground truth, columns: prediction
        total = float(confusion.sum())
        if total == 0:
            raise ValueError("MulticlassMetrics.compute(): no valid pixel was added (update() first)")
        hits = confusion.diagonal()
        in_truth, in_pred = confusion.sum(dim=1), confusion.sum(dim=0)
        union = in_truth + in_pred - hits
        present = union > 0
        iou = hits / union.clamp_min(1)
        results = {
            "miou": float(iou[present].mean()),
            "pixel_accuracy": float(hits.sum()) / total,
            "mean_accuracy": float((hits / in_truth.clamp_min(1))[in_truth > 0].mean()),
        }
        results.update({f"iou/{self.class_names[c]}": float(iou[c]) for c in range(self.num_classes) if present[c]})
        return results


def build_metrics(mode: str, num_classes: int | None = None, **kwargs: Any) -> BinaryMetrics | MulticlassMetrics:
    """A fresh metrics accumulator for a ``"binary"`` or ``"multiclass"`` task.

    Args:
        mode: ``"binary"`` or ``"multiclass"``.
        num_classes: number of classes including the background (multi-class only).
        kwargs: constructor arguments, e.g. ``sod_metrics=False`` or ``class_names``.

    >>> type(build_metrics("multiclass", num_classes=3)).__name__
    'MulticlassMetrics'
    """
    if mode == "binary":
        if num_classes not in (None, 1, 2):
            raise ValueError(f"binary metrics take num_classes None, 1 or 2, got {num_classes}")
        return BinaryMetrics(**kwargs)
    if mode == "multiclass":
        if num_classes is None:
            raise ValueError("multi-class metrics need num_classes (background included)")
        return MulticlassMetrics(num_classes, **kwargs)
    raise ValueError(f"mode must be 'binary' or 'multiclass', got {mode!r}")
