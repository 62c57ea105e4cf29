"""Phase-contrast cultured cells (imitates LIVECell's cytoplasm outlines): one id per cell, 8-bit grey images.

What makes it hard: adherent cells grow into confluent patches where neighbours share a boundary with no
background between them, and that boundary shows at most as a thin, faint dark line (often as nothing), while
the outer edge of a patch is loud: a bright phase halo and a dark rim. A foreground mask is easy and merges
every patch into one object; telling the cells apart is the point. Cells are large and varied (spindle-shaped
with pointed ends, flat and polygonal, or rounded and bright), lie aligned in patches, carry a granular
interior and a faint nucleus, and share the field with isolated cells, touching pairs and unlabelled debris.
The image is an 8-bit camera frame, uint8 ``(h, w)``, mid-grey with fine noise and faint uneven light; the
mask is an instance-id map, uint16, 0 = background and ids 1..n, each id one 4-connected region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from . import textures as tx
from ._instance_ids import tidy_ids

EMPTY_SHARE = 0.05  # images holding no cell
PATCH_SHARES = (0.15, 0.35, 0.3, 0.2)  # of 0, 1, 2, 3 confluent patches in a non-empty image
LONE_RANGE = (1, 7)  # isolated cells (or touching pairs) drawn per non-empty image, some may find no room
MIN_AREA = 20.0  # pixels at 128 px (scaled with the area): smaller slivers join a neighbour or the background


@dataclass(frozen=True)
class _Cell:
    center: tuple[float, float]  # (y, x)
    length: float  # major semi-axis, pixels
    width: float  # minor semi-axis, pixels
    angle: float  # of the major axis, radians
    taper: float  # 0: an ellipse, 1: a spindle with pointed ends
    tone: float  # body brightness relative to the background (8-bit range as 1)
    halo: float  # relative strength of the bright halo around it (rounded cells glow)
    in_patch: bool  # one of a confluent patch

    def radius(self, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Normalised radius of offsets from the centre: 1 on the smooth outline, proportional to the distance."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        big_u, big_v = (dx * c + dy * s) / self.length, (-dx * s + dy * c) / self.width
        ellipse = np.hypot(big_u, big_v)
        # the outline |V| = 1 - U^2 (pointed ends), as a radius of degree 1 so it can be scaled like the ellipse
        spindle = (np.abs(big_v) + np.sqrt(big_v**2 + 4 * big_u**2)) / 2
        return (1 - self.taper) * ellipse + self.taper * spindle

    def reach(self, direction: float) -> float:
        """Distance from the centre to the smooth outline along ``direction`` (radians, ``(y, x)`` frame)."""
        return 1.0 / float(self.radius(np.array(np.sin(direction)), np.array(np.cos(direction))))


def _orientation(rng: np.random.Generator, spacing: float) -> Callable[[float, float], float]:
    """A smooth field of cell directions over one patch: cells in a patch lie roughly aligned, as fibroblasts do."""
    base, sway, phase = rng.uniform(0, np.pi), rng.uniform(0.0, 0.8), rng.uniform(0, 2 * np.pi)
    kind, wavelength = rng.uniform(0, np.pi), rng.uniform(3.0, 7.0) * spacing
    along = np.array([np.cos(kind), np.sin(kind)]) * 2 * np.pi / wavelength
    return lambda y, x: float(base + sway * np.sin(y * along[0] + x * along[1] + phase))


def _patch(rng: np.random.Generator, h: int, w: int, spacing: float, taken: list[_Cell]) -> list[_Cell]:
    """The cells of one confluent patch: seeds dart-thrown with an aligned, stretched spacing inside a blob.

    Each cell reaches past the middle towards its neighbours, so the ownership (the cell a pixel lies
    deepest in) tiles the patch like a stretched Voronoi diagram with no gaps, and bulges out at its edge.
    """
    center = np.array([rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w])
    size = rng.uniform(1.3, 3.6) * spacing
    stretch = 1.0 + 2.0 * rng.random() ** 1.5  # elongation of the cells (1: cobblestone, 3: spindles)
    reach = rng.uniform(0.95, 1.15)  # in spacings: below 1 leaves small gaps in the patch
    blob_angle, blob_elongation = rng.uniform(0, np.pi), rng.uniform(1.0, 1.8)
    amps, phases = rng.normal(size=4) * 0.18 / np.arange(1, 5) ** 1.2, rng.uniform(0, 2 * np.pi, 4)
    direction = _orientation(rng, spacing)
    tone, taper = rng.normal(0.0, 0.025), rng.uniform(0.0, 0.5)
    extent = size * blob_elongation * 1.3
    points = center + rng.uniform(-extent, extent, (int(40 * (extent / spacing) ** 2), 2))  # candidates (n, 2)
    dy, dx = (points - center).T
    c, s = np.cos(blob_angle), np.sin(blob_angle)
    u, v = (dx * c + dy * s) / blob_elongation, -dx * s + dy * c
    theta = np.arctan2(v, u)
    edge = size * (1.0 + sum(a * np.cos(k * theta + p) for k, (a, p) in enumerate(zip(amps, phases, strict=True), 1)))
    inside = (np.hypot(u, v) < edge) & ((points >= 0) & (points < (h, w))).all(axis=1)
    seeds = [np.array(cell.center) for cell in taken if cell.in_patch]
    new: list[np.ndarray] = []
    for point in points[inside]:
        if seeds:
            angle = direction(*point)
            dy, dx = (np.array(seeds) - point).T
            c, s = np.cos(angle), np.sin(angle)
            metric = np.hypot((dx * c + dy * s) / np.sqrt(stretch), (-dx * s + dy * c) * np.sqrt(stretch))
            if metric.min() < spacing:
                continue
        seeds.append(point)
        new.append(point)
    cells = []
    for point in new:
        jitter = float(np.exp(rng.normal(0.0, 0.1)))
        cell = _Cell(
            center=(float(point[0]), float(point[1])),
            length=reach * spacing * np.sqrt(stretch) * jitter,
            width=reach * spacing / np.sqrt(stretch) * jitter,
            angle=direction(*point) + float(rng.normal(0.0, 0.15)),
            taper=taper,
            tone=tone + float(rng.normal(0.0, 0.02)),
            halo=rng.uniform(0.5, 1.0),
            in_patch=True,
        )
        cells.append(cell)
    return cells


def _lone(rng: np.random.Generator, spacing: float, center: tuple[float, float]) -> _Cell:
    """An isolated cell at ``center``: a spindle, a flat polygonal cell or a small rounded (dividing) one."""
    kind = rng.random()
    area = 1.4 * spacing**2 * float(np.exp(rng.normal(0.0, 0.25)))
    if kind < 0.45:  # spindle (fusiform), pointed ends
        elongation, taper, tone, halo = rng.uniform(2.5, 4.5), rng.uniform(0.7, 1.0), rng.normal(0.0, 0.03), 1.0
    elif kind < 0.75:  # flat, spread and polygonal
        elongation, taper, tone, halo = rng.uniform(1.1, 2.0), rng.uniform(0.0, 0.4), rng.normal(0.0, 0.03), 0.8
        area *= 1.3
    else:  # rounded up: smaller, brighter, glowing
        elongation, taper, tone, halo = rng.uniform(1.0, 1.25), 0.0, rng.uniform(0.08, 0.18), rng.uniform(1.6, 2.4)
        area *= 0.45
    width = float(np.sqrt(area / (np.pi * elongation)))
    return _Cell(center, width * elongation, width, rng.uniform(0, np.pi), taper, tone, halo, False)


def _place(rng: np.random.Generator, h: int, w: int, scale: float) -> list[_Cell]:
    """Cells in drawing order: confluent patches first, then isolated cells (some pressed into touching pairs)."""
    if rng.random() < EMPTY_SHARE:
        return []
    spacing = max(rng.uniform(10.0, 15.0) * scale, 1.0)
    cells: list[_Cell] = []
    for _ in range(int(rng.choice(len(PATCH_SHARES), p=PATCH_SHARES))):
        cells += _patch(rng, h, w, spacing, cells)
    for _ in range(int(rng.integers(LONE_RANGE[0], LONE_RANGE[1] + 1))):
        for _attempt in range(10):  # find a free spot, away from every cell drawn so far
            cell = _lone(rng, spacing, (rng.uniform(0, h), rng.uniform(0, w)))
            if rng.random() < 0.2 and cells and not cells[-1].in_patch:  # a daughter pressed against the last one
                other, direction = cells[-1], rng.uniform(0, 2 * np.pi)
                distance = (other.reach(direction) + cell.reach(direction + np.pi)) * rng.uniform(0.8, 0.95)
                y, x = other.center[0] + distance * np.sin(direction), other.center[1] + distance * np.cos(direction)
                cell = replace(cell, center=(float(y), float(x)))
                neighbours = cells[:-1]
            else:
                neighbours = cells
            if all(_apart(cell, other) for other in neighbours):
                cells.append(cell)
                break
    return cells


def _apart(a: _Cell, b: _Cell, margin: float = 1.25) -> bool:
    """Whether two cells' outlines (wobble allowed for by ``margin``) leave background between them."""
    dy, dx = b.center[0] - a.center[0], b.center[1] - a.center[1]
    direction = float(np.arctan2(dy, dx))
    return bool(np.hypot(dy, dx) > margin * (a.reach(direction) + b.reach(direction + np.pi)))


