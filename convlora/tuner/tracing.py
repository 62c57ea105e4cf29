"""Whether a graph is being captured, and which expert code Dynamo should not read line by line.

The expert code keeps no state and no cached tensor while a graph is captured. Its static-shape mixtures are
marked :func:`captured_as_one_call`, so that ``torch.compile`` captures a Conv-LoRA model about as fast as a
LoRA one.

All of these are public torch functions (``torch.compiler``, ``torch.jit``, ``torch.onnx``), not private hooks, so
they live here rather than in ``convlora._compat``; one place to extend if torch adds another capture mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)


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


def is_compiling_only() -> bool:
    """Inside ``torch.compile``, not an export: a graph that runs again and again, from Python.

    >>> is_compiling_only()
    False
    """
    return torch.compiler.is_compiling() and not is_exporting()


def captured_as_one_call(fn: Fn) -> Fn:
    """Mark ``fn`` so that Dynamo puts it into the graph as one call instead of interpreting its Python.

    Dynamo runs Python bytecode by bytecode, at about a thousandth of Python's speed. The experts' resize plans
    (pure-Python loops over the grid, a few milliseconds as Python) and einops' pattern parsing (which Dynamo
    follows into for einops 0.8.2 and later, about ten patterns per mixture) took a Conv-LoRA SAM minutes to
    capture where LoRA took seconds. AOT autograd, which every compiling backend but ``"eager"`` uses, then
    traces the call as Python on fake tensors, recording the same tensor operations, with the resize matrices
    as constants. ``fn`` takes tensors and plain constants (ints, floats, strings, tuples of them, ``None``),
    returns a tensor, and keeps no state; it is returned unchanged (``torch.compiler.allow_in_graph``).

    Args:
        fn: the function.

    >>> def twice(x: torch.Tensor) -> torch.Tensor:
    ...     return 2 * x
    >>> captured_as_one_call(twice)(torch.ones(2)).tolist()
    [2.0, 2.0]
    """
    return torch.compiler.allow_in_graph(fn)
