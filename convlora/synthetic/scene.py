"""Multi-class scenes (stands in for Trans10K-style multi-class sets): eight object classes on a textured ground.

Each class has its own shape family and surface signature (shading, stripes, dots, checks, planks, a
metallic sheen, fluff or bands); colour is only a weak cue because hues overlap between classes.
Instances overlap in painter's order, so classes must be told apart by partial shapes. Class 0 is
the background.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import textures as tx

CLASS_NAMES = ("background", "ball", "crate", "pennant", "star", "ring", "cross", "cloud", "rope")

# Preferred hue of each class (turns); each instance draws its hue within +-0.2 of it, so hues overlap.
_HUES = {"ball": 0.0, "crate": 0.08, "pennant": 0.6, "star": 0.15, "ring": 0.12, "cross": 0.35, "cloud": 0.55,
         "rope": 0.8}  # fmt: skip

Look = tuple[np.ndarray, np.ndarray]  # (alpha (h, w), colours (h, w, 3))
Painter = Callable[..., Look]


def _frame(h: int, w: int, center: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Local coordinates ``(u, v)`` of every pixel in a frame centred at ``center`` and rotated by ``angle``."""
    yy, xx = tx.grid(h, w)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    """Antialiased coverage of the rectangle ``|u| < half_u, |v| < half_v``."""
    return np.clip(half_u - np.abs(u) + 0.5, 0, 1) * np.clip(half_v - np.abs(v) + 0.5, 0, 1)


