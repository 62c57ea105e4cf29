"""Models that ship inside the package, loadable offline by name.

``convlora-tiny`` is a small SAM (ViT encoder with windowed and global attention, prompt encoder, mask
decoder; 128x128 inputs) pretrained by ``python tools/pretrain_base.py`` (a repository script) on the
generic objects corpus (``convlora.synthetic.objects``), never on the fine-tuning domains. Its folder holds
``config.json``, ``model.safetensors`` and ``pretraining.json`` (the command, seed, machine, wall time and
held-out IoUs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import SamModel

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# Architecture of the embedded ``convlora-tiny`` base (arguments of ``convlora.models.tiny_sam_config``).
BASE_ARCHITECTURE: dict[str, Any] = {
    "image_size": 128,
    "patch_size": 8,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "window_size": 8,
    "global_attn_indexes": [1, 3],
    "decoder_size": 64,
    "mlp_ratio": 4.0,
}

# name -> folder inside convlora/assets/
EMBEDDED_MODELS: dict[str, str] = {
    "convlora-tiny": "convlora-tiny",
}


def embedded_path(name: str) -> Path:
    """Folder of an embedded model inside the installed package.

    Args:
        name: a key of ``EMBEDDED_MODELS``.

    >>> embedded_path("convlora-tiny").name
    'convlora-tiny'
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"Unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    path = ASSETS_DIR / EMBEDDED_MODELS[name]
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"Embedded model {name!r} is incomplete: {missing} missing in {path} (broken installation?)")
    return path


def load_embedded(name: str) -> nn.Module:
    """Load an embedded model by name, offline, from the package's own safetensors weights.

    Args:
        name: a key of ``EMBEDDED_MODELS``, e.g. ``"convlora-tiny"``.

    >>> model = load_embedded("convlora-tiny")
    >>> model.config.vision_config.image_size
    128
    """
    path = embedded_path(name)
    return SamModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()


def embedded_info(name: str) -> dict[str, Any]:
    """The pretraining record (``pretraining.json``) of an embedded model.

    Args:
        name: a key of ``EMBEDDED_MODELS``.

    >>> embedded_info("convlora-tiny")["held_out"]["foreground_iou"] > 0.5
    True
    """
    return json.loads((embedded_path(name) / "pretraining.json").read_text())
