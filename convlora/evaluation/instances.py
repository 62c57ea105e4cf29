"""Instance segmentation metrics: how well predicted objects match the true objects, one to one.

Both maps are ``(h, w)`` integer id maps: 0 is background, every other value one object. Ids need not be
contiguous nor agree between the two maps, and any integer width works (8-bit to 64-bit). Pixels of an
optional boolean ``ignore`` mask are left out of everything: object areas, overlaps and counts (an
object lying wholly inside it does not exist for the metrics).

Matching: a true and a predicted object may be paired when their IoU is **at least** the threshold
(``iou >= threshold``, the convention of COCO and StarDist). Among all one-to-one pairings of such pairs
the matching takes one with the **most pairs**, and among those the largest total IoU. For thresholds
above 0.5 the candidate pairs already form a one-to-one matching (an object cannot overlap two others by
more than half of each union), so every rule agrees there; at exactly 0.5 (a tie such as one object split
into two equal halves) and below, the pairing is solved exactly with
:func:`scipy.optimize.linear_sum_assignment`. Matched pairs are true positives (TP), unmatched
predictions false positives (FP), unmatched true objects false negatives (FN).

Scores (:func:`instance_scores` for one image, :class:`InstanceMetrics` over a dataset):

================  ==============================================================================
key               what it is
================  ==============================================================================
``sa50``          segmentation accuracy at IoU 0.5, ``TP / (TP + FP + FN)``; ``sa75`` at 0.75
``msa``           mean segmentation accuracy: the mean of the SA over the thresholds (by default
                  0.50, 0.55, ..., 0.95), as micro-sam and the cell-segmentation papers report it
``ap50``          "average precision at 0.5" in the cell-segmentation sense (the DSB 2018 and
                  StarDist usage): the same number as ``sa50``
``f1_50``         ``2 TP / (2 TP + FP + FN)`` at 0.5, with ``precision_50`` = ``TP / n_pred`` and
                  ``recall_50`` = ``TP / n_true``
``coco_ap50``     score-ranked average precision at 0.5, as COCO computes it (101-point interpolated
                  precision-recall area); only with per-object ``scores``
``n_true``        true objects, ``n_pred`` predicted objects, ``count_error`` = ``n_pred - n_true``
================  ==============================================================================

Empty images: when neither map holds an object every accuracy is 1.0 (nothing to find, nothing wrongly
found); when exactly one of them is empty every accuracy is 0.0 (precision and recall included).

Thresholds are read to 10 decimal places, so the drift of ``np.arange(0.5, 1.0, 0.05)`` (whose third value
is ``0.6000000000000001``) does not lose a pair whose IoU is exactly 0.6.

>>> truth = np.array([[1, 1, 0, 2, 2]])
>>> pred = np.array([[7, 7, 0, 9, 0]])
>>> scores = instance_scores(truth, pred)
>>> scores["sa50"], scores["f1_50"], scores["count_error"]
(1.0, 1.0, 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .metrics import SumState

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
"""The IoU thresholds ``msa`` averages over unless told otherwise: 0.50 to 0.95 in steps of 0.05."""

_COCO_RECALL_POINTS = 101  # recall levels at which COCO samples the interpolated precision
_THRESHOLD_DECIMALS = 10


# ------------------------------------------------------------------------------------------ input


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _id_map(array: Any, name: str, ndim: int = 2) -> np.ndarray:
    """``array`` as a non-negative integer id map of ``ndim`` dimensions, or a ValueError naming ``name``."""
    ids = _as_numpy(array)
    if ids.dtype == bool:
        raise ValueError(
            f"{name} is a boolean mask, expected an integer id map; label it first with connected_components()"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} has dtype {ids.dtype}, expected an integer id map (0 = background)")
    if ids.ndim != ndim:
        expected = "(h, w)" if ndim == 2 else "(b, h, w)"
        raise ValueError(f"{name} has shape {ids.shape}, expected {expected}")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and ids.min() < 0:
        raise ValueError(f"{name} holds negative ids (smallest {ids.min()}); expected 0 = background or ids > 0")
    return ids


def _ignore_mask(ignore: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if ignore is None:
        return None
    mask = _as_numpy(ignore)
    if mask.dtype != bool:
        raise ValueError(f"ignore has dtype {mask.dtype}, expected a boolean mask (True = left out)")
    if mask.shape != shape:
        raise ValueError(f"ignore has shape {mask.shape}, expected the id maps' shape {shape}")
    return mask


def _thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.round(np.asarray(thresholds, dtype=np.float64), _THRESHOLD_DECIMALS)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence, got shape {values.shape}")
    if not ((values > 0) & (values <= 1)).all():
        raise ValueError(f"thresholds must lie in (0, 1], got {values.tolist()}")
    return values


# --------------------------------------------------------------------------------------- overlaps


@dataclass(frozen=True, eq=False)
class _Overlaps:
    """The objects of both maps and every overlapping (true, predicted) pair, stored sparsely."""

    true_ids: np.ndarray  # (n,) ascending
    pred_ids: np.ndarray  # (m,) ascending
    rows: np.ndarray  # (k,) index into true_ids of each overlapping pair
    cols: np.ndarray  # (k,) index into pred_ids
    iou: np.ndarray  # (k,) float64, > 0


def _objects(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(object ids, index per pixel, area per object)``; pixel index 0 is background, object i is i + 1."""
    values, inverse, areas = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if values.size and values[0] == 0:
        return values[1:], inverse, areas[1:]
    return values, inverse + 1, areas  # no background pixel: shift so that index 0 stays background


