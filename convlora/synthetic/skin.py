"""Dermoscopy-like skin lesions (imitates ISIC 2017): a pigmented patch with a fuzzy, irregular border.

What makes it hard: the border fades gradually over a width that changes along the outline (so the mask
edge is a judgement, not a colour step), the inside mixes light and dark browns, blue-grey veils, dots and a
pigment network, dark hairs cross lesion and skin alike, and the dermoscope darkens the corners.
"""

from __future__ import annotations

import numpy as np

from . import textures as tx


def _skin(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    tone = tx.jitter_colour(rng, (0.86, 0.66, 0.56), 0.07)
    blotches = tx.fractal_noise(rng, h, w, cell=50 * scale, octaves=3)
    base = tx.palette_map(blotches, [tone * 0.93, tone, np.clip(tone * 1.05 + 0.02, 0, 1)])
    # Skin furrows: a faint crisscross of fine ridges.
    _, furrow_dist = tx.voronoi(rng, h, w, int(h * w / (14 * scale) ** 2), jitter=0.9)
    lines = np.exp(-((furrow_dist / (0.7 * scale)) ** 2))
    pores = tx.fractal_noise(rng, h, w, cell=3 * scale, octaves=1)
    return base * (1 - 0.025 * lines[..., None] - 0.04 * pores[..., None])


def _pigment(rng: np.random.Generator, h: int, w: int, scale: float, core: np.ndarray) -> np.ndarray:
    light = tx.jitter_colour(rng, (0.62, 0.42, 0.30), 0.06)
    dark = tx.jitter_colour(rng, (0.30, 0.17, 0.11), 0.05)
    veil = tx.jitter_colour(rng, (0.42, 0.44, 0.52), 0.05)
    field = tx.fractal_noise(rng, h, w, cell=30 * scale, octaves=4, persistence=0.6)
    # Darker towards the core of the lesion, lighter towards the rim.
    field = np.clip(field * 0.7 + core * rng.uniform(0.2, 0.6), 0, 1)
    image = tx.palette_map(field, [light, (light + dark) / 2, dark])
    veil_alpha = np.clip((tx.fractal_noise(rng, h, w, cell=25 * scale, octaves=2) - 0.65) * 4, 0, 1)
    image = tx.composite(image, veil, veil_alpha * rng.choice([0.0, 0.0, 0.4, 0.7]))
    _, mesh = tx.voronoi(rng, h, w, int(h * w / (5 * scale) ** 2), jitter=0.8)
    network = np.exp(-((mesh / (0.6 * scale)) ** 2))
    image = image * (1 - rng.uniform(0.0, 0.2) * tx.blur(network, 0.4 * scale)[..., None])
    dots = (tx.fractal_noise(rng, h, w, cell=3 * scale, octaves=1) > rng.uniform(0.85, 0.97)).astype(float)
    return tx.composite(image, dark * 0.7, tx.blur(dots, 0.5 * scale))


def _hairs(rng: np.random.Generator, h: int, w: int, scale: float, count: int) -> np.ndarray:
    strokes = []
    for _ in range(count):
        start = (rng.uniform(-0.2, 1.2) * h, rng.uniform(-0.2, 1.2) * w)
        curve = tx.random_walk_curve(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(40, 160) * scale,
                                     step=scale, turn=0.02, smoothness=20)  # fmt: skip
        width = rng.uniform(0.5, 1.3) * scale
        strokes.append((curve, np.linspace(width, width * rng.uniform(0.3, 1.0), len(curve))))
    return tx.draw_strokes(h, w, strokes)


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy image and its {0, 255} lesion mask.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, sorted(set(mask.ravel().tolist())) == [0, 255]
    ((96, 128, 3), True)
    """
    h, w = height, width
    scale = min(h, w) / 128
    image = _skin(rng, h, w, scale)

    radius = rng.uniform(0.15, 0.38) * min(h, w)
    center = (h / 2 + rng.normal(0, 0.08) * h, w / 2 + rng.normal(0, 0.08) * w)
    yy, xx = tx.grid(h, w)
    # Border sharpness changes around the lesion: crisp on some sides, a wide gradient on others.
    theta = np.arctan2(yy - center[0], xx - center[1])
    wobble = tx.fourier_wobble(rng, theta, 3, decay=0.0)
    softness = scale * rng.uniform(1.5, 4.0) * np.exp(0.6 * wobble)
    alpha = tx.radial_blob(rng, h, w, center, radius, irregularity=rng.uniform(0.1, 0.3), harmonics=9,
                           elongation=rng.uniform(1.0, 1.6), softness=softness, warp_amount=0.12 * radius)  # fmt: skip
    opacity = rng.uniform(0.4, 0.95)
    core = tx.blur(alpha, 0.3 * radius)
    image = tx.composite(image, _pigment(rng, h, w, scale, core), alpha * opacity)

    # A few freckles elsewhere: pigmented, but not the lesion.
    for _ in range(rng.integers(0, 4)):
        spot = tx.radial_blob(rng, h, w, (rng.uniform(0, h), rng.uniform(0, w)), rng.uniform(1.5, 4) * scale,
                              softness=scale)  # fmt: skip
        image = tx.composite(image, np.array([0.55, 0.36, 0.26]), spot * (1 - alpha) * rng.uniform(0.4, 0.8))

    hairs = _hairs(rng, h, w, scale, int(rng.choice([0, 0, 2, 5, 10, 18])))
    image = tx.composite(image, tx.jitter_colour(rng, (0.18, 0.12, 0.10), 0.05), hairs * rng.uniform(0.7, 1.0))

    if rng.random() < 0.6:  # dermoscope field of view: dark, round-cornered frame
        image = image * tx.vignette(h, w, strength=rng.uniform(0.7, 1.0), radius=rng.uniform(1.05, 1.35),
                                    hardness=rng.uniform(4, 12))[..., None]  # fmt: skip
    image = image * tx.vignette(h, w, strength=0.25, radius=0.9, hardness=2.0)[..., None]
    image = tx.add_sensor_noise(rng, image, 0.01)
    return tx.to_uint8(image), tx.binary_mask(alpha)
