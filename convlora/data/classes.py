"""Class names (and colours) of a dataset: ``classes.json``, or ``class_names.txt`` / ``labels.txt`` beside the data.

``classes.json`` is a list (index = class id) or a dict ``{"0": "background", "1": "polyp"}``; an entry may
be an object ``{"name": "leaf", "color": [0, 128, 0]}`` (or ``"#008000"``), which makes RGB masks in those
colours readable as class ids. A dict may give key ``"255"`` a colour: pixels of that colour are ignored.
``class_names.txt`` / ``labels.txt`` hold one name per line, line i naming id i (VOC, labelme exports;
labelme's leading ``__ignore__`` line is skipped). :func:`colors_to_ids` maps a colour-coded mask through
a table.

>>> table = ClassTable(["background", "leaf"], {(0, 0, 0): 0, (0, 128, 0): 1})
>>> table.names[table.colors[(0, 128, 0)]]
'leaf'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .report import IGNORE_INDEX, DatasetError

CLASSES_FILE = "classes.json"
NAME_FILES = ("class_names.txt", "labels.txt")
LABELME_IGNORE = "__ignore__"

Color = tuple[int, int, int]


@dataclass(frozen=True)
class ClassTable:
    """Names of the classes, and the colour of each when masks are colour-coded.

    Args:
        names: one name per class id (background first).
        colors: ``(r, g, b)`` -> class id (255 = ignore); empty when masks hold ids.
        source: the file the table came from.
    """

    names: list[str]
    colors: dict[tuple[int, int, int], int] = field(default_factory=dict)
    source: str = ""


def _color(value: Any, path: Path, where: str) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        try:
            return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
        except ValueError:
            pass
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise DatasetError(f"{path}: {where} has color {value!r}; expected [r, g, b] with values 0..255 or '#rrggbb'")


def read_class_table(path: str | Path) -> ClassTable:
    """The class names, and colours where given, of a ``classes.json`` (see the module docstring).

    Args:
        path: the ``classes.json`` file.

    Raises:
        DatasetError: naming the file, when it is not valid JSON, ids are missing, names are not strings,
            colours are malformed or repeated, or only some classes have a colour.

    >>> read_class_table("data/classes.json").names  # doctest: +SKIP
    ['background', 'leaf']
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a readable JSON file ({error})") from None
    ignore_entry = None
    if isinstance(data, Mapping):
        try:
            by_id = {int(k): v for k, v in data.items()}
        except ValueError:
            raise DatasetError(f'{path}: keys must be class ids such as "0", got {list(data)[:5]}') from None
        ignore_entry = by_id.pop(IGNORE_INDEX, None)
        missing = sorted(set(range(len(by_id))) - set(by_id))
        if missing or min(by_id, default=0) < 0:
            raise DatasetError(f"{path}: class ids must run 0..{len(by_id) - 1} without gaps; missing {missing[:10]}")
        entries = [by_id[i] for i in range(len(by_id))]
    elif isinstance(data, list):
        entries = data
    else:
        raise DatasetError(f"{path}: expected a list of class names or a dict of id -> name, got {type(data).__name__}")
    names: list[Any] = []
    colors: dict[tuple[int, int, int], int] = {}
    for class_id, entry in enumerate(entries):
        if isinstance(entry, Mapping):
            names.append(entry.get("name"))
            if "color" in entry:
                color = _color(entry["color"], path, f"class {class_id}")
                if color in colors:
                    raise DatasetError(f"{path}: classes {colors[color]} and {class_id} share the color {color}")
                colors[color] = class_id
        else:
            names.append(entry)
    if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{path}: expected at least 2 non-empty class names (background first), got {names[:5]}")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{path}: names {len(names)} classes; at most 255 are supported (255 marks ignored pixels)")
    if colors and len(colors) != len(names):
        lacking = [i for i in range(len(names)) if i not in colors.values()][:10]
        raise DatasetError(f"{path}: classes {lacking} have no color while others do; expected a color for every class")
    if isinstance(ignore_entry, Mapping) and "color" in ignore_entry:
        color = _color(ignore_entry["color"], path, "id 255 (ignore)")
        if color in colors:
            raise DatasetError(f"{path}: the ignore color {color} is also class {colors[color]}'s")
        colors[color] = IGNORE_INDEX
    return ClassTable(list(names), colors, str(path))


