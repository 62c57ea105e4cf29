"""The Conv-LoRA tuner layer around an ``nn.Linear``.

``ConvLoraLinear`` follows PEFT's layer contract (``BaseTunerLayer``): adapters live in ``ModuleDict``s
keyed by adapter name, several adapters can coexist, ``merge``/``unmerge`` fold the linear part in and
out of the base weight, and disabling adapters gives the base layer's output exactly. ``merge_and_unload``
turns it into the :class:`~convlora.tuner.merged.ConvLoraMergedLinear` of ``merged.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import ConvLoraConfig
from .merged import ConvLoraMergedLinear, ConvLoraSideBranch, mixture_from_spec
from .moe import check_grid


class ConvLoraLayer(BaseTunerLayer):
    """State shared by Conv-LoRA layers: per-adapter down/up projections, dropout and expert mixture."""

    adapter_layer_names: tuple[str, ...] = ("conv_lora_A", "conv_lora_B", "conv_lora_experts")
    other_param_names: tuple[str, ...] = ("r", "lora_alpha", "scaling", "conv_lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.conv_lora_dropout = nn.ModuleDict()
        self.conv_lora_A = nn.ModuleDict()
        self.conv_lora_B = nn.ModuleDict()
        self.conv_lora_experts = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"Conv-LoRA adapts nn.Linear layers, got {type(base_layer).__name__}")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: ConvLoraConfig) -> None:
        """Create (or replace) the adapter ``adapter_name`` from ``config``."""
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.conv_lora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.conv_lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.conv_lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        spec = {"r": r, "scales": config.expert_scales, "top_k": config.top_k, "expert_conv": config.expert_conv,
                "interpolation": config.interpolation, "weighted_combine": config.weighted_combine}  # fmt: skip
        self.conv_lora_experts[adapter_name] = mixture_from_spec(
            spec, noisy_gating=config.noisy_gating, aux_loss_weight=config.aux_loss_weight
        )
        self.reset_adapter_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_adapter_parameters(self, adapter_name: str, init_lora_weights: bool) -> None:
        """LoRA's initialisation: Kaiming-uniform ``A``; zero ``B`` and gate so the layer starts as identity."""
        nn.init.kaiming_uniform_(self.conv_lora_A[adapter_name].weight, a=5**0.5)
        experts = self.conv_lora_experts[adapter_name]
        if init_lora_weights:
            nn.init.zeros_(self.conv_lora_B[adapter_name].weight)
            experts.reset_parameters(init_gate="zeros")
        else:
            nn.init.normal_(self.conv_lora_B[adapter_name].weight, std=0.1)
            experts.reset_parameters(init_gate="random")
            nn.init.normal_(experts.expert_bias, std=0.1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The linear part of the update, ``(alpha / r) B A``, in the base weight's dtype."""
        weight = self.get_base_layer().weight
        a = self.conv_lora_A[adapter_name].weight.float()
        b = self.conv_lora_B[adapter_name].weight.float()
        return ((b @ a) * self.scaling[adapter_name]).to(weight.dtype)


class ConvLoraLinear(nn.Module, ConvLoraLayer):
    """An ``nn.Linear`` with Conv-LoRA adapters; its input must be a channels-last grid ``(b, h, w, d)``.

    Args:
        base_layer: the frozen linear layer.
        adapter_name: name of the first adapter.
        config: the adapter's configuration.

    >>> layer = ConvLoraLinear(nn.Linear(8, 24), "default", ConvLoraConfig(r=2, num_experts=2))
    >>> layer(torch.randn(1, 4, 4, 8)).shape
    torch.Size([1, 4, 4, 24])
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ConvLoraConfig, **kwargs: Any) -> None:
        super().__init__()
        ConvLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the linear part of the adapters into the base weight (the conv path keeps running)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.conv_lora_A:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} would give non-finite weights; the adapter is broken")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter's linear part back out of the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.conv_lora_A:
                base.weight.data -= self.get_delta_weight(name)

    def _clear_stale_aux_losses(self, running: set[str]) -> None:
        for name, experts in self.conv_lora_experts.items():
            if name not in running:
                experts.aux_loss = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``W x + b + (alpha / r) B(z + MoE(z))`` with ``z = A x``, for every active adapter; ``(b, h, w, out)``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._clear_stale_aux_losses(set())
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        running = {name for name in self.active_adapters if name in self.conv_lora_A}
        self._clear_stale_aux_losses(running)
        for name in self.active_adapters:
            if name not in running:
                continue
            check_grid(x, "Conv-LoRA")
            down = self.conv_lora_A[name]
            z = down(self.conv_lora_dropout[name](self._cast_input_dtype(x, down.weight.dtype)))  # (b, h, w, r)
            side = self.conv_lora_experts[name](z)  # (b, h, w, r)
            bottleneck = side if name in self.merged_adapters else z + side
            result = result + self.conv_lora_B[name](bottleneck) * self.scaling[name]
        return result.to(result_dtype)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """Called by PEFT's ``merge_and_unload`` / ``unload``.

        ``merge=False`` returns the clean base layer. ``merge=True`` returns a
        :class:`ConvLoraMergedLinear` holding the folded weight and one frozen conv side branch per
        merged adapter.
        """
        if not merge:
            if self.merged:
                self.unmerge()
            return self.get_base_layer()
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        branches = {
            name: ConvLoraSideBranch.from_adapter(
                self.conv_lora_A[name],
                self.conv_lora_experts[name],
                self.conv_lora_B[name],
                self.scaling[name],
            )
            for name in self.merged_adapters
            if name in self.conv_lora_A
        }
        merged = ConvLoraMergedLinear.from_linear(base, branches)
        self.merged_adapters = []
        return merged

    def __repr__(self) -> str:
        return "conv_lora." + super().__repr__()
