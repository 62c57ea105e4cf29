"""Mixture of multi-scale convolution experts: the part of Conv-LoRA that is not LoRA.

Plain torch, no PEFT. The mixture works inside the LoRA bottleneck: it reads a channels-last grid
``z`` of shape ``(b, h, w, r)`` and returns a tensor of the same shape. Each expert resizes the grid by
its own scale, applies a 3x3 convolution and GELU, and resizes back, so that different experts see the
same features at different resolutions. A noisy top-k gate (Shazeer et al., 2017) picks experts per
sample from the grid-averaged features; the load-balancing loss of that paper is stored on the module
after every training forward (``aux_loss``) and collected by :func:`moe_aux_loss`.

Resizing is linear and separable, so each resize is a matrix product with a small constant matrix
(the interpolation weights of ``F.interpolate``, computed here in plain Python). That is faster than
the interpolation kernels at these sizes (their backward scatters), and since everything before the
GELU is linear, the conv's taps fold into those matrices and the conv is computed only where the resize
back reads it: for odd scales one position per output pixel, for large even scales four per axis.
Two dispatches give the same outputs and gradients:

- ``"sparse"``: each expert runs on the samples routed to it (one sort, one gather, one ``index_add``;
  experts with equally shaped matrices share one chain of batched products in which every sample reads
  its own expert's matrices): least arithmetic, but data-dependent shapes and, on an accelerator, a host
  sync;
- ``"dense"``: every expert runs on every sample and a per-sample weight (zero unless chosen) selects:
  static shapes, no host sync, traceable by ``torch.compile`` and the ONNX exporter.

``"auto"`` (the default) is dense while tracing or compiling and on accelerators, sparse in eager CPU
runs where it is faster (see ``docs/guides/deploy.md``). On small grids the sparse dispatch needs no sort:
every (sample, slot) row reads its own expert's matrices, zero-padded to the largest expert's, in batch
order. When no gradient is needed (a merged model, evaluation) it also folds each expert's conv weights
into its width-wise resize once per grid and keeps the result until the weights change, so that frozen
experts cost four batched products and a GELU per layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic")
ROUTING_MODES = ("auto", "sparse", "dense")

# Added to the learned noise scale so that the gate keeps exploring while its noise weights are zero.
NOISE_EPSILON = 1e-2
# The sparse dispatch runs a stack's used experts as one gathered chain when there are more than this many
# (with autograd; one more without it, where no backward pass shares the saving), else a chain each:
# gathering the matrices costs about one chain's operator calls (measured on a 2-core CPU).
GATHER_FROM = 1
# Values per row (r x positions x positions) up to which the sparse dispatch runs every expert in one chain,
# smaller experts zero-padded (convlora-tiny's 8x8 windows and 16x16 grid, ViT-B's 14x14 windows): the padding
# costs less than the operator calls of separate chains, and the shapes stay the same from batch to batch.
ONE_STACK_VALUES = 2**14
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
    so that every expert's matrices have the same shapes.

    >>> up, down = padded_stack(4, (1.0, 8.0), "bicubic")
    >>> len(up[0]), len(up[1]), len(down[0][0])  # scale 1 padded to scale 8's 16 positions
    (16, 16, 16)
    """
    plans = [axis_plan(size, scale, mode) for scale in scales]
    positions = max(p.positions for p in plans)
    up = [p.up + [[0.0] * (3 * p.size)] * (positions - p.positions) for p in plans]
    down = [[row + [0.0] * (positions - p.positions) for row in p.down] for p in plans]
    return up, down


_MATRICES: dict[tuple, torch.Tensor] = {}


def _matrix(key: tuple, like: torch.Tensor, values: Callable[[], list]) -> torch.Tensor:
    """``values()`` as a tensor on ``like``'s device and dtype, cached under ``key`` (the nested lists are built
    only on a miss and not kept: as Python floats they take four times a tensor's memory); a tracer sees a
    constant either way."""
    key = (*key, like.dtype, like.device)
    matrix = _MATRICES.get(key)
    if matrix is None:
        matrix = torch.tensor(values(), dtype=like.dtype, device=like.device)
        if not _tracing():  # a tensor made while tracing may be a fake one
            _MATRICES[key] = matrix
    return matrix


