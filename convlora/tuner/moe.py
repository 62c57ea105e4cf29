"""Mixture of multi-scale convolution experts: the part of Conv-LoRA that is not LoRA.

Plain torch, no PEFT. The mixture works inside the LoRA bottleneck: it reads a channels-last grid
``z`` of shape ``(b, h, w, r)`` and returns a tensor of the same shape. Each expert resizes the grid by
its own scale, applies a 3x3 convolution and GELU, and resizes back (:func:`reference_expert`), so that
different experts see the same features at different resolutions. A noisy top-k gate (Shazeer et al., 2017)
picks experts per sample from the grid-averaged features; the load-balancing loss of that paper is stored on
the module after every training forward (``aux_loss``) and collected by :func:`moe_aux_loss`.

This file is the reference: :meth:`ConvExpertMixture.forward_reference` is the whole mixture in plain torch.
``forward`` gives the same outputs and gradients through the fast paths of ``fast_experts.py`` (tested equal
to this reference): ``"dense"`` routing runs every expert on every sample and keeps each sample's chosen ones
(static shapes, traceable), ``"gathered"`` runs each sample through its own experts in one padded chain
(static shapes, traceable, ``top_k`` experts per sample), ``"sparse"`` runs each expert on its own samples
only (least arithmetic, a host sync), and frozen experts on small grids run folded. ``"auto"`` (the default)
is gathered under ``torch.compile``, dense while exporting and on accelerators, sparse in eager CPU runs (see
``docs/guides/deploy.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .fast_experts import FoldedExperts, dense_mixture, gathered_mixture, matrix_expert, sparse_mixture
from .resize_matrices import INTERPOLATION_MODES, axis_plan, resize_taps
from .tracing import is_compiling_only, is_exporting, is_tracing

__all__ = [
    "INTERPOLATION_MODES",
    "NOISE_EPSILON",
    "ROUTING_MODES",
    "ConvExpertMixture",
    "axis_plan",
    "check_grid",
    "cv_squared",
    "moe_aux_loss",
    "reference_expert",
    "reference_mixture",
    "resize_taps",
    "set_routing",
    "top_k_lowest_first",
]

ROUTING_MODES = ("auto", "sparse", "dense", "gathered")
# Added to the learned noise scale so that the gate keeps exploring while its noise weights are zero.
NOISE_EPSILON = 1e-2


def reference_expert(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float, interpolation: str = "bicubic"
) -> torch.Tensor:
    """One conv expert in plain torch: resize by ``scale``, 3x3 conv, GELU, resize back; ``(b, h, w, r)``.

    Args:
        z: the bottleneck grid ``(b, h, w, r)``, channels last.
        weight: the expert's conv weight, ``(r, r, 3, 3)`` (full) or ``(r, 1, 3, 3)`` (depthwise).
        bias: the expert's conv bias ``(r,)``.
        scale: the resize factor (1: the resizes leave the grid as it is).
        interpolation: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.

    >>> reference_expert(torch.randn(2, 5, 7, 3), torch.randn(3, 3, 3, 3), torch.zeros(3), 2.0).shape
    torch.Size([2, 5, 7, 3])
    """
    height, width, channels = z.shape[1:]
    align = None if interpolation == "nearest" else False  # nearest takes no align_corners
    x = rearrange(z, "b h w r -> b r h w")
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = F.interpolate(x, size=scaled, mode=interpolation, align_corners=align)  # (b, r, s h, s w)
    x = F.conv2d(x, weight, bias, padding=1, groups=channels // weight.shape[1])  # (b, r, s h, s w)
    x = F.interpolate(F.gelu(x), size=(height, width), mode=interpolation, align_corners=align)  # (b, r, h, w)
    return rearrange(x, "b r h w -> b h w r")


def reference_mixture(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scales: tuple[float, ...],
    interpolation: str,
    top_indices: torch.Tensor,
    combine: torch.Tensor | None,
) -> torch.Tensor:
    """Every expert on every sample of ``z`` ``(b, h, w, r)``, each sample keeping its chosen ones; ``(b, h, w, r)``.

    The fast mixtures of ``fast_experts.py`` take the same arguments and give the same outputs and gradients.

    Args:
        z: the bottleneck grid, channels last.
        weight: every expert's conv weight ``(e, r, r / groups, 3, 3)``.
        bias: every expert's conv bias ``(e, r)``.
        scales: every expert's resize factor.
        interpolation: the resize mode.
        top_indices: each sample's chosen experts ``(b, k)``.
        combine: each chosen expert's factor ``(b, k)``, or ``None`` for 1 (the unweighted sum).

    >>> weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    >>> z, chosen = torch.randn(2, 4, 4, 3), torch.tensor([[1], [0]])
    >>> reference_mixture(z, weight, bias, (1.0, 2.0), "bicubic", chosen, None).shape
    torch.Size([2, 4, 4, 3])
    """
    factors = torch.ones_like(top_indices, dtype=z.dtype) if combine is None else combine.to(z.dtype)
    per_expert = torch.zeros(z.shape[0], len(scales), dtype=z.dtype, device=z.device)
    per_expert = per_expert.scatter_add(1, top_indices, factors)  # (b, e): zero for the experts a sample skips
    out = torch.zeros_like(z)
    for e, scale in enumerate(scales):
        y = reference_expert(z, weight[e], bias[e], scale, interpolation)  # (b, h, w, r)
        out = out + y * rearrange(per_expert[:, e], "b -> b 1 1 1")
    return out


def check_grid(x: torch.Tensor, where: str) -> None:
    """Refuse anything but a channels-last grid ``(b, h, w, d)``, naming ``where`` it was seen.

    Args:
        x: the input of a Conv-LoRA layer.
        where: what to call the layer in the message.

    >>> check_grid(torch.zeros(1, 2, 2, 8), "a Conv-LoRA layer")
    """
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


@dataclass
class LastForward:
    """What a mixture keeps of its last forward: a plain record, so that a forward writes it without
    ``nn.Module.__setattr__``'s checks (a few microseconds per tensor, per layer, per forward)."""

    aux_loss: torch.Tensor | None = None  # the weighted load-balancing loss (zero in eval)
    routed: torch.Tensor | None = None  # the chosen experts (b, k)
    counts: torch.Tensor | None = None  # their per-expert counts, made on first read


