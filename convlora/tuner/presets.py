"""Named target sets: which ``nn.Linear`` modules of a SAM image encoder Conv-LoRA adapts.

Plain data (module-name patterns), keyed by model family and preset name, so that the PEFT method can
resolve ``target_preset`` / ``layers`` into PEFT's ``target_modules`` without importing any model code. The
patterns belong to the families (``ModelFamily.encoder_path`` / ``target_presets`` in ``convlora.models``),
which register them here (:func:`register_presets`) as they are defined.

>>> sorted(FAMILY_PRESETS["sam3"])
['attention', 'attention_mlp', 'qkv', 'qv']
"""

from __future__ import annotations

from collections.abc import Sequence

# Where each family keeps its encoder layers, and its named target sets relative to one layer. The facts
# belong to the families (``convlora.models``: ``ModelFamily.encoder_path`` / ``target_presets``), which
# register them here when they are defined: the PEFT method resolves presets without importing model code.
# Patterns are anchored at the encoder because SAM's mask decoder also has modules called ``mlp.lin1``.
ENCODER_LAYERS: dict[str, str] = {}
FAMILY_PRESETS: dict[str, dict[str, str]] = {}
# transformers model_type -> the preset family (a key of FAMILY_PRESETS)
MODEL_TYPE_FAMILIES: dict[str, str] = {}
# The presets of SAM (and SAM-HQ), the default family; filled when SAM registers.
TARGET_PRESETS: dict[str, str] = {}
DEFAULT_FAMILY = "sam"


def register_presets(family: str, model_types: Sequence[str], encoder_layers: str, presets: dict[str, str]) -> None:
    r"""Make a model family's target presets known to the PEFT method (``convlora.models`` calls it per family).

    Args:
        family: the preset family's name (``"sam2"``); families sharing presets register the same dict.
        model_types: the transformers ``model_type`` values that use them.
        encoder_layers: regex of the module path of the encoder's list of blocks (``r"vision_encoder\.layers"``).
        presets: preset name -> regex of the adapted modules inside one block.

    >>> register_presets("sam", ["sam"], ENCODER_LAYERS["sam"], FAMILY_PRESETS["sam"])  # what SAM's entry does
    """
    if family in FAMILY_PRESETS and (ENCODER_LAYERS[family], FAMILY_PRESETS[family]) != (encoder_layers, presets):
        raise ValueError(f"target presets of family {family!r} are already registered with other values")
    ENCODER_LAYERS[family] = encoder_layers
    FAMILY_PRESETS[family] = presets
    for model_type in model_types:
        MODEL_TYPE_FAMILIES[model_type] = family
    if family == DEFAULT_FAMILY:
        TARGET_PRESETS.clear()
        TARGET_PRESETS.update(presets)


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
