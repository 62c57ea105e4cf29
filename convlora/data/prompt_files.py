"""Prompts given by users: lists of boxes and points checked against the image, and prompts files.

A prompts file is JSON mapping image file names to their prompts::

    {"a.png": {"boxes": [[10, 20, 110, 140], [200, 40, 260, 90]]},
     "b.png": {"points": [[64, 80], [90, 30]], "point_labels": [1, 0]}}

``boxes`` are ``[x0, y0, x1, y1]`` in the image's own pixels, one prompt (and one mask) each. ``points``
are ``[x, y]``: a flat list is one prompt made of all its points (``point_labels``: 1 = on the object,
0 = not on it; all 1 when left out); a list of lists gives one prompt per inner list. With both, each
box gets the point list at its position. In Python, numpy arrays, torch tensors and tuples (and numpy
numbers inside lists) are taken like the lists they hold: boxes ``(n, 4)``, or ``(4,)`` for one box;
points ``(n, 2)`` (one prompt) or ``(k, n, 2)`` (one prompt each); labels ``(n,)`` or ``(k, n)``.

A COCO-style annotation file (``images`` with ``file_name`` and ``annotations`` with ``bbox`` =
``[x, y, width, height]``) is read as one box prompt per annotation.

>>> prompts = build_prompts(boxes=[[0, 0, 10, 10]], points=[[5, 5]], image_size=(20, 20))
>>> prompts.boxes.tolist(), prompts.point_labels.tolist()
([[0.0, 0.0, 10.0, 10.0]], [[1]])
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_json
from .prompts import PAD_LABEL, Prompts

PROMPT_KEYS = ("boxes", "points", "point_labels")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# what each argument may look like as an array: which shapes, and the words an error uses
_SHAPES = {
    "boxes": (lambda shape: shape == (4,) or (len(shape) == 2 and shape[1] == 4), "(n, 4), or (4,) for one box"),
    "points": (lambda shape: len(shape) in (2, 3) and shape[-1] == 2, "(n, 2) for one prompt or (k, n, 2)"),
    "point_labels": (lambda shape: len(shape) in (1, 2), "(n,) or (k, n), one label per point"),
}


def _plain(value: Any) -> Any:
    """Nested lists of Python numbers from array-likes: numpy arrays and numbers, torch tensors, tuples."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and not isinstance(value, (str, bytes)):
        plain = tolist()
        return [_plain(v) for v in plain] if isinstance(plain, list) else plain
    return value


def _given(value: Any, name: str, source: str) -> list[Any] | None:
    """A prompt argument as nested lists, or ``None`` when it is absent or empty; array shapes are checked."""
    if value is None:
        return None
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (list, tuple)):
        shape = tuple(int(n) for n in shape)
        if len(shape) >= 1 and shape[0] == 0:
            return None
        fits, expected = _SHAPES[name]
        if not fits(shape):
            raise ValueError(f"{source}: {name} is an array of shape {shape}; expected {expected}")
    plain = _plain(value)
    if not isinstance(plain, list):
        raise ValueError(f"{source}: {name} is {_show(plain)}; expected a list or array ({_SHAPES[name][1]})")
    return plain or None


def _depth(value: Any) -> int:
    """Nesting depth of a list of numbers (a number: 0, ``[x, y]``: 1, ``[[x, y]]``: 2 ...)."""
    depth = 0
    while isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        value, depth = value[0], depth + 1
    return depth


def build_prompts(
    boxes: Sequence[Any] | np.ndarray | None = None,
    points: Sequence[Any] | np.ndarray | None = None,
    point_labels: Sequence[Any] | np.ndarray | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    source: str = "prompts",
) -> Prompts:
    """Check user prompts (original-image pixels) and arrange them as :class:`Prompts`.

    Lists, tuples, numpy arrays and torch tensors are all accepted (see the module docstring); a 1-d
    array of four numbers is one box.

    Args:
        boxes: ``[x0, y0, x1, y1]`` or a list of them; an ``(n, 4)`` or ``(4,)`` array.
        points: ``[[x, y], ...]`` (one prompt) or ``[[[x, y], ...], ...]`` (one prompt per inner list); an
            ``(n, 2)`` or ``(k, n, 2)`` array.
        point_labels: labels shaped like ``points`` (without the last axis): 1 positive, 0 negative.
        image_size: ``(h, w)``; when given, boxes and points must lie inside the image.
        source: what to name in errors (a file and entry).

    Raises:
        ValueError: one line naming ``source`` and the entry: a box outside the image or with ``x0 > x1``,
            a label other than 0/1, point and label counts that differ, prompt counts that differ, an
            array of the wrong shape.

    >>> build_prompts(points=[[[1, 1]], [[3, 3], [4, 4]]]).point_labels.tolist()
    [[1, -10], [1, 1]]
    >>> build_prompts(boxes=np.array([2, 4, 20, 30], np.float32)).boxes.tolist()
    [[2.0, 4.0, 20.0, 30.0]]
    """
    boxes = _given(boxes, "boxes", source)
    points = _given(points, "points", source)
    point_labels = _given(point_labels, "point_labels", source)
    box_array = None if boxes is None else _boxes(boxes, image_size, source)
    point_array = label_array = None
    if points is not None:
        point_array, label_array = _points(points, point_labels, image_size, source)
    elif point_labels is not None:
        raise ValueError(f"{source}: point_labels given without points")
    if box_array is not None and point_array is not None and len(box_array) != len(point_array):
        raise ValueError(
            f"{source}: {len(box_array)} boxes but {len(point_array)} point lists; give one point list per box "
            "(a list of [x, y] lists for each box)"
        )
    return Prompts(box_array, point_array, label_array)


