"""Generic objects on generic backgrounds: the corpus the embedded base SAM is pretrained on.

Each image holds one to several objects (ellipses, smooth blobs, convex polygons, stars, rings, thin
bars) with flat, gradient, noise, striped or spotted fills, sometimes shaded or casting a soft shadow,
drawn over a backdrop (flat, gradient, noise texture, stripes, checkerboard or cells, sometimes with
thin clutter) that always spans the whole frame. Objects occlude one another; some are barely
distinguishable from what lies under them. Each object's visible pixels form its instance mask; the
union of the masks is the image's foreground.

The corpus is deliberately not any of the fine-tuning domains (no polyps, lesions, shadows as targets,
camouflage scenes, leaves or roads): the base learns "what is an object" in general, and the domains
measure what Conv-LoRA adds on top. It is sampled on the fly: an image depends only on its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SHAPES = ("ellipse", "blob", "polygon", "star", "ring", "bar")
_SHAPE_WEIGHTS = (0.22, 0.24, 0.2, 0.12, 0.1, 0.12)
BACKGROUNDS = ("flat", "gradient", "noise", "stripes", "checker", "cells")
_BACKGROUND_WEIGHTS = (0.12, 0.16, 0.3, 0.14, 0.1, 0.18)
FILLS = ("flat", "gradient", "noise", "stripes", "spots")
_FILL_WEIGHTS = (0.3, 0.2, 0.25, 0.12, 0.13)
_COUNT_WEIGHTS = (0.25, 0.25, 0.2, 0.15, 0.15)  # probability of 1, 2, 3, 4, 5 objects (scaled by max_objects)


def _spline_matrix(size: int, cell: float, offset: float, lattice: int) -> np.ndarray:
    """``(size, lattice)`` weights of a uniform cubic B-spline through lattice points ``cell`` pixels apart."""
    position = np.arange(size) / cell + offset
    base = np.floor(position).astype(np.int64)
    t = (position - base)[:, None]
    # C2-smooth basis: no grid-aligned creases, unlike bilinear upsampling
    basis = np.concatenate([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6
    matrix = np.zeros((size, lattice))
    rows = np.arange(size)
    for k in range(4):
        np.add.at(matrix, (rows, base + k), basis[:, k])
    return matrix


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 1) -> np.ndarray:
    """Smooth random field in ``[0, 1]``: lattice noise of spacing ``cell`` pixels, summed over octaves."""
    total = np.zeros((h, w))
    amplitude = 1.0
    for _ in range(octaves):
        cell = max(cell, 1.0)
        gh, gw = int(np.ceil(h / cell)) + 4, int(np.ceil(w / cell)) + 4
        lattice = rng.random((gh, gw))
        oy, ox = rng.random(2)
        total += amplitude * (_spline_matrix(h, cell, oy, gh) @ lattice @ _spline_matrix(w, cell, ox, gw).T)
        amplitude *= 0.5
        cell /= 2
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-8)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour, sometimes greyish or very dark/bright."""
    colour = rng.random(3)
    if rng.random() < 0.25:  # desaturate
        colour = colour * 0.3 + colour.mean() * 0.7
    return colour


def _near(rng: np.random.Generator, colour: np.ndarray, distance: float) -> np.ndarray:
    """A colour at about ``distance`` (Euclidean, RGB in [0, 1]) from ``colour``."""
    direction = rng.normal(size=3)
    direction /= max(np.linalg.norm(direction), 1e-8)
    return np.clip(colour + distance * direction, 0.0, 1.0)