def _overlaps(true_ids: np.ndarray, pred_ids: np.ndarray, ignore: np.ndarray | None) -> _Overlaps:
    if true_ids.shape != pred_ids.shape:
        raise ValueError(f"true_ids has shape {true_ids.shape} but pred_ids has shape {pred_ids.shape}")
    true_flat, pred_flat = true_ids.reshape(-1), pred_ids.reshape(-1)
    if ignore is not None:
        keep = ~ignore.reshape(-1)
        true_flat, pred_flat = true_flat[keep], pred_flat[keep]
    true_objects, true_index, true_areas = _objects(true_flat)
    pred_objects, pred_index, pred_areas = _objects(pred_flat)
    both = (true_index > 0) & (pred_index > 0)
    # One code per (true, predicted) pair of a pixel inside both objects; counting the codes gives every
    # intersection at once, touching only the pairs that overlap.
    codes = (true_index[both] - 1).astype(np.int64) * len(pred_objects) + (pred_index[both] - 1)
    pairs, intersection = np.unique(codes, return_counts=True)
    rows, cols = np.divmod(pairs, max(len(pred_objects), 1))
    union = true_areas[rows] + pred_areas[cols] - intersection
    iou = intersection / union.astype(np.float64)
    return _Overlaps(true_objects, pred_objects, rows, cols, iou)


def _match(overlaps: _Overlaps, threshold: float) -> np.ndarray:
    """Indices into the overlapping pairs of a one-to-one matching at ``threshold`` (see the module doc)."""
    candidates = np.flatnonzero(overlaps.iou >= threshold)
    rows, cols = overlaps.rows[candidates], overlaps.cols[candidates]
    true_rows, row_of = np.unique(rows, return_inverse=True)
    pred_cols, col_of = np.unique(cols, return_inverse=True)
    if len(true_rows) == len(candidates) and len(pred_cols) == len(candidates):
        return candidates  # no object has two candidates: the candidates are the matching
    # Weight 1 per pair plus a tie-break below 1/(k+1) per pair: k pairs can never add up to one more pair,
    # so the assignment maximises the number of matches first and their total IoU second.
    most = min(len(true_rows), len(pred_cols))
    weight = np.zeros((len(true_rows), len(pred_cols)))
    weight[row_of, col_of] = 1.0 + overlaps.iou[candidates] / (most + 1)
    pair_of = np.full(weight.shape, -1, dtype=np.int64)
    pair_of[row_of, col_of] = candidates
    assigned_rows, assigned_cols = linear_sum_assignment(weight, maximize=True)
    chosen = weight[assigned_rows, assigned_cols] > 0  # the assignment also pairs non-candidates (weight 0)
    return np.sort(pair_of[assigned_rows[chosen], assigned_cols[chosen]])


def _true_positives(overlaps: _Overlaps, thresholds: np.ndarray) -> np.ndarray:
    return np.array([len(_match(overlaps, float(t))) for t in thresholds], dtype=np.int64)


