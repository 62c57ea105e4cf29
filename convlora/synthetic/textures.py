"""Drawing primitives shared by the synthetic domains: noise, shapes, strokes, shading and colour.

Everything works on float arrays in ``[0, 1]`` (images ``(h, w, 3)``, masks and fields ``(h, w)``) and is
vectorised numpy/scipy. Positions are ``(y, x)`` in pixels. Randomness always comes from the
``numpy.random.Generator`` passed in, so a generator's output depends only on its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Stroke = tuple[np.ndarray, np.ndarray | float]  # (points (n, 2) as (y, x), widths (n,) or one width)


def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(height, width)`` float64.

    >>> yy, xx = grid(2, 3)
    >>> xx[1].tolist()
    [0.0, 1.0, 2.0]
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    return yy, xx


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    # Uniform cubic B-spline basis: C2-smooth noise with no grid-aligned creases.
    t2, t3 = t * t, t * t * t
    return np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], axis=-1) / 6.0


def _upsample_axis(values: np.ndarray, cell: float, size: int, offset: float, axis: int) -> np.ndarray:
    pos = np.arange(size) / cell + offset
    base = np.floor(pos).astype(np.int64)
    weights = _bspline_weights(pos - base)  # (size, 4)
    out = 0.0
    for k in range(4):
        taken = np.take(values, base + k, axis=axis)
        shape = [1] * values.ndim
        shape[axis] = size
        out = out + taken * weights[:, k].reshape(shape)
    return out


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float, channels: int = 0) -> np.ndarray:
    """Smooth random field: random values on a lattice of spacing ``cell`` pixels, B-spline interpolated.

    Args:
        rng: source of randomness.
        height: output height.
        width: output width.
        cell: lattice spacing in pixels (feature size); must be positive.
        channels: 0 for a ``(h, w)`` field, else ``(h, w, channels)`` independent fields.

    Returns:
        Field with mean ~0.5, roughly within ``[0.1, 0.9]`` (not rescaled).

    >>> value_noise(np.random.default_rng(0), 8, 6, cell=4.0).shape
    (8, 6)
    """
    if cell <= 0:
        raise ValueError(f"cell must be positive, got {cell}")
    gh, gw = int(np.ceil(height / cell)) + 4, int(np.ceil(width / cell)) + 4
    lattice = rng.random((gh, gw, channels) if channels else (gh, gw))
    oy, ox = rng.random(2)
    rows = _upsample_axis(lattice, cell, height, oy, axis=0)
    return _upsample_axis(rows, cell, width, ox, axis=1)


def fractal_noise(
    rng: np.random.Generator,
    height: int,
    width: int,
    cell: float = 32.0,
    octaves: int = 4,
    persistence: float = 0.5,
    channels: int = 0,
) -> np.ndarray:
    """Sum of ``octaves`` value-noise layers (cell halves, amplitude times ``persistence``), min-max scaled to [0, 1].

    Args:
        rng: source of randomness.
        height: output height.
        width: output width.
        cell: feature size of the coarsest octave in pixels.
        octaves: number of layers.
        persistence: amplitude ratio between successive octaves (low: smooth, high: rough).
        channels: 0 for a ``(h, w)`` field, else ``(h, w, channels)``, each channel scaled separately.

    >>> f = fractal_noise(np.random.default_rng(0), 16, 16, cell=8.0, octaves=2)
    >>> float(f.min()), float(f.max())
    (0.0, 1.0)
    """
    total, amp = 0.0, 1.0
    for i in range(octaves):
        total = total + amp * value_noise(rng, height, width, max(cell / 2**i, 1.0), channels)
        amp *= persistence
    lo = np.min(total, axis=(0, 1), keepdims=True)
    hi = np.max(total, axis=(0, 1), keepdims=True)
    return (total - lo) / np.maximum(hi - lo, 1e-12)


def ridges(field: np.ndarray, sharpness: float = 1.0) -> np.ndarray:
    """Ridge map of a [0, 1] field: 1 on its mid-level contour, falling to 0 away from it.

    >>> ridges(np.array([0.0, 0.5, 1.0])).tolist()
    [0.0, 1.0, 0.0]
    """
    return np.clip(1.0 - np.abs(2.0 * field - 1.0), 0.0, 1.0) ** sharpness


def warp(rng: np.random.Generator, field: np.ndarray, amount: float, cell: float) -> np.ndarray:
    """Resample ``field`` (``(h, w)`` or ``(h, w, c)``) at coordinates displaced by smooth noise of ``amount`` pixels.

    >>> warp(np.random.default_rng(0), np.zeros((8, 8)), amount=2.0, cell=4.0).shape
    (8, 8)
    """
    h, w = field.shape[:2]
    yy, xx = grid(h, w)
    d = (value_noise(rng, h, w, cell, channels=2) - 0.5) * 2.0 * amount
    coords = [yy + d[..., 0], xx + d[..., 1]]
    if field.ndim == 2:
        return ndimage.map_coordinates(field, coords, order=1, mode="reflect")
    return np.stack([ndimage.map_coordinates(field[..., c], coords, order=1, mode="reflect")
                     for c in range(field.shape[2])], axis=-1)  # fmt: skip


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes only (channels are left apart).

    >>> blur(np.ones((4, 4, 3)), 1.0).shape
    (4, 4, 3)
    """
    if sigma <= 0:
        return image
    sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, sigmas, mode="reflect")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function.

    >>> float(sigmoid(np.array(0.0)))
    0.5
    """
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x)))


def _fourier(theta: np.ndarray, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Explicit sum rather than a BLAS product, whose rounding differs between CPUs.
    total = np.zeros_like(theta)
    for k, (amp, phase) in enumerate(zip(amps, phases, strict=True), start=1):
        total += amp * np.cos(k * theta + phase)
    return total


def fourier_wobble(rng: np.random.Generator, theta: np.ndarray, harmonics: int, decay: float = 1.2) -> np.ndarray:
    """Random smooth periodic function of an angle field: ``sum_k a_k cos(k theta + phi_k)``, ``a_k ~ N(0, k^-decay)``.

    >>> fourier_wobble(np.random.default_rng(0), np.zeros(3), 2).shape
    (3,)
    """
    k = np.arange(1, harmonics + 1)
    amps = rng.normal(size=harmonics) / k**decay
    return _fourier(theta, amps, rng.uniform(0, 2 * np.pi, size=harmonics))


def radial_blob(
    rng: np.random.Generator,
    height: int,
    width: int,
    center: Sequence[float],
    radius: float,
    *,
    irregularity: float = 0.2,
    harmonics: int = 6,
    elongation: float = 1.0,
    angle: float | None = None,
    softness: float | np.ndarray = 1.0,
    warp_amount: float = 0.0,
    return_distance: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Soft mask of a smooth random star-shaped blob (radius varying with angle as a random Fourier series).

    Args:
        rng: source of randomness.
        height: output height.
        width: output width.
        center: ``(y, x)`` of the centre.
        radius: mean radius in pixels (along the short axis when elongated).
        irregularity: amplitude of the radius variation relative to ``radius``.
        harmonics: number of Fourier terms (more: wigglier outline).
        elongation: ratio of the long to the short axis.
        angle: orientation of the long axis in radians; random when ``None``.
        softness: edge width in pixels (scalar, or a ``(h, w)`` array to vary it along the outline).
        warp_amount: displacement of the coordinates by smooth noise, in pixels (breaks the star shape).
        return_distance: also return the approximate signed distance to the outline (negative inside).

    Returns:
        ``(h, w)`` alpha in [0, 1], and the signed distance when asked.

    >>> m = radial_blob(np.random.default_rng(0), 32, 32, (16, 16), 8.0)
    >>> bool(m[16, 16] > 0.99 and m[0, 0] < 0.01)
    True
    """
    yy, xx = grid(height, width)
    if warp_amount > 0:
        d = (value_noise(rng, height, width, max(radius, 4.0), channels=2) - 0.5) * 2.0 * warp_amount
        yy, xx = yy + d[..., 0], xx + d[..., 1]
    angle = rng.uniform(0, np.pi) if angle is None else angle
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dx * c + dy * s) / elongation, -dx * s + dy * c
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = radius * np.maximum(1.0 + irregularity * fourier_wobble(rng, theta, harmonics), 0.25)
    signed = (r - boundary) * np.sqrt(elongation)  # rough pixel units along both axes
    alpha = sigmoid(-signed / np.maximum(softness, 1e-3) * 2.0)
    return (alpha, signed) if return_distance else alpha