def _boxes(boxes: Any, image_size: tuple[int, int] | None, source: str) -> np.ndarray:
    if _depth(boxes) == 1:
        boxes = [boxes]
    rows = []
    for i, box in enumerate(boxes):
        entry = f"{source}: boxes[{i}]"
        if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4 or not all(_number(v) for v in box):
            raise ValueError(f"{entry} is {_show(box)}; expected [x0, y0, x1, y1], four numbers")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x0 > x1 or y0 > y1:
            raise ValueError(f"{entry} is {_show(box)}: x0 > x1 or y0 > y1; expected [x0, y0, x1, y1] with x0 <= x1")
        if image_size is not None:
            height, width = image_size
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise ValueError(f"{entry} is {_show(box)}, outside the {width}x{height} (w x h) image")
        rows.append((x0, y0, x1, y1))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def _points(points: Any, labels: Any, image_size: tuple[int, int] | None, source: str) -> tuple[np.ndarray, np.ndarray]:
    depth = _depth(points)
    if depth not in (2, 3):
        raise ValueError(f"{source}: points is {_show(points)}; expected [[x, y], ...] or [[[x, y], ...], ...]")
    groups = [points] if depth == 2 else list(points)
    if labels is None or len(labels) == 0:
        label_groups = [[1] * len(group) for group in groups]
    else:
        label_depth = _depth(labels)
        if label_depth != depth - 1:
            raise ValueError(
                f"{source}: point_labels {_show(labels)} are not shaped like points (one label per [x, y])"
            )
        label_groups = [labels] if label_depth == 1 else list(labels)
    if len(label_groups) != len(groups):
        raise ValueError(f"{source}: {len(groups)} point lists but {len(label_groups)} label lists")
    count = max(len(group) for group in groups)
    array = np.zeros((len(groups), count, 2), dtype=np.float32)
    label_array = np.full((len(groups), count), PAD_LABEL, dtype=np.int64)
    for g, (group, group_labels) in enumerate(zip(groups, label_groups, strict=True)):
        where = f"{source}: points[{g}]" if depth == 3 else f"{source}: points"
        if len(group) != len(group_labels):
            raise ValueError(f"{where}: {len(group)} points but {len(group_labels)} point_labels; give one label each")
        for j, (point, label) in enumerate(zip(group, group_labels, strict=True)):
            entry = f"{where}[{j}]"
            if (
                not isinstance(point, (list, tuple, np.ndarray))
                or len(point) != 2
                or not all(_number(v) for v in point)
            ):
                raise ValueError(f"{entry} is {_show(point)}; expected [x, y], two numbers")
            if isinstance(label, bool) or label not in (0, 1):
                raise ValueError(f"{entry} has label {_show(label)}; point labels are 1 (object) or 0 (not object)")
            if image_size is not None:
                height, width = image_size
                if not (0 <= point[0] <= width and 0 <= point[1] <= height):
                    raise ValueError(f"{entry} is {_show(point)}, outside the {width}x{height} (w x h) image")
            array[g, j] = point
            label_array[g, j] = int(label)
    return array, label_array