def _lerp(field: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + field[..., None] * (b - a)


def _rotated(yy: np.ndarray, xx: np.ndarray, center: Sequence[float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(u, v)`` of the grid in a frame centred at ``center`` and turned by ``angle``."""
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _pattern(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, kind: str, size: int) -> np.ndarray:
    """A ``[0, 1]`` field of the given kind (shared by backgrounds and fills)."""
    h, w = yy.shape
    if kind == "flat":
        return np.zeros((h, w))
    if kind == "gradient":
        if rng.random() < 0.7:
            u, _ = _rotated(yy, xx, (h / 2, w / 2), rng.uniform(0, 2 * np.pi))
            field = u
        else:
            field = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w))
        low, high = field.min(), field.max()
        return (field - low) / max(high - low, 1e-8)
    if kind == "noise":
        cell = size * rng.uniform(0.03, 0.3)
        return _smooth_noise(rng, h, w, cell, octaves=int(rng.integers(1, 4)))
    if kind == "stripes":
        u, _ = _rotated(yy, xx, (0, 0), rng.uniform(0, np.pi))
        period = size * rng.uniform(0.04, 0.2)
        wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        return 0.5 + 0.5 * np.tanh(rng.uniform(0.5, 6.0) * wave)
    if kind == "checker":
        u, v = _rotated(yy, xx, (0, 0), rng.uniform(0, np.pi / 2))
        period = size * rng.uniform(0.06, 0.25)
        return 0.5 + 0.5 * np.sign(np.sin(np.pi * u / period) * np.sin(np.pi * v / period))
    if kind == "cells":
        n = int(rng.integers(6, 30))
        seeds = rng.uniform(-0.1, 1.1, size=(n, 2)) * np.array([h, w])
        distance = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        values = rng.random(n)
        return values[np.argmin(distance, axis=-1)]
    if kind == "spots":
        field = _smooth_noise(rng, h, w, size * rng.uniform(0.02, 0.08))
        return (field > rng.uniform(0.55, 0.75)).astype(np.float64)
    raise ValueError(f"unknown pattern kind {kind!r}")


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A backdrop ``(h, w, 3)`` spanning the whole frame, possibly with thin clutter over it."""
    kind = rng.choice(BACKGROUNDS, p=_BACKGROUND_WEIGHTS)
    base = _colour(rng)
    other = _near(rng, base, rng.uniform(0.05, 0.6))
    image = _lerp(_pattern(rng, yy, xx, kind, size), base, other)
    if kind != "noise" and rng.random() < 0.5:  # grain on top of geometric backdrops
        grain = _smooth_noise(rng, *yy.shape, size * rng.uniform(0.02, 0.1)) - 0.5
        image = image + rng.uniform(0.02, 0.15) * grain[..., None]
    if rng.random() < 0.35:
        image = _clutter(rng, image, yy, xx, size)
    return image


def _clutter(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Thin lines and specks: background detail that is never an object (too thin or too small)."""
    for _ in range(int(rng.integers(2, 12))):
        colour = _colour(rng)
        if rng.random() < 0.5:  # a long thin line across the frame
            _, v = _rotated(yy, xx, rng.uniform(0, size, 2), rng.uniform(0, np.pi))
            width = rng.uniform(0.4, 1.2) * size / 128
            alpha = np.clip(width - np.abs(v) + 0.5, 0, 1)
        else:  # a speck
            radius = rng.uniform(0.5, 2.0) * size / 128
            alpha = np.clip(radius - np.hypot(yy - rng.uniform(0, size), xx - rng.uniform(0, size)) + 0.5, 0, 1)
        image = image + alpha[..., None] * rng.uniform(0.3, 1.0) * (colour - image)
    return image


def _shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, kind: str, size: int) -> np.ndarray:
    """Approximate signed distance in pixels to a random shape's outline (positive inside)."""
    center = rng.uniform(0.08, 0.92, size=2) * size
    radius = size * np.exp(rng.uniform(np.log(0.05), np.log(0.4)))
    angle = rng.uniform(0, 2 * np.pi)
    u, v = _rotated(yy, xx, center, angle)
    if kind in ("ellipse", "ring"):
        a, b = radius, radius * rng.uniform(0.4, 1.0)
        rho = np.hypot(u / a, v / b)
        outer = (1.0 - rho) * b
        if kind == "ellipse":
            return outer
        inner = (rho - rng.uniform(0.35, 0.7)) * b
        return np.minimum(outer, inner)
    if kind == "bar":
        length = size * rng.uniform(0.2, 0.7)
        width = max(size * rng.uniform(0.03, 0.08), 3.0)
        return np.minimum(length / 2 - np.abs(u), width / 2 - np.abs(v))
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        if np.max(np.diff(np.append(angles, angles[0] + 2 * np.pi))) > np.pi * 0.95:
            angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi / n)
        stretch = rng.uniform(0.5, 1.0)
        vertices = np.stack([radius * np.cos(angles), radius * stretch * np.sin(angles)], axis=1)
        distance = np.full(u.shape, np.inf)
        for i in range(n):
            p, q = vertices[i], vertices[(i + 1) % n]
            edge = q - p
            normal = np.array([edge[1], -edge[0]]) / max(np.linalg.norm(edge), 1e-8)  # points inwards (ccw)
            distance = np.minimum(distance, (u - p[0]) * normal[0] + (v - p[1]) * normal[1])
        return distance
    # Star-convex outlines: a radius that depends on the angle.
    stretch = rng.uniform(0.6, 1.0)
    rho = np.hypot(u, v / stretch)
    theta = np.arctan2(v / stretch, u)
    if kind == "blob":
        profile = np.ones_like(theta)
        for k in range(2, 6):
            profile += rng.uniform(0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        reach = radius * profile
    elif kind == "star":
        points = int(rng.integers(4, 9))
        inner = rng.uniform(0.4, 0.7)
        reach = radius * (inner + (1 - inner) * np.abs(np.cos(points * theta / 2)) ** rng.uniform(1.0, 3.0))
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return (reach - rho) * stretch


def _fill(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, under: np.ndarray) -> np.ndarray:
    """An object's appearance ``(h, w, 3)``; ``under`` is the mean colour it is drawn over."""
    kind = rng.choice(FILLS, p=_FILL_WEIGHTS)
    if rng.random() < 0.2:  # low contrast: close to what lies underneath
        base = _near(rng, under, rng.uniform(0.06, 0.18))
    else:
        base = _colour(rng)
    other = _near(rng, base, rng.uniform(0.05, 0.5))
    return _lerp(_pattern(rng, yy, xx, kind, size), base, other)


def _shading(rng: np.random.Generator, distance: np.ndarray, size: int) -> np.ndarray:
    """Brightness factor that darkens (or lightens) towards the outline, as on a rounded surface."""
    depth = np.clip(distance / (size * rng.uniform(0.03, 0.12)), 0, 1)
    strength = rng.uniform(0.15, 0.45) * (1 if rng.random() < 0.8 else -1)
    return 1.0 - strength * (1.0 - np.sqrt(depth))


def generate(rng: np.random.Generator, height: int, width: int, max_objects: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One objects image and the visible mask of each object.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.
        max_objects: most objects in one image (at least one is always visible).

    Returns:
        ``image`` uint8 ``(h, w, 3)`` and ``masks`` bool ``(n, h, w)``, one non-empty mask per visible object
        in drawing order (a later object hides what it covers of earlier ones).

    >>> image, masks = generate(np.random.default_rng(0), 64, 64)
    >>> image.shape, image.dtype, masks.dtype, masks.shape[1:]
    ((64, 64, 3), dtype('uint8'), dtype('bool'), (64, 64))
    """
    if height < 8 or width < 8:
        raise ValueError(f"height and width must be at least 8 pixels, got {height}x{width}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    size = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = _background(rng, yy, xx, size)
    weights = np.asarray(_COUNT_WEIGHTS[:max_objects] if max_objects <= 5 else np.ones(max_objects))
    count = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    masks: list[np.ndarray] = []
    for _ in range(count):
        distance = _shape(rng, yy, xx, rng.choice(SHAPES, p=_SHAPE_WEIGHTS), size)
        inside = distance >= 0
        if inside.sum() < 4:
            continue
        alpha = np.clip(distance + 0.5, 0.0, 1.0)
        if rng.random() < 0.25:  # soft drop shadow: dark, but not part of the object
            shift = rng.normal(0, 0.03 * size, 2)
            shadow = ndimage.gaussian_filter(ndimage.shift(alpha, shift, order=1), 0.02 * size + 0.5)
            image = image * (1 - rng.uniform(0.2, 0.5) * shadow[..., None])
        under = image[inside].mean(axis=0)
        appearance = _fill(rng, yy, xx, size, under)
        if rng.random() < 0.4:
            appearance = appearance * _shading(rng, distance, size)[..., None]
        image = image + alpha[..., None] * (appearance - image)
        masks = [m & ~inside for m in masks]
        masks.append(inside)
    masks = [m for m in masks if m.any()]
    if not masks:  # every object fell outside the frame: draw a plain ellipse in the middle
        u, v = _rotated(yy, xx, (height / 2, width / 2), 0.0)
        distance = (1.0 - np.hypot(u / (0.2 * size), v / (0.15 * size))) * 0.15 * size
        image = image + np.clip(distance + 0.5, 0, 1)[..., None] * (_colour(rng) - image)
        masks = [distance >= 0]
    image = _finish(rng, image, size)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), np.stack(masks)


def _finish(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """Camera-like variation: illumination, contrast and gamma, defocus, sensor noise."""
    if rng.random() < 0.3:
        light = _smooth_noise(rng, *image.shape[:2], size * 0.5)
        image = image * (1 - rng.uniform(0.1, 0.4) * light[..., None])
    image = (image - 0.5) * rng.uniform(0.7, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.3:
        image = ndimage.gaussian_filter(image, (rng.uniform(0.3, 1.0) * size / 128,) * 2 + (0,))
    if rng.random() < 0.6:
        image = image + rng.normal(0, rng.uniform(0.005, 0.04), image.shape)
    return image


def sample(seed: int | Sequence[int], size: int = 128, max_objects: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The objects image of a seed (an int or a sequence of ints, as ``numpy.random.default_rng`` takes).

    Args:
        seed: the image's seed; the same seed always gives the same image and masks.
        size: side length of the square image.
        max_objects: most objects in one image.

    >>> image, masks = sample(0, size=32)
    >>> bool(np.array_equal(image, sample(0, size=32)[0]))
    True
    """
    return generate(np.random.default_rng(seed), size, size, max_objects)


def foreground(masks: np.ndarray) -> np.ndarray:
    """Union of instance masks ``(n, h, w)``: the prompt-free target.

    >>> foreground(np.array([[[True, False]], [[False, False]]])).tolist()
    [[True, False]]
    """
    return np.asarray(masks, dtype=bool).any(axis=0)
