"""Fast paths of the conv-expert mixture: the outputs and gradients of ``moe.py``'s reference, with fewer operations.

``tests/test_routing.py`` checks every path here against the reference, in training and evaluation, on windowed
and global grids. All of them compute an expert without interpolation kernels: each resize is a product with a
small constant matrix (``resize_matrices.py``; faster than the interpolation kernels at these sizes, whose
backward scatters), the conv's channel mixing runs at the grid's own resolution and its spatial taps ride along
in the up-sampling matrices, so the conv is computed only where the resize back reads it (for odd scales one
position per output pixel, for large even scales four per axis).

- :func:`matrix_expert`: one expert on a batch.
- :func:`stacked_experts`: several experts on the whole batch, as one chain of batched products.
- :func:`gathered_experts`: each row of a batch through its own expert, every matrix gathered per row.
- :class:`FoldedExperts`: frozen experts on small grids, conv weights folded into the resize once per grid.

Three mixtures (routing plus combine) are built from them:

- :func:`dense_mixture`: every expert on every sample, a per-sample weight (zero unless chosen) selects:
  static shapes, no host sync, traceable by ``torch.compile`` and the ONNX exporter;
- :func:`gathered_mixture`: each (sample, slot) row through its own expert in one padded chain: static shapes,
  no host sync and ``top_k`` experts per sample, the path ``torch.compile`` takes;
- :func:`sparse_mixture`: each expert on the samples routed to it: least arithmetic, but data-dependent shapes
  and, on an accelerator, a host sync.

The two static-shape mixtures are single calls in Dynamo's graph (``tracing.captured_as_one_call``): AOT autograd
records their tensor operations, running their plain-Python plans as Python, and keeps the resize matrices as
constants, so ``torch.compile`` captures a mixture in about the time of its tensor operations.

The functions take the mixture's stacked weights ``(e, r, r / groups, 3, 3)`` and biases ``(e, r)``; a depthwise
conv is recognised from the weight's shape. ``combine`` is ``None`` for an unweighted combine (every factor 1).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .resize_matrices import axis_plan, padded_stack, resize_matrices
from .tracing import captured_as_one_call

# The sparse dispatch runs a stack's used experts as one gathered chain when there are more than this many
# (with autograd; one more without it, where no backward pass shares the saving), else a chain each:
# gathering the matrices costs about one chain's operator calls (measured on a 2-core CPU). Either way the
# outputs are the same; only the speed depends on it.
GATHER_FROM = 1
# Values per row (r x positions x positions) up to which the sparse dispatch runs every expert in one chain,
# smaller experts zero-padded (convlora-tiny's 8x8 windows and 16x16 grid, ViT-B's 14x14 windows): the padding
# costs less than the operator calls of separate chains, and the shapes stay the same from batch to batch
# (each new shape costs the kernel libraries a cached plan). Measured on a 2-core CPU; speed only, as above.
ONE_STACK_VALUES = 2**14


def matrix_expert(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """One expert on channels-first ``z`` ``(n, r, h, w)``; returns ``(n, r, h, w)``.

    Args:
        z: the features, channels first.
        weight: the expert's conv weight ``(r, r / groups, 3, 3)``.
        bias: its conv bias ``(r,)``.
        scale: its resize factor.
        mode: the interpolation mode.

    >>> matrix_expert(torch.randn(2, 3, 4, 5), torch.randn(3, 3, 3, 3), torch.zeros(3), 2.0, "bicubic").shape
    torch.Size([2, 3, 4, 5])
    """
    weight, bias = weight.to(z.dtype), bias.to(z.dtype)
    groups = z.shape[1] // weight.shape[1]
    if scale == 1.0:
        return F.gelu(F.conv2d(z, weight, bias, padding=1, groups=groups))
    height, width = (int(n) for n in z.shape[-2:])  # plain ints under tracers too: the matrices are constants
    up_h, down_h = resize_matrices(height, (scale,), mode, z)  # (1, p, 3 h), (1, h, p)
    up_w, down_w = resize_matrices(width, (scale,), mode, z)  # (1, q, 3 w), (1, w, q)
    grid = rearrange(z, "n c h w -> n h w c")  # a view: the mixture's input is channels-last
    if groups == 1:
        taps = grid @ rearrange(weight, "o c a b -> c (o a b)")  # (n, h, w, r 3 3): one per conv tap
    else:
        taps = rearrange(grid[..., None] * weight.flatten(1), "n h w o t -> n h w (o t)")
    taps = rearrange(taps, "n h w (o a b) -> n o a h (b w)", a=3, b=3)
    y = rearrange(taps @ up_w[0].T, "n o a h q -> n o (a h) q")  # (n, r, 3 h, q)
    y = F.gelu(up_h[0] @ y + bias.view(-1, 1, 1))  # (n, r, p, q): conv outputs where the resize back reads
    return down_h[0] @ y @ down_w[0].T


def stacked_experts(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scales: tuple[float, ...], mode: str
) -> torch.Tensor:
    """Several experts (full convs) on all of ``z`` ``(n, r, h, w)``; returns ``(n, e, r, h, w)``.

    Batched over the experts; cheapest when their matrices have the same shapes (:func:`matrix_stacks`), since
    smaller ones are zero-padded to the largest.

    Args:
        z: the features, channels first.
        weight: the experts' conv weights ``(e, r, r, 3, 3)``.
        bias: their conv biases ``(e, r)``.
        scales: their resize factors.
        mode: the interpolation mode.

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> stacked_experts(torch.randn(2, 3, 4, 4), weight, bias, (1.0, 3.0), "bicubic").shape
    torch.Size([2, 2, 3, 4, 4])
    """
    height, width = (int(n) for n in z.shape[-2:])
    weight, bias = weight.to(z.dtype), bias.to(z.dtype)
    up_h, down_h = resize_matrices(height, scales, mode, z)  # (e, p, 3 h), (e, h, p)
    up_w, down_w = resize_matrices(width, scales, mode, z)  # (e, q, 3 w), (e, w, q)
    grid = rearrange(z, "n c h w -> n h w c")
    taps = grid @ rearrange(weight, "e o c a b -> c (e o a b)")  # (n, h, w, e r 3 3)
    taps = rearrange(taps, "n h w (e o a b) -> n e o a h (b w)", e=len(scales), a=3, b=3)
    y = torch.einsum("neoahk,eqk->neoahq", taps, up_w)  # (n, e, r, 3, h, q)
    y = rearrange(y, "n e o a h q -> n e o (a h) q")
    y = torch.einsum("epk,neokq->neopq", up_h, y)  # (n, e, r, p, q)
    y = F.gelu(y + bias[None, :, :, None, None])
    y = torch.einsum("ehp,neopq->neohq", down_h, y)
    return torch.einsum("neohq,ewq->neohw", y, down_w)  # (n, e, r, h, w)


def gathered_experts(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scales: tuple[float, ...],
    mode: str,
    row_experts: torch.Tensor,
) -> torch.Tensor:
    """Each row of ``z`` ``(m, r, h, w)`` through its own expert ``row_experts`` ``(m,)``; returns ``(m, r, h, w)``.

    One chain of batched products serves all the experts (full convs): every row reads its expert's matrices,
    zero-padded to the largest expert's (:func:`padded_stack`).

    Args:
        z: the rows, channels first.
        weight: the experts' conv weights ``(e, r, r, 3, 3)``.
        bias: their conv biases ``(e, r)``.
        scales: their resize factors.
        mode: the interpolation mode.
        row_experts: the expert of each row, indices into ``weight``.

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> gathered_experts(torch.randn(4, 3, 5, 5), weight, bias, (1.0, 2.0), "bicubic", torch.tensor([1, 0, 0, 1])).shape
    torch.Size([4, 3, 5, 5])
    """
    height, width = int(z.shape[-2]), int(z.shape[-1])
    up_h, down_h = (m.index_select(0, row_experts) for m in resize_matrices(height, scales, mode, z))  # (m, p, 3 h)
    up_w, down_w = (m.index_select(0, row_experts) for m in resize_matrices(width, scales, mode, z))  # (m, q, 3 w)
    weight = weight.index_select(0, row_experts).to(z.dtype)  # (m, o, c, 3, 3)
    bias = bias.index_select(0, row_experts).to(z.dtype)  # (m, o)
    channels, q = weight.shape[1], up_w.shape[1]
    grid = rearrange(z, "m c h w -> m (h w) c")  # a view: the mixture's input is channels-last
    taps = torch.bmm(grid, rearrange(weight, "m o c a b -> m c (o a b)"))  # (m, h w, r 3 3): one per conv tap
    taps = rearrange(taps, "m (h w) (o a b) -> m (o a h) (b w)", h=height, a=3, b=3)
    y = torch.bmm(taps, up_w.transpose(1, 2))  # (m, r 3 h, q)
    y = rearrange(y, "m (o a h) q -> m (a h) (o q)", a=3, h=height)
    y = rearrange(torch.bmm(up_h, y), "m p (o q) -> m p o q", q=q)  # conv outputs where the resize back reads
    y = F.gelu(y + bias[:, None, :, None])
    y = torch.bmm(down_h, rearrange(y, "m p o q -> m p (o q)"))  # (m, h, r q)
    y = torch.bmm(rearrange(y, "m h (o q) -> m (h o) q", q=q), down_w.transpose(1, 2))  # (m, h r, w)
    return rearrange(y, "m (h o) w -> m o h w", o=channels)


def matrix_stacks(height: int, width: int, scales: tuple[float, ...], mode: str, groups: int) -> list[list[int]]:
    """Experts grouped by the shapes of their resize matrices (full convs only; depthwise ones stand alone).

    >>> matrix_stacks(8, 8, (1.0, 2.0, 3.0, 4.0), "bicubic", groups=1)  # scales 1 and 3: one position per pixel
    [[0, 2], [1], [3]]
    """
    if groups > 1:
        return [[e] for e in range(len(scales))]
    stacks: dict[tuple[int, int], list[int]] = {}
    for expert, scale in enumerate(scales):
        shape = (axis_plan(int(height), scale, mode).positions, axis_plan(int(width), scale, mode).positions)
        stacks.setdefault(shape, []).append(expert)
    return list(stacks.values())


@functools.lru_cache(maxsize=256)
def fits_one_stack(height: int, width: int, scales: tuple[float, ...], mode: str, channels: int) -> bool:
    """Whether the largest expert's conv outputs on this grid fit :data:`ONE_STACK_VALUES` per row.

    >>> fits_one_stack(8, 8, (1.0, 8.0), "bicubic", 3), fits_one_stack(64, 64, (1.0, 8.0), "bicubic", 3)
    (True, False)
    """
    rows = max(axis_plan(height, s, mode).positions for s in scales)
    cols = max(axis_plan(width, s, mode).positions for s in scales)
    return channels * rows * cols <= ONE_STACK_VALUES


def merge_slots(y: torch.Tensor, combine: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Rows ``(b k, ...)`` in batch order to ``(b, ...)``: each slot scaled by its factor (unless ``combine`` is
    ``None``), the top-k slots of a sample summed.

    >>> merge_slots(torch.ones(4, 2), torch.tensor([[0.5, 1.0], [1.0, 1.0]]), top_k=2).tolist()
    [[1.5, 1.5], [2.0, 2.0]]
    """
    if combine is not None:
        y = y * combine.flatten().to(y.dtype).view(-1, *[1] * (y.dim() - 1))
    if top_k > 1:
        y = rearrange(y, "(b k) ... -> b k ...", k=top_k).sum(dim=1)
    return y


