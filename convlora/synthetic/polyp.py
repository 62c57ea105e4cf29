"""Colonoscopy-like polyps (imitates Kvasir-SEG): a pink dome on reddish mucosa with folds and vessels.

What makes it hard: the polyp is made of the same tissue as its surroundings (same texture, a slightly
paler hue), part of its outline has almost no colour step and is visible only through shading, and wet
specular highlights appear on the folds of the background as well as on the polyp.
"""

from __future__ import annotations

import numpy as np

from . import textures as tx


def _mucosa(rng: np.random.Generator, h: int, w: int, scale: float, tint: np.ndarray) -> np.ndarray:
    field = tx.fractal_noise(rng, h, w, cell=40 * scale, octaves=5, persistence=0.55)
    dark, mid, light = tint * 0.55, tint, np.clip(tint * 1.25 + 0.08, 0, 1)
    return tx.palette_map(field, [dark, mid, light], [0.0, 0.55, 1.0])


def _vessels(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    strokes = []
    for _ in range(rng.integers(3, 9)):
        start = (rng.uniform(0, h), rng.uniform(0, w))
        curve = tx.random_walk_curve(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(30, 90) * scale,
                                     step=scale, turn=0.06, smoothness=10)  # fmt: skip
        strokes.append((curve, rng.uniform(0.5, 1.1) * scale))
        # a branch or two off the main vessel
        for _ in range(rng.integers(0, 3)):
            at = curve[rng.integers(len(curve))]
            branch = tx.random_walk_curve(rng, at, rng.uniform(0, 2 * np.pi), rng.uniform(8, 25) * scale,
                                          step=scale, turn=0.1, smoothness=6)  # fmt: skip
            strokes.append((branch, rng.uniform(0.4, 0.9) * scale))
    return tx.blur(tx.draw_strokes(h, w, strokes), 0.6 * scale)


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One polyp image and its {0, 255} mask.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, mask.shape, image.dtype
    ((96, 128, 3), (96, 128), dtype('uint8'))
    """
    h, w = height, width
    scale = min(h, w) / 128
    tint = tx.jitter_colour(rng, (0.78, 0.36, 0.30), 0.06)
    image = _mucosa(rng, h, w, scale, tint)

    # Background relief: broad undulation plus mucosal folds (ridges of a warped noise field).
    fold_field = tx.warp(rng, tx.fractal_noise(rng, h, w, cell=70 * scale, octaves=2), 8 * scale, 30 * scale)
    folds = np.exp(-(((fold_field - rng.uniform(0.35, 0.65)) / 0.09) ** 2))
    relief = (8.0 * tx.fractal_noise(rng, h, w, cell=60 * scale, octaves=2) + rng.uniform(3.0, 7.0) * folds
              + 0.6 * tx.fractal_noise(rng, h, w, cell=5 * scale, octaves=2)) * scale  # fmt: skip

    # Polyps: one or two domes of the same tissue, paler and pinker, with the colour step fading out
    # along part of the outline.
    alpha = np.zeros((h, w))
    dome = np.zeros((h, w))
    for _ in range(1 if rng.random() < 0.7 else 2):
        radius = rng.uniform(0.12, 0.28) * min(h, w)
        center = (rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w)
        blob = tx.radial_blob(rng, h, w, center, radius, irregularity=0.18, harmonics=4,
                              elongation=rng.uniform(1.0, 1.5), softness=1.2 * scale)  # fmt: skip
        alpha = np.maximum(alpha, blob)
        dome = np.maximum(dome, tx.blur(blob, 0.3 * radius) * radius * rng.uniform(0.7, 1.1))
    yy, xx = tx.grid(h, w)
    cy, cx = (yy * alpha).sum() / max(alpha.sum(), 1), (xx * alpha).sum() / max(alpha.sum(), 1)
    theta = np.arctan2(yy - cy, xx - cx)
    faint_dir = rng.uniform(0, 2 * np.pi)
    contrast = rng.uniform(0.65, 1.0) * (0.15 + 0.85 * tx.sigmoid(3 * np.cos(theta - faint_dir) + 1.0))
    polyp_tissue = _mucosa(rng, h, w, scale, np.clip(tint * np.array([1.08, 1.15, 1.2]) + 0.06, 0, 1))
    polyp_alpha = tx.blur(alpha, 1.5 * scale) * contrast
    image = tx.composite(image, polyp_tissue, polyp_alpha)

    vessels = _vessels(rng, h, w, scale) * rng.uniform(0.3, 0.6) * (1 - 0.7 * alpha)
    image = tx.composite(image, np.array([0.5, 0.1, 0.16]), vessels)

    tilt, azimuth = rng.uniform(0.5, 0.8), rng.uniform(0, 2 * np.pi)
    light = (np.sin(tilt) * np.sin(azimuth), np.sin(tilt) * np.cos(azimuth), np.cos(tilt))
    diffuse, specular = tx.shade(relief + dome, light=light, shininess=rng.uniform(150, 300))
    image = image * (0.45 + 0.7 * diffuse[..., None])
    glints = np.clip(specular * 2.0, 0, 1)
    image = tx.composite(image, np.array([1.0, 0.97, 0.95]), glints)

    # Endoscope optics: vignetting, a dark octagonal frame, slight blur and sensor noise.
    image = image * tx.vignette(h, w, strength=rng.uniform(0.3, 0.6), radius=0.9)[..., None]
    r = np.abs((yy - h / 2) / (h / 2)) + np.abs((xx - w / 2) / (w / 2))
    frame = (r < rng.uniform(1.55, 1.9)).astype(float)
    image = image * frame[..., None]
    image = tx.add_sensor_noise(rng, tx.blur(image, 0.5 * scale), 0.01)
    return tx.to_uint8(image), tx.binary_mask(alpha * frame)
