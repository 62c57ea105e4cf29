"""Evaluation below the training engine: metrics that score predictions, needing no model and no trainer.

Imports numpy, scipy and torch only (nothing from :mod:`convlora.training`), so predicting and scoring a
trained model never loads the training stack.
"""

from .instances import (
    DEFAULT_THRESHOLDS,
    InstanceMatch,
    InstanceMetrics,
    connected_components,
    instance_scores,
    match_instances,
    relabel_sequential,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "InstanceMatch",
    "InstanceMetrics",
    "connected_components",
    "instance_scores",
    "match_instances",
    "relabel_sequential",
]
