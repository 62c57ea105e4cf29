"""Fluorescence nuclei (imitates the 2018 Data Science Bowl / BBBC038 nuclei): one id per nucleus, 12-bit images.

What makes it hard: nuclei crowd into clusters whose members press against each other with no background
between them (their boundary shows only as a shallow dip or a brightness step), some lie on top of others
(the signals add; the upper nucleus's id wins in the overlap), sizes and brightness vary within one image
so that dim nuclei barely clear the haze, the illumination is uneven, and shot noise is strong where the
signal is weak. The image is a 12-bit camera frame, uint16 ``(h, w)`` holding 0..4095; the mask is an
instance-id map, uint16, 0 = background and ids 1..n, each id one 4-connected region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import textures as tx
from ._instance_ids import tidy_ids

MAX_VALUE = 4095  # a 12-bit camera
EMPTY_SHARE = 0.05  # images holding no nucleus
COUNT_RANGE = (5, 40)  # nuclei drawn per non-empty image (a few may vanish under others or off the border)
MIN_AREA = 10.0  # pixels at 128 px (scaled with the area): smaller slivers join a neighbour or the background


@dataclass(frozen=True)
class _Nucleus:
    center: tuple[float, float]  # (y, x)
    radius: float  # minor semi-axis, pixels
    elongation: float  # major / minor axis
    angle: float  # of the major axis, radians
    brightness: float  # relative
    on_top: bool  # lies over the nuclei drawn before it instead of pressing against them

    def reach(self, direction: float) -> float:
        """Distance from the centre to the (smooth) outline along ``direction`` (radians, ``(y, x)`` frame)."""
        phi = direction - self.angle
        major, minor = self.radius * self.elongation, self.radius
        return major * minor / float(np.hypot(minor * np.cos(phi), major * np.sin(phi)))


def _place(rng: np.random.Generator, h: int, w: int, scale: float) -> list[_Nucleus]:
    """Nuclei in drawing order: most set against one drawn before (touching), some over one, the rest free."""
    if rng.random() < EMPTY_SHARE:
        return []
    count = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    typical = rng.uniform(4.0, 7.5) * scale
    touching = rng.uniform(0.3, 0.7)
    overlapping = rng.uniform(0.06, 0.18)
    nuclei: list[_Nucleus] = []
    for _ in range(count):
        radius = typical * float(np.exp(rng.normal(0.0, 0.22)))
        elongation = 1.0 + 0.9 * rng.random() ** 1.6
        angle = rng.uniform(0, np.pi)
        brightness = float(np.exp(rng.normal(0.0, 0.35)))
        if rng.random() < 0.05:  # a condensed (mitotic) nucleus: small and bright
            radius, brightness = radius * 0.65, brightness * 1.7
        draw = rng.random()
        on_top = bool(nuclei) and touching <= draw < touching + overlapping
        if nuclei and draw < touching + overlapping:
            other = nuclei[rng.integers(len(nuclei))]
            direction = rng.uniform(0, 2 * np.pi)
            probe = _Nucleus((0.0, 0.0), radius, elongation, angle, brightness, on_top)
            reach = other.reach(direction) + probe.reach(direction + np.pi)
            # pressed nuclei overlap a little as drawn and share the overlap; one on top covers up to half
            distance = reach * (rng.uniform(0.45, 0.75) if on_top else rng.uniform(0.8, 0.97))
            center = (other.center[0] + distance * np.sin(direction), other.center[1] + distance * np.cos(direction))
            if not (0 <= center[0] < h and 0 <= center[1] < w):  # off the image: start a new cluster instead
                center, on_top = (rng.uniform(0, h), rng.uniform(0, w)), False
        else:
            center = (rng.uniform(0, h), rng.uniform(0, w))
        nuclei.append(_Nucleus((float(center[0]), float(center[1])), radius, elongation, angle, brightness, on_top))
    return nuclei


def _shape(rng: np.random.Generator, nucleus: _Nucleus, h: int, w: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The nucleus's box in the image and its normalised radius there (< 1 inside, 1 on the wobbly outline)."""
    extent = nucleus.radius * nucleus.elongation * 1.4 + 2.0
    cy, cx = nucleus.center
    y0, y1 = max(0, int(np.floor(cy - extent))), min(h, int(np.ceil(cy + extent)) + 1)
    x0, x1 = max(0, int(np.floor(cx - extent))), min(w, int(np.ceil(cx + extent)) + 1)
    wobble_amount = rng.uniform(0.03, 0.1)
    if y0 >= y1 or x0 >= x1:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(nucleus.angle), np.sin(nucleus.angle)
    u, v = (dx * c + dy * s) / nucleus.elongation, -dx * s + dy * c
    boundary = nucleus.radius * np.maximum(1.0 + wobble_amount * tx.fourier_wobble(rng, np.arctan2(v, u), 5), 0.6)
    return (slice(y0, y1), slice(x0, x1)), np.hypot(u, v) / boundary


