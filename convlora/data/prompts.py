"""Objects and SAM prompts derived from label maps: boxes, points and correction clicks.

Prompted fine-tuning (and prompted evaluation) needs prompts where a dataset only has masks. The objects
of a label map are its connected components (binary masks), its ids (instance maps) or the components of
each class (multi-class maps); each object gives a box (its extent, jittered in training as MedSAM and
transformers' tutorial do), positive points away from its border and optional negative points near it.
Interactive correction, as in SAM's own training, adds one click per round from the error region of the
previous prediction: a positive click in a missed part, a negative one in a false alarm.

Coordinates are ``(x, y)`` = (column, row) pixel indices of the label map given; boxes are
``(x0, y0, x1, y1)`` with the corners on the extreme object pixels (inclusive), SAM's convention.

>>> import numpy as np
>>> labels = np.zeros((8, 8), np.uint8)
>>> labels[2:5, 1:7] = 1
>>> objects = find_objects(labels)
>>> boxes_from_masks(objects.masks).tolist()
[[1.0, 2.0, 6.0, 4.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

IGNORE_INDEX = 255
OBJECT_KINDS = ("binary", "instances", "classes")
PROMPT_KINDS = ("none", "box", "point", "box_point", "mixed")
# The kinds a "mixed" step draws from (one per step).
MIXED_KINDS = ("box", "point", "box_point")
# Label of a padding point: the prompt encoder ignores it (transformers' convention).
PAD_LABEL = -10


@dataclass
class PromptConfig:
    """How prompts are drawn from masks for prompted training and prompted evaluation.

    Args:
        kind: ``"none"`` (prompt-free), ``"box"``, ``"point"``, ``"box_point"`` or ``"mixed"`` (each step
            draws one of box / point / box_point).
        max_objects: objects prompted per image and step (sampled when an image has more).
        min_area: objects with fewer pixels (at the model's input size) are not prompted.
        box_jitter: in training each box coordinate moves by up to this fraction of the box side.
        num_points: positive points per object.
        num_negative: negative points per object, drawn near the object but outside it.
        correction_rounds: extra rounds per step: a click from the previous error region, with the
            previous low-resolution logits fed back as a mask prompt (SAM trained with 11).
        multimask_single_point: for a prompt that is one point, predict SAM's three masks and train the best.
        train_prompt_encoder: also train the prompt encoder (frozen by default, as MedSAM does).
        iou_loss_weight: weight of the IoU head's MSE to the real IoU of each predicted mask.
        seed: seed of the prompts drawn for evaluation (training draws from the run's seed and step).

    >>> PromptConfig(kind="box", box_jitter=0.05).max_objects
    8
    """

    kind: str = field(default="none", metadata={"help": "none, box, point, box_point or mixed."})
    max_objects: int = field(default=8, metadata={"help": "Objects prompted per image and step."})
    min_area: int = field(default=10, metadata={"help": "Smallest object (pixels at the input size) prompted."})
    box_jitter: float = field(default=0.1, metadata={"help": "Training box jitter, as a fraction of the box side."})
    num_points: int = field(default=1, metadata={"help": "Positive points per object."})
    num_negative: int = field(default=0, metadata={"help": "Negative points per object (near it, outside it)."})
    correction_rounds: int = field(default=0, metadata={"help": "Iterative correction rounds per training step."})
    multimask_single_point: bool = field(
        default=True, metadata={"help": "Single-point prompts: three masks, train the best (SAM's recipe)."}
    )
    train_prompt_encoder: bool = field(default=False, metadata={"help": "Train the prompt encoder too."})
    iou_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the IoU head's MSE loss."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompts drawn for evaluation."})

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"kind must be one of {list(PROMPT_KINDS)}, got {self.kind!r}")
        for name in ("max_objects", "num_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("min_area", "num_negative", "correction_rounds", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, low, high in (("box_jitter", 0.0, 1.0), ("iou_loss_weight", 0.0, float("inf"))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        for name in ("multimask_single_point", "train_prompt_encoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def prompted(self) -> bool:
        """Whether prompts are used at all."""
        return self.kind != "none"


@dataclass
class Objects:
    """The objects of one label map.

    Args:
        masks: bool ``(m, h, w)``, one mask per object.
        class_ids: int64 ``(m,)``: the class (multi-class), the instance id (instances) or 1 (binary).
    """

    masks: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> Objects:
        """The objects at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Objects(self.masks[indices], self.class_ids[indices])


@dataclass
class Prompts:
    """``n`` prompts for one image, in one coordinate frame (any field may be ``None``).

    Args:
        boxes: float ``(n, 4)`` boxes ``(x0, y0, x1, y1)``.
        points: float ``(n, k, 2)`` points ``(x, y)``; padding points carry label ``PAD_LABEL``.
        point_labels: int64 ``(n, k)``: 1 positive, 0 negative, ``PAD_LABEL`` padding.
    """

    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None

    def __len__(self) -> int:
        if self.boxes is not None:
            return int(self.boxes.shape[0])
        return int(self.points.shape[0]) if self.points is not None else 0

    @property
    def single_point(self) -> np.ndarray:
        """bool ``(n,)``: which prompts are exactly one (non-padding) point and no box (ambiguous ones)."""
        if self.points is None or self.boxes is not None:
            return np.zeros(len(self), dtype=bool)
        return (self.point_labels != PAD_LABEL).sum(axis=1) == 1

    def add_points(self, points: np.ndarray, labels: np.ndarray) -> Prompts:
        """A copy with one more point per prompt (``(n, 2)``, labels ``(n,)``; ``PAD_LABEL`` for none)."""
        points = np.asarray(points, dtype=np.float32)[:, None]
        labels = np.asarray(labels, dtype=np.int64)[:, None]
        if self.points is None:
            return Prompts(self.boxes, points, labels)
        return Prompts(
            self.boxes,
            np.concatenate([self.points, points], axis=1),
            np.concatenate([self.point_labels, labels], axis=1),
        )


def find_objects(
    labels: np.ndarray,
    kind: str = "binary",
    *,
    min_area: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> Objects:
    """The objects of a label map (see the module docstring), largest first within each class.

    Args:
        labels: integer ``(h, w)`` label map (``ignore_index`` pixels belong to no object).
        kind: ``"binary"`` (connected components of the nonzero pixels, 8-connected), ``"instances"``
            (one object per id) or ``"classes"`` (the connected components of each class id >= 1).
        min_area: objects with fewer pixels are dropped.
        ignore_index: label of ignored pixels.

    >>> labels = np.array([[1, 0, 1], [1, 0, 0]])
    >>> find_objects(labels).masks.sum(axis=(1, 2)).tolist()
    [2, 1]
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (h, w) label map, got shape {labels.shape}")
    if kind not in OBJECT_KINDS:
        raise ValueError(f"kind must be one of {list(OBJECT_KINDS)}, got {kind!r}")
    valid = labels != ignore_index
    masks: list[np.ndarray] = []
    ids: list[int] = []
    if kind == "instances":
        for value in np.unique(labels[valid & (labels != 0)]):
            masks.append(labels == value)
            ids.append(int(value))
    else:
        classes = [1] if kind == "binary" else [int(v) for v in np.unique(labels[valid & (labels != 0)])]
        for class_id in classes:
            region = valid & (labels != 0) if kind == "binary" else labels == class_id
            components, count = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
            areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
            for component in np.argsort(-areas, kind="stable") + 1:
                masks.append(components == component)
                ids.append(class_id)
    keep = [i for i, mask in enumerate(masks) if int(mask.sum()) >= max(1, min_area)]
    if not keep:
        return Objects(np.zeros((0, *labels.shape), dtype=bool), np.zeros(0, dtype=np.int64))
    return Objects(np.stack([masks[i] for i in keep]), np.asarray([ids[i] for i in keep], dtype=np.int64))


def sample_objects(objects: Objects, max_objects: int, rng: np.random.Generator) -> Objects:
    """At most ``max_objects`` of ``objects``, drawn without replacement (all of them, in order, if fewer).

    >>> objects = find_objects(np.eye(6, dtype=np.uint8) + np.eye(6, k=3, dtype=np.uint8)[::-1], min_area=1)
    >>> len(sample_objects(objects, 1, np.random.default_rng(0)))
    1
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if len(objects) <= max_objects:
        return objects
    return objects.subset(np.sort(rng.choice(len(objects), size=max_objects, replace=False)))


def boxes_from_masks(masks: np.ndarray, *, jitter: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Boxes ``(m, 4)`` ``(x0, y0, x1, y1)``: each mask's extent, optionally jittered.

    Args:
        masks: bool ``(m, h, w)``, each with at least one pixel.
        jitter: each coordinate moves by a uniform amount in ``[-jitter * side, jitter * side]`` (side: the
            box's width for x, height for y), then is clipped to the image; 0 gives the exact extent.
        rng: random generator (needed when ``jitter > 0``).

    >>> masks = np.zeros((1, 5, 5), bool)
    >>> masks[0, 1:3, 2:5] = True
    >>> boxes_from_masks(masks).tolist()
    [[2.0, 1.0, 4.0, 2.0]]
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (m, h, w), got shape {masks.shape}")
    height, width = masks.shape[1:]
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise ValueError(f"mask {i} is empty: an empty object has no box")
        boxes[i] = (cols[0], rows[0], cols[-1], rows[-1])
    if jitter > 0:
        if rng is None:
            raise ValueError("box jitter needs a random generator (rng)")
        sides = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)  # (m, 2) w, h
        scale = np.concatenate([sides, sides], axis=1) * jitter  # (m, 4) as x0 y0 x1 y1
        boxes = boxes + rng.uniform(-1.0, 1.0, size=boxes.shape).astype(np.float32) * scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)
        low = np.minimum(boxes[:, :2], boxes[:, 2:])
        high = np.maximum(boxes[:, :2], boxes[:, 2:])
        boxes = np.concatenate([low, high], axis=1)
    return boxes


def interior_point(mask: np.ndarray, rng: np.random.Generator | None = None, depth: float = 0.5) -> np.ndarray:
    """One ``(x, y)`` point of ``mask`` away from its border.

    The candidates are the pixels whose distance to the outside is at least ``depth`` times the largest
    such distance; without ``rng`` the deepest pixel is taken (on ties, the one nearest the middle of the deepest ones).

    Args:
        mask: bool ``(h, w)`` with at least one pixel.
        rng: random generator, or ``None`` for the deterministic deepest point.
        depth: in [0, 1]; 0 allows any pixel of the mask.

    >>> mask = np.zeros((5, 7), bool)
    >>> mask[1:4, 1:6] = True
    >>> interior_point(mask).tolist()
    [3.0, 2.0]
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("an empty mask has no interior point")
    # Padding makes the image border count as outside, so points keep off it too.
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if rng is None:
        rows, cols = np.nonzero(distance == distance.max())
        # among equally deep pixels, the one nearest their centre (the middle of a rectangle, not its corner)
        pick = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
        row, col = rows[pick], cols[pick]
    else:
        rows, cols = np.nonzero(distance >= max(distance.max() * depth, np.finfo(np.float32).tiny))
        pick = int(rng.integers(rows.size))
        row, col = rows[pick], cols[pick]
    return np.array([col, row], dtype=np.float32)


def points_from_masks(
    masks: np.ndarray,
    *,
    num_positive: int = 1,
    num_negative: int = 0,
    rng: np.random.Generator | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(m, k, 2)`` and labels ``(m, k)`` per mask: positives inside, away from the border, then negatives.

    Negatives lie outside the object, in its box grown by half its size on each side (anywhere outside it
    when that band is empty), and never on ignored pixels (``valid`` False).

    Args:
        masks: bool ``(m, h, w)``.
        num_positive: positive points per mask (>= 1). Without ``rng`` only 1 is possible (the deepest pixel).
        num_negative: negative points per mask.
        rng: random generator; ``None`` gives the deterministic deepest point (evaluation of one click).
        valid: bool ``(h, w)`` pixels that may hold a negative point (default: all).

    >>> masks = np.zeros((1, 9, 9), bool)
    >>> masks[0, 3:6, 3:6] = True
    >>> points, labels = points_from_masks(masks, num_negative=1, rng=np.random.default_rng(0))
    >>> labels.tolist(), bool(masks[0][int(points[0, 0, 1]), int(points[0, 0, 0])])
    ([[1, 0]], True)
    """
    masks = np.asarray(masks, dtype=bool)
    if num_positive < 1 or num_negative < 0:
        raise ValueError(f"need num_positive >= 1 and num_negative >= 0, got {num_positive}, {num_negative}")
    if rng is None and (num_positive > 1 or num_negative > 0):
        raise ValueError("more than one positive point, or negative points, need a random generator (rng)")
    count = num_positive + num_negative
    points = np.zeros((masks.shape[0], count, 2), dtype=np.float32)
    labels = np.zeros((masks.shape[0], count), dtype=np.int64)
    labels[:, :num_positive] = 1
    height, width = masks.shape[1:]
    allowed = np.ones((height, width), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    for i, mask in enumerate(masks):
        for j in range(num_positive):
            points[i, j] = interior_point(mask, rng)
        if num_negative:
            x0, y0, x1, y1 = boxes_from_masks(mask[None])[0].astype(int)
            grow_x, grow_y = (x1 - x0 + 1) // 2 + 1, (y1 - y0 + 1) // 2 + 1
            band = np.zeros_like(mask)
            band[max(0, y0 - grow_y) : y1 + grow_y + 1, max(0, x0 - grow_x) : x1 + grow_x + 1] = True
            outside = ~mask & allowed
            candidates = band & outside if (band & outside).any() else outside
            rows, cols = np.nonzero(candidates)
            for j in range(num_negative):
                if rows.size == 0:  # the object fills the image: a padding point instead
                    labels[i, num_positive + j] = PAD_LABEL
                    continue
                pick = int(rng.integers(rows.size))
                points[i, num_positive + j] = (cols[pick], rows[pick])
    return points, labels


def correction_points(
    predictions: np.ndarray,
    targets: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One corrective click per object from the error region of its previous prediction.

    The larger of the two error regions is chosen: missed object pixels (false negatives) give a
    positive click, false alarms (false positives) a negative one; the click lies inside that region,
    away from its border (:func:`interior_point`). An object predicted without error gets a padding point.

    Args:
        predictions: bool ``(m, h, w)`` previous masks.
        targets: bool ``(m, h, w)`` true objects.
        rng: random generator (``None``: the deepest error pixel).
        valid: bool ``(h, w)`` or ``(m, h, w)`` pixels that count (ignored pixels never hold a click).

    Returns:
        points float ``(m, 2)`` and labels int64 ``(m,)`` (1, 0, or ``PAD_LABEL``).

    >>> target = np.zeros((1, 6, 6), bool)
    >>> target[0, 1:5, 1:5] = True
    >>> correction_points(np.zeros_like(target), target)[1].tolist()
    [1]
    """
    predictions = np.asarray(predictions, dtype=bool)
    targets = np.asarray(targets, dtype=bool)
    if predictions.shape != targets.shape or predictions.ndim != 3:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} must both be (m, h, w)")
    allowed = np.ones(targets.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    allowed = np.broadcast_to(allowed, targets.shape)
    points = np.zeros((targets.shape[0], 2), dtype=np.float32)
    labels = np.full(targets.shape[0], PAD_LABEL, dtype=np.int64)
    for i, (prediction, target, counted) in enumerate(zip(predictions, targets, allowed, strict=True)):
        missed = target & ~prediction & counted
        false_alarm = prediction & ~target & counted
        if not missed.any() and not false_alarm.any():
            continue
        positive = int(missed.sum()) >= int(false_alarm.sum())
        points[i] = interior_point(missed if positive else false_alarm, rng)
        labels[i] = 1 if positive else 0
    return points, labels


def derive_prompts(
    objects: Objects,
    kind: str,
    config: PromptConfig,
    rng: np.random.Generator,
    *,
    training: bool = True,
    valid: np.ndarray | None = None,
) -> Prompts:
    """The prompts of ``kind`` (``box``, ``point`` or ``box_point``) for each of ``objects``.

    Training jitters boxes and samples points at random; evaluation (``training=False``) uses exact boxes
    and, for points, the same seeded sampling so that every model sees the same clicks.

    >>> labels = np.zeros((16, 16), np.uint8)
    >>> labels[4:10, 3:12] = 1
    >>> prompts = derive_prompts(find_objects(labels), "box", PromptConfig(kind="box"), np.random.default_rng(0),
    ...                          training=False)
    >>> prompts.boxes.tolist(), prompts.points
    ([[3.0, 4.0, 11.0, 9.0]], None)
    """
    if kind not in MIXED_KINDS:
        raise ValueError(f"kind must be one of {list(MIXED_KINDS)} here, got {kind!r}")
    boxes = points = labels = None
    if kind in ("box", "box_point"):
        boxes = boxes_from_masks(objects.masks, jitter=config.box_jitter if training else 0.0, rng=rng)
    if kind in ("point", "box_point"):
        points, labels = points_from_masks(
            objects.masks, num_positive=config.num_points, num_negative=config.num_negative, rng=rng, valid=valid
        )
    return Prompts(boxes, points, labels)
