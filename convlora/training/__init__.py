"""Training: config, losses, checkpoints, the prompted step, the engine, the run report.

``engine.train(config)`` is the one entry point; everything else here is what it is built from. What using a
trained model needs lives below, without the engine: the trained-folder format and method registry in
:mod:`convlora.artifact`, prompt decoding in :mod:`convlora.prompting`, metrics and evaluation in
:mod:`convlora.evaluation`.
"""

from ..artifact import TaskInfo, export_trained, load_trained
from ..artifact.methods import METHODS, build_task_model, get_method
from ..evaluation.evaluate import evaluate_split
from .config import TrainConfig, load_config
from .engine import TrainingError, TrainResult, train

__all__ = [
    "METHODS",
    "TaskInfo",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "build_task_model",
    "evaluate_split",
    "export_trained",
    "get_method",
    "load_config",
    "load_trained",
    "train",
]