def _ratio(numerator: np.ndarray | float, denominator: np.ndarray | float, both_empty: bool) -> np.ndarray:
    """``numerator / denominator``, 1.0 where nothing exists on either side, 0.0 where only one side is empty."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    ratio = np.divide(numerator, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return np.where(both_empty, 1.0, ratio)


# --------------------------------------------------------------------------------------- matching


@dataclass(frozen=True, eq=False)
class InstanceMatch:
    """The objects of two id maps, their IoU matrix and the one-to-one matching at a threshold.

    Args:
        true_ids: ``(n,)`` ids of the true objects, ascending.
        pred_ids: ``(m,)`` ids of the predicted objects, ascending.
        iou: ``(n, m)`` float64 IoU of every true (row) and predicted (column) object.
        threshold: the IoU a pair needs to match (``iou >= threshold``).
        pairs: ``(k, 2)`` int64 ``(row, column)`` indices into ``iou`` of the matched pairs.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    iou: np.ndarray
    threshold: float
    pairs: np.ndarray

    @property
    def tp(self) -> int:
        """Matched pairs (true positives)."""
        return len(self.pairs)

    @property
    def fp(self) -> int:
        """Predicted objects left unmatched (false positives)."""
        return len(self.pred_ids) - len(self.pairs)

    @property
    def fn(self) -> int:
        """True objects left unmatched (false negatives)."""
        return len(self.true_ids) - len(self.pairs)

    @property
    def matched_ids(self) -> np.ndarray:
        """``(k, 2)`` ``(true id, predicted id)`` of each matched pair."""
        return np.stack([self.true_ids[self.pairs[:, 0]], self.pred_ids[self.pairs[:, 1]]], axis=1)


def match_instances(
    true_ids: np.ndarray | torch.Tensor,
    pred_ids: np.ndarray | torch.Tensor,
    threshold: float = 0.5,
    *,
    ignore: np.ndarray | torch.Tensor | None = None,
) -> InstanceMatch:
    """Match the objects of a predicted id map one to one to the objects of the true id map.

    The IoUs come from one count over the pixels' (true id, predicted id) pairs, not from a loop over
    object masks; the matching follows the rule of the module docstring (``iou >= threshold``, most
    pairs, then largest total IoU).

    Args:
        true_ids: ``(h, w)`` integer ids of the true objects (numpy or torch), 0 = background.
        pred_ids: ``(h, w)`` integer ids of the predicted objects, 0 = background.
        threshold: the IoU in (0, 1] a pair needs to match.
        ignore: optional ``(h, w)`` boolean mask of pixels left out of everything.

    Returns:
        An :class:`InstanceMatch` with the objects, the dense ``(n, m)`` IoU matrix and the matched pairs.

    >>> match = match_instances(np.array([[1, 1, 2, 2]]), np.array([[5, 5, 5, 0]]))
    >>> match.iou.tolist(), match.matched_ids.tolist(), (match.tp, match.fp, match.fn)
    ([[0.6666666666666666], [0.25]], [[1, 5]], (1, 0, 1))
    """
    truth, pred = _id_map(true_ids, "true_ids"), _id_map(pred_ids, "pred_ids")
    level = float(_thresholds([threshold])[0])
    overlaps = _overlaps(truth, pred, _ignore_mask(ignore, truth.shape))
    iou = np.zeros((len(overlaps.true_ids), len(overlaps.pred_ids)))
    iou[overlaps.rows, overlaps.cols] = overlaps.iou
    chosen = _match(overlaps, level)
    pairs = np.stack([overlaps.rows[chosen], overlaps.cols[chosen]], axis=1).astype(np.int64).reshape(-1, 2)
    return InstanceMatch(overlaps.true_ids, overlaps.pred_ids, iou, level, pairs)


# ----------------------------------------------------------------------------------------- scores


def _coco_ap(overlaps: _Overlaps, scores: Mapping[int, float], threshold: float = 0.5) -> float:
    """Score-ranked AP of one image: COCO's greedy matching by score, 101-point interpolated precision."""
    n_true, n_pred = len(overlaps.true_ids), len(overlaps.pred_ids)
    if n_true == 0 or n_pred == 0:
        return 1.0 if n_true == n_pred else 0.0
    missing = [int(i) for i in overlaps.pred_ids if int(i) not in scores]
    if missing:
        raise ValueError(f"scores has no entry for predicted ids {missing[:5]}; give one score per predicted object")
    score = np.array([float(scores[int(i)]) for i in overlaps.pred_ids])
    iou = np.zeros((n_true, n_pred))
    iou[overlaps.rows, overlaps.cols] = overlaps.iou
    order = np.argsort(-score, kind="stable")  # ties keep ascending predicted id
    taken = np.zeros(n_true, dtype=bool)
    hits = np.zeros(n_pred, dtype=bool)
    for rank, col in enumerate(order):
        # COCO's greedy step: the highest-scored prediction takes its best still free true object.
        free = np.where(taken | (iou[:, col] < threshold), -1.0, iou[:, col])
        best = int(free.argmax())
        if free[best] >= 0:
            taken[best] = hits[rank] = True
    return _interpolated_ap(hits, n_true)


