"""Mixture of multi-scale convolution experts: the part of Conv-LoRA that is not LoRA.

Plain torch, no PEFT. The mixture works inside the LoRA bottleneck: it reads a channels-last grid
``z`` of shape ``(b, h, w, r)`` and returns a tensor of the same shape. Each expert resizes the grid by
its own scale, applies a 3x3 convolution and GELU, and resizes back, so that different experts see the
same features at different resolutions. A noisy top-k gate (Shazeer et al., 2017) picks experts per
sample from the grid-averaged features; the load-balancing loss of that paper is stored on the module
after every training forward (``aux_loss``) and collected by :func:`moe_aux_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic")
EXPERT_CONVS = ("full", "depthwise")

# Added to the learned noise scale so that the gate keeps exploring while its noise weights are zero.
NOISE_EPSILON = 1e-2


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


class ConvExpertMixture(nn.Module):
    """Noisy top-k mixture of multi-scale 3x3 conv experts over a channels-last grid.

    Expert ``i`` computes ``resize_back(gelu(conv3x3_i(resize(z, scale_i))))``. The expert weights are
    stored stacked, ``(experts, r, r / groups, 3, 3)``, so the module's state has the same four tensors
    whatever the number of experts. Routing is per sample: experts run once each on the batch of
    samples routed to them, never in a Python loop over samples.

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
        self.last_expert_counts: torch.Tensor | None = None
        self.reset_parameters()

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
        # A stable sort makes ties (e.g. a zero-initialised gate) pick the lowest expert index.
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        top_indices = order[:, : self.top_k]  # (b, k)
        top_logits = logits.gather(1, top_indices)
        gates = torch.zeros_like(logits).scatter(1, top_indices, top_logits.softmax(dim=-1))  # (b, e)
        if self.weighted_combine:
            combine = logits.softmax(dim=-1).gather(1, top_indices)
        else:
            combine = torch.ones_like(top_logits)

        if not self.training or self.aux_loss_weight == 0:
            aux = logits.new_zeros(())
        else:
            importance = gates.sum(dim=0)
            if noisy and self.top_k < self.num_experts:
                load = self._prob_in_top_k(clean_logits, logits, noise_std, order).sum(dim=0)
            else:
                load = (gates > 0).float().sum(dim=0)
            aux = (cv_squared(importance) + cv_squared(load)) * self.aux_loss_weight
        return top_indices, combine, aux

    def _prob_in_top_k(
        self,
        clean_logits: torch.Tensor,
        noisy_logits: torch.Tensor,
        noise_std: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Probability, under fresh noise, that each expert would be in the top k: a smooth load."""
        sorted_noisy = noisy_logits.gather(1, order)
        # For an expert inside the top k the threshold to beat is the (k+1)-th logit; for the others it is
        # the k-th one.
        threshold_if_in = sorted_noisy[:, self.top_k : self.top_k + 1]
        threshold_if_out = sorted_noisy[:, self.top_k - 1 : self.top_k]
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_if_in = normal.cdf((clean_logits - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean_logits - threshold_if_out) / noise_std)
        is_in = noisy_logits > threshold_if_in
        return torch.where(is_in, prob_if_in, prob_if_out)

    def run_expert(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on channels-first features ``(n, r, h, w)``."""
        height, width = z.shape[-2:]
        scale = self.scales[index]
        align = None if self.interpolation == "nearest" else False
        y = z
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            y = F.interpolate(y, size=size, mode=self.interpolation, align_corners=align)
        weight = self.expert_weight[index].to(y.dtype)
        bias = self.expert_bias[index].to(y.dtype)
        y = F.gelu(F.conv2d(y, weight, bias, padding=1, groups=self.groups))
        if scale != 1.0:
            y = F.interpolate(y, size=(height, width), mode=self.interpolation, align_corners=align)
        return y

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Mix the experts over ``z`` ``(b, h, w, r)``; returns ``(b, h, w, r)``."""
        if z.dim() != 4 or z.shape[-1] != self.channels:
            raise ValueError(
                f"ConvExpertMixture expects a channels-last grid (b, h, w, {self.channels}), got {tuple(z.shape)}"
            )
        top_indices, combine, aux = self.route(z)
        self.aux_loss = aux
        self.last_expert_counts = torch.bincount(top_indices.flatten(), minlength=self.num_experts).detach()

        features = rearrange(z, "b h w r -> b r h w")
        out = torch.zeros_like(features)
        for expert in range(self.num_experts):
            sample_idx, slot = torch.nonzero(top_indices == expert, as_tuple=True)
            if sample_idx.numel() == 0:
                continue
            y = self.run_expert(expert, features.index_select(0, sample_idx))
            y = y * combine[sample_idx, slot].to(y.dtype).view(-1, 1, 1, 1)
            out = out.index_add(0, sample_idx, y)
        return rearrange(out, "b r h w -> b h w r")

    def extra_repr(self) -> str:
        conv = "depthwise" if self.groups > 1 else "full"
        return (
            f"channels={self.channels}, scales={self.scales}, top_k={self.top_k}, conv={conv}, "
            f"interpolation={self.interpolation!r}, weighted_combine={self.weighted_combine}"
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


def reset_aux_losses(model: nn.Module) -> None:
    """Forget the auxiliary losses stored by the last forward (so that a stale one is never added)."""
    for module in model.modules():
        if isinstance(module, ConvExpertMixture):
            module.aux_loss = None
