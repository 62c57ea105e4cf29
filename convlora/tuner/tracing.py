"""Whether a graph is being captured: the expert code keeps no state and no cached tensor while it is.

Both are public torch functions (``torch.compiler``, ``torch.jit``, ``torch.onnx``), not private hooks, so they
live here rather than in ``convlora._compat``; one place to extend if torch adds another capture mode.
"""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """Inside ``torch.export``, the ONNX exporter or a TorchScript trace: the graph keeps no Python state.

    >>> is_exporting()
    False
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def is_tracing() -> bool:
    """Inside ``torch.compile`` or any of :func:`is_exporting`'s: tensors made now may be fake ones.

    >>> is_tracing()
    False
    """
    return torch.compiler.is_compiling() or is_exporting()
