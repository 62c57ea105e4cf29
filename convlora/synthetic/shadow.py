"""Cast shadows (imitates SBU): soft-edged darkened regions on textured ground, among dark painted objects.

What makes it hard: darkness alone does not separate shadow from dark paint, tar or dark objects, which are
just as dark; a shadow is multiplicative (the ground's texture carries on inside it, slightly bluer) with a
soft penumbra, while a dark object replaces the texture under it and has a crisp edge.
"""

from __future__ import annotations

import numpy as np

from . import textures as tx

GROUNDS = ("grass", "pavement", "soil", "asphalt", "planks")


def _ground(rng: np.random.Generator, h: int, w: int, scale: float, kind: str) -> np.ndarray:
    fine = tx.fractal_noise(rng, h, w, cell=4 * scale, octaves=2)
    coarse = tx.fractal_noise(rng, h, w, cell=40 * scale, octaves=3)
    if kind == "grass":
        blades = tx.warp(rng, tx.value_noise(rng, h, w, cell=1.5 * scale), 3 * scale, 6 * scale)
        field = 0.35 * coarse + 0.45 * blades + 0.2 * fine
        return tx.palette_map(field, [(0.18, 0.30, 0.08), (0.38, 0.55, 0.18), (0.66, 0.74, 0.36)])
    if kind == "pavement":
        side = rng.uniform(12, 28) * scale
        yy, xx = tx.grid(h, w)
        joints = np.minimum(np.abs((yy % side) - side / 2), np.abs((xx % side) - side / 2))
        joints = np.exp(-(((side / 2 - joints) / (0.8 * scale)) ** 2))
        tone = tx.jitter_colour(rng, (0.66, 0.64, 0.60), 0.08)
        return tone * (0.85 + 0.15 * coarse + 0.2 * (fine - 0.5) - 0.35 * joints)[..., None]
    if kind == "soil":
        pebbles = (tx.value_noise(rng, h, w, cell=2.5 * scale) > 0.68).astype(float)
        field = 0.6 * coarse + 0.4 * fine
        soil = tx.palette_map(field, [(0.40, 0.30, 0.20), (0.62, 0.50, 0.36), (0.80, 0.70, 0.54)])
        return tx.composite(soil, np.array([0.86, 0.82, 0.74]), 0.6 * pebbles)
    if kind == "asphalt":
        grit = tx.value_noise(rng, h, w, cell=1.2 * scale)
        tone = rng.uniform(0.42, 0.6)
        image = np.full((h, w, 3), tone) * (0.8 + 0.25 * grit + 0.1 * coarse)[..., None]
        if rng.random() < 0.7:  # a painted lane marking
            x0 = rng.uniform(0.2, 0.8) * w
            line = ([(-5.0, x0), (h + 5.0, x0 + rng.uniform(-0.3, 0.3) * w)], rng.uniform(3, 7) * scale)
            image = tx.composite(image, np.array([0.92, 0.9, 0.82]), tx.draw_strokes(h, w, [line]) * 0.9)
        return image
    # planks: parallel boards with wood grain
    board = rng.uniform(10, 20) * scale
    yy, xx = tx.grid(h, w)
    along = tx.warp(rng, yy, 2 * scale, 20 * scale)
    gaps = np.exp(-(((along % board) / (0.7 * scale)) ** 2))
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * along / (2.5 * scale) + 4 * coarse)
    shade = rng.random(int(h / board) + 3)[np.clip((along / board).astype(int), 0, None)]
    field = 0.4 * grain + 0.3 * shade + 0.3 * fine
    wood = tx.palette_map(field, [(0.45, 0.28, 0.14), (0.68, 0.48, 0.28), (0.85, 0.68, 0.45)])
    return wood * (1 - 0.5 * gaps)[..., None]


def _shape(rng: np.random.Generator, h: int, w: int, scale: float, size: float) -> np.ndarray:
    """A crisp random shape: an irregular blob or a polygon, about ``size`` pixels across."""
    center = (rng.uniform(0, h), rng.uniform(0, w))
    if rng.random() < 0.5:
        return tx.radial_blob(rng, h, w, center, size / 2, irregularity=0.3, elongation=rng.uniform(1, 2.5),
                              softness=0.6 * scale)  # fmt: skip
    n = int(rng.integers(3, 7))
    verts = tx.regular_polygon(center, size / 2, n, rng.uniform(0, np.pi))
    verts = verts + rng.normal(0, size / 8, verts.shape)
    return tx.polygon_mask(h, w, verts)


