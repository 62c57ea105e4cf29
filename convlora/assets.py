"""Models that ship inside the package (filled in by the embedded-base work)."""

from __future__ import annotations

from torch import nn

EMBEDDED_MODELS: dict[str, str] = {}


def load_embedded(name: str) -> nn.Module:
    """Load an embedded model by name."""
    raise ValueError(f"Unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
