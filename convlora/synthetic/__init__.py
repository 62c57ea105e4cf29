"""Synthetic stand-ins for the paper's fine-tuning domains, drawn with numpy so they need no download.

Each domain is a generator ``generate(rng, height, width) -> (image uint8 (h, w, 3), mask uint8 (h, w))``
built to carry the real difficulty of the dataset it imitates (low-contrast polyps, fuzzy lesion borders,
camouflage, shadows among dark objects, disease spots on leaves, thin roads, overlapping classes). Binary
masks are {0, 255}; the multi-class scene mask holds class ids. The nuclei and cells domains are for
instance segmentation, with uint16 instance-id masks written as 16-bit PNGs: nuclei draws 12-bit
fluorescence images (uint16 ``(h, w)``, 16-bit PNGs), cells 8-bit phase-contrast ones (uint8 ``(h, w)``,
8-bit grey PNGs).

>>> from convlora.synthetic import DOMAINS, sample
>>> image, mask = sample("polyp", 0, size=64, square=True)
>>> image.shape, DOMAINS["polyp"].metric
((64, 64, 3), 's_measure')
"""

from __future__ import annotations

from .domains import DOMAINS, GENERATOR_VERSION, MODES, DomainSpec
from .writer import preview_grid, sample, write_dataset

__all__ = ["DOMAINS", "GENERATOR_VERSION", "MODES", "DomainSpec", "preview_grid", "sample", "write_dataset"]