def _render(rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
    """The nuclei image with what it was made of (for tests).

    Returns:
        ``image`` (uint16 ``(h, w)``, 0..4095), ``ids`` (uint16 instance ids), ``nuclei`` (the placed
        ``_Nucleus`` list, drawing order) and ``shapes``: for each of them its bool ``(h, w)`` outline as
        drawn before any other nucleus cut into it, and the id it ended up with (0 when it vanished).
    """
    h, w = height, width
    scale = min(h, w) / 128
    nuclei = _place(rng, h, w, scale)
    softness = 0.4 + 0.5 * scale
    dome = rng.uniform(0.1, 0.45)  # how much dimmer a nucleus is at its rim: the dip between pressed nuclei
    chromatin = (0.6 * tx.fractal_noise(rng, h, w, cell=2.5 * scale + 0.5, octaves=2)
                 + 0.4 * tx.fractal_noise(rng, h, w, cell=7 * scale + 1, octaves=2))  # fmt: skip

    # Pressed nuclei share their overlap by the normalised radius (the pixel goes to the nucleus it lies
    # deeper in); nuclei on top are painted over afterwards, in drawing order.
    deepest = np.full((h, w), np.inf)
    owner = np.zeros((h, w), np.int64)
    pressed_signal = np.zeros((h, w))
    over_signal = np.zeros((h, w))
    raw = np.zeros((h, w), np.int64)
    shapes: list[np.ndarray] = []
    for index, nucleus in enumerate(nuclei, start=1):
        box, q = _shape(rng, nucleus, h, w)
        texture = 1.0 + rng.uniform(0.2, 0.7) * (chromatin[box] - 0.5)
        alpha = tx.sigmoid((1.0 - q) * nucleus.radius / softness * 2.0)
        signal = nucleus.brightness * texture * (1.0 - dome * np.minimum(q, 1.0) ** 2) * alpha
        full = np.zeros((h, w), bool)
        full[box] = q < 1.0
        shapes.append(full)
        if nucleus.on_top:
            over_signal[box] += signal
            raw[box][q < 1.0] = index
            continue
        closer = q < deepest[box]
        deepest[box][closer] = q[closer]
        owner[box][closer] = index
        pressed_signal[box][closer] = signal[closer]
    pressed = (raw == 0) & (deepest < 1.0)  # a pressed pixel under a nucleus on top keeps the top one's id
    raw[pressed] = owner[pressed]
    ids, lookup = tidy_ids(raw, max(3.0, MIN_AREA * scale**2))
    final = [int(lookup[i]) if i < lookup.size else 0 for i in range(1, len(nuclei) + 1)]

    # Optics and camera: out-of-focus debris and haze, uneven illumination, blur, shot and read noise.
    debris = np.zeros((h, w))
    for _ in range(rng.integers(0, 4)):
        center = (rng.uniform(0, h), rng.uniform(0, w))
        radius = rng.uniform(4, 10) * scale
        debris += rng.uniform(0.08, 0.25) * tx.radial_blob(rng, h, w, center, radius, softness=2.5 * radius)
    haze = rng.uniform(0.01, 0.06) * tx.fractal_noise(rng, h, w, cell=40 * scale + 2, octaves=3)
    illumination = tx.vignette(h, w, strength=rng.uniform(0.1, 0.45), radius=rng.uniform(0.5, 0.9))
    illumination = illumination * (1.0 - rng.uniform(0.05, 0.3) * tx.fractal_noise(rng, h, w, cell=90 * scale + 4))
    signal = tx.blur((pressed_signal + over_signal) * 0.8 + debris + haze, rng.uniform(0.5, 1.3) * scale)
    expected = signal * illumination
    # The exposure puts the bright nuclei near the top of the 12-bit range (an empty field as if it held one);
    # overlaps, where signals add, may saturate.
    reference = float(np.percentile(expected[ids > 0], 99.5)) if ids.any() else 0.8
    exposure = rng.uniform(3300.0, 3800.0) / max(reference, 1e-6)
    gain = rng.uniform(0.8, 3.0)  # camera units per photoelectron: higher = noisier at the same brightness
    electrons = rng.poisson(np.maximum(expected * exposure, 0.0) / gain)
    frame = electrons * gain + rng.uniform(80.0, 200.0) + rng.normal(0.0, rng.uniform(2.0, 6.0), (h, w))
    image = np.clip(np.rint(frame), 0, MAX_VALUE).astype(np.uint16)
    return {"image": image, "ids": ids, "nuclei": nuclei, "shapes": list(zip(shapes, final, strict=True))}


def generate(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One fluorescence image of nuclei (uint16 ``(h, w)``, 0..4095) and its uint16 instance-id map.

    Args:
        rng: source of randomness.
        height: image height in pixels.
        width: image width in pixels.

    >>> image, ids = generate(np.random.default_rng(1), 96, 128)
    >>> image.shape, image.dtype, ids.dtype, int(image.max()) <= 4095
    ((96, 128), dtype('uint16'), dtype('uint16'), True)
    """
    scene = _render(rng, height, width)
    return scene["image"], scene["ids"]
