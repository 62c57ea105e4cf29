"""Named target sets: which ``nn.Linear`` modules of a SAM image encoder Conv-LoRA adapts.

Plain data (module-name patterns), keyed by model family and preset name, so that the PEFT method can
resolve ``target_preset`` / ``layers`` into PEFT's ``target_modules`` without importing any model code.

>>> sorted(FAMILY_PRESETS["sam3"])
['attention', 'attention_mlp', 'qkv', 'qv']
"""

from __future__ import annotations

from collections.abc import Sequence

# Where each family keeps its encoder layers, and its named target sets relative to one layer. Patterns are
# anchored at the encoder because SAM's mask decoder also has modules called ``mlp.lin1`` or ``q_proj``.
ENCODER_LAYERS: dict[str, str] = {
    "sam": r"vision_encoder\.layers",
    "sam_hq": r"vision_encoder\.layers",
    "sam2": r"vision_encoder\.backbone\.blocks",
    "sam3": r"vision_encoder\.backbone\.layers",
}
FAMILY_PRESETS: dict[str, dict[str, str]] = {
    "sam": {
        "qkv": r"attn\.qkv",
        "qkv_proj": r"attn\.(?:qkv|proj)",
        "attention_mlp": r"(?:attn\.(?:qkv|proj)|mlp\.(?:lin1|lin2))",
    },
    # Hiera: one fused qkv per block; `blocks.N.proj` (the skip projection at stage changes) is never a target.
    "sam2": {
        "qkv": r"attn\.qkv",
        "qkv_proj": r"attn\.(?:qkv|proj)",
        "attention_mlp": r"(?:attn\.(?:qkv|proj)|mlp\.(?:proj_in|proj_out))",
    },
    # SAM 3's ViT has separate projections; "qv" is LoRA's usual choice.
    "sam3": {
        "qv": r"attention\.(?:q_proj|v_proj)",
        "qkv": r"attention\.(?:q_proj|k_proj|v_proj)",
        "attention": r"attention\.(?:q_proj|k_proj|v_proj|o_proj)",
        "attention_mlp": r"(?:attention\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:fc1|fc2))",
    },
}
FAMILY_PRESETS["sam_hq"] = FAMILY_PRESETS["sam"]
# The presets of SAM (and SAM-HQ), the default family.
TARGET_PRESETS: dict[str, str] = FAMILY_PRESETS["sam"]
# transformers model_type -> the preset family (a key of FAMILY_PRESETS); the model registry is convlora.models.
MODEL_TYPE_FAMILIES: dict[str, str] = {
    "sam": "sam",
    "sam_hq": "sam_hq",
    "sam2": "sam2",
    "sam2_video": "sam2",
    "sam3_tracker": "sam3",
    "sam3_video": "sam3",
    "sam3_tracker_video": "sam3",
    "sam3": "sam3",
}


def preset_family(model_type: str | None) -> str | None:
    """The preset family of a transformers ``model_type``, or ``None`` for models convlora has no presets for.

    Args:
        model_type: e.g. ``"sam2"`` or ``"sam3_tracker"``.

    >>> preset_family("sam3_tracker")
    'sam3'
    """
    return MODEL_TYPE_FAMILIES.get(model_type or "")


def target_modules_pattern(preset: str = "qkv", layers: Sequence[int] | None = None, family: str = "sam") -> str:
    """Regex (for PEFT's ``target_modules``) selecting a preset's modules in the given encoder layers.

    Args:
        preset: a key of ``FAMILY_PRESETS[family]``.
        layers: encoder layer indices; all layers when ``None``.
        family: the preset family (``"sam"``, ``"sam_hq"``, ``"sam2"``, ``"sam3"``).

    >>> import re
    >>> bool(re.fullmatch(target_modules_pattern("qkv", [0, 2]), "vision_encoder.layers.2.attn.qkv"))
    True
    """
    if family not in FAMILY_PRESETS:
        raise ValueError(f"Unknown model family {family!r}; known: {sorted(FAMILY_PRESETS)}")
    presets = FAMILY_PRESETS[family]
    if preset not in presets:
        raise ValueError(f"Unknown target preset {preset!r} for {family}; choose one of {sorted(presets)}")
    layer = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    return rf"(?:.*\.)?{ENCODER_LAYERS[family]}\.{layer}\.{presets[preset]}"
