"""Per-domain training recipes: the paper's settings for the real datasets, and quick ones for the synthetic suite.

A recipe is what changes between domains: loss, validation metric, learning rate, epochs. The real-data
settings follow the paper's reference set-up (AdamW, effective batch 4, 1e-4 with 3e-4 for roads and
leaves; 30 epochs, 20 for camouflage and roads, 10 for shadows; structure loss, balanced BCE for
shadows). The synthetic settings are sized for the embedded base on a 2-core CPU: a few minutes a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Training settings of one domain.

    Args:
        domain: a key of ``convlora.synthetic.DOMAINS``.
        dataset: the real dataset the domain stands for.
        metric: validation metric that picks the best checkpoint.
        loss: loss name (``convlora.training.losses``).
        real: ``TrainConfig`` fields for the real dataset with a real SAM checkpoint.
        synthetic: ``TrainConfig`` fields for the synthetic data with the embedded base.
        synthetic_sizes: images per split of the generated data.
    """

    domain: str
    dataset: str
    metric: str
    loss: str
    real: dict[str, Any]
    synthetic: dict[str, Any]
    synthetic_sizes: dict[str, int] = field(default_factory=lambda: {"train": 160, "val": 40, "test": 80})

    def train_fields(self, *, real: bool) -> dict[str, Any]:
        """``TrainConfig`` fields of this recipe for real or synthetic data."""
        chosen = self.real if real else self.synthetic
        return {"metric": self.metric, "loss": self.loss, **chosen}


_REAL = {"model": "facebook/sam-vit-base", "image_size": 1024, "batch_size": 4, "weight_decay": 1e-4}
_SYNTHETIC = {"model": "convlora-tiny", "batch_size": 8, "lr": 2e-3, "epochs": 6, "weight_decay": 1e-4}
_AUGMENT = {"hflip": 0.5}

RECIPES: dict[str, Recipe] = {
    "polyp": Recipe(
        "polyp", "Kvasir-SEG / CVC-ClinicDB", "s_measure", "structure",
        real={**_REAL, "lr": 1e-4, "epochs": 30, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "skin": Recipe(
        "skin", "ISIC 2017", "iou", "structure",
        real={**_REAL, "lr": 1e-4, "epochs": 30, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "camouflage": Recipe(
        "camouflage", "CAMO / COD10K", "s_measure", "structure",
        real={**_REAL, "lr": 1e-4, "epochs": 20, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "shadow": Recipe(
        "shadow", "SBU Shadow", "ber", "balanced_bce",
        real={**_REAL, "lr": 1e-4, "epochs": 10, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "leaf": Recipe(
        "leaf", "Leaf disease segmentation", "iou", "structure",
        real={**_REAL, "lr": 3e-4, "epochs": 30, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "road": Recipe(
        "road", "Massachusetts Roads", "iou", "structure",
        real={**_REAL, "lr": 3e-4, "epochs": 20, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
    "scene": Recipe(
        "scene", "Trans10K-style multi-class scenes", "miou", "ce_dice",
        real={**_REAL, "lr": 1e-4, "epochs": 30, "augment": _AUGMENT},
        synthetic={**_SYNTHETIC, "augment": _AUGMENT},
    ),
}  # fmt: skip


def recipe(domain: str) -> Recipe:
    """The recipe of ``domain``, with a clear error for an unknown one.

    Args:
        domain: a key of :data:`RECIPES`.

    >>> recipe("shadow").loss
    'balanced_bce'
    """
    if domain not in RECIPES:
        from .synthetic import DOMAINS

        if domain in DOMAINS and DOMAINS[domain].mode == "instances":
            raise ValueError(
                f"the {domain} domain holds instance masks and has no recipe; train it with --mode instances "
                "(examples/nuclei.py)"
            )
        raise ValueError(f"Unknown domain {domain!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[domain]