def _interpolated_ap(hits: np.ndarray, n_true: int) -> float:
    """Area under the precision-recall curve of ranked detections, sampled at 101 recall levels as COCO does."""
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / n_true
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    levels = np.linspace(0.0, 1.0, _COCO_RECALL_POINTS)
    at = np.searchsorted(recall, levels, side="left")
    sampled = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
    return float(sampled.mean())


def instance_scores(
    true_ids: np.ndarray | torch.Tensor,
    pred_ids: np.ndarray | torch.Tensor,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    *,
    ignore: np.ndarray | torch.Tensor | None = None,
    scores: Mapping[int, float] | None = None,
) -> dict[str, float]:
    """Instance segmentation scores of one image (every key is described in the module docstring).

    Args:
        true_ids: ``(h, w)`` integer ids of the true objects (numpy or torch), 0 = background.
        pred_ids: ``(h, w)`` integer ids of the predicted objects, 0 = background.
        thresholds: the IoU thresholds ``msa`` averages over (0.50 to 0.95 in steps of 0.05 by default);
            ``sa50``, ``sa75`` and the ``_50`` scores are computed whatever this holds.
        ignore: optional ``(h, w)`` boolean mask of pixels left out of everything.
        scores: optional confidence per predicted id (e.g. SAM's predicted IoU); adds ``coco_ap50``.

    Returns:
        ``msa``, ``sa50``, ``sa75``, ``ap50``, ``f1_50``, ``precision_50``, ``recall_50`` (floats in
        [0, 1]), ``n_true``, ``n_pred``, ``count_error`` (ints) and, with ``scores``, ``coco_ap50``.

    >>> truth = np.array([[1, 1, 1, 0, 2, 2]])
    >>> pred = np.array([[3, 3, 0, 0, 4, 4]])  # IoUs 2/3 and 1
    >>> scores = instance_scores(truth, pred, thresholds=[0.5, 0.7])
    >>> scores["msa"], scores["sa75"], scores["recall_50"]  # msa = (1 + 1/3) / 2
    (0.6666666666666666, 0.3333333333333333, 1.0)
    """
    truth, pred = _id_map(true_ids, "true_ids"), _id_map(pred_ids, "pred_ids")
    levels = _thresholds(thresholds)
    overlaps = _overlaps(truth, pred, _ignore_mask(ignore, truth.shape))
    grid = np.unique(np.concatenate([levels, [0.5, 0.75]]))
    tp = _true_positives(overlaps, grid)
    results = _scores_from_counts(tp, len(overlaps.true_ids), len(overlaps.pred_ids), grid, levels)
    if scores is not None:
        results["coco_ap50"] = _coco_ap(overlaps, scores)
    return results


def _scores_from_counts(
    tp: np.ndarray, n_true: int, n_pred: int, grid: np.ndarray, levels: np.ndarray
) -> dict[str, float]:
    both_empty = n_true == 0 and n_pred == 0
    accuracy = _ratio(tp, n_true + n_pred - tp, both_empty)  # TP / (TP + FP + FN)
    at = {float(t): i for i, t in enumerate(grid)}
    tp50 = int(tp[at[0.5]])
    return {
        "msa": float(accuracy[[at[float(t)] for t in levels]].mean()),
        "sa50": float(accuracy[at[0.5]]),
        "sa75": float(accuracy[at[0.75]]),
        "ap50": float(accuracy[at[0.5]]),
        "f1_50": float(_ratio(2 * tp50, n_true + n_pred, both_empty)),
        "precision_50": float(_ratio(tp50, n_pred, both_empty)),
        "recall_50": float(_ratio(tp50, n_true, both_empty)),
        "n_true": n_true,
        "n_pred": n_pred,
        "count_error": n_pred - n_true,
    }


