"""PEFT's own methods on SAM's image encoder: one row per method, saying how convlora's settings configure it.

A row names PEFT's config class and which :class:`~convlora.ConvLoraConfig` settings set which of its
fields (rank, alpha, dropout, initialisation). The targets are the family preset's modules, resolved as for
LoRA and Conv-LoRA (``target_preset``, ``layers``, ``target_modules``), except for ``ln_tuning``, which tunes
the LayerNorms of the same encoder blocks; the mask decoder is trained in full (``modules_to_save``) as
for LoRA. Nothing of a method is re-implemented here: ``get_peft_model`` builds it, ``save_pretrained`` /
``PeftModel.from_pretrained`` save and load it, ``merge_and_unload`` merges it.

Any other field of the method's config is an option (``--peft.KEY VALUE``, ``TrainConfig.peft``), checked by
:func:`check_peft_options` against the config class's fields and type hints.

>>> PEFT_METHODS["loha"].settings["lora_alpha"], "use_dora" in peft_options("lora")
('alpha', True)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from peft import (
    BOFTConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .._compat import keep_trained_modules_on_unload, quiet_peft_deprecations
from ..models.adapters import existing_adapters
from ..models.family import family_of, find_sam
from ..tuner import ConvLoraConfig
from ..tuner.presets import ENCODER_LAYERS, preset_family

# Where convlora's targets and trained modules go; a --peft option cannot override them.
_SET_BY_CONVLORA = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "target_parameters",
)
_CONVS = (nn.Conv1d, nn.Conv2d)


def _fields(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class) if f.init}


@dataclass(frozen=True)
class PeftMethod:
    """How one of PEFT's methods is configured from convlora's adapter settings.

    Args:
        config_class: PEFT's config class (``LoHaConfig``, ...).
        settings: ``ConvLoraConfig`` field -> the ``config_class`` field it sets (``lora_alpha`` -> ``alpha``).
        fixed: fields the method sets itself (``dora``: ``use_dora=True``); options cannot change them.
        adapts: the module types PEFT's layers of this method wrap; ``None``: any module.
        targets: ``"preset"`` (the family preset's modules, as for LoRA) or ``"layer_norms"`` (the LayerNorms
            of the encoder blocks in ``layers``).
        feedforward: (IA)3: the targeted MLP down-projections become ``feedforward_modules`` (scaled at their
            input, the MLP's hidden activation, as the paper does), unless the ``feedforward_modules`` option
            says otherwise.

    >>> PeftMethod(VeraConfig, {"r": "r"}).targets
    'preset'
    """

    config_class: type[PeftConfig]
    settings: dict[str, str]
    fixed: dict[str, Any] = field(default_factory=dict)
    adapts: tuple[type[nn.Module], ...] | None = (nn.Linear,)
    targets: str = "preset"
    feedforward: bool = False

    def __post_init__(self) -> None:
        if self.targets not in ("preset", "layer_norms"):
            raise ValueError(f"targets must be 'preset' or 'layer_norms', got {self.targets!r}")
        known = _fields(self.config_class)
        unknown = [name for name in (*self.settings.values(), *self.fixed) if name not in known]
        if unknown:
            raise ValueError(f"{self.config_class.__name__} has no fields {unknown}")


_LORA = {"r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "init_lora_weights": "init_lora_weights"}
_LYCORIS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "rank_dropout", "init_lora_weights": "init_weights"}

PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(LoraConfig, _LORA, adapts=(nn.Linear, nn.Embedding, *_CONVS, nn.Conv3d, nn.MultiheadAttention)),
    "dora": PeftMethod(LoraConfig, _LORA, fixed={"use_dora": True}, adapts=(nn.Linear, nn.Embedding, *_CONVS)),
    "loha": PeftMethod(LoHaConfig, _LYCORIS, adapts=(nn.Linear, *_CONVS)),
    "lokr": PeftMethod(LoKrConfig, _LYCORIS, adapts=(nn.Linear, *_CONVS)),
    "ia3": PeftMethod(
        IA3Config, {"init_lora_weights": "init_ia3_weights"}, adapts=(nn.Linear, nn.Conv2d), feedforward=True
    ),
    "boft": PeftMethod(
        BOFTConfig, {"lora_dropout": "boft_dropout", "init_lora_weights": "init_weights"}, adapts=(nn.Linear, nn.Conv2d)
    ),
    "vera": PeftMethod(VeraConfig, {"r": "r", "lora_dropout": "vera_dropout", "init_lora_weights": "init_weights"}),
    "ln_tuning": PeftMethod(LNTuningConfig, {}, adapts=None, targets="layer_norms"),
}  # fmt: skip


def _spec(method: str) -> PeftMethod:
    if method not in PEFT_METHODS:
        raise ValueError(f"{method!r} is not one of PEFT's methods convlora configures: {sorted(PEFT_METHODS)}")
    return PEFT_METHODS[method]


def peft_options(method: str) -> list[str]:
    """The ``--peft.KEY`` options of a PEFT method: its config's fields that convlora does not set itself.

    Args:
        method: a key of ``PEFT_METHODS``.

    >>> peft_options("ln_tuning")
    []
    """
    spec = _spec(method)
    taken = {*_fields(PeftConfig), *_SET_BY_CONVLORA, *spec.settings.values(), *spec.fixed}
    return sorted(_fields(spec.config_class) - taken)


def reads(method: str) -> list[str]:
    """The adapter settings (``ConvLoraConfig`` fields, ``--conv_lora.KEY``) a PEFT method reads.

    >>> reads("ia3")
    ['exclude_modules', 'family', 'init_lora_weights', 'layers', 'modules_to_save', 'target_modules', 'target_preset']
    """
    spec = _spec(method)
    where = ["layers", "family", "modules_to_save", "exclude_modules"]
    if spec.targets == "preset":
        where += ["target_modules", "target_preset"]
    return sorted({*where, *spec.settings})


def check_peft_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Hold ``--peft.KEY`` options to the chosen method's PEFT config: its fields, their types, its own checks.

    Args:
        method: the training method (``TrainConfig.method``).
        options: option name -> value, as JSON, TOML or the command line give them.

    Returns:
        The options with values of their fields' types (an integer where a number is expected becomes one).

    Raises:
        ValueError: one line naming the option: an unknown key (listing the method's options), an option of
            another method (naming which), a setting convlora makes itself, a value of the wrong type, or a
            value PEFT's config refuses; any option for a method that is not one of PEFT's.

    >>> check_peft_options("lora", {"use_rslora": True})
    {'use_rslora': True}
    >>> check_peft_options("loha", {"use_dora": True})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: peft.use_dora is an option of dora/lora, not of loha; loha's options: ['alpha_pattern', ...]
    """
    if not options:
        return {}
    given = sorted(f"peft.{key}" for key in options)
    if method == "conv_lora":
        raise ValueError(f"{given}: method conv_lora takes its settings as --conv_lora.KEY (ConvLoraConfig fields)")
    if method not in PEFT_METHODS:
        raise ValueError(
            f"{given}: --peft.KEY options configure PEFT's methods ({', '.join(sorted(PEFT_METHODS))}); method "
            f"{method!r} is not one of them"
        )
    spec = PEFT_METHODS[method]
    known = peft_options(method)
    hints = typing.get_type_hints(spec.config_class)
    checked = {}
    for key, value in options.items():
        if key in known:
            checked[key] = _typed(value, hints[key], f"peft.{key}")
            continue
        setting = next((ours for ours, theirs in spec.settings.items() if theirs == key), None)
        if setting is not None:
            raise ValueError(f"peft.{key}: {method} takes {key} from the adapter settings; set --conv_lora.{setting}")
        if key in spec.fixed:
            raise ValueError(f"peft.{key}: {method} sets {key}={spec.fixed[key]!r} itself")
        if key in _SET_BY_CONVLORA or key in _fields(PeftConfig):
            raise ValueError(
                f"peft.{key} is set by convlora, not an option (targets and modules_to_save come from --conv_lora.*)"
            )
        owners = [name for name, other in PEFT_METHODS.items() if key in _fields(other.config_class)]
        if owners:
            raise ValueError(
                f"peft.{key} is an option of {'/'.join(sorted(owners))}, not of {method}; {method}'s options: {known}"
            )
        raise ValueError(
            f"peft.{key} is not an option of {method} ({spec.config_class.__name__}); its options: {known}"
        )
    try:
        spec.config_class(**spec.fixed, **checked)
    except (ValueError, TypeError) as error:
        raise ValueError(f"peft options {checked} of {method}: {error}") from error
    return checked


def _typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the PEFT field's type ``hint`` takes it, or a ValueError naming ``key``."""
    found = _take(value, hint)
    if found is _NO:
        raise ValueError(f"{key} must be {_describe(hint)}, got {value!r}")
    return found


_NO = object()


def _take(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        exact = [o for o in options if _take(value, o) is not _NO and not (o is float and isinstance(value, int))]
        for option in exact or options:  # an int stays an int where the union also takes one
            found = _take(value, option)
            if found is not _NO:
                return found
        return _NO
    if origin is Literal:
        return value if value in typing.get_args(hint) else _NO
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        kind = origin or hint
        if kind is dict:
            return value if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _NO
        if not isinstance(value, (list, tuple)):
            return _NO
        args = typing.get_args(hint)
        items = args[:1] * len(value) if kind is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if args and len(items) != len(value):
            return _NO
        taken = [_take(item, arg) for item, arg in zip(value, items, strict=True)] if args else list(value)
        return _NO if any(t is _NO for t in taken) else kind(taken)
    if hint is type(None):
        return None if value is None else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    return _NO  # a PEFT object (LoftQConfig, ...): not expressible as an option


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(o) for o in typing.get_args(hint)))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {type(None): "null", float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    if (origin or hint) in (list, tuple):
        return "a list"
    if (origin or hint) is dict:
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)} (a PEFT object, which --peft options cannot express)"


