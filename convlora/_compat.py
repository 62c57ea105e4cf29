"""The one place that touches private hooks of PEFT, transformers and torch; first of all, registering a PEFT
method that PEFT's enum does not list.

PEFT's public ``peft.utils.register_peft_method`` only accepts names already present in the closed
``PeftType`` enum. ``PeftType`` is a ``str`` enum, so its members hash and compare like their string
values; PEFT's dispatch tables are plain dicts, so an entry keyed by the string ``"CONV_LORA"`` is found
wherever PEFT looks up ``config.peft_type``. Tested with the PEFT versions allowed in pyproject.toml.

PEFT and transformers also read ``config.peft_type.value`` / ``.name`` (transformers' ``load_adapter``
marks adapter keys with ``peft_type.value.lower()``), so the registered name is a :class:`MethodType`: a
``str`` that carries ``.value`` and ``.name`` like an enum member, hashes and compares as its plain string
and is written to ``adapter_config.json`` as that string.

Without ``import convlora`` stock PEFT has no entry for ``"CONV_LORA"`` and refuses such an adapter
with ``KeyError: 'CONV_LORA'`` instead of silently building a different model (tested).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import peft
from accelerate.state import AcceleratorState, GradientState, PartialState
from packaging.version import Version
from peft import mapping

TESTED_PEFT = ("0.21", "0.22")  # [lower, upper)


class MethodType(str):
    """A PEFT method name outside PEFT's closed ``PeftType`` enum, usable wherever a member is.

    It is the plain string for hashing, comparison, ``str()`` and JSON, and answers ``.value`` and
    ``.name`` as ``PeftType`` members do.

    Args:
        value: the method's name, e.g. ``"CONV_LORA"``.

    >>> kind = MethodType("CONV_LORA")
    >>> kind == "CONV_LORA", kind.value.lower(), {"CONV_LORA": 1}[kind], str(kind)
    (True, 'conv_lora', 1, 'CONV_LORA')
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        """The plain string, as ``PeftType.LORA.value`` is ``"LORA"``."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The member name; equal to the value, as for every ``PeftType`` member."""
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return repr(str.__str__(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # copies and pickles (dataclasses.asdict deep-copies fields) keep the type
        return (MethodType, (str.__str__(self),))


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Hide the one deprecation PEFT 0.21 triggers inside transformers 5.x on every ``get_peft_model``.

    The warning is about PEFT's code, not the user's; it is silenced only for the duration of the call, so
    no warning filter of the user's process changes when convlora is imported.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_peft_version() -> None:
    """Warn when the installed PEFT is outside the range this shim was tested with."""
    version = Version(peft.__version__).release[:2]
    lower, upper = (Version(v).release[:2] for v in TESTED_PEFT)
    if not lower <= version < upper:
        warnings.warn(
            f"convlora was tested with peft>={TESTED_PEFT[0]},<{TESTED_PEFT[1]} but peft {peft.__version__} is "
            "installed; Conv-LoRA's PEFT registration may not work.",
            stacklevel=2,
        )


def register_peft_method(peft_type: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``peft_type`` known to PEFT's config, tuner and prefix tables (idempotent)."""
    check_peft_version()
    tables: dict[str, tuple[dict[Any, Any], Any]] = {
        "config": (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        "tuner": (mapping.PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        "prefix": (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    }
    for table, value in tables.values():
        existing = table.get(peft_type)
        if (
            existing is not None
            and existing is not value
            and getattr(existing, "__qualname__", existing) != getattr(value, "__qualname__", value)
        ):
            raise RuntimeError(f"PEFT already has a different method registered as {peft_type!r}: {existing}")
        table[peft_type] = value


def keep_trained_modules_on_unload(peft_model: Any) -> Any:
    """Let ``merge_and_unload()`` / ``unload()`` put a whole trained module (``modules_to_save``) in place, in place.

    Two gaps of PEFT's tuners for modules such as SAM's mask decoder: the generic ``BaseTuner._replace_module``
    copies ``child.weight`` onto the module that replaces a ``ModulesToSaveWrapper``, which fails for a module
    without a ``weight`` of its own (huggingface/peft#3114; LoRA's tuner overrides it and is not affected);
    and LN tuning's own unloading leaves the wrapper in the model, whose state dict then no longer fits the
    base architecture. The trained copy already owns its weights: for those wrappers only the module is put in
    place, and any wrapper still there after unloading is replaced by its trained module.

    Args:
        peft_model: a ``PeftModel``; returned.
    """
    import types

    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import AuxiliaryTrainingWrapper

    tuner = peft_model.base_model
    if type(tuner)._replace_module is BaseTuner._replace_module:
        replace_module = tuner._replace_module

        def replace(self: Any, parent: Any, child_name: str, new_module: Any, child: Any) -> None:
            if isinstance(child, AuxiliaryTrainingWrapper):
                setattr(parent, child_name, new_module)
                return
            replace_module(parent, child_name, new_module, child)

        tuner._replace_module = types.MethodType(replace, tuner)
    unload_model = tuner._unload_and_optionally_merge

    def unload(self: Any, merge: bool = True, *args: Any, **kwargs: Any) -> Any:
        model = unload_model(merge, *args, **kwargs)
        wrappers = [name for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)]
        for name in wrappers:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            module = getattr(owner, child).unload_and_optionally_merge_module(merge, False, None)
            setattr(owner, child, module)
        return model

    tuner._unload_and_optionally_merge = types.MethodType(unload, tuner)
    return peft_model


def forget_accelerate_settings() -> None:
    """Let one process run several trainings with different settings (examples, benchmarks, notebooks).

    Accelerate keeps its settings (mixed precision, ...) in a process-wide singleton and refuses to change
    them. In a single process nothing else depends on it, so it is cleared between runs; under
    `accelerate launch` it holds the process group and is left alone.
    """
    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state()
    GradientState._reset_state()


def checkpoint_block(block: Any) -> None:
    """Make one of transformers' ``GradientCheckpointingLayer`` blocks recompute itself in the backward pass.

    transformers switches blocks on through ``gradient_checkpointing_enable``, which some SAM classes refuse
    (SAM 3); the block reads the private ``_gradient_checkpointing_func``. Non-reentrant checkpointing keeps
    gradients reaching adapters inside the block.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    block.gradient_checkpointing = True
    block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def set_last_lr(scheduler: Any, values: list[float]) -> None:
    """Set what ``scheduler.get_last_lr()`` returns (torch keeps it in the private ``_last_lr``)."""
    scheduler._last_lr = list(values)