@captured_as_one_call
def dense_mixture(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scales: tuple[float, ...],
    mode: str,
    top_indices: torch.Tensor,
    combine: torch.Tensor | None,
) -> torch.Tensor:
    """Every expert on every sample of ``z`` ``(b, h, w, r)``, each sample keeping its chosen ones; ``(b, h, w, r)``.

    Experts whose resize matrices have the same shapes (e.g. scales 1, 3, 5, 7, which all compute one conv
    output per grid position) run stacked, one batched product per step instead of one per expert.

    Args:
        z: the bottleneck grid, channels last.
        weight: every expert's conv weights ``(e, r, r / groups, 3, 3)``.
        bias: every expert's conv biases ``(e, r)``.
        scales: every expert's resize factor.
        mode: the interpolation mode.
        top_indices: the chosen experts ``(b, k)``.
        combine: each chosen expert's factor ``(b, k)``, or ``None`` for 1.

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> z, chosen = torch.randn(2, 4, 4, 3), torch.tensor([[1], [0]])
    >>> dense_mixture(z, weight, bias, (1.0, 2.0), "bicubic", chosen, None).shape
    torch.Size([2, 4, 4, 3])
    """
    features = rearrange(z, "b h w r -> b r h w")
    factors = torch.ones_like(top_indices, dtype=torch.float32) if combine is None else combine
    per_expert = torch.zeros(z.shape[0], len(scales), device=z.device, dtype=factors.dtype)
    per_expert = per_expert.scatter_add(1, top_indices, factors)  # (b, e): zero for the experts a sample skips
    groups = z.shape[-1] // weight.shape[2]
    out = torch.zeros_like(features)
    for experts in matrix_stacks(*features.shape[-2:], scales, mode, groups):
        if len(experts) == 1:
            e = experts[0]
            y = matrix_expert(features, weight[e], bias[e], scales[e], mode)  # (b, r, h, w)
            out = out + y * per_expert[:, e].to(y.dtype).view(-1, 1, 1, 1)
        else:
            stack = tuple(scales[e] for e in experts)
            y = stacked_experts(features, weight[experts], bias[experts], stack, mode)  # (b, e, r, h, w)
            out = out + torch.einsum("berhw,be->brhw", y, per_expert[:, experts].to(y.dtype))
    return rearrange(out, "b r h w -> b h w r")