def _layer_norm_targets(sam: nn.Module, config: ConvLoraConfig) -> str:
    """Regex of the LayerNorms inside the encoder blocks ``config.layers`` (all blocks when unset)."""
    family = preset_family(sam.config.model_type)
    if family is None:
        raise ValueError(f"ln_tuning needs a SAM-family model, got model_type={sam.config.model_type!r}")
    names = sorted(
        {
            name
            for block in family_of(sam).encoder_layers(sam)
            for name, module in block.named_modules()
            if name and re.search(r"(?:Layer|RMS)Norm", type(module).__name__)
        }
    )
    if not names:
        raise ValueError(f"ln_tuning: the encoder blocks of {type(sam).__name__} have no LayerNorm")
    layer = r"\d+" if config.layers is None else "(?:" + "|".join(str(int(i)) for i in config.layers) + ")"
    return rf"(?:.*\.)?{ENCODER_LAYERS[family]}\.{layer}\.(?:{'|'.join(re.escape(n) for n in names)})"


def build_peft_config(
    model: nn.Module, method: str, config: ConvLoraConfig | None = None, options: Mapping[str, Any] | None = None
) -> PeftConfig:
    """PEFT's config of ``method`` for a SAM model, from a Conv-LoRA config's settings and the method's options.

    Checks what it can before PEFT builds anything: the layer indices exist, every targeted module is of a
    type the method adapts (naming the module otherwise), and the options fit the method.

    Args:
        model: a ``SamModel`` (any family) or a module containing one.
        method: a key of ``PEFT_METHODS``.
        config: targets, rank, alpha, dropout, initialisation and ``modules_to_save`` (defaults when ``None``);
            its target preset is resolved for the model's family (in place).
        options: more fields of the method's config (see :func:`check_peft_options`).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> build_peft_config(random_sam(tiny_sam_config()), "loha").alpha
    32
    """
    spec = _spec(method)
    options = check_peft_options(method, options or {})
    config = ConvLoraConfig() if config is None else config
    if not isinstance(config, ConvLoraConfig):
        raise TypeError(f"config must be a ConvLoraConfig, got {type(config).__name__}")
    sam = find_sam(model)
    config.resolve_targets(sam.config.model_type, type(sam).__name__)
    depth = len(family_of(sam).encoder_layers(sam))
    if config.layers is not None and max(config.layers) >= depth:
        raise ValueError(f"layers {config.layers} out of range: the image encoder has {depth} layers (0..{depth - 1})")
    targets = config.target_modules if spec.targets == "preset" else _layer_norm_targets(sam, config)
    values: dict[str, Any] = {theirs: getattr(config, ours) for ours, theirs in spec.settings.items()}
    values |= {"target_modules": targets, "modules_to_save": config.modules_to_save}
    if config.exclude_modules is not None:
        if "exclude_modules" not in _fields(spec.config_class):
            raise ValueError(f"exclude_modules: PEFT's {spec.config_class.__name__} ({method}) has no exclude_modules")
        values["exclude_modules"] = config.exclude_modules
    values |= spec.fixed
    dropout = spec.settings.get("lora_dropout")
    if dropout is None and config.lora_dropout:
        raise ValueError(f"lora_dropout={config.lora_dropout}: {method} has no dropout; leave it at 0")
    matched = _check_targets(model, method, spec, spec.config_class(**{**values, **options}))
    if spec.feedforward and "feedforward_modules" not in options:
        values["feedforward_modules"] = sorted(
            name
            for name, module in matched.items()
            if ".mlp." in f".{name}" and isinstance(module, nn.Linear) and module.in_features > module.out_features
        )
    try:
        return spec.config_class(**{**values, **options})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{method}: {error}") from error


