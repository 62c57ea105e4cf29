"""Leaf disease (imitates leaf-disease segmentation sets): the mask is the lesions on a leaf, not the leaf.

What makes it hard: a generic model segments the salient object, the leaf, but the target is its brown
necrotic spots and blotches; these sit inside yellow halos that are not part of the mask, among healthy
variegation and veins, and often on soil that has the same browns as the lesions.
"""

from __future__ import annotations

import numpy as np

from . import textures as tx


def _background(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # soil
        field = tx.fractal_noise(rng, h, w, cell=25 * scale, octaves=5, persistence=0.6)
        return tx.palette_map(field, [(0.22, 0.15, 0.09), (0.42, 0.31, 0.20), (0.60, 0.48, 0.34)])
    if kind == 1:  # out-of-focus foliage
        field = tx.blur(tx.fractal_noise(rng, h, w, cell=20 * scale, octaves=3), 2 * scale)
        return tx.palette_map(field, [(0.05, 0.12, 0.04), (0.18, 0.30, 0.10), (0.45, 0.52, 0.30)])
    tone = tx.jitter_colour(rng, (0.82, 0.82, 0.80), 0.08)  # bench or paper, unevenly lit
    return tone * (0.8 + 0.2 * tx.fractal_noise(rng, h, w, cell=80 * scale, octaves=2))[..., None]


def _leaf(rng: np.random.Generator, h: int, w: int, scale: float) -> tuple[np.ndarray, np.ndarray, list]:
    """Soft leaf mask, the leaf's local coordinates ``(u, v)`` and its vein strokes."""
    length = rng.uniform(0.35, 0.55) * min(h, w)  # half-length
    breadth = length * rng.uniform(0.35, 0.65)  # maximum half-width
    center = np.array([rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w])
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([axis[1], -axis[0]])
    yy, xx = tx.grid(h, w)
    dy, dx = yy - center[0], xx - center[1]
    u = (dy * axis[0] + dx * axis[1]) / length  # -1 at the stalk, +1 at the tip
    v = dy * normal[0] + dx * normal[1]
    skew = rng.uniform(-0.4, 0.1)  # broadest part towards the stalk (ovate) or the middle
    profile = breadth * np.clip(1 - u**2, 0, None) ** 0.6 * (1 + skew * u)
    teeth = 1 + rng.uniform(0.0, 0.04) * np.sin(u * rng.uniform(25, 45))  # serrated margin
    alpha = tx.sigmoid((profile * teeth - np.abs(v)) / (0.4 * scale)) * (np.abs(u) < 1.05)

    # Veins: midrib plus pairs of side veins curving towards the tip.
    def to_image(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        return center + np.outer(uu * length, axis) + np.outer(vv, normal)

    strokes = [(to_image(np.linspace(-1.25, 0.95, 40), np.zeros(40)), np.linspace(2.2, 0.6, 40) * scale)]
    for start in np.linspace(-0.75, 0.65, int(rng.integers(4, 8))):
        for side in (-1, 1):
            t = np.linspace(0, 1, 12)
            reach = breadth * (1 - start**2) ** 0.6 * 0.85
            strokes.append((to_image(start + 0.35 * t**1.3, side * reach * t), np.linspace(1.0, 0.4, 12) * scale))
    return alpha, np.stack([u, v / breadth], -1), strokes


def _spot(
    rng: np.random.Generator, core: np.ndarray, halo: np.ndarray, pos: np.ndarray, radius: float, scale: float
) -> None:
    """Add one small round lesion to ``core`` and its halo to ``halo``, drawing only in a window around it."""
    halo_width = rng.uniform(1.5, 3.5) * scale
    reach = int(np.ceil(radius * 1.6 + halo_width + 4 * scale))
    y0, x0 = int(pos[0]) - reach, int(pos[1]) - reach
    ys, xs = slice(max(y0, 0), max(y0 + 2 * reach, 0)), slice(max(x0, 0), max(x0 + 2 * reach, 0))
    spot, dist = tx.radial_blob(rng, 2 * reach, 2 * reach, (pos[0] - y0, pos[1] - x0), radius, irregularity=0.2,
                                harmonics=4, softness=0.6 * scale, return_distance=True)  # fmt: skip
    window = (slice(ys.start - y0, ys.start - y0 + core[ys, xs].shape[0]),
              slice(xs.start - x0, xs.start - x0 + core[ys, xs].shape[1]))  # fmt: skip
    core[ys, xs] = np.maximum(core[ys, xs], spot[window])
    halo[ys, xs] = np.maximum(halo[ys, xs], tx.sigmoid(-(dist[window] - halo_width) / (1.2 * scale)))


def _render(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """The leaf photo with its parts (for tests): ``image``, ``mask`` ({0, 255} lesions) and ``leaf`` (soft alpha)."""
    h, w = height, width
    scale = min(h, w) / 128
    image = _background(rng, h, w, scale)
    leaf, uv, veins = _leaf(rng, h, w, scale)

    green = tx.jitter_colour(rng, (0.30, 0.52, 0.16), 0.06)
    tone = tx.fractal_noise(rng, h, w, cell=30 * scale, octaves=4)
    surface = tx.palette_map(tone, [green * 0.7, green, np.clip(green * 1.25 + 0.05, 0, 1)])
    # Healthy variegation: pale yellow-green patches that are not disease.
    pale = np.clip((tx.fractal_noise(rng, h, w, cell=25 * scale, octaves=3) - 0.65) * 4, 0, 1)
    surface = tx.composite(surface, np.array([0.62, 0.70, 0.30]), pale * rng.uniform(0.0, 0.6))
    surface = tx.composite(surface, np.clip(green * 1.35 + 0.1, 0, 1), tx.draw_strokes(h, w, veins) * 0.6)
    surface = surface * (0.85 + 0.3 * np.clip(uv[..., 1:2] * rng.uniform(-0.5, 0.5) + 0.5, 0, 1))  # leaf curl

    # Lesions: clusters of round spots plus, sometimes, a blight blotch; necrotic core inside a yellow halo.
    core, halo = np.zeros((h, w)), np.zeros((h, w))
    inside = np.argwhere(leaf > 0.9)
    clusters = int(rng.integers(1, 4))
    for attempt in range(12):
        if attempt >= clusters and (core * leaf).mean() > 0.015:
            break
        at = inside[rng.integers(len(inside))]
        if rng.random() < 0.25:  # blight blotch
            radius = rng.uniform(6, 16) * scale
            spot, dist = tx.radial_blob(rng, h, w, at, radius, irregularity=0.35, harmonics=8, softness=scale,
                                        warp_amount=0.3 * radius, return_distance=True)  # fmt: skip
            core = np.maximum(core, spot)
            halo = np.maximum(halo, tx.sigmoid(-(dist - rng.uniform(2, 4) * scale) / (1.5 * scale)))
            continue
        for _ in range(rng.integers(3, 12)):
            _spot(rng, core, halo, at + rng.normal(0, 10 * scale, 2), rng.uniform(1.2, 4.5) * scale, scale)
    core, halo = core * leaf, halo * leaf
    necrotic = tx.palette_map(tx.fractal_noise(rng, h, w, cell=4 * scale, octaves=2),
                              [(0.25, 0.14, 0.06), (0.45, 0.30, 0.14), (0.62, 0.48, 0.28)])  # fmt: skip
    surface = tx.composite(surface, tx.jitter_colour(rng, (0.78, 0.72, 0.22), 0.06), halo * rng.uniform(0.5, 0.9))
    surface = tx.composite(surface, necrotic, core)

    # The leaf casts a soft shadow on its background.
    offset = np.round(rng.uniform(1, 4, 2) * scale).astype(int)
    cast = np.roll(tx.blur(leaf, 2 * scale), tuple(offset), axis=(0, 1))
    image = image * (1 - 0.4 * cast)[..., None]
    image = tx.composite(image, surface, leaf)
    image = tx.add_sensor_noise(rng, tx.blur(image, 0.4 * scale), 0.01)
    return {"image": tx.to_uint8(image), "mask": tx.binary_mask(core), "leaf": leaf}


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One diseased-leaf photo and its {0, 255} lesion mask.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, mask.shape
    ((96, 128, 3), (96, 128))
    """
    scene = _render(rng, height, width)
    return scene["image"], scene["mask"]