def full_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Stacked conv weights ``(e, o, c / groups, 3, 3)`` as full ones ``(e, o, c, 3, 3)``.

    A depthwise conv is a full conv whose channel mixing is diagonal; full weights come back as they are.

    >>> full_conv_weight(torch.ones(2, 3, 1, 3, 3))[0, :, :, 1, 1].tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if weight.shape[2] == weight.shape[1]:
        return weight
    full = torch.diag_embed(rearrange(weight[:, :, 0], "e o a b -> e a b o"))  # (e, 3, 3, o, o)
    return rearrange(full, "e a b o c -> e o c a b")


@captured_as_one_call
def gathered_mixture(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scales: tuple[float, ...],
    mode: str,
    top_indices: torch.Tensor,
    combine: torch.Tensor | None,
) -> torch.Tensor:
    """Each (sample, slot) row of ``z`` ``(b, h, w, r)`` through its own expert; returns ``(b, h, w, r)``.

    One chain of batched products for every expert (:func:`gathered_experts`: each row reads its expert's
    matrices, zero-padded to the largest expert's), with static shapes and no host sync: the path
    ``torch.compile`` takes. It runs ``top_k`` experts per sample, not all of them as :func:`dense_mixture` does:
    on small grids the sparse dispatch's own chain; on large ones each row pays for the largest expert's
    positions, where the sparse dispatch groups rows by matrix shape. One short program to capture whatever
    the number of experts. Depthwise experts run as full convs with diagonal channel mixing
    (:func:`full_conv_weight`).

    Args:
        z: the bottleneck grid, channels last.
        weight: every expert's conv weights ``(e, r, r / groups, 3, 3)``.
        bias: every expert's conv biases ``(e, r)``.
        scales: every expert's resize factor.
        mode: the interpolation mode.
        top_indices: the chosen experts ``(b, k)``.
        combine: each chosen expert's factor ``(b, k)``, or ``None`` for 1.

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> z, chosen = torch.randn(2, 4, 4, 3), torch.tensor([[1], [0]])
    >>> gathered_mixture(z, weight, bias, (1.0, 2.0), "bicubic", chosen, None).shape
    torch.Size([2, 4, 4, 3])
    """
    top_k = top_indices.shape[1]
    rows = z if top_k == 1 else z.repeat_interleave(top_k, dim=0)  # (b k, h, w, r), in batch order
    features = rearrange(rows, "n h w r -> n r h w")
    y = gathered_experts(features, full_conv_weight(weight), bias, scales, mode, top_indices.flatten())
    return rearrange(merge_slots(y, combine, top_k), "b r h w -> b h w r")