def _check_targets(model: nn.Module, method: str, spec: PeftMethod, peft_config: PeftConfig) -> dict[str, nn.Module]:
    """The modules ``peft_config`` targets, after checking each is of a type the method adapts."""
    matched = {name: m for name, m in model.named_modules() if name and check_target_module_exists(peft_config, name)}
    if not matched:
        raise ValueError(f"{method}: target_modules {peft_config.target_modules!r} match no module of the model")
    if spec.adapts is not None:
        for name, module in matched.items():
            if not isinstance(module, spec.adapts):
                kinds = ", ".join(t.__name__ for t in spec.adapts)
                raise ValueError(
                    f"{method} cannot adapt {name}: it is a {type(module).__name__}, and PEFT's {method} layers wrap "
                    f"{kinds} only; choose a target_preset or target_modules of such layers"
                )
    return matched


def apply_peft_method(
    model: nn.Module,
    method: str,
    config: ConvLoraConfig | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
) -> Any:
    """One of PEFT's methods on SAM's image encoder (the mask decoder trained in full), as a ``peft.PeftModel``.

    Only the method's tensors and ``modules_to_save`` are trainable afterwards; a model that already carries
    adapters is refused, never reset.

    Args:
        model: a ``SamModel``, ``SamHQModel``, ``Sam2Model``, ``Sam3TrackerModel`` or a module containing one.
        method: a key of ``PEFT_METHODS`` (``"dora"``, ``"loha"``, ``"lokr"``, ``"ia3"``, ``"boft"``, ``"vera"``,
            ``"ln_tuning"``, ``"lora"``).
        config: a :class:`~convlora.ConvLoraConfig` whose targets and settings the method reads (see
            :func:`reads`); defaults when ``None``.
        options: more fields of the method's PEFT config (``{"use_rslora": True}``), see :func:`peft_options`.
        adapter_name: name of the adapter in the returned ``PeftModel``.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> type(apply_peft_method(random_sam(tiny_sam_config()), "ia3").peft_config["default"]).__name__
    'IA3Config'
    """
    found = existing_adapters(model)
    if found:
        listed = "; ".join(f"{kind} adapter {', '.join(repr(n) for n in names)}" for kind, names in found.items())
        raise ValueError(
            f"apply_peft_method({method!r}): {type(model).__name__} already has a {listed}; refusing to apply another "
            "over it (that would reset or break the trained one); merge_and_unload() or unload() it first, or start "
            "from a model without adapters"
        )
    peft_config = build_peft_config(model, method, config, options)
    try:
        with quiet_peft_deprecations():
            peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    except (ValueError, TypeError, RuntimeError) as error:  # PEFT's refusals, e.g. a block size that does not divide
        raise ValueError(f"{method} on {type(find_sam(model)).__name__}: {error}") from error
    return keep_trained_modules_on_unload(peft_model)


def ignored_settings(method: str, given: Mapping[str, Any]) -> list[str]:
    """The adapter settings in ``given`` (``--conv_lora.KEY``) that a PEFT method does not read.

    >>> ignored_settings("ia3", {"r": 4, "layers": [0]})
    ['r']
    """
    return sorted(set(given) - set(reads(method)))
