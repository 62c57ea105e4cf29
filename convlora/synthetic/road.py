"""Aerial road networks (imitates the Massachusetts roads set): thin connected curves over rural land.

What makes it hard: roads are a few pixels wide (2-6 px at 128 px) and cover a few percent of the image,
so a model must keep thin long structures; tree crowns hide parts of them (the mask still runs under the
trees), and driveways, parking lots, field tracks and rivers look like roads but are not labelled.
"""

from __future__ import annotations

import numpy as np

from . import textures as tx


def _land(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Patchwork of fields with crop rows, with thin field-boundary lines."""
    ids, border = tx.voronoi(rng, h, w, int(rng.integers(4, 12)), jitter=1.0)
    n = int(ids.max()) + 1
    palette = np.array([(0.42, 0.50, 0.26), (0.55, 0.58, 0.32), (0.62, 0.56, 0.38), (0.50, 0.44, 0.30),
                        (0.36, 0.44, 0.22), (0.68, 0.64, 0.46)])  # fmt: skip
    colours = palette[rng.integers(len(palette), size=n)] + rng.uniform(-0.04, 0.04, (n, 3))
    yy, xx = tx.grid(h, w)
    angle = rng.uniform(0, np.pi, n)[ids]
    period = rng.uniform(2.5, 5.0, n)[ids] * scale
    rows = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    rows = rows * rng.uniform(0.0, 0.12, n)[ids]
    land = colours[ids] * (1 - rows + 0.1 * tx.fractal_noise(rng, h, w, cell=20 * scale, octaves=3))[..., None]
    hedges = np.exp(-((border / (0.6 * scale)) ** 2)) * rng.uniform(0.1, 0.4)
    return land * (1 - hedges)[..., None]


def _network(rng: np.random.Generator, h: int, w: int, scale: float) -> list[tx.Stroke]:
    """Main roads crossing the frame, then side roads branching off them (so the network is connected)."""
    main: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 4))):
        side = rng.integers(4)
        t = rng.uniform(0.1, 0.9)
        start = [(-4, t * w), (h + 4, t * w), (t * h, -4), (t * h, w + 4)][side]
        heading = [np.pi / 2, -np.pi / 2, 0.0, np.pi][side] + rng.uniform(-0.5, 0.5)
        main.append(tx.random_walk_curve(rng, start, heading, 2.0 * max(h, w), step=scale, turn=0.012,
                                         smoothness=30))  # fmt: skip
    strokes: list[tx.Stroke] = [(c, rng.uniform(4.0, 6.0) * scale) for c in main]
    for curve in main:
        inside = np.flatnonzero((curve[:, 0] > 0) & (curve[:, 0] < h) & (curve[:, 1] > 0) & (curve[:, 1] < w))
        if len(inside) < 2:
            continue
        for _ in range(rng.integers(0, 5)):
            i = inside[rng.integers(len(inside))]
            direction = curve[min(i + 1, len(curve) - 1)] - curve[max(i - 1, 0)]
            heading = np.arctan2(direction[0], direction[1]) + rng.choice([-1, 1]) * rng.uniform(1.2, 1.9)
            branch = tx.random_walk_curve(rng, curve[i], heading, rng.uniform(0.2, 0.9) * max(h, w), step=scale,
                                          turn=rng.uniform(0.005, 0.04), smoothness=15)  # fmt: skip
            width = rng.uniform(2.4, 3.5) * scale
            strokes.append((branch, width * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(2, 8), len(branch))))))
    return strokes


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One aerial tile and its {0, 255} road mask.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, mask = generate(np.random.default_rng(0), 96, 128)
    >>> image.shape, bool(0 < (mask > 0).mean() < 0.3)
    ((96, 128, 3), True)
    """
    h, w = height, width
    scale = min(h, w) / 128
    image = _land(rng, h, w, scale)

    if rng.random() < 0.4:  # a river: road-like curve, but dark and not a road
        side = rng.integers(2)
        start = (rng.uniform(0, h), -4.0) if side else (-4.0, rng.uniform(0, w))
        river = tx.random_walk_curve(rng, start, 0.0 if side else np.pi / 2, 2.0 * max(h, w), step=scale, turn=0.04)
        water = tx.draw_strokes(h, w, [(river, rng.uniform(3, 8) * scale)])
        image = tx.composite(image, tx.jitter_colour(rng, (0.16, 0.24, 0.24), 0.04), water)

    strokes = _network(rng, h, w, scale)
    roads = tx.draw_strokes(h, w, strokes)
    asphalt = tx.jitter_colour(rng, (0.52, 0.51, 0.50), 0.06)
    surface = asphalt * (0.92 + 0.16 * tx.value_noise(rng, h, w, cell=2 * scale))[..., None]

    # Built-up things beside the roads: houses with driveways, and parking lots (grey, but not roads).
    clutter = np.zeros((h, w, 3))
    clutter_alpha = np.zeros((h, w))
    driveways: list[tx.Stroke] = []
    for points, _ in strokes[1:] if len(strokes) > 1 else strokes:
        for _ in range(rng.integers(0, 6)):
            p = points[rng.integers(len(points))]
            if not (0 <= p[0] < h and 0 <= p[1] < w):
                continue
            normal = rng.normal(size=2)
            normal /= np.sqrt(normal[0] ** 2 + normal[1] ** 2)
            house = p + normal * rng.uniform(6, 10) * scale
            driveways.append((np.stack([p, house]), rng.uniform(1.0, 1.8) * scale))
            size = rng.uniform(3, 6) * scale
            verts = tx.regular_polygon(house, size, 4, rng.uniform(0, np.pi / 2))
            roof = tx.polygon_mask(h, w, verts)
            colour = [(0.35, 0.33, 0.33), (0.62, 0.35, 0.28), (0.85, 0.84, 0.80), (0.25, 0.25, 0.28)][rng.integers(4)]
            clutter = tx.composite(clutter, np.asarray(colour), roof)
            clutter_alpha = np.maximum(clutter_alpha, roof)
    shift = round(1.5 * scale)
    image = image * (1 - 0.5 * np.roll(clutter_alpha, (shift, shift), axis=(0, 1)))[..., None]  # house shadows
    if rng.random() < 0.4:
        corner = np.array([rng.uniform(0.1, 0.8) * h, rng.uniform(0.1, 0.8) * w])
        verts = corner + np.array([[0, 0], [0, 1], [1, 1], [1, 0]]) * rng.uniform(8, 20, 2) * scale
        lot = tx.polygon_mask(h, w, verts)
        clutter = tx.composite(clutter, asphalt * 1.05, lot)
        clutter_alpha = np.maximum(clutter_alpha, lot)
    if driveways:
        image = tx.composite(image, asphalt * 1.1, tx.draw_strokes(h, w, driveways) * 0.9)
    image = tx.composite(image, surface, roads)
    image = tx.composite(image, clutter, clutter_alpha)

    # Woods and tree rows: dark bumpy crowns, partly hiding the roads.
    woods = tx.fractal_noise(rng, h, w, cell=35 * scale, octaves=3) > rng.uniform(0.55, 0.8)
    crowns = tx.value_noise(rng, h, w, cell=2.5 * scale)
    trees = tx.blur(woods.astype(float), 0.8 * scale) * np.clip(0.6 + crowns, 0, 1)
    forest = tx.palette_map(crowns, [(0.10, 0.17, 0.08), (0.20, 0.32, 0.14), (0.32, 0.44, 0.22)])
    image = tx.composite(image, forest, trees)
    image = tx.add_sensor_noise(rng, tx.blur(image, 0.4 * scale), 0.012)
    return tx.to_uint8(image), tx.binary_mask(roads)
