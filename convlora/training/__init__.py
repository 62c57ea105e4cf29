"""Training: config, methods (a registry), losses, metrics, checkpoints, evaluation, the engine, the run report.

``engine.train(config)`` is the one entry point; everything else here is what it is built from.
"""

from .artifact import TaskInfo, export_trained, load_trained
from .config import TrainConfig, load_config
from .engine import TrainingError, TrainResult, train
from .evaluate import evaluate_split
from .methods import METHODS, build_task_model, get_method

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
