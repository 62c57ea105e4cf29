"""The trained-model folder and the method registry: what a run exports, how it loads back, onto which base.

Below the training engine, so that using a trained model (predict, evaluate, merge, export) never imports it:
:mod:`convlora.artifact.methods` holds one :class:`~convlora.artifact.methods.Method` entry per training
method (build, export, load), :mod:`convlora.artifact.folder` the task file and ``load_trained`` /
``export_trained``.
"""

from .folder import (
    TASK_FILE,
    TaskInfo,
    apply_task_settings,
    continue_from_export,
    export_trained,
    load_peft_folder,
    load_trained,
    verify_weights,
    write_task_file,
)
from .methods import METHODS, Method, build_task_model, get_method, method_for_adapter

__all__ = [
    "METHODS",
    "TASK_FILE",
    "Method",
    "TaskInfo",
    "apply_task_settings",
    "build_task_model",
    "continue_from_export",
    "export_trained",
    "get_method",
    "load_peft_folder",
    "load_trained",
    "method_for_adapter",
    "verify_weights",
    "write_task_file",
]