def read_classes(path: str | Path) -> list[str]:
    """Class names from a ``classes.json``: a list (index = class id) or a dict ``{"0": "background", ...}``.

    Raises:
        DatasetError: naming the file, when it is not valid JSON, ids are missing or names are not strings.

    >>> read_classes("data/classes.json")  # doctest: +SKIP
    ['background', 'polyp']
    """
    return read_class_table(path).names


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file holding one name per line, line i naming class id i.

    Blank lines at the end are ignored; labelme's leading ``__ignore__`` line (id -1) is skipped.

    Args:
        path: a ``class_names.txt`` or ``labels.txt``.

    Raises:
        DatasetError: naming the file, when it cannot be read, has blank lines between names or repeats a name.

    >>> read_class_names("data/class_names.txt")  # doctest: +SKIP
    ['_background_', 'aeroplane', 'bicycle']
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    while lines and not lines[-1]:
        lines.pop()
    if lines and lines[0] == LABELME_IGNORE:
        lines = lines[1:]
    if "" in lines:
        raise DatasetError(
            f"{path}: line {lines.index('') + 1} is blank; expected one class name per line (line i = id i)"
        )
    repeated = sorted({n for n in lines if lines.count(n) > 1})
    if repeated:
        raise DatasetError(f"{path}: names {repeated[:5]} appear more than once; expected one line per class")
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected at least 2 class names (background first), got {lines}")
    if len(lines) > IGNORE_INDEX:
        raise DatasetError(f"{path}: names {len(lines)} classes; at most 255 are supported (255 marks ignored pixels)")
    return lines


def find_class_table(root: Path) -> tuple[ClassTable | None, list[str]]:
    """The class table of a dataset root: ``classes.json``, else ``class_names.txt``, else ``labels.txt``.

    Args:
        root: the dataset folder (the CSV file's folder for a CSV dataset).

    Returns:
        ``(table or None, notes)``; the notes say which files were ignored.

    Raises:
        DatasetError: the file found is malformed.

    >>> table, notes = find_class_table(Path("data/leaves"))  # doctest: +SKIP
    """
    candidates = [root / CLASSES_FILE, *(root / name for name in NAME_FILES)]
    present = [path for path in candidates if path.is_file()]
    if not present:
        return None, []
    chosen = present[0]
    notes = [f"{path.name} ignored: {chosen.name} names the classes" for path in present[1:]]
    if chosen.suffix == ".json":
        return read_class_table(chosen), notes
    return ClassTable(read_class_names(chosen), {}, str(chosen)), notes


def pack_colors(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 colours as one int64 ``0xRRGGBB`` per pixel.

    Args:
        rgb: colours, channels last.

    >>> hex(int(pack_colors(np.array([255, 200, 0], np.uint8))))
    '0xffc800'
    """
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def unpack_color(packed: int) -> Color:
    """The ``(r, g, b)`` of a colour packed by :func:`pack_colors`.

    Args:
        packed: ``0xRRGGBB``.

    >>> unpack_color(0xFFC800)
    (255, 200, 0)
    """
    return (int(packed) >> 16, (int(packed) >> 8) & 255, int(packed) & 255)


def colors_to_ids(rgb: np.ndarray, colors: Mapping[Color, int]) -> np.ndarray:
    """Class ids ``(h, w)`` uint8 of an RGB colour-coded mask ``(h, w, 3)``, through a colour table.

    Args:
        rgb: the mask's colours.
        colors: ``(r, g, b)`` -> class id (255 = ignore).

    Raises:
        ValueError: a colour that is not in the table, with its pixel count.

    >>> colors_to_ids(np.array([[[0, 0, 0], [0, 128, 0]]], np.uint8), {(0, 0, 0): 0, (0, 128, 0): 1}).tolist()
    [[0, 1]]
    """
    packed = pack_colors(rgb)
    present, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    table = {(r << 16) | (g << 8) | b: int(i) for (r, g, b), i in colors.items()}
    unknown = [(int(n), unpack_color(c)) for c, n in zip(present, counts, strict=True) if int(c) not in table]
    if unknown:
        unknown.sort(key=lambda item: (-item[0], item[1]))
        count, color = unknown[0]
        others = f" (and {len(unknown) - 1} more unknown colours)" if len(unknown) > 1 else ""
        raise ValueError(
            f"{count:,} pixels have colour {color}, which the colour table does not list{others}; expected one of "
            f"its {len(table)} colours (add it to classes.json with its class id)"
        )
    ids = np.array([table[int(c)] for c in present], np.uint8)
    return ids[inverse.reshape(packed.shape)]