def sparse_mixture(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scales: tuple[float, ...],
    mode: str,
    top_indices: torch.Tensor,
    combine: torch.Tensor | None,
) -> torch.Tensor:
    """Each expert on the samples of ``z`` ``(b, h, w, r)`` routed to it only; returns ``(b, h, w, r)``.

    One host sync (the per-expert counts). A batch routed to one expert runs it alone; on small grids every
    (sample, slot) row reads its own expert's padded matrices in batch order (:func:`gathered_experts`: no sort);
    on large grids the rows are sorted by expert once and experts whose matrices have the same shapes share one
    gathered chain, so a batch spread over eight experts costs one to three chains, not eight.

    Args:
        z: the bottleneck grid, channels last.
        weight: every expert's conv weights ``(e, r, r / groups, 3, 3)``.
        bias: every expert's conv biases ``(e, r)``.
        scales: every expert's resize factor.
        mode: the interpolation mode.
        top_indices: the chosen experts ``(b, k)``.
        combine: each chosen expert's factor ``(b, k)``, or ``None`` for 1.

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> z, chosen = torch.randn(2, 4, 4, 3), torch.tensor([[1], [0]])
    >>> sparse_mixture(z, weight, bias, (1.0, 2.0), "bicubic", chosen, None).shape
    torch.Size([2, 4, 4, 3])
    """
    num_experts, top_k = len(scales), top_indices.shape[1]
    features = rearrange(z, "b h w r -> b r h w")
    slots = top_indices.flatten()  # (b k): the expert of each (sample, slot)
    sizes = torch.bincount(slots, minlength=num_experts).tolist()  # the one host sync
    if top_k == 1 and max(sizes) == len(slots):  # one expert for the whole batch: no gather
        e = sizes.index(len(slots))
        y = matrix_expert(features, weight[e], bias[e], scales[e], mode)
        return rearrange(merge_slots(y, combine, top_k), "b r h w -> b h w r")
    groups = z.shape[-1] // weight.shape[2]
    height, width = int(z.shape[1]), int(z.shape[2])
    limit = GATHER_FROM if torch.is_grad_enabled() else GATHER_FROM + 1
    used = [e for e in range(num_experts) if sizes[e]]
    if len(used) > limit and groups == 1 and fits_one_stack(height, width, scales, mode, int(z.shape[-1])):
        # small grid: every expert in one chain (smaller matrices zero-padded), rows in batch order
        rows = z if top_k == 1 else z.repeat_interleave(top_k, dim=0)
        y = gathered_experts(rearrange(rows, "n h w r -> n r h w"), weight, bias, scales, mode, slots)
        return rearrange(merge_slots(y, combine, top_k), "b r h w -> b h w r")
    # (used experts, their whole stack for a gathered chain or None), in the order of their rows; a gathered
    # chain reads the whole stack's matrices (one set per stack and grid, whichever of its experts are used)
    plan: list[tuple[list[int], list[int] | None]] = []
    for experts in matrix_stacks(height, width, scales, mode, groups):
        used = [e for e in experts if sizes[e]]
        plan += [(used, experts)] if len(used) > limit else [([e], None) for e in used]
    rank = [0] * num_experts  # rows sorted by their place in the plan
    for index, (experts, _) in enumerate(plan):
        for expert in experts:
            rank[expert] = index
    order = torch.argsort(torch.tensor(rank, device=slots.device)[slots], stable=True)
    samples = torch.div(order, top_k, rounding_mode="floor")
    grouped = rearrange(z.index_select(0, samples), "n h w r -> n r h w")  # (b k, r, h, w), in plan order
    outputs, start = [], 0
    for experts, stack in plan:
        count = sum(sizes[e] for e in experts)
        rows = grouped[start : start + count]
        if stack is not None:
            place = [0] * num_experts  # expert id -> its place in the stack
            for index, expert in enumerate(stack):
                place[expert] = index
            row_experts = torch.tensor(place, device=z.device)[slots[order[start : start + count]]]
            stack_scales = tuple(scales[e] for e in stack)
            outputs.append(gathered_experts(rows, weight[stack], bias[stack], stack_scales, mode, row_experts))
        else:
            e = experts[0]
            outputs.append(matrix_expert(rows, weight[e], bias[e], scales[e], mode))
        start += count
    y = torch.cat(outputs)
    if combine is not None:
        y = y * combine.flatten()[order].to(y.dtype).view(-1, 1, 1, 1)
    return rearrange(torch.zeros_like(features).index_add(0, samples, y), "b r h w -> b h w r")


