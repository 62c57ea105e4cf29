"""Camouflaged objects (imitates CAMO / COD10K): an animal-like shape wearing its surroundings' pattern.

What makes it hard: the object is filled with a texture of the same family as the background (mottled,
pebbles, stripes or speckles) with only slightly shifted scale and colours, so its mean colour matches the
background; what gives it away is a subtle change of pattern statistics, weak self-shading and its shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import textures as tx

FAMILIES = ("mottled", "pebbles", "stripes", "speckle")

# Natural colour schemes (dark, mid, light): foliage, sand, rock, leaf litter, seabed.
PALETTES = np.array([
    [(0.16, 0.24, 0.10), (0.34, 0.45, 0.20), (0.58, 0.62, 0.36)],
    [(0.52, 0.42, 0.28), (0.72, 0.62, 0.44), (0.88, 0.80, 0.62)],
    [(0.28, 0.28, 0.27), (0.50, 0.49, 0.46), (0.72, 0.71, 0.67)],
    [(0.26, 0.16, 0.08), (0.48, 0.33, 0.18), (0.70, 0.55, 0.34)],
    [(0.10, 0.22, 0.24), (0.22, 0.42, 0.40), (0.50, 0.64, 0.56)],
])  # fmt: skip


def _texture(rng: np.random.Generator, h: int, w: int, family: str, p: dict[str, Any]) -> np.ndarray:
    """Draw one texture of ``family`` with parameters ``p`` (``cell`` in pixels, ``palette`` (3, 3), ...)."""
    cell, palette = p["cell"], p["palette"]
    if family == "mottled":
        field = tx.fractal_noise(rng, h, w, cell=cell, octaves=4, persistence=p["rough"])
        return tx.palette_map(field, palette, [0.0, p["mid"], 1.0])
    if family == "pebbles":
        ids, border = tx.voronoi(rng, h, w, max(int(h * w / cell**2), 2), jitter=0.9)
        tone = rng.random(int(ids.max()) + 1)[ids]
        image = tx.palette_map(0.15 + 0.7 * tone, palette, [0.0, p["mid"], 1.0])
        shading = 1 - p["rough"] * np.exp(-border / (0.08 * cell))
        grain = tx.value_noise(rng, h, w, cell=max(cell / 6, 1.0))
        return image * (shading * (0.92 + 0.16 * grain))[..., None]
    if family == "stripes":
        yy, xx = tx.grid(h, w)
        along = xx * np.cos(p["angle"]) + yy * np.sin(p["angle"])
        phase = 2 * np.pi * along / cell + 6.0 * tx.fractal_noise(rng, h, w, cell=2 * cell, octaves=2)
        field = 0.5 + 0.5 * np.sin(phase)
        field = 0.8 * field + 0.2 * tx.fractal_noise(rng, h, w, cell=cell / 2, octaves=2)
        return tx.palette_map(field, palette, [0.0, p["mid"], 1.0])
    # speckle: mid-tone ground with dark and light spots
    ground = tx.palette_map(0.5 + 0.2 * (tx.fractal_noise(rng, h, w, cell=2 * cell, octaves=3) - 0.5),
                            palette, [0.0, 0.5, 1.0])  # fmt: skip
    spots = tx.fractal_noise(rng, h, w, cell=cell / 2, octaves=2)
    dark = np.clip((spots - p["mid"] - 0.2) * 8, 0, 1)
    light = np.clip((0.2 - spots + p["rough"] * 0.2) * 8, 0, 1)
    return tx.composite(tx.composite(ground, palette[0], dark), palette[2], light * 0.6)


def _perturb(rng: np.random.Generator, p: dict[str, Any], strength: float) -> dict[str, Any]:
    """Parameters of a sibling texture: scale, roughness and colours nudged by ``strength`` (0..1)."""
    return {
        "cell": p["cell"] * np.exp(rng.uniform(-0.35, 0.35) * strength),
        "rough": float(np.clip(p["rough"] + rng.uniform(-0.15, 0.15) * strength, 0.2, 0.8)),
        "mid": float(np.clip(p["mid"] + rng.uniform(-0.1, 0.1) * strength, 0.3, 0.7)),
        "angle": p["angle"] + rng.uniform(-0.6, 0.6) * strength,
        "palette": np.clip(p["palette"] + rng.uniform(-0.05, 0.05, (1, 3)) * strength, 0, 1),
    }


def _animal(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Soft mask of an irregular body with a few tapering limbs."""
    radius = rng.uniform(0.14, 0.26) * min(h, w)
    center = np.array([rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w])
    body = tx.radial_blob(rng, h, w, center, radius, irregularity=0.25, harmonics=7,
                          elongation=rng.uniform(1.0, 2.2), softness=0.8 * scale,
                          warp_amount=0.25 * radius)  # fmt: skip
    limbs = []
    for _ in range(rng.integers(0, 5)):
        heading = rng.uniform(0, 2 * np.pi)
        start = center + 0.6 * radius * np.array([np.sin(heading), np.cos(heading)])
        curve = tx.random_walk_curve(rng, start, heading, rng.uniform(0.8, 1.8) * radius, step=scale, turn=0.05)
        width = rng.uniform(0.15, 0.35) * radius
        limbs.append((curve, np.linspace(width, width * 0.2, len(curve))))
    return np.maximum(body, tx.draw_strokes(h, w, limbs)) if limbs else body


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One camouflage scene and its {0, 255} object mask.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, mask.dtype
    ((96, 128, 3), dtype('uint8'))
    """
    h, w = height, width
    scale = min(h, w) / 128
    family = FAMILIES[rng.integers(len(FAMILIES))]
    palette = np.clip(PALETTES[rng.integers(len(PALETTES))] + rng.uniform(-0.06, 0.06, (1, 3)), 0, 1)
    params = {"cell": rng.uniform(8, 22) * scale, "rough": rng.uniform(0.35, 0.65), "mid": rng.uniform(0.4, 0.6),
              "angle": rng.uniform(0, np.pi), "palette": palette}  # fmt: skip
    image = _texture(rng, h, w, family, params)

    mask = np.zeros((h, w))
    for _ in range(1 if rng.random() < 0.8 else 2):
        alpha = _animal(rng, h, w, scale)
        skin = _texture(rng, h, w, family, _perturb(rng, params, rng.uniform(0.4, 1.0)))
        # Weak self-shading: the body is a little darker away from the light, as a rounded object would be.
        bulge = tx.blur(alpha, 4 * scale)
        gy, gx = np.gradient(bulge)
        light = rng.uniform(0, 2 * np.pi)
        relief = 1 + rng.uniform(0.5, 2.5) * scale * (gy * np.sin(light) + gx * np.cos(light))
        image = tx.composite(image, skin * relief[..., None], alpha)
        mask = np.maximum(mask, alpha)

    # Uneven light over the whole scene, so brightness is no cue either.
    light_field = 0.85 + 0.3 * tx.fractal_noise(rng, h, w, cell=80 * scale, octaves=2)
    image = tx.add_sensor_noise(rng, tx.blur(image * light_field[..., None], 0.4 * scale), 0.01)
    return tx.to_uint8(image), tx.binary_mask(mask)
