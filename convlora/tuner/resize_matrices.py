"""The experts' resizes as small constant matrices, for the fast paths in ``fast_experts.py``.

Resizing is linear and separable, so each resize of ``F.interpolate`` (``align_corners=False``) is a matrix
product along each axis, with weights computed here in plain Python. Since everything before an expert's
GELU is linear, the 3x3 conv's three taps along an axis fold into the up-sampling matrix, and the conv need
only be computed where the resize back reads it (:class:`AxisPlan`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .tracing import is_tracing

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic")
# PyTorch's bicubic kernel constant.
CUBIC_A = -0.75

Taps = tuple[tuple[tuple[int, float], ...], ...]


def _cubic_near(x: float) -> float:
    return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: float) -> float:
    return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def resize_taps(size_in: int, size_out: int, mode: str) -> Taps:
    """One-axis weights of ``F.interpolate(..., size, mode, align_corners=False)``, as plain Python.

    Returns, for each output index, the ``(input index, weight)`` pairs with non-zero weight (merged
    where border clamping repeats an index). Follows ``aten/src/ATen/native/UpSample.h``.

    Args:
        size_in: input length along the axis.
        size_out: output length along the axis.
        mode: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.

    >>> resize_taps(2, 4, "bilinear")[1]
    ((0, 0.75), (1, 0.25))
    """
    scale = size_in / size_out
    rows = []
    for dst in range(size_out):
        taps: dict[int, float] = {}
        if mode == "nearest":
            if size_out == size_in:
                src = dst
            elif size_out == 2 * size_in:
                src = dst >> 1
            else:
                src = min(math.floor(dst * scale), size_in - 1)
            taps[src] = 1.0
        elif mode == "bilinear":
            src = max(scale * (dst + 0.5) - 0.5, 0.0)
            low = int(src)
            high = low + (1 if low < size_in - 1 else 0)
            frac = src - low
            taps[low] = taps.get(low, 0.0) + 1.0 - frac
            taps[high] = taps.get(high, 0.0) + frac
        elif mode == "bicubic":
            src = scale * (dst + 0.5) - 0.5
            low = math.floor(src)
            t = src - low
            weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
            for offset, weight in zip(range(-1, 3), weights, strict=True):
                index = min(max(low + offset, 0), size_in - 1)
                taps[index] = taps.get(index, 0.0) + weight
        else:
            raise ValueError(f"interpolation must be one of {INTERPOLATION_MODES}, got {mode!r}")
        rows.append(tuple(sorted((i, w) for i, w in taps.items() if w != 0.0)))
    return tuple(rows)


@dataclass(frozen=True)
class AxisPlan:
    """How one expert resizes one axis of length ``size``: constant matrices, as nested lists.

    The expert needs its conv outputs only at the up-sampled ``positions`` that the resize back reads
    (for odd scales one per output index, for large even scales four; all of them otherwise). With the
    3x3 conv's three taps along this axis folded in, ``up`` ``(positions, 3 * size)`` maps the grid to the
    three shifted up-sampled rows each position needs (zero outside the up-sampled grid: the conv's
    padding), and ``down`` ``(size, positions)`` is the resize back restricted to those positions.
    """

    size: int
    scaled: int
    positions: int
    up: list[list[float]]
    down: list[list[float]]


def _dense_rows(taps: Taps, size_in: int) -> list[list[float]]:
    rows = [[0.0] * size_in for _ in taps]
    for row, pairs in zip(rows, taps, strict=True):
        for index, weight in pairs:
            row[index] = weight
    return rows


@functools.lru_cache(maxsize=256)
def axis_plan(size: int, scale: float, mode: str) -> AxisPlan:
    """The resize matrices of an expert with ``scale`` along an axis of length ``size``.

    Args:
        size: the grid's length along the axis.
        scale: the expert's resize factor.
        mode: the interpolation mode.

    >>> plan = axis_plan(4, 3.0, "bicubic")
    >>> plan.scaled, plan.positions  # odd scales: the resize back samples one position per output
    (12, 4)
    """
    scaled = max(1, round(size * scale))
    up_rows = _dense_rows(resize_taps(size, scaled, mode), size)  # (scaled, size)
    down_taps = resize_taps(scaled, size, mode)
    width = max(pairs[-1][0] - pairs[0][0] + 1 for pairs in down_taps)  # conv outputs one output index reads
    if size * width < scaled:  # each output index gets its own block of `width` positions
        blocks = [(index, pairs[0][0] + t) for index, pairs in enumerate(down_taps) for t in range(width)]
    else:  # every up-sampled position, shared by all outputs
        blocks = [(None, p) for p in range(scaled)]
    zero = [0.0] * size
    up = [
        [w for tap in range(3) for w in (up_rows[p + tap - 1] if 0 <= p + tap - 1 < scaled else zero)]
        for _, p in blocks
    ]
    down = [[0.0] * len(blocks) for _ in range(size)]
    for index, pairs in enumerate(down_taps):
        weights = dict(pairs)
        for column, (owner, p) in enumerate(blocks):
            if owner in (None, index):
                down[index][column] = weights.get(p, 0.0)
    return AxisPlan(size, scaled, len(blocks), up, down)


def padded_stack(size: int, scales: tuple[float, ...], mode: str) -> tuple[list, list]:
    """The ``up`` and ``down`` matrices of experts with ``scales`` along an axis of ``size``, stacked.

    Experts with fewer positions than the largest get zero rows in ``up`` and zero columns in ``down``,
    so that every expert's matrices have the same shapes (the padded positions hold ``gelu(bias)`` but
    are never read back).

    Args:
        size: the grid's length along the axis.
        scales: the experts' resize factors.
        mode: the interpolation mode.

    >>> up, down = padded_stack(4, (1.0, 8.0), "bicubic")
    >>> len(up[0]), len(up[1]), len(down[0][0])  # scale 1 padded to scale 8's 16 positions
    (16, 16, 16)
    """
    plans = [axis_plan(size, scale, mode) for scale in scales]
    positions = max(p.positions for p in plans)
    up = [p.up + [[0.0] * (3 * p.size)] * (positions - p.positions) for p in plans]
    down = [[row + [0.0] * (positions - p.positions) for row in p.down] for p in plans]
    return up, down


def resize_matrices(
    size: int, scales: tuple[float, ...], mode: str, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`padded_stack` as tensors of ``like``'s dtype and device: ``(e, p, 3 size)`` and ``(e, size, p)``.

    Cached outside tracing (``_cached_matrices``, bounded); a tracer sees a constant either way.

    Args:
        size: the grid's length along the axis.
        scales: the experts' resize factors.
        mode: the interpolation mode.
        like: a tensor of the dtype and device wanted.

    >>> up, down = resize_matrices(4, (3.0,), "bicubic", torch.zeros(()))
    >>> tuple(up.shape), tuple(down.shape)
    ((1, 4, 12), (1, 4, 4))
    """
    if is_tracing():  # a tensor made while tracing may be a fake one: never cache it
        return _build_matrices(size, scales, mode, like.dtype, like.device)
    return _cached_matrices(size, scales, mode, like.dtype, like.device)


def _build_matrices(
    size: int, scales: tuple[float, ...], mode: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # the nested lists are built only here and not kept: as Python floats they take four times a tensor's memory
    up, down = padded_stack(size, scales, mode)
    return torch.tensor(up, dtype=dtype, device=device), torch.tensor(down, dtype=dtype, device=device)


# Shared by every mixture. The matrices are constants of the key (size, scales, mode, dtype, device), so nothing
# invalidates an entry; the bound keeps at most 128 pairs, the least recently used dropped first. A SAM encoder
# with the default 8 experts uses up to 12 per grid size, dtype and device (one per scale, one per stack of equally
# shaped experts, one of all eight), 2 MiB at most each (all eight padded, ViT's 64x64 global grid, float32).
_cached_matrices = functools.lru_cache(maxsize=128)(_build_matrices)
