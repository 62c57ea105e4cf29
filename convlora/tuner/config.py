"""``ConvLoraConfig``: the configuration of the Conv-LoRA PEFT method."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from .._compat import MethodType
from .moe import INTERPOLATION_MODES
from .presets import ENCODER_LAYERS, FAMILY_PRESETS, preset_family, target_modules_pattern

# Not a PeftType member (a closed enum): a str carrying `.value`/`.name`, equal to and saved as "CONV_LORA".
PEFT_TYPE = MethodType("CONV_LORA")
# Bumped when a saved adapter can no longer be read by an older convlora.
FORMAT_VERSION = 1


@dataclass
class ConvLoraConfig(PeftConfig):
    """Configuration of a Conv-LoRA adapter.

    Conv-LoRA wraps each target ``nn.Linear`` ``W`` with a LoRA bottleneck whose features also pass
    through a mixture of multi-scale conv experts: ``y = W x + (lora_alpha / r) * B(z + MoE(z))`` with
    ``z = A(dropout(x))``. Defaults follow the paper's reference set-up (8 experts with scales 1..8,
    top-1 noisy gate, auxiliary weight 0.01, full 3x3 convs) on the fused ``qkv`` projection of every
    layer of SAM's image encoder, with the mask decoder trained and saved alongside.

    Args:
        r: LoRA rank, also the channel count the conv experts see.
        lora_alpha: LoRA scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the layer input before the down-projection.
        target_modules: module names or a regex of the layers to adapt; derived from ``target_preset``
            and ``layers`` when not given.
        target_preset: a named set of targets of the model's family from
            ``convlora.tuner.presets.FAMILY_PRESETS`` (SAM, SAM 2: ``"qkv"``, ``"qkv_proj"``,
            ``"attention_mlp"``; SAM 3: ``"qv"``, ``"qkv"``, ``"attention"``, ``"attention_mlp"``); the default
            is ``"qkv"``. Resolved against the model the config is applied to (its ``model_type``).
        layers: indices of the image-encoder layers (blocks) to adapt; all layers when ``None``.
        family: the preset family the targets are for (``"sam"``, ``"sam_hq"``, ``"sam2"``, ``"sam3"``); read
            from the model when unset, and recorded in the saved adapter (for families other than SAM's) so
            that it refuses a model of another family.
        num_experts: number of conv experts.
        expert_scales: resize factor of each expert; ``1, 2, ..., num_experts`` when ``None``.
        top_k: experts chosen per sample by the gate.
        expert_conv: ``"full"`` 3x3 convs over the ``r`` channels (the paper's code) or ``"depthwise"``.
        interpolation: resize mode of the experts: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.
        weighted_combine: multiply each chosen expert's output by its gate probability, so that the task
            loss also trains the gate; the paper's code sums the chosen outputs unweighted.
        noisy_gating: learned noise on the gate logits during training.
        aux_loss_weight: weight of the load-balancing loss returned by ``convlora.moe_aux_loss``.
        modules_to_save: modules trained in full and saved with the adapter (SAM's mask decoder).
        init_lora_weights: ``True`` for the identity at initialisation (zero ``B``, zero gate);
            ``False`` gives random ``B`` and gate weights, useful only for tests.
        format_version: version of the saved format; adapters from a newer convlora are refused.
        target_parameters: read by PEFT's generic code; Conv-LoRA adapts modules, so it must stay ``None``.
        exclude_modules: names or a regex of modules never to adapt, even when ``target_modules`` matches.

    >>> config = ConvLoraConfig(r=4, num_experts=4)
    >>> config.expert_scales
    [1.0, 2.0, 3.0, 4.0]
    """

    r: int = field(default=3, metadata={"help": "LoRA rank; also the channel count of the conv experts."})
    lora_alpha: float = field(default=32, metadata={"help": "Scaling numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapted input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names or a regex of the nn.Linear modules to adapt; derived from target_preset if unset."},
    )
    target_preset: str | None = field(
        default=None,
        metadata={
            "help": "Named target set of the model's family (convlora.tuner.presets.FAMILY_PRESETS); 'qkv' if unset."
        },
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Image-encoder layer indices to adapt (all layers when unset)."}
    )
    family: str | None = field(
        default=None,
        metadata={"help": "Preset family of the targets (sam, sam_hq, sam2, sam3); read from the model if unset."},
    )
    num_experts: int = field(default=8, metadata={"help": "Number of multi-scale conv experts."})
    expert_scales: list[float] | None = field(
        default=None, metadata={"help": "Resize factor of each expert; 1..num_experts when unset."}
    )
    top_k: int = field(default=1, metadata={"help": "Experts chosen per sample by the noisy gate."})
    expert_conv: str = field(default="full", metadata={"help": "'full' 3x3 convs over r channels, or 'depthwise'."})
    interpolation: str = field(
        default="bicubic", metadata={"help": "Resize mode of the experts: nearest, bilinear or bicubic."}
    )
    weighted_combine: bool = field(
        default=False,
        metadata={"help": "Weight chosen experts by gate probability (trains the gate on the task loss)."},
    )
    noisy_gating: bool = field(default=True, metadata={"help": "Learned gate noise during training."})
    aux_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    modules_to_save: list[str] | None = field(
        default_factory=lambda: ["mask_decoder"],
        metadata={"help": "Modules trained in full and saved with the adapter."},
    )
    init_lora_weights: bool = field(
        default=True, metadata={"help": "True: identity at initialisation. False: random B and gate (tests)."}
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Saved-format version."})
    # Read by PEFT's generic code; Conv-LoRA targets modules, never bare parameters.
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unsupported; must stay None."})
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules never to adapt."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate()

    def _validate(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This Conv-LoRA adapter was saved with format_version={self.format_version} by a newer convlora; "
                f"this convlora reads format_version <= {FORMAT_VERSION}. Upgrade convlora to load it."
            )
        _check_int("r", self.r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, minimum=0.0, inclusive=False)
        _check_number("lora_dropout", self.lora_dropout, minimum=0.0)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check_int("num_experts", self.num_experts, minimum=1)
        if self.expert_scales is None:
            self.expert_scales = [float(i + 1) for i in range(self.num_experts)]
        else:
            if isinstance(self.expert_scales, (int, float)) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in self.expert_scales
            ):
                raise ValueError(f"expert_scales must be a list of numbers, got {self.expert_scales!r}")
            self.expert_scales = [float(s) for s in self.expert_scales]
            if len(self.expert_scales) != self.num_experts:
                raise ValueError(
                    f"expert_scales has {len(self.expert_scales)} entries but num_experts is {self.num_experts}"
                )
            if not all(0 < s < math.inf for s in self.expert_scales):
                raise ValueError(f"expert_scales must all be > 0 and finite, got {self.expert_scales}")
        _check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.expert_conv not in ("full", "depthwise"):
            raise ValueError(f"expert_conv must be 'full' or 'depthwise', got {self.expert_conv!r}")
        if self.interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"interpolation must be one of {INTERPOLATION_MODES}, got {self.interpolation!r}")
        _check_number("aux_loss_weight", self.aux_loss_weight, minimum=0.0)
        for name in ("weighted_combine", "noisy_gating", "init_lora_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.target_parameters:
            raise ValueError("Conv-LoRA adapts nn.Linear modules; target_parameters is not supported")
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise ValueError(f"layers must be a list of non-negative layer indices, got {self.layers!r}")
            self.layers = sorted(set(self.layers))
        if self.family is not None and self.family not in FAMILY_PRESETS:
            raise ValueError(f"family must be one of {sorted(FAMILY_PRESETS)}, got {self.family!r}")
        known = sorted({name for presets in FAMILY_PRESETS.values() for name in presets})
        if self.target_preset is not None and self.target_preset not in known:
            raise ValueError(f"Unknown target_preset {self.target_preset!r}; choose one of {known}")
        family = self.family or "sam"
        preset = self.target_preset or "qkv"
        if self.family is not None and preset not in FAMILY_PRESETS[family]:
            raise ValueError(
                f"target_preset {preset!r} does not exist for family {family}; choose one of "
                f"{sorted(FAMILY_PRESETS[family])}"
            )
        derived = target_modules_pattern(preset, self.layers, family) if preset in FAMILY_PRESETS[family] else None
        # Targets derived from a preset follow the model they are applied to (see resolve_targets); explicit or
        # saved target_modules are kept as given.
        self._from_preset = self.target_modules is None
        self._family_given = self.family is not None
        if self.target_modules is None:
            # SAM's targets right away (as before families existed); other families resolve on their model.
            self.target_modules = derived
        else:
            if isinstance(self.target_modules, set):
                self.target_modules = sorted(self.target_modules)
            if self.target_preset is not None and self.target_modules != derived:
                raise ValueError("Give either target_modules or target_preset/layers, not both")
            if self.layers is not None and self.target_modules != derived:
                raise ValueError("layers only applies to target presets; put the layer indices in target_modules")
        if self.modules_to_save is not None and isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def resolve_targets(self, model_type: str | None, model_name: str = "the model") -> None:
        r"""Resolve ``target_preset`` / ``layers`` for a model's family (in place), or refuse another family.

        Called by the tuner (and by ``convlora.apply_conv_lora``) with the model's ``model_type``: a config
        made from a preset gets that family's ``target_modules``; a config with explicit or saved targets
        of another family (a SAM 2 adapter on a SAM 3 model) is refused in one line naming both.

        Args:
            model_type: the model's transformers ``model_type`` (``"sam"``, ``"sam2"``, ``"sam3_tracker"``, ...).
            model_name: how to name the model in error messages (e.g. its class name).

        >>> config = ConvLoraConfig(target_preset="qv")
        >>> config.resolve_targets("sam3_tracker")
        >>> config.family, config.target_modules.endswith(r"attention\.(?:q_proj|v_proj)")
        ('sam3', True)
        """
        family = preset_family(model_type)
        preset = self.target_preset or "qkv"
        if family is None:
            if self.target_modules is None:
                raise ValueError(
                    f"target_preset {preset!r} needs a SAM-family model, but {model_name} has model_type="
                    f"{model_type!r}; give target_modules explicitly"
                )
            return
        made_for = self.family
        if made_for is None and not self._from_preset and isinstance(self.target_modules, str):
            # Adapters saved before families existed (and hand-written regexes): the encoder path names the family.
            made_for = next((name for name, path in ENCODER_LAYERS.items() if path in self.target_modules), None)
        if made_for is not None and (self._family_given or not self._from_preset):
            if not _same_layout(made_for, family):
                raise ValueError(
                    f"This Conv-LoRA config targets a {made_for} model (target_modules {self.target_modules!r}) "
                    f"but {model_name} is a {family} model (model_type={model_type!r}); use a {made_for} base "
                    f"or a config made for {family}"
                )
            return
        if not self._from_preset:
            return
        if preset not in FAMILY_PRESETS[family]:
            raise ValueError(
                f"target_preset {preset!r} does not exist for {model_name} (family {family}); choose one of "
                f"{sorted(FAMILY_PRESETS[family])}"
            )
        self.target_modules = target_modules_pattern(preset, self.layers, family)
        # SAM's targets are what every config meant before families existed: saved exactly as then, no family.
        self.family = None if _same_layout(family, "sam") else family

    def to_dict(self) -> dict[str, Any]:
        """The saved form; ``family`` only when set, so a SAM adapter is written exactly as before families existed."""
        data = super().to_dict()
        if data.get("family") is None:
            data.pop("family", None)
        return data

    @property
    def scaling(self) -> float:
        """The factor ``lora_alpha / r`` applied to the adapter's output."""
        return self.lora_alpha / self.r

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Refuse saved configs with fields this convlora does not know (instead of silently dropping them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        version = kwargs.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(
                f"This Conv-LoRA adapter was saved with format_version={version} by a newer convlora; "
                f"this convlora reads format_version <= {FORMAT_VERSION}. Upgrade convlora to load it."
            )
        if unknown:
            raise ValueError(
                f"adapter_config.json has fields this convlora does not know: {unknown}. It was probably written "
                "by a newer convlora; upgrade convlora to load it."
            )
        return kwargs


_dataclass_init = ConvLoraConfig.__init__


def _init_refusing_unknown_fields(self: ConvLoraConfig, *args: Any, **kwargs: Any) -> None:
    # A typo such as `num_expert=4` (or a field from a newer convlora) must be an error, not a TypeError that
    # PEFT's loader catches and turns into a warning while dropping the field.
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(ConvLoraConfig)})
    if unknown:
        raise ValueError(
            f"ConvLoraConfig got unknown fields {unknown}; known fields: "
            f"{sorted(f.name for f in dataclasses.fields(ConvLoraConfig) if f.init)}. A saved adapter_config.json "
            "with such fields was probably written by a newer convlora."
        )
    _dataclass_init(self, *args, **kwargs)


ConvLoraConfig.__init__ = _init_refusing_unknown_fields  # type: ignore[method-assign]


def _same_layout(first: str, second: str) -> bool:
    """Whether two preset families name the same modules (SAM and SAM-HQ share SAM's encoder)."""
    return ENCODER_LAYERS[first] == ENCODER_LAYERS[second] and FAMILY_PRESETS[first] == FAMILY_PRESETS[second]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {bound} {minimum}, got {value}")