def polygon_mask(height: int, width: int, vertices: np.ndarray, supersample: int = 2) -> np.ndarray:
    """Antialiased fill (even-odd rule) of a polygon with ``vertices`` ``(n, 2)`` as ``(y, x)``.

    >>> square = np.array([[2, 2], [2, 6], [6, 6], [6, 2]], float)
    >>> float(polygon_mask(8, 8, square, supersample=1).sum())
    16.0
    """
    s = supersample
    out = np.zeros((height, width))
    # Only the pixels inside the polygon's bounding box can be covered.
    y0, x0 = np.maximum(np.floor(vertices.min(axis=0)).astype(int) - 1, 0)
    y1, x1 = np.minimum(np.ceil(vertices.max(axis=0)).astype(int) + 2, (height, width))
    if y1 <= y0 or x1 <= x0:
        return out
    yy, xx = np.mgrid[y0 * s : y1 * s, x0 * s : x1 * s].astype(np.float64)
    yy, xx = (yy + 0.5) / s - 0.5, (xx + 0.5) / s - 0.5
    inside = np.zeros(yy.shape, dtype=bool)
    vy, vx = vertices[:, 0], vertices[:, 1]
    for i in range(len(vertices)):
        y_a, x_a, y_b, x_b = vy[i - 1], vx[i - 1], vy[i], vx[i]
        if y_a == y_b:
            continue
        crosses = (y_a > yy) != (y_b > yy)
        x_at = x_a + (yy - y_a) * (x_b - x_a) / (y_b - y_a)
        inside ^= crosses & (xx < x_at)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def regular_polygon(center: Sequence[float], radius: float, n: int, angle: float = 0.0) -> np.ndarray:
    """Vertices ``(n, 2)`` of a regular n-gon.

    >>> regular_polygon((0, 0), 1.0, 4).shape
    (4, 2)
    """
    t = angle + 2 * np.pi * np.arange(n) / n
    return np.stack([center[0] + radius * np.sin(t), center[1] + radius * np.cos(t)], axis=1)


