"""Evaluation below the training engine: the task metrics, instance metrics, and scoring a model on a dataset.

Nothing here imports :mod:`convlora.training`, so scoring a trained model (``convlora evaluate``) never loads
the training stack; the engine uses the same code for validation. :mod:`~convlora.evaluation.metrics` and
:mod:`~convlora.evaluation.instances` need no model; :mod:`~convlora.evaluation.evaluate` (prompt-free) and
:mod:`~convlora.evaluation.prompted` run one.
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