def _ball(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    radius = size / 2
    alpha = tx.radial_blob(rng, h, w, center, radius, irregularity=0.02, harmonics=2, softness=0.6)
    yy, xx = tx.grid(h, w)
    ny, nx = (yy - center[0]) / radius, (xx - center[1]) / radius
    nz = np.sqrt(np.clip(1 - ny**2 - nx**2, 0, 1))
    light = np.array([-0.5, -0.4, 0.77])
    diffuse = np.clip(ny * light[0] + nx * light[1] + nz * light[2], 0, 1)
    glint = np.clip((ny * 0.28 + nx * 0.22 + nz * 0.93), 0, 1) ** 40
    return alpha, colour * (0.25 + 0.85 * diffuse)[..., None] + glint[..., None] * 0.8


def _crate(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    u, v = _frame(h, w, center, rng.uniform(0, np.pi))
    hu, hv = size / 2, size / 2 * rng.uniform(0.6, 1.0)
    alpha = _box(u, v, hu, hv)
    planks = 0.5 + 0.5 * np.sin(2 * np.pi * v / (size / 4.5) + 3 * tx.value_noise(rng, h, w, max(size / 5, 2)))
    border = (np.abs(u) > hu - size * 0.1) | (np.abs(v) > hv - size * 0.1)
    tone = (0.7 + 0.3 * planks) * np.where(border, 0.65, 1.0)
    return alpha, colour * tone[..., None]


def _pennant(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    verts = tx.regular_polygon(center, size / 1.6, 3, rng.uniform(0, 2 * np.pi))
    verts = verts + rng.normal(0, size / 12, verts.shape)
    alpha = tx.polygon_mask(h, w, verts)
    u, _ = _frame(h, w, center, rng.uniform(0, np.pi))
    stripes = np.sin(2 * np.pi * u / (size / 4)) > 0
    other = tx.hsv(rng.random(), 0.3, 0.95)
    return alpha, np.where(stripes[..., None], colour, other)


def _star(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    points = int(rng.integers(5, 8))
    r_out = size / 1.7
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_out * rng.uniform(0.4, 0.55))
    t = rng.uniform(0, 2 * np.pi) + np.pi * np.arange(2 * points) / points
    verts = np.stack([center[0] + radii * np.sin(t), center[1] + radii * np.cos(t)], 1)
    alpha = tx.polygon_mask(h, w, verts)
    yy, xx = tx.grid(h, w)
    period = max(size / 5, 3.0)
    dots = (np.sin(2 * np.pi * yy / period) * np.sin(2 * np.pi * xx / period)) > 0.55
    return alpha, np.where(dots[..., None], colour * 0.45, colour)


def _ring(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    yy, xx = tx.grid(h, w)
    r = np.hypot(yy - center[0], xx - center[1])
    outer, inner = size / 2, size / 2 * rng.uniform(0.45, 0.65)
    alpha = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)
    theta = np.arctan2(yy - center[0], xx - center[1])
    sheen = 0.5 + 0.5 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    metal = 0.55 * colour + 0.45 * np.array([0.8, 0.8, 0.8])
    return alpha, metal * (0.45 + 0.75 * sheen)[..., None]


def _cross(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    u, v = _frame(h, w, center, rng.uniform(0, np.pi / 2))
    arm = size * rng.uniform(0.14, 0.2)
    alpha = np.maximum(_box(u, v, size / 2, arm), _box(u, v, arm, size / 2))
    period = max(size / 6, 2.5)
    checks = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    return alpha, np.where(checks[..., None], colour, colour * 0.35 + 0.55)


def _cloud(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    alpha = tx.radial_blob(rng, h, w, center, size / 2, irregularity=0.3, harmonics=12,
                           elongation=rng.uniform(1.2, 1.8), softness=1.5)  # fmt: skip
    fluff = tx.fractal_noise(rng, h, w, cell=max(size / 3, 4), octaves=3)
    pale = 0.35 * colour + 0.65
    return alpha, pale * (0.75 + 0.3 * fluff)[..., None]


def _rope(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float, colour: np.ndarray) -> Look:
    heading = rng.uniform(0, 2 * np.pi)
    start = center - size * np.array([np.sin(heading), np.cos(heading)])
    curve = tx.random_walk_curve(rng, start, heading, 2 * size, step=1.0, turn=0.03, smoothness=12)
    width = size * rng.uniform(0.2, 0.3)
    alpha = tx.draw_strokes(h, w, [(curve, width)])
    u, _ = _frame(h, w, center, heading)
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * u / max(width * 0.8, 2.5))
    return alpha, colour * (0.5 + 0.5 * bands)[..., None]


PAINTERS: dict[str, Painter] = {"ball": _ball, "crate": _crate, "pennant": _pennant, "star": _star,
                                "ring": _ring, "cross": _cross, "cloud": _cloud, "rope": _rope}  # fmt: skip


def _render(rng: np.random.Generator, height: int, width: int) -> dict:
    """The scene with its instances (for tests).

    Returns:
        ``image`` (uint8 ``(h, w, 3)``), ``mask`` (uint8 class ids) and ``instances``: a list of
        ``(class_id, full_mask)`` in painting order, each full mask the instance's whole (unoccluded) extent.
    """
    h, w = height, width
    scale = min(h, w) / 128
    ground = tx.hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.75))
    field = tx.fractal_noise(rng, h, w, cell=rng.uniform(10, 40) * scale, octaves=4)
    image = ground * (0.7 + 0.5 * field)[..., None]
    labels = np.zeros((h, w), dtype=np.uint8)
    instances = []
    centers: list[np.ndarray] = []
    for _ in range(rng.integers(3, 8)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        size = rng.uniform(0.2, 0.42) * min(h, w)
        if centers and rng.random() < 0.5:  # next to an earlier instance, so they overlap
            center = centers[rng.integers(len(centers))] + rng.normal(0, 0.5 * size, 2)
        else:
            center = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
        centers.append(center)
        name = CLASS_NAMES[cls]
        colour = tx.hsv(_HUES[name] + rng.uniform(-0.2, 0.2), rng.uniform(0.4, 0.9), rng.uniform(0.55, 0.95))
        alpha, look = PAINTERS[name](rng, h, w, center, size, colour)
        shadow = np.roll(tx.blur(alpha, 1.5 * scale), (int(2 * scale), int(2 * scale)), axis=(0, 1))
        image = image * (1 - 0.35 * shadow)[..., None]
        image = tx.composite(image, np.clip(look, 0, 1), alpha)
        labels[alpha > 0.5] = cls
        instances.append((cls, alpha > 0.5))
    image = tx.add_sensor_noise(rng, tx.blur(image, 0.3 * scale), 0.01)
    return {"image": tx.to_uint8(image), "mask": labels, "instances": instances}


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One multi-class scene and its class-id mask (0 background, 1..8 as in ``CLASS_NAMES``).

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, int(mask.max()) < len(CLASS_NAMES)
    ((96, 128, 3), True)
    """
    scene = _render(rng, height, width)
    return scene["image"], scene["mask"]