def _tracing() -> bool:
    """Inside ``torch.compile``, ``torch.export``, the ONNX exporter or a TorchScript trace."""
    return torch.compiler.is_compiling() or _exporting()


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def check_grid(x: torch.Tensor, where: str) -> None:
    """Refuse anything but a channels-last grid ``(b, h, w, d)``, naming ``where`` it was seen."""
    if x.dim() != 4:
        raise ValueError(
            f"{where} needs a channels-last grid (batch, height, width, channels) to run its conv experts, "
            f"got a tensor of shape {tuple(x.shape)}. Target only image-encoder layers (e.g. attn.qkv)."
        )


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2``; zero for a single value.

    Args:
        x: a 1-D tensor, e.g. the per-expert importance.

    >>> float(cv_squared(torch.tensor([1.0, 1.0, 1.0])))
    0.0
    """
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def top_k_lowest_first(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(b, k)`` of the ``k`` largest logits per row, ties going to the lowest index.

    A stable descending sort would do the same; repeated ``argmax`` (documented to return the first
    maximum) keeps the tie rule in traced graphs too, whose sorts need not be stable.

    Args:
        logits: ``(b, e)`` gate logits.
        k: how many to keep.

    >>> top_k_lowest_first(torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0]]), 2).tolist()
    [[0, 1], [1, 2]]
    """
    picked = [logits.argmax(dim=-1, keepdim=True)]  # (b, 1)
    remaining = logits
    for _ in range(k - 1):
        remaining = remaining.scatter(1, picked[-1], float("-inf"))
        picked.append(remaining.argmax(dim=-1, keepdim=True))
    return torch.cat(picked, dim=1) if k > 1 else picked[0]