def random_walk_curve(
    rng: np.random.Generator,
    start: Sequence[float],
    heading: float,
    length: float,
    *,
    step: float = 1.0,
    turn: float = 0.05,
    smoothness: int = 8,
) -> np.ndarray:
    """Points ``(n, 2)`` of a smooth random curve: a walk whose heading changes by smoothed Gaussian turns.

    Args:
        rng: source of randomness.
        start: ``(y, x)`` of the first point.
        heading: initial direction in radians (0: +x).
        length: curve length in pixels.
        step: distance between points.
        turn: standard deviation of the heading change per step, in radians, after smoothing.
        smoothness: width (in steps) of the smoothing of the turns.

    >>> random_walk_curve(np.random.default_rng(0), (0, 0), 0.0, 10.0).shape
    (11, 2)
    """
    n = max(int(length / step), 1)
    turns = rng.normal(size=n)
    if smoothness > 1 and n > 1:
        turns = ndimage.gaussian_filter1d(turns, smoothness / 2, mode="reflect")
        turns = turns / max(float(np.std(turns)), 1e-6)
    headings = heading + np.cumsum(turn * turns)
    steps = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    return np.concatenate([np.asarray(start, float)[None], start + np.cumsum(steps, axis=0)])


def draw_strokes(height: int, width: int, strokes: Sequence[Stroke], supersample: int = 2) -> np.ndarray:
    """Antialiased coverage of thick polylines whose width may vary along them.

    Each stroke is ``(points, widths)``: points ``(n, 2)`` as ``(y, x)`` pixels and widths ``(n,)`` (or one
    number) in pixels. The polylines are densified, rasterised on a ``supersample``-times finer grid, grown to
    their local width with a distance transform, and averaged back down.

    Args:
        height: output height.
        width: output width.
        strokes: the polylines.
        supersample: fineness of the rasterisation grid (antialiasing).

    >>> line = (np.array([[4.0, 0.0], [4.0, 15.0]]), 2.0)
    >>> m = draw_strokes(8, 16, [line])
    >>> round(float(m[:, 8].sum()), 1)
    2.0
    """
    s = supersample
    hs, ws = height * s, width * s
    width_map = np.zeros((hs, ws))
    for points, widths in strokes:
        points = np.asarray(points, float)
        widths = np.broadcast_to(np.asarray(widths, float), (len(points),))
        seg = np.hypot(*np.diff(points, axis=0).T) if len(points) > 1 else np.zeros(0)
        # Densify so consecutive samples are < half a fine pixel apart.
        arclen = np.concatenate([[0.0], np.cumsum(seg)])
        n = max(int(arclen[-1] * s * 2) + 2, 2)
        t = np.linspace(0.0, arclen[-1], n)
        py = np.interp(t, arclen, points[:, 0]) if len(points) > 1 else np.full(n, points[0, 0])
        px = np.interp(t, arclen, points[:, 1]) if len(points) > 1 else np.full(n, points[0, 1])
        pw = np.interp(t, arclen, widths) if len(points) > 1 else np.full(n, widths[0])
        iy = np.floor((py + 0.5) * s).astype(np.int64)
        ix = np.floor((px + 0.5) * s).astype(np.int64)
        ok = (iy >= 0) & (iy < hs) & (ix >= 0) & (ix < ws)
        np.maximum.at(width_map, (iy[ok], ix[ok]), pw[ok] * s)
    if not width_map.any():
        return np.zeros((height, width))
    # Work only inside the strokes' bounding box (in whole coarse pixels), grown by the widest half-width.
    rows, cols = np.flatnonzero(width_map.any(axis=1)), np.flatnonzero(width_map.any(axis=0))
    pad = int(np.ceil(width_map.max() / 2)) + s
    y0, y1 = max((rows[0] - pad) // s, 0) * s, min(-(-(rows[-1] + pad + 1) // s) * s, hs)
    x0, x1 = max((cols[0] - pad) // s, 0) * s, min(-(-(cols[-1] + pad + 1) // s) * s, ws)
    crop = width_map[y0:y1, x0:x1]
    ny, nx = ndimage.distance_transform_edt(crop == 0, return_distances=False, return_indices=True)
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    dist = np.sqrt((yy - ny) ** 2 + (xx - nx) ** 2)
    fine = np.clip(crop[ny, nx] / 2.0 - dist + 0.5, 0.0, 1.0)
    out = np.zeros((height, width))
    out[y0 // s : y1 // s, x0 // s : x1 // s] = fine.reshape((y1 - y0) // s, s, (x1 - x0) // s, s).mean(axis=(1, 3))
    return out


def voronoi(
    rng: np.random.Generator, height: int, width: int, n_cells: int, jitter: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Random Voronoi partition: cell ids ``(h, w)`` in ``[0, n_cells)`` and the distance to the nearest cell border.

    Args:
        rng: source of randomness.
        height: output height.
        width: output width.
        n_cells: number of seeds (roughly; seeds sit on a jittered grid).
        jitter: 0 for a regular grid of seeds, 1 for fully random positions within their grid cell.

    >>> ids, border = voronoi(np.random.default_rng(0), 16, 16, 4)
    >>> ids.shape, int(ids.max()) < 4
    ((16, 16), True)
    """
    side = max(round(float(np.sqrt(n_cells * height / width))), 1)
    cols = max(round(n_cells / side), 1)
    cy = (np.arange(side)[:, None] + 0.5 + jitter * (rng.random((side, cols)) - 0.5)) * height / side
    cx = (np.arange(cols)[None, :] + 0.5 + jitter * (rng.random((side, cols)) - 0.5)) * width / cols
    seeds = np.full((height, width), -1, dtype=np.int64)
    iy = np.clip(cy.astype(np.int64), 0, height - 1).ravel()
    ix = np.clip(cx.astype(np.int64), 0, width - 1).ravel()
    seeds[iy, ix] = np.arange(iy.size)
    _, (ny, nx) = ndimage.distance_transform_edt(seeds < 0, return_indices=True)
    ids = seeds[ny, nx]
    ids = np.unique(ids, return_inverse=True)[1].reshape(height, width)
    edges = np.zeros((height, width), dtype=bool)
    edges[1:] |= ids[1:] != ids[:-1]
    edges[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    return ids, ndimage.distance_transform_edt(~edges)


def shade(height_map: np.ndarray, light: Sequence[float] = (-1.0, -1.0, 1.5), shininess: float = 30.0):
    """Lambert and specular terms of a height map lit from direction ``light`` = ``(y, x, z)``.

    Returns:
        ``(diffuse, specular)``, each ``(h, w)`` in [0, 1].

    >>> d, s = shade(np.zeros((4, 4)))
    >>> round(float(d[0, 0]), 3)
    0.728
    """
    gy, gx = np.gradient(height_map)
    length = np.sqrt(gy * gy + gx * gx + 1.0)
    ly, lx, lz = np.asarray(light, float) / np.sqrt(sum(c * c for c in light))
    hy, hx, hz = ly, lx, lz + 1.0  # half-way vector between the light and a viewer straight above
    hnorm = np.sqrt(hy * hy + hx * hx + hz * hz)
    # Elementwise dot products: a BLAS matmul would round differently on different CPUs.
    diffuse = np.clip((-gy * ly - gx * lx + lz) / length, 0.0, 1.0)
    specular = np.clip((-gy * hy - gx * hx + hz) / (length * hnorm), 0.0, 1.0) ** shininess
    return diffuse, specular


def vignette(height: int, width: int, strength: float = 0.5, radius: float = 0.8, hardness: float = 4.0):
    """Multiplicative darkening towards the corners: 1 in the centre, ``1 - strength`` far out.

    Args:
        height: output height.
        width: output width.
        strength: darkening at the far corners (0: none, 1: black).
        radius: normalised distance from the centre (1 = middle of an edge) where darkening is half done.
        hardness: steepness of the transition.

    >>> v = vignette(9, 9)
    >>> bool(v[4, 4] > v[0, 0])
    True
    """
    yy, xx = grid(height, width)
    r = np.hypot((yy - (height - 1) / 2) / (height / 2), (xx - (width - 1) / 2) / (width / 2))
    return 1.0 - strength * sigmoid(hardness * 2 * (r - radius))


def palette_map(field: np.ndarray, colours: Sequence[Sequence[float]], stops: Sequence[float] | None = None):
    """Map a [0, 1] field to colours by piecewise-linear interpolation between ``colours`` at ``stops``.

    >>> palette_map(np.array([0.0, 0.5, 1.0]), [(0, 0, 0), (1, 1, 1)])[:, 0].tolist()
    [0.0, 0.5, 1.0]
    """
    colours = np.asarray(colours, float)
    stops = np.linspace(0.0, 1.0, len(colours)) if stops is None else np.asarray(stops, float)
    return np.stack([np.interp(field, stops, colours[:, c]) for c in range(3)], axis=-1)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB in [0, 1] of a hue ``h`` (turns, wraps), saturation ``s`` and value ``v``.

    >>> hsv(0.0, 1.0, 1.0).tolist()
    [1.0, 0.0, 0.0]
    """
    h6 = (h % 1.0) * 6.0
    c = v * s
    x = c * (1 - abs(h6 % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h6) % 6]
    return np.array(rgb, float) + (v - c)


def jitter_colour(rng: np.random.Generator, colour: Sequence[float], amount: float) -> np.ndarray:
    """``colour`` plus independent uniform noise of ``±amount`` per channel, clipped to [0, 1].

    >>> jitter_colour(np.random.default_rng(0), (0.5, 0.5, 0.5), 0.0).tolist()
    [0.5, 0.5, 0.5]
    """
    return np.clip(np.asarray(colour, float) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def composite(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha blend of ``over`` onto ``under`` (``alpha`` ``(h, w)`` broadcast over channels).

    >>> composite(np.zeros((1, 1, 3)), np.ones((1, 1, 3)), np.full((1, 1), 0.25))[0, 0].tolist()
    [0.25, 0.25, 0.25]
    """
    a = alpha[..., None] if alpha.ndim == under.ndim - 1 else alpha
    return under * (1.0 - a) + over * a


def add_sensor_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Add per-pixel Gaussian noise of standard deviation ``sigma`` (in [0, 1] units) and clip.

    >>> float(add_sensor_noise(np.random.default_rng(0), np.zeros((2, 2, 3)), 0.0).sum())
    0.0
    """
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0.0, 1.0) if sigma > 0 else image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round a [0, 1] float image to uint8 (values outside are clipped).

    >>> to_uint8(np.array([0.0, 0.5, 1.2])).tolist()
    [0, 128, 255]
    """
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def binary_mask(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A {0, 255} uint8 mask of ``alpha > threshold``.

    >>> binary_mask(np.array([0.2, 0.7])).tolist()
    [0, 255]
    """
    return np.where(alpha > threshold, 255, 0).astype(np.uint8)