class FoldedExperts:
    """Frozen experts on small grids: each expert's conv weights folded into its width-wise resize, kept per grid.

    Then an expert is four batched products and a GELU, and every (sample, slot) row reads its own expert's
    folded matrices in the order of the batch: no sort, no scatter back. For a merged model or an evaluation
    pass; gradients reach the input but not the expert weights (:meth:`applies` says when it may run).

    The cache (one per mixture) keys on the grid's height and width, the dtype and device, the experts and
    their scales and interpolation mode. An entry is used only while the weight and bias it was folded from are
    the same tensor objects (``.to()``, ``.half()`` or ``load_state_dict(assign=True)`` make new ones), at the
    same addresses, with the same version counters (in-place writes such as an optimiser step, a
    ``load_state_dict`` copy or ``reset_parameters`` bump them). A miss drops the entries of other weights, and
    at most ``max_entries`` are kept (the oldest dropped first). Copies and pickles start empty. Hits read
    without the lock (a single dict lookup); misses, which change the dict, take it.

    Args:
        max_entries: how many folded sets to keep.

    >>> folded, weight, bias = FoldedExperts(), torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> z, chosen = torch.randn(2, 4, 4, 3), torch.tensor([[1], [0]])
    >>> folded(z, weight, bias, (1.0, 2.0), "bicubic", chosen, None).shape
    torch.Size([2, 4, 4, 3])
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple] = {}  # key -> (weight, bias, versions, folded), oldest first
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_entries"])

    @staticmethod
    def applies(
        z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scales: tuple[float, ...], mode: str
    ) -> bool:
        """Whether the folded chain may run on ``z`` ``(b, h, w, r)``: no gradient for the experts, a small grid.

        Args:
            z: the bottleneck grid, channels last.
            weight: every expert's conv weights.
            bias: every expert's conv biases.
            scales: every expert's resize factor.
            mode: the interpolation mode.
        """
        if torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad):
            return False
        return fits_one_stack(int(z.shape[1]), int(z.shape[2]), scales, mode, int(z.shape[3]))

    def matrices(
        self,
        height: int,
        width: int,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scales: tuple[float, ...],
        mode: str,
        experts: tuple[int, ...],
        like: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The matrices of ``experts`` on a ``height x width`` grid, folded and packed: ``((e, values), (p, q))``.

        Per expert, one row holding, in order: ``fold`` ``(w c, 3 o q)`` (the conv's weights times the
        width-wise up-sampling, so that one product takes the grid to the three row-shifted, width-wise
        up-sampled conv taps), ``up`` ``(p, h 3)`` (the height-wise up-sampling, its columns in ``(h a)``
        order to read that product's rows as they lie), the bias repeated over the positions ``(o q,)``,
        ``down_h`` ``(h, p)`` and ``down_w`` transposed ``(q, w)``. Several experts are zero-padded to the
        largest one's positions (see :func:`padded_stack`). Cached as the class docstring says.
        """
        key = (height, width, like.dtype, like.device, experts, scales, mode)
        versions = (weight._version, weight.data_ptr(), bias._version, bias.data_ptr())
        cached = self._entries.get(key)
        if cached is not None and cached[0] is weight and cached[1] is bias and cached[2] == versions:
            return cached[3]
        chosen = tuple(scales[e] for e in experts)
        with torch.inference_mode(False), torch.no_grad():  # kept tensors must not be inference tensors
            rows_up, rows_down = padded_stack(height, chosen, mode)
            cols_up, cols_down = padded_stack(width, chosen, mode)
            options = {"dtype": like.dtype, "device": like.device}
            up_h = torch.tensor(rows_up, **options)  # (e, p, 3 h), columns (a h)
            up_w = torch.tensor(cols_up, **options)  # (e, q, 3 w), columns (b w)
            down_h = torch.tensor(rows_down, **options)  # (e, h, p)
            down_w = torch.tensor(cols_down, **options)  # (e, w, q)
            q = up_w.shape[1]
            full = full_conv_weight(weight[list(experts)].to(**options))  # (e, o, c, 3, 3)
            fold = torch.einsum("eocab,eqbw->ewcaoq", full, rearrange(up_w, "e q (b w) -> e q b w", b=3))
            up = rearrange(up_h, "e p (a h) -> e p (h a)", a=3)
            bias_rows = bias[list(experts)].to(**options)[:, :, None].expand(-1, -1, q)  # (e, o, q)
            parts = [fold, up, bias_rows, down_h, rearrange(down_w, "e w q -> e q w")]
            packed = torch.cat([part.reshape(len(experts), -1) for part in parts], dim=1)
        folded = (packed, (up_h.shape[1], q))
        with self._lock:
            stale = [
                k for k, (w, b, v, _) in self._entries.items() if w is not weight or b is not bias or v != versions
            ]
            for old in stale:  # folded from other weights, or from older values of these: never used again
                del self._entries[old]
            self._entries[key] = (weight, bias, versions, folded)
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]
        return folded

    def __call__(
        self,
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scales: tuple[float, ...],
        mode: str,
        top_indices: torch.Tensor,
        combine: torch.Tensor | None,
    ) -> torch.Tensor:
        """The chosen experts on ``z`` ``(b, h, w, r)``; returns ``(b, h, w, r)``.

        A single row runs its expert's matrices unpadded.

        Args:
            z: the bottleneck grid, channels last.
            weight: every expert's conv weights ``(e, r, r / groups, 3, 3)``, needing no gradient.
            bias: every expert's conv biases ``(e, r)``, needing no gradient.
            scales: every expert's resize factor.
            mode: the interpolation mode.
            top_indices: the chosen experts ``(b, k)``.
            combine: each chosen expert's factor ``(b, k)``, or ``None`` for 1.
        """
        if torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad):
            raise ValueError("FoldedExperts needs experts without gradient: run it under no_grad or freeze them")
        height, width, channels = (int(n) for n in z.shape[1:])
        rows = top_indices.flatten()  # (b k): the expert of each (sample, slot)
        m, top_k = rows.numel(), top_indices.shape[1]
        if m == 1:  # one row: its own expert's matrices, unpadded (reading its index is free on a CPU)
            mats, (p, q) = self.matrices(height, width, weight, bias, scales, mode, (int(rows[0]),), z)
        else:
            packed, (p, q) = self.matrices(height, width, weight, bias, scales, mode, tuple(range(len(scales))), z)
            mats = packed.index_select(0, rows)  # (m, values)
        sizes = [width * channels * 3 * channels * q, p * height * 3, channels * q, height * p, q * width]
        fold, up, bias_rows, down_h, down_w = torch.split(mats, sizes, dim=1)
        grid = z if top_k == 1 else z.repeat_interleave(top_k, dim=0)  # (m, h, w, c)
        y = torch.bmm(grid.reshape(m, height, width * channels), fold.view(m, width * channels, -1))  # (m, h, 3 o q)
        y = torch.baddbmm(  # (m, p, o q): conv outputs where the resize back reads, before the GELU
            bias_rows.view(m, 1, channels * q), up.view(m, p, height * 3), y.view(m, height * 3, channels * q)
        )
        y = torch.bmm(down_h.view(m, height, p), F.gelu(y))  # (m, h, o q)
        y = torch.bmm(y.view(m, height * channels, q), down_w.view(m, q, width))  # (m, h o, w)
        y = y.view(m, height, channels, width).transpose(2, 3)  # (m, h, w, o), a view (einops costs µs here)
        return merge_slots(y, combine, top_k)