class ConvExpertMixture(nn.Module):
    """Noisy top-k mixture of multi-scale 3x3 conv experts over a channels-last grid.

    Expert ``i`` computes ``resize_back(gelu(conv3x3_i(resize(z, scale_i))))``. The expert weights are
    stored stacked, ``(experts, r, r / groups, 3, 3)``, so the module's state has the same four tensors
    whatever the number of experts. Routing is per sample and never loops over samples in Python: the
    sparse dispatch runs each expert once on the samples routed to it, the dense one runs every expert
    on the whole batch and keeps each sample's chosen ones (see the module docstring).

    Args:
        channels: channels of the grid (the LoRA rank ``r``).
        scales: resize factor of each expert, one per expert (1 means no resize).
        top_k: experts used per sample.
        depthwise: depthwise convs (``groups = channels``) instead of full convs.
        interpolation: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``, used to resize both ways.
        weighted_combine: scale each selected expert's output by its gate probability (softmax over all
            experts), which lets the task loss train the gate; otherwise outputs are summed unweighted
            as in the paper's code, and the gate learns from the auxiliary loss alone.
        noisy_gating: add learned Gaussian noise to the gate logits in training.
        aux_loss_weight: weight of the load-balancing loss stored in ``aux_loss``.
        routing: ``"sparse"``, ``"dense"`` or ``"auto"`` (dense when traced, compiled or on an
            accelerator); both give the same outputs and gradients. Also settable later (``routing``
            attribute, or :func:`set_routing` on a whole model).

    >>> moe = ConvExpertMixture(channels=4, scales=[1, 2, 3])
    >>> moe(torch.randn(2, 5, 7, 4)).shape
    torch.Size([2, 5, 7, 4])
    """

    def __init__(
        self,
        channels: int,
        scales: Sequence[float],
        top_k: int = 1,
        depthwise: bool = False,
        interpolation: str = "bicubic",
        weighted_combine: bool = False,
        noisy_gating: bool = True,
        aux_loss_weight: float = 0.01,
        routing: str = "auto",
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if len(scales) < 1 or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        if not 1 <= top_k <= len(scales):
            raise ValueError(f"top_k must be between 1 and the number of experts ({len(scales)}), got {top_k}")
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"interpolation must be one of {INTERPOLATION_MODES}, got {interpolation!r}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing
        self.channels = channels
        self.scales = [float(s) for s in scales]
        self.top_k = top_k
        self.groups = channels if depthwise else 1
        self.interpolation = interpolation
        self.weighted_combine = weighted_combine
        self.noisy_gating = noisy_gating
        self.aux_loss_weight = aux_loss_weight
        num_experts = len(self.scales)
        self.expert_weight = nn.Parameter(torch.empty(num_experts, channels, channels // self.groups, 3, 3))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, channels))
        self.gate_weight = nn.Parameter(torch.zeros(channels, num_experts))
        self.noise_weight = nn.Parameter(torch.zeros(channels, num_experts))
        self.aux_loss: torch.Tensor | None = None
        # the last forward's per-expert counts, or the chosen experts to count on first read (last_expert_counts)
        self._routed: torch.Tensor | None = None
        self._routed_counted = True
        # (height, width, dtype, device, experts) -> (weight, bias, their versions and addresses, folded matrices)
        self._folded_cache: dict[tuple, tuple] = {}
        self._one_stack_fits: dict[tuple[int, int], bool] = {}  # grid -> whether every expert fits one padded chain
        self.reset_parameters()

    @property
    def last_expert_counts(self) -> torch.Tensor | None:
        """How many (sample, slot) pairs the last forward sent to each expert, ``(e,)``; ``None`` before any."""
        if not self._routed_counted:
            counts = torch.bincount(self._routed.flatten(), minlength=self.num_experts)
            self.__dict__.update(_routed=counts, _routed_counted=True)
        return self._routed

    def _remember(self, aux: torch.Tensor, routed: torch.Tensor, counted: bool) -> None:
        """Keep the forward's auxiliary loss and routing (plain attributes, set without ``nn.Module``'s checks)."""
        if not _exporting():  # an exported graph keeps no state
            self.__dict__.update(aux_loss=aux, _routed=routed.detach(), _routed_counted=counted)

    @property
    def num_experts(self) -> int:
        """How many experts the mixture holds (one per scale)."""
        return len(self.scales)

    def reset_parameters(self, init_gate: str = "zeros") -> None:
        """Kaiming-uniform conv weights (as ``nn.Conv2d``), zero conv biases, gate per ``init_gate``.

        Args:
            init_gate: ``"zeros"`` (the paper: all experts tie, the first one wins at inference) or
                ``"random"`` (small random gate and noise weights, used by tests to make routing vary).
        """
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.expert_weight.data[i], a=5**0.5)
        nn.init.zeros_(self.expert_bias)
        if init_gate == "zeros":
            nn.init.zeros_(self.gate_weight)
            nn.init.zeros_(self.noise_weight)
        elif init_gate == "random":
            nn.init.normal_(self.gate_weight, std=1.0)
            nn.init.normal_(self.noise_weight, std=0.1)
        else:
            raise ValueError(f"init_gate must be 'zeros' or 'random', got {init_gate!r}")

    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for each sample of ``z`` ``(b, h, w, r)``.

        Returns:
            ``(top_indices (b, k), combine_weights (b, k), aux_loss ())``: the chosen experts, the factor
            applied to each chosen expert's output, and the weighted load-balancing loss (zero in eval).
        """
        z_mean = z.float().mean(dim=(1, 2))  # (b, r)
        clean_logits = z_mean @ self.gate_weight.float()  # (b, e)
        noisy = self.training and self.noisy_gating
        if noisy:
            noise_std = F.softplus(z_mean @ self.noise_weight.float()) + NOISE_EPSILON
            logits = clean_logits + torch.randn_like(clean_logits) * noise_std
        else:
            logits = clean_logits
        top_indices = top_k_lowest_first(logits, self.top_k)  # (b, k)
        if self.weighted_combine:
            combine = logits.softmax(dim=-1).gather(1, top_indices)
        else:
            combine = torch.ones_like(top_indices, dtype=logits.dtype)

        if not self.training or self.aux_loss_weight == 0:
            aux = logits.new_zeros(())
        else:
            top_logits = logits.gather(1, top_indices)
            gates = torch.zeros_like(logits).scatter(1, top_indices, top_logits.softmax(dim=-1))  # (b, e)
            importance = gates.sum(dim=0)
            if noisy and self.top_k < self.num_experts:
                load = self._prob_in_top_k(clean_logits, logits, noise_std).sum(dim=0)
            else:
                load = (gates > 0).float().sum(dim=0)
            aux = (cv_squared(importance) + cv_squared(load)) * self.aux_loss_weight
        return top_indices, combine, aux

    def _prob_in_top_k(
        self,
        clean_logits: torch.Tensor,
        noisy_logits: torch.Tensor,
        noise_std: torch.Tensor,
    ) -> torch.Tensor:
        """Probability, under fresh noise, that each expert would be in the top k: a smooth load."""
        # the (k+1) largest noisy logits: for an expert inside the top k the threshold to beat is the
        # (k+1)-th, for the others the k-th
        largest = torch.topk(noisy_logits, self.top_k + 1, dim=-1).values
        threshold_if_in = largest[:, self.top_k : self.top_k + 1]
        threshold_if_out = largest[:, self.top_k - 1 : self.top_k]
        prob_if_in = torch.special.ndtr((clean_logits - threshold_if_in) / noise_std)  # the standard normal's CDF
        prob_if_out = torch.special.ndtr((clean_logits - threshold_if_out) / noise_std)
        is_in = noisy_logits > threshold_if_in
        return torch.where(is_in, prob_if_in, prob_if_out)

    def run_expert(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on channels-first features ``(n, r, h, w)``: resize, 3x3 conv, GELU, resize back.

        Equal (to float rounding) to ``F.interpolate`` -> ``conv2d(padding=1)`` -> GELU -> ``F.interpolate``.
        Everything before the GELU is linear, so the conv's channel mixing runs first, at the grid's own
        resolution, and its spatial taps ride along in the resize matrices (:func:`axis_plan`): two matrix
        products give the conv outputs at exactly the positions the resize back reads.
        """
        weight = self.expert_weight[index].to(z.dtype)
        bias = self.expert_bias[index].to(z.dtype)
        scale = self.scales[index]
        if scale == 1.0:
            return F.gelu(F.conv2d(z, weight, bias, padding=1, groups=self.groups))
        height, width = (int(n) for n in z.shape[-2:])  # plain ints under tracers too: the matrices are constants
        rows, cols = axis_plan(height, scale, self.interpolation), axis_plan(width, scale, self.interpolation)
        key = (scale, self.interpolation)
        grid = rearrange(z, "n c h w -> n h w c")  # a view: the mixture's input is channels-last
        if self.groups == 1:
            taps = grid @ rearrange(weight, "o c a b -> c (o a b)")  # (n, h, w, r 3 3): one per conv tap
        else:
            taps = rearrange(grid[..., None] * weight.flatten(1), "n h w o t -> n h w (o t)")
        taps = rearrange(taps, "n h w (o a b) -> n o a h (b w)", a=3, b=3)
        up_w = _matrix(("up", width, *key), z, lambda: cols.up)  # (q, 3 w)
        y = rearrange(taps @ up_w.T, "n o a h q -> n o (a h) q")  # (n, r, 3 h, q)
        up_h = _matrix(("up", height, *key), z, lambda: rows.up)  # (p, 3 h)
        y = F.gelu(up_h @ y + bias.view(-1, 1, 1))  # (n, r, p, q): conv outputs where the resize back reads
        down_h = _matrix(("down", height, *key), z, lambda: rows.down)  # (h, p)
        down_w = _matrix(("down", width, *key), z, lambda: cols.down)  # (w, q)
        return down_h @ y @ down_w.T

    def uses_dense_routing(self, z: torch.Tensor) -> bool:
        """Whether this forward dispatches densely (``routing``, or for ``"auto"`` tracing and the device)."""
        if self.routing != "auto":
            return self.routing == "dense"
        return _tracing() or z.device.type != "cpu"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Mix the experts over ``z`` ``(b, h, w, r)``; returns ``(b, h, w, r)``."""
        if z.dim() != 4 or z.shape[-1] != self.channels:
            raise ValueError(
                f"ConvExpertMixture expects a channels-last grid (b, h, w, {self.channels}), got {tuple(z.shape)}"
            )
        top_indices, combine, aux = self.route(z)
        dense = self.uses_dense_routing(z)
        if not dense and self._folds(*z.shape[1:3]):
            self._remember(aux, top_indices, counted=False)
            return self._run_folded(z, top_indices, combine)  # (b, h, w, r)
        features = rearrange(z, "b h w r -> b r h w")
        if dense:
            # (b, e): each sample's factor per expert, zero for the experts it does not use
            per_expert = torch.zeros(z.shape[0], self.num_experts, device=z.device, dtype=combine.dtype)
            out = self._dense(features, per_expert.scatter_add(1, top_indices, combine))
            slots = top_indices.flatten()
            counts = torch.zeros(self.num_experts, dtype=slots.dtype, device=z.device)
            counts = counts.scatter_add(0, slots, torch.ones_like(slots))
        else:
            out, counts = self._sparse(features, top_indices, combine)
        self._remember(aux, counts, counted=True)
        return rearrange(out, "b r h w -> b h w r")

    def _dense(self, features: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """Every expert on every sample, weighted per sample: static shapes, no host sync.

        Experts whose resize matrices have the same shapes (e.g. scales 1, 3, 5, 7, which all compute one
        conv output per grid position) run stacked, as one batched product per step instead of one per
        expert.
        """
        out = torch.zeros_like(features)
        for experts in self._stacks(*features.shape[-2:]):
            if len(experts) == 1:
                y = self.run_expert(experts[0], features)  # (b, r, h, w)
                out = out + y * per_expert[:, experts[0]].to(y.dtype).view(-1, 1, 1, 1)
            else:
                y = self._run_stacked(experts, features)  # (b, e, r, h, w)
                out = out + torch.einsum("berhw,be->brhw", y, per_expert[:, experts].to(y.dtype))
        return out

    def _stacks(self, height: int, width: int) -> list[list[int]]:
        """Experts grouped by the shapes of their resize matrices (full convs only; depthwise run alone)."""
        if self.groups > 1:
            return [[e] for e in range(self.num_experts)]
        stacks: dict[tuple[int, int], list[int]] = {}
        for expert, scale in enumerate(self.scales):
            rows = axis_plan(int(height), scale, self.interpolation)
            cols = axis_plan(int(width), scale, self.interpolation)
            stacks.setdefault((rows.positions, cols.positions), []).append(expert)
        return list(stacks.values())

    def _run_stacked(self, experts: list[int], z: torch.Tensor) -> torch.Tensor:
        """Experts ``experts`` (same matrix shapes) on ``z`` ``(n, r, h, w)``; returns ``(n, e, r, h, w)``.

        The same computation as :meth:`run_expert`, scale 1 included (its resize matrices are the
        identity), batched over the experts.
        """
        height, width = (int(n) for n in z.shape[-2:])
        weight = self.expert_weight[experts].to(z.dtype)  # (e, o, c, 3, 3)
        bias = self.expert_bias[experts].to(z.dtype)  # (e, o)
        rows = [axis_plan(height, self.scales[e], self.interpolation) for e in experts]
        cols = [axis_plan(width, self.scales[e], self.interpolation) for e in experts]
        key = (tuple(self.scales[e] for e in experts), self.interpolation)
        up_h = _matrix(("stack_up", height, *key), z, lambda: [p.up for p in rows])  # (e, p, 3 h)
        up_w = _matrix(("stack_up", width, *key), z, lambda: [p.up for p in cols])  # (e, q, 3 w)
        down_h = _matrix(("stack_down", height, *key), z, lambda: [p.down for p in rows])  # (e, h, p)
        down_w = _matrix(("stack_down", width, *key), z, lambda: [p.down for p in cols])  # (e, w, q)
        grid = rearrange(z, "n c h w -> n h w c")
        taps = grid @ rearrange(weight, "e o c a b -> c (e o a b)")  # (n, h, w, e r 3 3)
        taps = rearrange(taps, "n h w (e o a b) -> n e o a h (b w)", e=len(experts), a=3, b=3)
        y = torch.einsum("neoahk,eqk->neoahq", taps, up_w)  # (n, e, r, 3, h, q)
        y = rearrange(y, "n e o a h q -> n e o (a h) q")
        y = torch.einsum("epk,neokq->neopq", up_h, y)  # (n, e, r, p, q)
        y = F.gelu(y + bias[None, :, :, None, None])
        y = torch.einsum("ehp,neopq->neohq", down_h, y)
        return torch.einsum("neohq,ewq->neohw", y, down_w)  # (n, e, r, h, w)

    def _sparse(
        self, features: torch.Tensor, top_indices: torch.Tensor, combine: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert on the samples routed to it only: one sort, one gather, one scatter back.

        Experts whose resize matrices have the same shapes (see :meth:`_stacks`) run as one chain of
        batched products in which every sample reads its own expert's matrices (on small grids every expert
        does), so a batch spread over eight experts costs one to three chains, not eight. Returns the mixed
        features and how many (sample, slot) pairs went to each expert.
        """
        slots = top_indices.flatten()  # (b k): the expert of each (sample, slot)
        counts = torch.bincount(slots, minlength=self.num_experts)
        sizes = counts.tolist()  # the one host sync
        if self.top_k == 1 and max(sizes) == len(slots):  # one expert for the whole batch: no gather
            expert = sizes.index(len(slots))
            return self._merge_slots(self.run_expert(expert, features), combine), counts
        limit = GATHER_FROM if torch.is_grad_enabled() else GATHER_FROM + 1
        grid = rearrange(features, "b r h w -> b h w r")  # gather in the channels-last memory layout
        used = [e for e in range(self.num_experts) if sizes[e]]
        if len(used) > limit and self._one_gathered_stack(*features.shape[-2:]):
            # small grid: every used expert in one chain (smaller matrices zero-padded), rows in batch order
            rows = grid if self.top_k == 1 else grid.repeat_interleave(self.top_k, dim=0)
            experts = list(range(self.num_experts))  # all of them: one set of padded matrices per grid
            y = self._run_gathered(experts, rearrange(rows, "n h w r -> n r h w"), slots)  # (b k, r, h, w)
            return self._merge_slots(y, combine), counts
        # (used experts, their whole stack for a gathered chain or None), in the order of their rows; a gathered
        # chain reads the whole stack's matrices (one set per stack and grid, whichever of its experts are used)
        plan: list[tuple[list[int], list[int] | None]] = []
        for experts in self._stacks(*features.shape[-2:]):
            used = [e for e in experts if sizes[e]]
            plan += [(used, experts)] if len(used) > limit else [([e], None) for e in used]
        rank = [0] * self.num_experts  # rows sorted by their place in the plan
        for index, (experts, _) in enumerate(plan):
            for expert in experts:
                rank[expert] = index
        order = torch.argsort(torch.tensor(rank, device=slots.device)[slots], stable=True)
        samples = torch.div(order, self.top_k, rounding_mode="floor")
        grouped = rearrange(grid.index_select(0, samples), "n h w r -> n r h w")  # (b k, r, h, w), in plan order
        outputs, start = [], 0
        for experts, stack in plan:
            count = sum(sizes[e] for e in experts)
            rows = grouped[start : start + count]
            if stack is not None:
                outputs.append(self._run_gathered(stack, rows, slots[order[start : start + count]]))
            else:
                outputs.append(self.run_expert(experts[0], rows))
            start += count
        y = torch.cat(outputs)
        if self.weighted_combine:  # otherwise every factor is 1
            y = y * combine.flatten()[order].to(y.dtype).view(-1, 1, 1, 1)
        return torch.zeros_like(features).index_add(0, samples, y), counts

    def _one_gathered_stack(self, height: int, width: int) -> bool:
        """Whether the sparse dispatch runs every expert as one gathered chain on this grid (full convs, small grids).

        Each row then carries the largest expert's positions (:data:`ONE_STACK_VALUES` values at most): for
        convlora-tiny's 8x8 windows and 16x16 grid and ViT-B's 14x14 windows the padding costs less than the
        operator calls of separate chains, and every batch has the same shapes (a chain per stack would
        change shape with the routing, and each new shape costs the kernel libraries a cached plan);
        ViT-B's 64x64 global grid at 1024 px stacks by matrix shapes.
        """
        return self.groups == 1 and self._fits_one_stack(height, width)

    def _fits_one_stack(self, height: int, width: int) -> bool:
        """Whether the largest expert's conv outputs on this grid fit :data:`ONE_STACK_VALUES` (cached per grid)."""
        fits = self._one_stack_fits.get((height, width))
        if fits is None:
            rows = max(axis_plan(int(height), s, self.interpolation).positions for s in self.scales)
            cols = max(axis_plan(int(width), s, self.interpolation).positions for s in self.scales)
            fits = self._one_stack_fits[(height, width)] = self.channels * rows * cols <= ONE_STACK_VALUES
        return fits

    def _run_gathered(self, experts: list[int], z: torch.Tensor, row_experts: torch.Tensor) -> torch.Tensor:
        """Each row of ``z`` ``(m, r, h, w)`` through its own expert ``row_experts`` ``(m,)`` of the stack ``experts``.

        The computation of :meth:`run_expert` (scale 1 included: its resize matrices are the identity) with
        every matrix gathered per row, so one chain of batched products serves several experts (their
        matrices zero-padded to the largest, see :func:`padded_stack`). Full convs only.
        """
        height, width = int(z.shape[-2]), int(z.shape[-1])
        scales = tuple(self.scales[e] for e in experts)
        key = (scales, self.interpolation)
        local = [0] * self.num_experts  # expert id -> its place in the stack
        for place, expert in enumerate(experts):
            local[expert] = place
        place = torch.tensor(local, device=z.device)[row_experts]  # (m,)

        # experts with fewer positions than the largest get zero rows in their up-sampling and zero columns in
        # their down-sampling matrices: the padded positions hold gelu(bias) but are never read back
        def stack(size: int, part: int) -> Callable[[], list]:
            return lambda: padded_stack(size, scales, self.interpolation)[part]

        up_h = _matrix(("gather_up", height, *key), z, stack(height, 0)).index_select(0, place)  # (m, p, 3 h)
        up_w = _matrix(("gather_up", width, *key), z, stack(width, 0)).index_select(0, place)  # (m, q, 3 w)
        down_h = _matrix(("gather_down", height, *key), z, stack(height, 1)).index_select(0, place)  # (m, h, p)
        down_w = _matrix(("gather_down", width, *key), z, stack(width, 1)).index_select(0, place)  # (m, w, q)
        weight = self.expert_weight.index_select(0, row_experts).to(z.dtype)  # (m, o, c, 3, 3)
        bias = self.expert_bias.index_select(0, row_experts).to(z.dtype)  # (m, o)
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

    def _folds(self, height: int, width: int) -> bool:
        """Whether the sparse dispatch runs the folded chain: frozen experts (no gradient needed), small grid."""
        if torch.is_grad_enabled() and (self.expert_weight.requires_grad or self.expert_bias.requires_grad):
            return False
        return self._fits_one_stack(height, width)

    def _folded(
        self, height: int, width: int, like: torch.Tensor, experts: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The matrices of ``experts`` on a ``height x width`` grid, folded and packed: ``((e, values), (p, q))``.

        Per expert, one row holding, in order: ``fold`` ``(w c, 3 o q)`` (the conv's weights times the
        width-wise up-sampling, so that one product takes the grid to the three row-shifted, width-wise
        up-sampled conv taps), ``up`` ``(p, h 3)`` (the height-wise up-sampling, its columns in ``(h a)``
        order to read that product's rows as they lie), the bias repeated over the positions ``(o q,)``,
        ``down_h`` ``(h, p)`` and ``down_w`` transposed ``(q, w)``. Several experts are zero-padded to the
        largest one's positions (see :func:`padded_stack`). Computed once per grid and kept until the expert
        weights change (their version counters), so frozen experts (a merged model, an evaluation) fold once.
        """
        key = (height, width, like.dtype, like.device, experts)
        weight, bias = self.expert_weight, self.expert_bias
        versions = (weight._version, weight.data_ptr(), bias._version, bias.data_ptr())
        cached = self._folded_cache.get(key)
        # the same tensors (a replaced parameter is another object), unchanged since (in-place writes bump versions)
        if cached is not None and cached[0] is weight and cached[1] is bias and cached[2] == versions:
            return cached[3]
        scales = tuple(self.scales[e] for e in experts)
        with torch.inference_mode(False), torch.no_grad():
            rows_up, rows_down = padded_stack(height, scales, self.interpolation)
            cols_up, cols_down = padded_stack(width, scales, self.interpolation)
            options = {"dtype": like.dtype, "device": like.device}
            up_h = torch.tensor(rows_up, **options)  # (e, p, 3 h), columns (a h)
            up_w = torch.tensor(cols_up, **options)  # (e, q, 3 w), columns (b w)
            down_h = torch.tensor(rows_down, **options)  # (e, h, p)
            down_w = torch.tensor(cols_down, **options)  # (e, w, q)
            q = up_w.shape[1]
            full = weight[list(experts)].to(**options)  # (e, o, c / groups, 3, 3)
            if self.groups > 1:  # a depthwise conv is a full conv whose channel mixing is diagonal
                full = torch.diag_embed(rearrange(full[:, :, 0], "e o a b -> e a b o"))
                full = rearrange(full, "e a b o c -> e o c a b")
            fold = torch.einsum("eocab,eqbw->ewcaoq", full, rearrange(up_w, "e q (b w) -> e q b w", b=3))
            up = rearrange(up_h, "e p (a h) -> e p (h a)", a=3)
            bias_rows = bias[list(experts)].to(**options)[:, :, None].expand(-1, -1, q)  # (e, o, q)
            parts = [fold, up, bias_rows, down_h, rearrange(down_w, "e w q -> e q w")]
            packed = torch.cat([part.reshape(len(experts), -1) for part in parts], dim=1)
        folded = (packed, (up_h.shape[1], q))
        self._folded_cache[key] = (weight, bias, versions, folded)
        return folded

    def _run_folded(self, z: torch.Tensor, top_indices: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Frozen experts on a small channels-last grid ``z`` ``(b, h, w, r)``: every (sample, slot) row reads its
        own expert's folded matrices (:meth:`_folded`), in the order of the batch: no sort, no scatter back;
        four batched products and a GELU. A single row runs its expert's matrices unpadded. Returns
        ``(b, h, w, r)``.
        """
        height, width, channels = (int(n) for n in z.shape[1:])
        rows = top_indices.flatten()  # (b k): the expert of each (sample, slot)
        m = rows.numel()
        if m == 1:  # one row: its own expert's matrices, unpadded (reading its index is free on a CPU)
            mats, (p, q) = self._folded(height, width, z, (int(rows[0]),))
        else:
            packed, (p, q) = self._folded(height, width, z, tuple(range(self.num_experts)))
            mats = packed.index_select(0, rows)  # (m, values)
        sizes = [width * channels * 3 * channels * q, p * height * 3, channels * q, height * p, q * width]
        fold, up, bias, down_h, down_w = torch.split(mats, sizes, dim=1)
        grid = z if self.top_k == 1 else z.repeat_interleave(self.top_k, dim=0)  # (m, h, w, c)
        y = torch.bmm(grid.reshape(m, height, width * channels), fold.view(m, width * channels, -1))  # (m, h, 3 o q)
        y = torch.baddbmm(  # (m, p, o q): conv outputs where the resize back reads, before the GELU
            bias.view(m, 1, channels * q), up.view(m, p, height * 3), y.view(m, height * 3, channels * q)
        )
        y = torch.bmm(down_h.view(m, height, p), F.gelu(y))  # (m, h, o q)
        y = torch.bmm(y.view(m, height * channels, q), down_w.view(m, q, width))  # (m, h o, w)
        y = y.view(m, height, channels, width).transpose(2, 3)  # (m, h, w, o), a view (einops costs µs here)
        return self._merge_slots(y, combine)

    def _merge_slots(self, y: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Rows ``(b k, ...)`` in batch order to ``(b, ...)``: each slot scaled by its factor when the combine
        is weighted (every factor is 1 otherwise), the top-k slots of a sample summed."""
        if self.weighted_combine:
            y = y * combine.flatten().to(y.dtype).view(-1, *[1] * (y.dim() - 1))
        if self.top_k > 1:
            y = rearrange(y, "(b k) ... -> b k ...", k=self.top_k).sum(dim=1)
        return y

    def extra_repr(self) -> str:
        conv = "depthwise" if self.groups > 1 else "full"
        return (
            f"channels={self.channels}, scales={self.scales}, top_k={self.top_k}, conv={conv}, "
            f"interpolation={self.interpolation!r}, weighted_combine={self.weighted_combine}, "
            f"routing={self.routing!r}"
        )


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses stored by every expert mixture in ``model``'s last forward.

    Already weighted by each mixture's ``aux_loss_weight``; zero when the model has no mixture, was run
    in eval mode, or has not run yet. Add it to the task loss in training.

    Args:
        model: any module containing :class:`ConvExpertMixture` layers (a ``PeftModel`` too).

    >>> moe = ConvExpertMixture(channels=2, scales=[1, 2]).train()
    >>> _ = moe(torch.randn(4, 3, 3, 2))
    >>> moe_aux_loss(moe).shape
    torch.Size([])
    """
    losses = [m.aux_loss for m in model.modules() if isinstance(m, ConvExpertMixture) and m.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def set_routing(model: nn.Module, routing: str) -> int:
    """Set the dispatch of every expert mixture in ``model``; returns how many were set.

    Args:
        model: any module (a ``PeftModel``, a merged ``SamModel``).
        routing: ``"sparse"``, ``"dense"`` or ``"auto"``.

    >>> set_routing(ConvExpertMixture(channels=2, scales=[1, 2]), "dense")
    1
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    mixtures = [m for m in model.modules() if isinstance(m, ConvExpertMixture)]
    for mixture in mixtures:
        mixture.routing = routing
    return len(mixtures)
