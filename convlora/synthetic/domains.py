"""The registry of synthetic domains: one ``DomainSpec`` per domain, in a plain dict.

>>> DOMAINS["road"].num_classes
2
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import camouflage, cells, leaf, nuclei, polyp, road, scene, shadow, skin

Generator = Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]

MODES = ("binary", "multiclass", "instances")

# Bump whenever any generator's output changes: it is recorded in dataset.json, so a stale dataset on
# disk is regenerated instead of reused.
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class DomainSpec:
    """One synthetic domain.

    Args:
        name: registry key.
        generate: ``generate(rng, height, width) -> (image, mask)``.
        mode: ``"binary"`` ({0, 255} masks), ``"multiclass"`` (masks of class ids) or ``"instances"``
            (uint16 masks of instance ids, 0 = background, one id per object).
        class_names: names by class id, ``class_names[0]`` the background; two names for binary and instance
            domains.
        description: what the images show and what makes them hard.
        imitates: the paper dataset this domain stands in for.
        metric: name of the domain's main metric (``s_measure``, ``iou``, ``ber``, ``miou``, or ``msa`` for
            instances).

    >>> DOMAINS["road"].num_classes
    2
    """

    name: str
    generate: Generator
    mode: str
    class_names: tuple[str, ...]
    description: str
    imitates: str
    metric: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DomainSpec {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if len(self.class_names) < 2 or (self.mode != "multiclass" and len(self.class_names) != 2):
            raise ValueError(
                f"DomainSpec {self.name!r}: class_names must hold 2 names for a binary or instance domain and at "
                f"least 2 for a multiclass one, got {len(self.class_names)}"
            )
        if not callable(self.generate):
            raise ValueError(f"DomainSpec {self.name!r}: generate must be callable, got {type(self.generate).__name__}")

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.class_names)


DOMAINS: dict[str, DomainSpec] = {
    "polyp": DomainSpec(
        "polyp", polyp.generate, "binary", ("background", "polyp"),
        "pink polyp domes on reddish mucosa with folds, vessels and wet glints; part of the outline has almost "
        "no colour step", "Kvasir-SEG", "s_measure"),
    "skin": DomainSpec(
        "skin", skin.generate, "binary", ("background", "lesion"),
        "pigmented skin lesion with a fuzzy border of varying width, mixed browns and veils, hairs and dermoscope "
        "vignetting", "ISIC 2017", "iou"),
    "camouflage": DomainSpec(
        "camouflage", camouflage.generate, "binary", ("background", "object"),
        "animal-like shapes wearing a sibling of the background's texture (same family, nudged scale and colour)",
        "CAMO / COD10K", "s_measure"),
    "shadow": DomainSpec(
        "shadow", shadow.generate, "binary", ("background", "shadow"),
        "soft multiplicative cast shadows on textured ground among equally dark painted objects", "SBU", "ber"),
    "leaf": DomainSpec(
        "leaf", leaf.generate, "binary", ("background", "disease"),
        "leaves on soil, foliage or a bench; the mask is the brown lesions (not their yellow halos, not the leaf)",
        "leaf disease segmentation", "iou"),
    "road": DomainSpec(
        "road", road.generate, "binary", ("background", "road"),
        "thin connected road networks (2-6 px at 128 px) over fields and woods, with houses, driveways, parking "
        "lots and rivers", "Massachusetts roads", "iou"),
    "scene": DomainSpec(
        "scene", scene.generate, "multiclass", scene.CLASS_NAMES,
        "eight overlapping object classes, each with its own shape family and surface pattern, on a textured "
        "ground", "Trans10K (multi-class)", "miou"),
    "nuclei": DomainSpec(
        "nuclei", nuclei.generate, "instances", ("background", "nucleus"),
        "12-bit fluorescence nuclei (uint16 images, 16-bit instance-id masks) crowding into clusters that touch "
        "with no background between them, some lying over others, dim ones, uneven light and shot noise",
        "2018 Data Science Bowl (BBBC038) fluorescence nuclei", "msa"),
    "cells": DomainSpec(
        "cells", cells.generate, "instances", ("background", "cell"),
        "8-bit phase-contrast cultured cells (uint8 grey images, 16-bit instance-id masks): spindle, flat and "
        "rounded cells packed into confluent patches whose members share a faint boundary line or none, a bright "
        "halo around each patch, granular interiors, isolated cells and debris",
        "LIVECell (phase-contrast cell cytoplasm)", "msa"),
}  # fmt: skip