class ConvExpertMixture(nn.Module):
    """Noisy top-k mixture of multi-scale 3x3 conv experts over a channels-last grid.

    Expert ``i`` is :func:`reference_expert` with scale ``i``. The expert weights are stored stacked,
    ``(experts, r, r / groups, 3, 3)``, so the module's state has the same four tensors whatever the number
    of experts. Routing is per sample and never loops over samples in Python (see the module docstring).

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
        routing: ``"sparse"``, ``"dense"``, ``"gathered"`` or ``"auto"`` (gathered under ``torch.compile``,
            dense when exported or on an accelerator, else sparse); all give the same outputs and gradients.
            Also settable later (``routing`` attribute, or :func:`set_routing` on a whole model).

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
        # the same numbers as exact integer ratios: torch.compile keeps a module's ints static, where its floats may
        # become symbolic (dynamic=True), which the experts' resize plans cannot take
        self._scale_ratios = tuple(s.as_integer_ratio() for s in self.scales)
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
        self.last_forward = LastForward()
        self._folded = FoldedExperts()  # frozen experts' folded matrices, per grid (its docstring: invalidation)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """How many experts the mixture holds (one per scale)."""
        return len(self.scales)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward, weighted (zero in eval); ``None`` before any."""
        return self.last_forward.aux_loss

    @aux_loss.setter
    def aux_loss(self, value: torch.Tensor | None) -> None:
        self.last_forward.aux_loss = value

    @property
    def last_expert_counts(self) -> torch.Tensor | None:
        """How many (sample, slot) pairs the last forward sent to each expert, ``(e,)``; ``None`` before any."""
        last = self.last_forward
        if last.counts is None and last.routed is not None:
            last.counts = torch.bincount(last.routed.flatten(), minlength=self.num_experts)
        return last.counts

    def reset_parameters(self, init_gate: str = "zeros") -> None:
        """Kaiming-uniform conv weights (as ``nn.Conv2d``), zero conv biases, gate per ``init_gate``.

        Args:
            init_gate: ``"zeros"`` (the paper: all experts tie, the first one wins at inference) or
                ``"random"`` (small random gate and noise weights, used by tests to make routing vary).
        """
        if init_gate not in ("zeros", "random"):
            raise ValueError(f"init_gate must be 'zeros' or 'random', got {init_gate!r}")
        with torch.no_grad():  # in place on the parameters, so their version counters move (FoldedExperts)
            for i in range(self.num_experts):
                nn.init.kaiming_uniform_(self.expert_weight[i], a=5**0.5)
            nn.init.zeros_(self.expert_bias)
            if init_gate == "zeros":
                nn.init.zeros_(self.gate_weight)
                nn.init.zeros_(self.noise_weight)
            else:
                nn.init.normal_(self.gate_weight, std=1.0)
                nn.init.normal_(self.noise_weight, std=0.1)

    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for each sample of ``z`` ``(b, h, w, r)``.

        Args:
            z: the bottleneck grid, channels last.

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

    def forward_reference(self, z: torch.Tensor) -> torch.Tensor:
        """The mixture in plain torch (:func:`reference_mixture`): slow and obvious; :meth:`forward` gives the
        same outputs, auxiliary loss and gradients (tested).

        Args:
            z: the bottleneck grid ``(b, h, w, r)``, channels last.
        """
        top_indices, combine, aux = self.route(z)  # (b, k): each sample's experts and their factors
        scales, weight, bias = tuple(self.scales), self.expert_weight, self.expert_bias
        out = reference_mixture(z, weight, bias, scales, self.interpolation, top_indices, combine)
        self._remember(aux, top_indices)
        return out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Mix the experts over ``z`` ``(b, h, w, r)``; returns ``(b, h, w, r)``, as :meth:`forward_reference`.

        Args:
            z: the bottleneck grid, channels last.
        """
        if z.dim() != 4 or z.shape[-1] != self.channels:
            raise ValueError(
                f"ConvExpertMixture expects a channels-last grid (b, h, w, {self.channels}), got {tuple(z.shape)}"
            )
        top_indices, combine, aux = self.route(z)  # (b, k): each sample's experts and their factors
        scales = tuple(n / d for n, d in self._scale_ratios)  # == self.scales, exactly
        weight, bias = self.expert_weight, self.expert_bias
        dispatch = self.dispatch(z)
        if dispatch == "dense":
            mixture = dense_mixture
        elif dispatch == "gathered":
            mixture = gathered_mixture
        elif FoldedExperts.applies(z, weight, bias, scales, self.interpolation):
            mixture = self._folded
        else:
            mixture = sparse_mixture
        factors = combine if self.weighted_combine else None  # unweighted: every factor is 1
        out = mixture(z, weight, bias, scales, self.interpolation, top_indices, factors)
        self._remember(aux, top_indices)
        return out

    def run_expert(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on channels-first features ``(n, r, h, w)``, through the fast path.

        Equal to :func:`reference_expert` on the channels-last grid (``fast_experts.matrix_expert``).

        Args:
            index: which expert.
            z: the features, channels first.
        """
        return matrix_expert(
            z, self.expert_weight[index], self.expert_bias[index], self.scales[index], self.interpolation
        )

    def dispatch(self, z: torch.Tensor) -> str:
        """The path this forward takes: ``routing``, or for ``"auto"`` the capture mode and the device.

        ``torch.compile`` gets the gathered path (static shapes, ``top_k`` experts per sample, one chain to
        capture); exports and accelerators the dense one (every expert stacked: the graph the ONNX tests pin);
        eager CPU runs the sparse one (frozen experts on small grids run folded there).

        Args:
            z: the forward's input.
        """
        if self.routing != "auto":
            return self.routing
        if is_compiling_only():
            return "gathered"
        return "dense" if is_tracing() or z.device.type != "cpu" else "sparse"

    def uses_dense_routing(self, z: torch.Tensor) -> bool:
        """Whether this forward runs with static shapes and no host sync (:meth:`dispatch` not ``"sparse"``).

        Args:
            z: the forward's input.
        """
        return self.dispatch(z) != "sparse"

    def _remember(self, aux: torch.Tensor, top_indices: torch.Tensor) -> None:
        """Keep the forward's auxiliary loss and chosen experts (counted on the first read of the counts)."""
        if not is_exporting():  # an exported graph keeps no state
            last = self.last_forward
            last.aux_loss, last.routed, last.counts = aux, top_indices.detach(), None

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
        routing: ``"sparse"``, ``"dense"``, ``"gathered"`` or ``"auto"``.

    >>> set_routing(ConvExpertMixture(channels=2, scales=[1, 2]), "dense")
    1
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    mixtures = [m for m in model.modules() if isinstance(m, ConvExpertMixture)]
    for mixture in mixtures:
        mixture.routing = routing
    return len(mixtures)