def _show(value: Any) -> str:
    text = json.dumps(value.tolist() if isinstance(value, np.ndarray) else value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def read_prompts_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a prompts JSON file or a COCO-style annotation file: image file name -> raw prompts.

    Entries are not checked against images here (see :func:`load_prompts`); the file's structure is.

    >>> read_prompts_file("prompts.json")  # doctest: +SKIP
    {'a.png': {'boxes': [[10, 20, 110, 140]]}}
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _read_coco(data, path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map image file names to prompts, found a JSON {type(data).__name__}")
    prompts: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f'{path}: {name!r} maps to {_show(entry)}; expected {{"boxes": [...], "points": [...]}}')
        unknown = sorted(set(entry) - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"{path}: {name!r} has unknown keys {unknown}; known keys: {list(PROMPT_KEYS)}")
        prompts[name] = {key: entry[key] for key in PROMPT_KEYS if key in entry}
    return prompts


def _read_coco(data: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    names: dict[Any, str] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name', found {_show(image)}")
        names[image["id"]] = str(image["file_name"])
    prompts: dict[str, dict[str, Any]] = {name: {"boxes": []} for name in names.values()}
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "bbox" not in annotation or "image_id" not in annotation:
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and 'bbox', found {_show(annotation)}")
        if annotation["image_id"] not in names:
            raise ValueError(f"{path}: annotations[{i}] names image_id {annotation['image_id']!r}, not in images")
        bbox = annotation["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise ValueError(f"{path}: annotations[{i}].bbox is {_show(bbox)}; expected [x, y, width, height]")
        x, y, width, height = bbox
        if width < 0 or height < 0:
            raise ValueError(f"{path}: annotations[{i}].bbox is {_show(bbox)}: negative width or height")
        prompts[names[annotation["image_id"]]]["boxes"].append([x, y, x + width, y + height])
    return {name: entry for name, entry in prompts.items() if entry["boxes"]}


def load_prompts(path: str | Path, image_sizes: Mapping[str, tuple[int, int]]) -> dict[str, Prompts]:
    """The checked prompts of every image named in a prompts file.

    Args:
        path: a prompts JSON or COCO file (see the module docstring).
        image_sizes: image file name (as the file names them: the name, or a path relative to the image
            folder) -> ``(h, w)`` for the images of the folder.

    Raises:
        ValueError: one line naming the file and the entry (an image not in the folder, a bad prompt).

    >>> load_prompts("prompts.json", {"a.png": (480, 640)})  # doctest: +SKIP
    """
    raw = read_prompts_file(path)
    checked: dict[str, Prompts] = {}
    for name, entry in raw.items():
        if name not in image_sizes:
            known = ", ".join(sorted(image_sizes)[:5]) + (" ..." if len(image_sizes) > 5 else "")
            raise ValueError(f"{path}: image {name!r} is not in the image folder (it holds {known or 'no images'})")
        checked[name] = build_prompts(**entry, image_size=image_sizes[name], source=f"{path}: {name}")
    return checked


def prompts_to_dict(prompts: Prompts) -> dict[str, Any]:
    """A JSON-able entry of a prompts file (padding points left out).

    >>> prompts_to_dict(build_prompts(boxes=[[1, 2, 3, 4]]))
    {'boxes': [[1.0, 2.0, 3.0, 4.0]]}
    """
    entry: dict[str, Any] = {}
    if prompts.boxes is not None:
        entry["boxes"] = prompts.boxes.tolist()
    if prompts.points is not None:
        groups, label_groups = [], []
        for points, labels in zip(prompts.points, prompts.point_labels, strict=True):
            keep = labels != PAD_LABEL
            groups.append(points[keep].tolist())
            label_groups.append(labels[keep].tolist())
        entry["points"] = groups
        entry["point_labels"] = label_groups
    return entry


def write_prompts_file(path: str | Path, prompts: Mapping[str, Prompts]) -> Path:
    """Write a prompts JSON file (atomically) that :func:`read_prompts_file` reads back.

    Args:
        path: the JSON file.
        prompts: image file name -> its prompts.

    >>> write_prompts_file("/tmp/convlora-doc-prompts.json", {"a.png": build_prompts(boxes=[[1, 2, 3, 4]])})
    PosixPath('/tmp/convlora-doc-prompts.json')
    """
    write_json(path, {name: prompts_to_dict(entry) for name, entry in prompts.items()})
    return Path(path)


def write_coco_boxes(
    path: str | Path, boxes: Mapping[str, Sequence[Sequence[float]]], image_sizes: Mapping[str, tuple[int, int]]
) -> Path:
    """Write boxes ``[x0, y0, x1, y1]`` per image as a COCO-style annotation file (``bbox`` = x, y, w, h).

    Args:
        path: the JSON file.
        boxes: image file name -> its boxes.
        image_sizes: image file name -> ``(h, w)``.

    >>> write_coco_boxes("/tmp/convlora-doc-coco.json", {"a.png": [[1, 2, 11, 22]]}, {"a.png": (40, 50)})
    PosixPath('/tmp/convlora-doc-coco.json')
    """
    images, annotations = [], []
    for image_id, (name, image_boxes) in enumerate(boxes.items(), start=1):
        height, width = image_sizes[name]
        images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
        for x0, y0, x1, y1 in image_boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                }
            )
    categories = [{"id": 1, "name": "object"}]
    write_json(path, {"images": images, "annotations": annotations, "categories": categories})
    return Path(path)
