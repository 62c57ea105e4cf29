"""The strength of a fine-tune after training: a trained adapter scaled, its mask decoder interpolated toward SAM's.

At strength ``a`` in [0, 1] the adapter's whole branch is scaled by ``a`` (LoRA's ``B A x``; Conv-LoRA's
``B (A x + MoE(A x))``, both linear in ``B``, so ``B`` is scaled) and every trained weight of the mask decoder
becomes ``lerp(base, trained, a)``, the weight-space interpolation of WiSE-FT (Wortsman et al., 2022). ``a = 0``
gives SAM's own model exactly, ``a = 1`` the fine-tune exactly (``torch.lerp`` returns each end bit for bit).
Because the strength lives in the weights, an adapter saved at strength ``a`` is a regular adapter that stock
PEFT loads with the same outputs.

>>> set_strength(model, task, 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The methods whose trained part is a branch linear in one weight (B) beside a decoder with a base to return to.
STRENGTH_METHODS = ("conv_lora", "lora")
# adapter weights whose scaling scales the whole branch
_BRANCH_WEIGHTS = ("conv_lora_B", "lora_B")


def set_strength(model: nn.Module, task: Any, strength: float) -> nn.Module:
    """Put a trained adapter model at ``strength`` (in place; from the trained weights every time); returns it.

    Args:
        model: what ``load_trained`` gives for a ``conv_lora`` or ``lora`` run (a ``PeftModel``).
        task: its task (``task.method`` is checked).
        strength: 0 (SAM's own model) to 1 (the fine-tune as trained).

    Raises:
        ValueError: a strength outside [0, 1], or a method without a base to interpolate toward.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if task.method not in STRENGTH_METHODS or getattr(task, "merged", False):
        raise ValueError(
            f"strength applies to {list(STRENGTH_METHODS)} adapters (not merged), whose branch and decoder have a base "
            f"to return to; this model was trained with method {task.method!r}"
            + (" and merged" if getattr(task, "merged", False) else "")
        )
    found = False
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(f".{part}." in name for part in _BRANCH_WEIGHTS):
                trained = _trained(model, name, parameter)
                parameter.copy_(trained * strength if strength != 1.0 else trained)
                found = True
        for wrapper in _decoder_wrappers(model):
            base = dict(wrapper.original_module.named_parameters())
            for adapter, trained_module in wrapper.modules_to_save.items():
                for name, parameter in trained_module.named_parameters():
                    trained = _trained(model, f"{adapter}:{id(wrapper)}:{name}", parameter)
                    if name in base and base[name].shape == trained.shape:
                        parameter.copy_(torch.lerp(base[name].to(trained.dtype), trained, strength))
    if not found:
        raise ValueError("the model has no LoRA / Conv-LoRA branch weights to scale")
    return model


def _trained(model: nn.Module, key: str, parameter: torch.Tensor) -> torch.Tensor:
    """The weight as trained (kept on the model at the first strength change, so that strengths do not compound)."""
    kept: dict[str, torch.Tensor] | None = getattr(model, "_convlora_trained_weights", None)
    if kept is None:
        kept = {}
        model._convlora_trained_weights = kept
    if key not in kept:
        kept[key] = parameter.detach().clone()
    return kept[key]


def _decoder_wrappers(model: nn.Module) -> list[Any]:
    from peft.utils.other import ModulesToSaveWrapper

    return [module for module in model.modules() if isinstance(module, ModulesToSaveWrapper)]