def _cast_shadow(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Hard shadow shape: a building edge, a person or pole, or the dappled shadow of a tree."""
    kind = rng.choice(["building", "figure", "tree"])
    if kind == "building":
        # A polygon entering from one side: u runs along that side, v away from it (both in [0, 1]).
        u = np.sort(rng.uniform(-0.3, 1.3, 2))
        depth = rng.uniform(0.25, 0.6)
        uv = np.array([(u[0], -0.1), (u[0] + rng.uniform(-0.3, 0.3), depth + rng.uniform(-0.15, 0.15)),
                       (u[1] + rng.uniform(-0.3, 0.3), depth + rng.uniform(-0.15, 0.15)), (u[1], -0.1)])  # fmt: skip
        side = rng.integers(4)
        v = uv[:, 1] if side % 2 == 0 else 1 - uv[:, 1]
        verts = np.stack([v, uv[:, 0]], 1) if side < 2 else np.stack([uv[:, 0], v], 1)
        return tx.polygon_mask(h, w, verts * np.array([h, w]))
    if kind == "figure":
        start = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
        heading = np.arctan2(h / 2 - start[0], w / 2 - start[1]) + rng.uniform(-1, 1)
        curve = tx.random_walk_curve(rng, start, heading, rng.uniform(0.4, 0.8) * min(h, w), step=scale, turn=0.01)
        width = rng.uniform(10, 24) * scale
        body = tx.draw_strokes(h, w, [(curve, width * (0.6 + 0.4 * np.sin(np.linspace(0.3, 2.8, len(curve)))))])
        head = tx.radial_blob(rng, h, w, curve[-1], width * 0.7, irregularity=0.05, softness=0.5 * scale)
        return np.maximum(body, head)
    crown = tx.radial_blob(rng, h, w, (rng.uniform(0, h), rng.uniform(0, w)), rng.uniform(0.2, 0.4) * min(h, w),
                           irregularity=0.3, softness=scale)  # fmt: skip
    holes = tx.fractal_noise(rng, h, w, cell=10 * scale, octaves=2) > rng.uniform(0.55, 0.7)
    return crown * (1 - holes)


def _render(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """The shadow scene with what it was made of (for tests).

    Returns:
        ``image`` (uint8 ``(h, w, 3)``) and ``mask`` ({0, 255}); the noise-free float stages ``ground`` (before
        the dark objects), ``lit`` (with them, before the shadows) and ``shaded`` (with the shadows); the soft
        shadow alpha ``shadow`` and the dark objects' alpha ``distractors``, both float ``(h, w)``.
    """
    h, w = height, width
    scale = min(h, w) / 128
    lit = _ground(rng, h, w, scale, GROUNDS[rng.integers(len(GROUNDS))])

    for _ in range(rng.integers(0, 3)):  # bright or coloured objects lying around
        alpha = _shape(rng, h, w, scale, rng.uniform(10, 35) * scale)
        colour = tx.hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.6, 1.0))
        lit = tx.composite(lit, colour * (0.9 + 0.2 * tx.value_noise(rng, h, w, 3 * scale))[..., None], alpha)

    ground = lit
    # Dark paint, tar and dark objects: as dark as the shadows (their brightness is matched to the shadowed
    # ground), but they replace the texture and have crisp edges.
    keep = rng.uniform(0.25, 0.55) * np.array([0.9, 1.0, 1.25])
    shadowed = float((lit * np.clip(keep, 0, 1)).mean())
    distractors = np.zeros((h, w))
    for _ in range(rng.integers(2, 5)):
        alpha = _shape(rng, h, w, scale, rng.uniform(20, 50) * scale)
        colour = tx.hsv(rng.random(), rng.uniform(0.0, 0.5), 1.0)
        colour = colour * np.clip(shadowed * rng.uniform(0.6, 1.3), 0.03, 0.5) / colour.mean()
        surface = colour * (0.85 + 0.3 * tx.value_noise(rng, h, w, rng.uniform(1.5, 8) * scale))[..., None]
        lit = tx.composite(lit, np.clip(surface, 0, 1), alpha)
        distractors = np.maximum(distractors, alpha)

    hard = np.zeros((h, w))
    wanted = rng.integers(1, 3)
    for count in range(1, 7):  # one or two shadows, more while they cover too little of the frame
        hard = np.maximum(hard, _cast_shadow(rng, h, w, scale))
        if count >= wanted and hard.mean() > 0.05:
            break
    # Penumbra: a blur whose width drifts across the image (shadows soften away from their caster).
    sharp, soft = tx.blur(hard, 0.7 * scale), tx.blur(hard, rng.uniform(2.0, 4.5) * scale)
    drift = tx.fractal_noise(rng, h, w, cell=60 * scale, octaves=1)
    shadow = sharp * (1 - drift) + soft * drift

    # Multiplicative darkening, bluer than direct light (shadows are lit by the sky).
    image = shaded = lit * (1 - shadow[..., None] * (1 - np.clip(keep, 0, 1)))
    image = tx.add_sensor_noise(rng, tx.blur(image, 0.4 * scale), 0.012)
    return {"image": tx.to_uint8(image), "mask": tx.binary_mask(shadow), "shadow": shadow, "lit": lit,
            "ground": ground, "shaded": shaded, "distractors": distractors}  # fmt: skip


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One shadow scene and its {0, 255} shadow mask.

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