def _shape(rng: np.random.Generator, cell: _Cell, h: int, w: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The cell's box in the image, its normalised radius there (< 1 inside the wobbly outline) and its nucleus's."""
    extent = cell.length * 1.4 + 2.0
    cy, cx = cell.center
    y0, y1 = max(0, int(np.floor(cy - extent))), min(h, int(np.ceil(cy + extent)) + 1)
    x0, x1 = max(0, int(np.floor(cx - extent))), min(w, int(np.ceil(cx + extent)) + 1)
    wobble_amount = rng.uniform(0.04, 0.14)
    nucleus = max(0.5 * cell.width, min(0.35 * cell.length, 0.9 * cell.width)), 0.5 * cell.width  # semi-axes
    if y0 >= y1 or x0 >= x1:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0)), np.zeros((0, 0))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(cell.angle), np.sin(cell.angle)
    theta = np.arctan2(-dx * s + dy * c, dx * c + dy * s)
    boundary = np.maximum(1.0 + wobble_amount * tx.fourier_wobble(rng, theta, 6), 0.6)
    inner = np.hypot((dx * c + dy * s) / nucleus[0], (-dx * s + dy * c) / nucleus[1])
    return (slice(y0, y1), slice(x0, x1)), cell.radius(dy, dx) / boundary, inner


def _render(rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
    """The phase-contrast image with what it was made of (for tests).

    Returns:
        ``image`` (uint8 ``(h, w)``), ``ids`` (uint16 instance ids) and ``cells`` (the placed ``_Cell`` list,
        drawing order) with ``final``: the id each ended up with (0 when it vanished).
    """
    h, w = height, width
    scale = min(h, w) / 128
    cells = _place(rng, h, w, scale)

    # Neighbours share their overlap by the normalised radius (the pixel goes to the cell it lies deeper in).
    deepest = np.full((h, w), np.inf)
    owner = np.zeros((h, w), np.int64)
    nucleus = np.zeros((h, w))
    for index, cell in enumerate(cells, start=1):
        box, q, inner = _shape(rng, cell, h, w)
        closer = q < np.minimum(deepest[box], 1.0)
        deepest[box][closer] = q[closer]
        owner[box][closer] = index
        nucleus[box][closer] = tx.sigmoid((1.0 - inner[closer]) * 6.0)
    ids, lookup = tidy_ids(owner, max(3.0, MIN_AREA * scale**2))
    final = [int(lookup[i]) if i < lookup.size else 0 for i in range(1, len(cells) + 1)]
    fg = ids > 0
    tone = np.zeros(len(cells) + 1)
    halo = np.zeros(len(cells) + 1)
    line = np.zeros(len(cells) + 1)
    for i, cell in zip(final, cells, strict=True):
        if i:
            tone[i], halo[i], line[i] = cell.tone, cell.halo, rng.random() * (rng.random() > 0.3)

    # The cell bodies: a tone of their own, thicker (darker) towards the middle, a faint nucleus, granules.
    body_tone = rng.uniform(-0.1, 0.05)  # the culture's cells mostly a little darker than the background
    dome = rng.uniform(0.02, 0.07) * (1.0 - np.minimum(deepest, 1.0) ** 2) * fg
    granules = tx.fractal_noise(rng, h, w, cell=1.2 * scale + 0.6, octaves=2)
    density = rng.uniform(0.55, 0.75)
    specks = (rng.uniform(0.08, 0.16) * np.clip((granules - density) / 0.15, 0.0, 1.0)
              - rng.uniform(0.0, 0.06) * np.clip((0.3 - granules) / 0.15, 0.0, 1.0))  # fmt: skip
    texture = 0.05 * (tx.fractal_noise(rng, h, w, cell=4 * scale + 1, octaves=2) - 0.5)
    body = (body_tone + tone[ids] - dome - specks * (1.0 - 0.6 * nucleus) + texture
            + rng.uniform(-0.04, 0.05) * nucleus) * fg  # fmt: skip

    # Phase optics: a bright halo outside each cluster and a dark rim inside it; between touching cells
    # only a thin faint dark line, or nothing.
    out = np.zeros((h, w))
    if fg.any():
        outside, (ny, nx) = ndimage.distance_transform_edt(~fg, return_indices=True)
        glow = halo[ids[ny, nx]] * np.exp(-outside / (1.2 * scale + 0.5)) * ~fg
        inside = ndimage.distance_transform_edt(fg)
        rim = halo[ids] * np.exp(-(inside - 1.0) / (0.8 * scale + 0.4)) * fg
        edge = np.zeros((h, w))
        right = (ids[:, :-1] != ids[:, 1:]) & fg[:, :-1] & fg[:, 1:]
        down = (ids[:-1] != ids[1:]) & fg[:-1] & fg[1:]
        edge[:, :-1][right], edge[:-1][down] = 1.0, 1.0
        out = (rng.uniform(0.12, 0.3) * glow - rng.uniform(0.04, 0.1) * rim
               - rng.uniform(0.0, 0.08) * edge * line[ids])  # fmt: skip
    debris = np.zeros((h, w))
    for _ in range(rng.integers(0, 6)):  # unlabelled debris and dead cells: small round specks
        center = (rng.uniform(0, h), rng.uniform(0, w))
        debris += rng.uniform(-0.15, 0.25) * tx.radial_blob(rng, h, w, center, rng.uniform(0.8, 2.2) * scale + 0.3)

    # Light and camera: mid-grey, faint uneven illumination, a little blur, fine noise.
    background = rng.uniform(0.42, 0.6)
    yy, xx = tx.grid(h, w)
    tilt = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - h / 2) * np.sin(tilt) + (xx - w / 2) * np.cos(tilt)) / max(h, w)
    unevenness = tx.fractal_noise(rng, h, w, cell=80 * scale + 4, octaves=2) - 0.5
    light = 1.0 + rng.uniform(0.0, 0.08) * ramp + rng.uniform(0.02, 0.07) * unevenness
    grain = 0.02 * (tx.fractal_noise(rng, h, w, cell=1.0, octaves=1) - 0.5)
    signal = tx.blur(background + body + out + debris, rng.uniform(0.4, 0.8) * scale + 0.1) * light + grain
    image = tx.to_uint8(signal + rng.normal(0.0, rng.uniform(0.008, 0.022), (h, w)))
    return {"image": image, "ids": ids, "cells": cells, "final": final}


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One phase-contrast image of cultured cells (uint8 ``(h, w)``) and its uint16 instance-id map.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, ids = generate(np.random.default_rng(1), 96, 128)
    >>> image.shape, image.dtype, ids.dtype
    ((96, 128), dtype('uint8'), dtype('uint16'))
    """
    scene = _render(rng, height, width)
    return scene["image"], scene["ids"]