# ------------------------------------------------------------------------------------ accumulator


class InstanceMetrics(SumState):
    """Accumulator of instance segmentation scores over a dataset, two ways.

    Per image (the keys of :func:`instance_scores`: ``msa``, ``sa50``, ``sa75``, ``ap50``, ``f1_50``,
    ``precision_50``, ``recall_50``): each image is scored on its own and the scores are averaged over
    images, as micro-sam reports mSA. Pooled (the same names with ``_pooled``): TP, FP and FN are summed
    over all images first, then the ratios are taken once, so images with many objects weigh more.
    Also ``images``, the totals ``n_true`` and ``n_pred``, and the per-image mean ``count_error``
    (signed, ``n_pred - n_true``) and ``count_error_abs``. Score-ranked COCO AP is not accumulated: it
    ranks detections over the whole dataset, which sums of counts cannot hold.

    The state is sums and counts only (:meth:`state`), so accumulators of several processes merge by
    summing their states.

    Args:
        thresholds: the IoU thresholds ``msa`` averages over (0.50 to 0.95 in steps of 0.05 by default).

    >>> metrics = InstanceMetrics()
    >>> metrics.update(np.array([[1, 1, 0, 2]]), np.array([[1, 1, 0, 0]]))  # SA 1/2 at every threshold
    >>> metrics.update(np.zeros((1, 4), int), np.zeros((1, 4), int))  # nothing to find: SA 1
    >>> result = metrics.compute()
    >>> result["msa"], result["msa_pooled"], result["recall_50_pooled"]
    (0.75, 0.5, 0.5)
    """

    def __init__(self, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = _thresholds(thresholds)
        self._grid = np.unique(np.concatenate([self.thresholds, [0.5, 0.75]]))
        super().__init__()

    shape_hint = " (was it made with other thresholds?)"

    def _empty_state(self) -> dict[str, torch.Tensor]:
        size = len(self._grid)
        state = {key: torch.zeros((), dtype=torch.int64) for key in ("images", "n_true", "n_pred", "abs_count_error")}
        state.update(tp=torch.zeros(size, dtype=torch.int64), sa_sum=torch.zeros(size, dtype=torch.float64))
        state.update({f"{key}_sum": torch.zeros((), dtype=torch.float64) for key in ("f1", "precision", "recall")})
        return state

    def update(
        self,
        true_ids: np.ndarray | torch.Tensor,
        pred_ids: np.ndarray | torch.Tensor,
        ignore: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one image ``(h, w)`` or a batch of same-size images ``(b, h, w)``.

        Args:
            true_ids: integer ids of the true objects (numpy or torch), 0 = background.
            pred_ids: integer ids of the predicted objects, same shape.
            ignore: optional boolean mask of pixels left out of everything, same shape.
        """
        ndim = np.ndim(_as_numpy(true_ids))
        if ndim not in (2, 3):
            raise ValueError(f"true_ids has {ndim} dimensions, expected (h, w) or (b, h, w)")
        truth, pred = _id_map(true_ids, "true_ids", ndim), _id_map(pred_ids, "pred_ids", ndim)
        if truth.shape != pred.shape:
            raise ValueError(f"true_ids has shape {truth.shape} but pred_ids has shape {pred.shape}")
        mask = _ignore_mask(ignore, truth.shape)
        if ndim == 2:
            truth, pred, mask = truth[None], pred[None], None if mask is None else mask[None]
        for index in range(len(truth)):
            self._add(_overlaps(truth[index], pred[index], None if mask is None else mask[index]))

    def _add(self, overlaps: _Overlaps) -> None:
        n_true, n_pred = len(overlaps.true_ids), len(overlaps.pred_ids)
        tp = _true_positives(overlaps, self._grid)
        both_empty = n_true == 0 and n_pred == 0
        tp50 = int(tp[self._at(0.5)])
        state = self._state
        state["images"] += 1
        state["n_true"] += n_true
        state["n_pred"] += n_pred
        state["abs_count_error"] += abs(n_pred - n_true)
        state["tp"] += torch.from_numpy(tp)
        state["sa_sum"] += torch.from_numpy(_ratio(tp, n_true + n_pred - tp, both_empty))
        state["f1_sum"] += float(_ratio(2 * tp50, n_true + n_pred, both_empty))
        state["precision_sum"] += float(_ratio(tp50, n_pred, both_empty))
        state["recall_sum"] += float(_ratio(tp50, n_true, both_empty))

    def _at(self, threshold: float) -> int:
        return int(np.flatnonzero(self._grid == threshold)[0])

    def compute(self) -> dict[str, float]:
        """Per-image means, pooled ratios and counts of everything accumulated (or loaded/merged) so far."""
        state = self._state
        images = int(state["images"])
        if images == 0:
            raise ValueError("InstanceMetrics.compute(): no image was added (update() first)")
        n_true, n_pred = int(state["n_true"]), int(state["n_pred"])
        tp = state["tp"].numpy()
        levels = [self._at(float(t)) for t in self.thresholds]
        sa = state["sa_sum"].numpy() / images
        both_empty = n_true == 0 and n_pred == 0
        pooled_sa = _ratio(tp, n_true + n_pred - tp, both_empty)
        tp50 = int(tp[self._at(0.5)])
        results = {
            "images": images,
            "msa": float(sa[levels].mean()),
            "sa50": float(sa[self._at(0.5)]),
            "sa75": float(sa[self._at(0.75)]),
            "ap50": float(sa[self._at(0.5)]),
            "f1_50": float(state["f1_sum"]) / images,
            "precision_50": float(state["precision_sum"]) / images,
            "recall_50": float(state["recall_sum"]) / images,
            "msa_pooled": float(pooled_sa[levels].mean()),
            "sa50_pooled": float(pooled_sa[self._at(0.5)]),
            "sa75_pooled": float(pooled_sa[self._at(0.75)]),
            "ap50_pooled": float(pooled_sa[self._at(0.5)]),
            "f1_50_pooled": float(_ratio(2 * tp50, n_true + n_pred, both_empty)),
            "precision_50_pooled": float(_ratio(tp50, n_pred, both_empty)),
            "recall_50_pooled": float(_ratio(tp50, n_true, both_empty)),
            "n_true": n_true,
            "n_pred": n_pred,
            "count_error": (n_pred - n_true) / images,
            "count_error_abs": int(state["abs_count_error"]) / images,
        }
        return results


# ---------------------------------------------------------------------------------------- helpers


def relabel_sequential(ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """The same objects with ids 1..n in the order of their old ids (0 stays background).

    Args:
        ids: integer id map of any shape (numpy or torch).

    Returns:
        int32 ids (int64 above 2**31 - 1 objects).

    >>> relabel_sequential(np.array([[0, 300, 5], [17, 5, 0]])).tolist()
    [[0, 3, 1], [2, 1, 0]]
    """
    array = _as_numpy(ids)
    _id_map(array.reshape(1, -1), "ids")
    values, inverse = np.unique(array, return_inverse=True)
    labels = inverse.reshape(array.shape) + (0 if values.size and values[0] == 0 else 1)
    count = len(values) - int(values.size > 0 and values[0] == 0)
    return labels.astype(np.int32 if count < 2**31 else np.int64)


def connected_components(binary: np.ndarray | torch.Tensor, connectivity: int = 2, min_size: int = 1) -> np.ndarray:
    """An id map with one id per connected foreground region, so a binary mask can be scored as instances.

    Args:
        binary: ``(h, w)`` boolean or integer mask (numpy or torch), nonzero = foreground.
        connectivity: 1 joins pixels sharing an edge (4 neighbours), 2 also diagonal ones (8 neighbours,
            scikit-image's default).
        min_size: regions with fewer pixels become background (drops specks that would count as FP).

    Returns:
        int32 ids 1..n, numbered in raster order of each region's first pixel; 0 = background.

    >>> connected_components(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]]), connectivity=1).tolist()
    [[1, 0, 0], [0, 2, 0], [0, 0, 0]]
    """
    mask = _as_numpy(binary)
    if mask.ndim != 2:
        raise ValueError(f"binary has shape {mask.shape}, expected (h, w)")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"binary has dtype {mask.dtype}, expected a boolean or integer mask (threshold it first)")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4 neighbours) or 2 (8 neighbours), got {connectivity}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    labels, count = ndimage.label(mask != 0, structure=ndimage.generate_binary_structure(2, connectivity))
    labels = labels.astype(np.int32)
    if min_size > 1 and count:
        small = np.bincount(labels.reshape(-1), minlength=count + 1) < min_size
        small[0] = False
        labels[small[labels]] = 0
        labels = relabel_sequential(labels)
    return labels
