"""What ``merge_and_unload`` leaves of a Conv-LoRA layer: a folded ``nn.Linear`` plus a frozen conv side branch.

``ConvLoraMergedLinear`` is an ``nn.Linear`` whose weight holds ``W + (alpha / r) B A`` and which still
runs the (non-linear) conv path as a small frozen side branch ``B' MoE(A x)`` with ``B' = (alpha / r) B``.

transformers' checkpoint format cannot hold those branches: ``SamModel.from_pretrained`` would load the
folded weights, drop the branches with nothing but an "unexpected keys" report and give other masks. So the
model ``merge_and_unload`` returns gets a :class:`MergedSavePretrained` as its ``save_pretrained``: it
writes convlora's merged layout through the writer ``convlora.models`` registers (tuner/ never imports
models/), which stock transformers refuses to load and ``convlora.load_sam`` rebuilds exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .moe import ConvExpertMixture, check_grid
from .tracing import is_tracing


def _experts_spec(experts: ConvExpertMixture) -> dict[str, Any]:
    return {
        "r": experts.channels,
        "scales": list(experts.scales),
        "top_k": experts.top_k,
        "expert_conv": "depthwise" if experts.groups > 1 else "full",
        "interpolation": experts.interpolation,
        "weighted_combine": experts.weighted_combine,
    }


def mixture_from_spec(
    spec: dict[str, Any], *, noisy_gating: bool = False, aux_loss_weight: float = 0.0
) -> ConvExpertMixture:
    """The one mapping from expert settings (a config's, or a merged branch's saved spec) to a mixture.

    Args:
        spec: ``r``, ``scales``, ``top_k``, ``expert_conv``, ``interpolation``, ``weighted_combine``.
        noisy_gating: learned gate noise in training (adapters); merged branches are deterministic.
        aux_loss_weight: weight of the load-balancing loss (adapters); merged branches have none.
    """
    return ConvExpertMixture(
        channels=int(spec["r"]),
        scales=spec["scales"],
        top_k=spec["top_k"],
        depthwise=spec["expert_conv"] == "depthwise",
        interpolation=spec["interpolation"],
        weighted_combine=spec["weighted_combine"],
        noisy_gating=noisy_gating,
        aux_loss_weight=aux_loss_weight,
    )


class ConvLoraSideBranch(nn.Module):
    """The non-linear remainder of a merged Conv-LoRA adapter: ``up(experts(down(x)))``.

    ``up`` already contains the ``alpha / r`` scaling. The gate runs without noise, so the branch is
    deterministic in train and eval mode alike.

    Args:
        in_features: input width of the adapted layer.
        out_features: output width of the adapted layer.
        spec: the expert mixture's settings, as returned by :meth:`spec`.
    """

    def __init__(self, in_features: int, out_features: int, spec: dict[str, Any]) -> None:
        super().__init__()
        r = int(spec["r"])
        self.down = nn.Linear(in_features, r, bias=False)
        self.experts = mixture_from_spec(spec)
        self.up = nn.Linear(r, out_features, bias=False)

    @classmethod
    def from_adapter(
        cls, down: nn.Linear, experts: ConvExpertMixture, up: nn.Linear, scaling: float
    ) -> ConvLoraSideBranch:
        """A frozen copy of one adapter's conv path, with ``scaling`` folded into the up-projection."""
        branch = cls(down.in_features, up.out_features, _experts_spec(experts))
        weight = down.weight
        branch.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            branch.down.weight.copy_(down.weight)
            branch.up.weight.copy_(up.weight.float() * scaling)
            branch.experts.load_state_dict(copy.deepcopy(experts.state_dict()))
        return branch.requires_grad_(False)

    def spec(self) -> dict[str, Any]:
        """The settings needed to rebuild this branch before loading its weights."""
        return _experts_spec(self.experts)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' output ``(b, h, w, r)`` for a grid ``x`` ``(b, h, w, in)``, before the up-projection."""
        check_grid(x, "A merged Conv-LoRA layer")
        return self.experts(self.down(x.to(self.down.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's contribution ``(b, h, w, out)`` for a grid ``x`` ``(b, h, w, in)``."""
        return self.up(self.bottleneck(x))  # (b, h, w, out)


class ConvLoraMergedLinear(nn.Linear):
    """``nn.Linear`` with the LoRA part folded in, plus frozen conv side branches.

    ``forward(x) = x W'^T + b + sum_i branch_i(x)``. Its extra parameters are the side branches':
    ``r (in + out)`` for the projections plus the experts and gate, per merged adapter.

    Args:
        in_features: input width.
        out_features: output width.
        specs: one branch spec (see :meth:`ConvLoraSideBranch.spec`) per adapter name.
        bias: whether the linear layer has a bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        specs: dict[str, dict[str, Any]],
        bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.side_branches = nn.ModuleDict(
            {name: ConvLoraSideBranch(in_features, out_features, spec) for name, spec in specs.items()}
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, branches: dict[str, ConvLoraSideBranch]) -> ConvLoraMergedLinear:
        """Wrap an ``nn.Linear`` (whose weight already holds the folded LoRA part) with side branches."""
        merged = cls(
            linear.in_features,
            linear.out_features,
            {},
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        merged.weight = linear.weight
        if linear.bias is not None:
            merged.bias = linear.bias
        merged.side_branches = nn.ModuleDict(branches)
        return merged

    def branch_specs(self) -> dict[str, dict[str, Any]]:
        """Settings of every side branch, keyed by adapter name."""
        return {name: branch.spec() for name, branch in self.side_branches.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The folded linear layer plus every side branch."""
        result = super().forward(x)
        for branch in self.side_branches.values():
            if torch.is_grad_enabled() or is_tracing() or branch.up.weight.dtype != result.dtype:
                result = result + branch(x).to(result.dtype)
            else:  # eager inference: the up-projection adds into the result in place, one pass over it fewer
                bottleneck = branch.bottleneck(x)
                flat = result.view(-1, result.shape[-1])
                flat.addmm_(bottleneck.reshape(-1, bottleneck.shape[-1]), branch.up.weight.t())
        return result


# The writer of convlora's merged layout, registered by convlora.models.merged_io (``(model, directory)``).
_MERGED_SAVER: list[Callable[[nn.Module, Path], Any]] = []

# transformers' save_pretrained options and the values under which the merged layout honours them.
_SAVE_DEFAULTS: dict[str, Any] = {
    "state_dict": None, "push_to_hub": False, "max_shard_size": "50GB", "variant": None, "token": None,
    "save_peft_format": True, "save_original_format": True, "distributed_checkpoint": False,
    "safe_serialization": True,
}  # fmt: skip


def register_merged_saver(saver: Callable[[nn.Module, Path], Any]) -> None:
    """Set the function that writes a merged model's self-contained checkpoint (``convlora.models`` registers it).

    Args:
        saver: ``(model, directory)``; writes the whole folder atomically.

    >>> register_merged_saver(_MERGED_SAVER[0]) if _MERGED_SAVER else None  # what convlora.models does on import
    """
    _MERGED_SAVER[:] = [saver]


class MergedSavePretrained:
    """``save_pretrained`` of a model that transformers' checkpoint format cannot hold (installed per instance).

    Writes convlora's merged layout (``config.json`` with a ``convlora_merged`` block and
    ``convlora_model.safetensors``, no ``model.safetensors``) into ``save_directory``, atomically: stock
    ``from_pretrained`` refuses the folder, ``convlora.load_sam`` rebuilds the model exactly. It follows
    ``copy.deepcopy`` and pickling (it holds the model, not a bound method); ``.to()`` / ``.eval()`` return the
    same model. Options it cannot honour (``push_to_hub``, ``state_dict``, sharding, variants, ...) are refused.

    Args:
        model: the model whose ``save_pretrained`` this is.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | Path, is_main_process: bool = True, **options: Any) -> None:
        """Write the model's merged checkpoint to ``save_directory`` (on the main process only)."""
        for key, value in options.items():
            default = _SAVE_DEFAULTS.get(key, ...)
            if not (value is default or (isinstance(value, (str, bool, int)) and value == default)):
                shown = repr(value) if isinstance(value, (str, bool, int, float)) else type(value).__name__
                raise ValueError(
                    f"save_pretrained({key}={shown}) is not supported for {type(self.model).__name__}: its conv side "
                    "branches or class decoder need convlora's own layout, written whole; save it with "
                    "convlora.save_merged(model, directory) (and upload that folder yourself)"
                )
        if not is_main_process:
            return
        if not _MERGED_SAVER:
            raise RuntimeError(
                f"{type(self.model).__name__} needs convlora's merged layout; import convlora (or convlora.models), "
                "which provides it, then call save_pretrained or convlora.save_merged again"
            )
        _MERGED_SAVER[0](self.model, Path(save_directory))

    def __repr__(self) -> str:
        return f"<convlora merged save_pretrained of {type(self.model).__name__}>"


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` write convlora's merged layout (see :class:`MergedSavePretrained`); returns it.

    Args:
        model: a merged model with conv side branches, or a model with convlora's class decoder.

    >>> model = guard_save_pretrained(nn.Linear(2, 2))
    >>> type(model.save_pretrained).__name__
    'MergedSavePretrained'
    """
    current = model.__dict__.get("save_pretrained")
    if not (isinstance(current, MergedSavePretrained) and current.model is model):
        object.__setattr__(model, "save_pretrained", MergedSavePretrained(model))
    return model
