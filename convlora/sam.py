"""Everything that knows about SAM: variants, target presets, image size, loading, ``apply_conv_lora``.

The PEFT method itself (``config``, ``moe``, ``layer``, ``model``) works on any ``nn.Linear`` that sees a
channels-last grid; this module maps it onto transformers' ``SamModel`` / ``SamHQModel``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import SamConfig, SamModel

# Encoder hyper-parameters of the released SAM checkpoints (facebook/sam-vit-{base,large,huge}).
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "global_attn_indexes": [2, 5, 8, 11]},
    "vit-l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "global_attn_indexes": [5, 11, 17, 23]},
    "vit-h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
              "global_attn_indexes": [7, 15, 23, 31]},
}  # fmt: skip

HUB_IDS = {
    "vit-b": "facebook/sam-vit-base",
    "vit-l": "facebook/sam-vit-large",
    "vit-h": "facebook/sam-vit-huge",
}

# Named sets of target modules inside SAM's image encoder. Patterns are anchored at ``vision_encoder``
# because the mask decoder also has modules called ``mlp.lin1`` or ``q_proj``.
TARGET_PRESETS: dict[str, str] = {
    "qkv": r"attn\.qkv",
    "qkv_proj": r"attn\.(?:qkv|proj)",
    "attention_mlp": r"(?:attn\.(?:qkv|proj)|mlp\.(?:lin1|lin2))",
}


def target_modules_pattern(preset: str = "qkv", layers: Sequence[int] | None = None) -> str:
    """Regex (for PEFT's ``target_modules``) selecting a preset's modules in the given encoder layers.

    Args:
        preset: a key of ``TARGET_PRESETS``.
        layers: encoder layer indices; all layers when ``None``.

    >>> bool(re.fullmatch(target_modules_pattern("qkv", [0, 2]), "vision_encoder.layers.2.attn.qkv"))
    True
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"Unknown target preset {preset!r}; choose one of {sorted(TARGET_PRESETS)}")
    layer = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    return rf"(?:.*\.)?vision_encoder\.layers\.{layer}\.{TARGET_PRESETS[preset]}"


def sam_config(variant: str = "vit-b", image_size: int = 1024) -> SamConfig:
    """``SamConfig`` of a released SAM variant, built locally (no download).

    Args:
        variant: ``"vit-b"``, ``"vit-l"`` or ``"vit-h"``.
        image_size: input side length; 1024 for the released checkpoints.

    >>> sam_config("vit-b").vision_config.hidden_size
    768
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}")
    vision = dict(SAM_VARIANTS[variant], image_size=image_size, patch_size=16, output_channels=256,
                  window_size=14, mlp_ratio=4.0, num_pos_feats=128)  # fmt: skip
    prompt = {"hidden_size": 256, "image_size": image_size, "patch_size": 16}
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config={"hidden_size": 256})


def tiny_sam_config(
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    window_size: int = 4,
    global_attn_indexes: Sequence[int] = (1,),
    decoder_size: int = 16,
    mlp_ratio: float = 2.0,
) -> SamConfig:
    """A small ``SamConfig`` with the real architecture (windowed and global attention, fused qkv).

    The defaults build a ~40k-parameter model for tests; the embedded base uses larger values.

    Args:
        image_size: input side length (a multiple of ``patch_size``).
        patch_size: patch side length.
        hidden_size: encoder width.
        num_hidden_layers: encoder depth.
        num_attention_heads: encoder heads.
        window_size: side of the attention windows in windowed layers.
        global_attn_indexes: layers with global attention.
        decoder_size: width of the prompt encoder and mask decoder (and of the encoder's output).
        mlp_ratio: encoder MLP width relative to ``hidden_size``.

    >>> cfg = tiny_sam_config()
    >>> cfg.vision_config.image_size, cfg.mask_decoder_config.hidden_size
    (64, 16)
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if decoder_size % 4:
        raise ValueError(f"decoder_size must be a multiple of 4, got {decoder_size}")
    vision = {
        "hidden_size": hidden_size,
        "output_channels": decoder_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "window_size": window_size,
        "global_attn_indexes": list(global_attn_indexes),
        "num_pos_feats": decoder_size // 2,
        "mlp_dim": int(hidden_size * mlp_ratio),
    }
    prompt = {
        "hidden_size": decoder_size,
        "image_size": image_size,
        "patch_size": patch_size,
        "mask_input_channels": 4,
    }
    decoder = {
        "hidden_size": decoder_size,
        "mlp_dim": decoder_size * 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": decoder_size * 2,
    }
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def random_sam(config: Any, seed: int = 0) -> nn.Module:
    """A randomly initialised SAM whose outputs depend on its input (for tests and cost benchmarks).

    transformers initialises SAM's image encoder with a standard deviation of 1e-10 and its neck norms
    at zero, which is right before loading pretrained weights but makes a random model ignore its
    image. This resets every layer with PyTorch's default initialisation instead and draws the position
    tables from ``N(0, 0.02)``.

    Args:
        config: a ``SamConfig`` (or ``SamHQConfig``; the model class follows ``config.model_type``).
        seed: random seed, so the same config and seed give the same weights.

    >>> model = random_sam(tiny_sam_config(), seed=0)
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _model_class(config.model_type, "config")(config)
        for name, module in model.named_modules():
            if hasattr(module, "reset_parameters") and not name.endswith("shared_image_embedding"):
                module.reset_parameters()
        for name, param in model.named_parameters():
            if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                nn.init.normal_(param, std=0.02)
            elif name.endswith("shared_image_embedding.positional_embedding"):
                # transformers draws these Fourier frequencies with std hidden_size / 2, which makes neighbouring
                # pixels' codes unrelated; SAM uses 1 (the prompt encoder shares this tensor).
                nn.init.normal_(param, std=1.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def find_sam(model: nn.Module) -> nn.Module:
    """The SAM model inside ``model`` (itself, or inside a ``PeftModel`` or a task wrapper).

    Args:
        model: any module.

    Raises:
        ValueError: if no module with a ViT ``vision_encoder`` and a ``mask_decoder`` is found.
    """
    for module in model.modules():
        encoder = getattr(module, "vision_encoder", None)
        if encoder is not None and hasattr(encoder, "layers") and hasattr(module, "mask_decoder"):
            return module
    raise ValueError(
        f"{type(model).__name__} is not a SAM model: expected a module with a ViT `vision_encoder` (with `layers`) "
        "and a `mask_decoder`, such as transformers' SamModel or SamHQModel"
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters, optionally only those with ``requires_grad``.

    Args:
        model: any module; shared (tied) parameters count once.
        trainable_only: count only parameters with ``requires_grad``.

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def apply_conv_lora(
    model: nn.Module,
    config: Any = None,
    *,
    adapter_name: str = "default",
    plain_lora: bool = False,
) -> Any:
    """Inject Conv-LoRA (or plain LoRA) into SAM's image encoder and return a ``peft.PeftModel``.

    Only the adapters and the modules in ``config.modules_to_save`` (the mask decoder by default) are
    trainable afterwards. With ``plain_lora=True`` the same targets, rank, alpha, dropout and
    ``modules_to_save`` are given to PEFT's own LoRA, the baseline Conv-LoRA is measured against; it
    merges into a vanilla ``SamModel``.

    Args:
        model: a ``SamModel``, ``SamHQModel`` or a module containing one.
        config: a :class:`~convlora.ConvLoraConfig`; the defaults when ``None``.
        adapter_name: name of the adapter in the returned ``PeftModel``.
        plain_lora: use PEFT's LoRA instead of Conv-LoRA.

    >>> from transformers import SamModel
    >>> from convlora import ConvLoraConfig, tiny_sam_config
    >>> peft_model = apply_conv_lora(SamModel(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
    >>> type(peft_model).__name__
    'PeftModel'
    """
    from peft import LoraConfig, get_peft_model

    from .config import ConvLoraConfig

    config = ConvLoraConfig() if config is None else config
    if not isinstance(config, ConvLoraConfig):
        raise TypeError(f"config must be a ConvLoraConfig, got {type(config).__name__}")
    sam = find_sam(model)
    depth = len(sam.vision_encoder.layers)
    if config.layers is not None and max(config.layers) >= depth:
        raise ValueError(f"layers {config.layers} out of range: the image encoder has {depth} layers (0..{depth - 1})")
    if plain_lora:
        peft_config: Any = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            exclude_modules=config.exclude_modules,
            modules_to_save=config.modules_to_save,
            init_lora_weights=config.init_lora_weights,
        )
    else:
        peft_config = config
    peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    if not plain_lora:
        outside = [name for name in describe_targets(peft_model) if ".vision_encoder." not in f".{name}"]
        if outside:
            raise ValueError(
                f"Conv-LoRA's conv experts need the token grid of SAM's image encoder, but target_modules also "
                f"matched {outside[:3]}; restrict target_modules to vision_encoder layers"
            )
    return peft_model


def _interpolate_grid(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding ``(1, h, w, d)`` to ``(1, size, size, d)``."""
    grid = rearrange(table.float(), "one h w d -> one d h w")
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return rearrange(grid, "one d h w -> one h w d").to(table.dtype)


def _interpolate_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a relative position table ``(L, head_dim)`` to ``(length, head_dim)``.

    This is the interpolation SAM applies at run time when the grid differs from the table, so resizing
    the stored table up front leaves the outputs of the global-attention layers unchanged.
    """
    resized = F.interpolate(rearrange(table.float(), "l c -> 1 c l"), size=length, mode="linear")
    return rearrange(resized, "1 c l -> l c").to(table.dtype)


def resize_sam(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of a SAM model that takes ``image_size x image_size`` inputs.

    Builds the model anew from a config with the new size, interpolates the absolute position embedding
    (bicubic) and the relative position tables of the global-attention layers (linear, as SAM does at run
    time), and copies every other weight. Mask outputs are ``image_size / 4`` on a side. Cost grows with
    the square of the size: 512 costs about a quarter of 1024 per image.

    Args:
        model: a ``SamModel`` or ``SamHQModel`` (not wrapped in PEFT: resize before injecting adapters).
        image_size: new input side length, a multiple of the patch size.

    >>> from transformers import SamModel
    >>> small = resize_sam(SamModel(tiny_sam_config(image_size=64)), 96)
    >>> small.config.vision_config.image_size
    96
    """
    if find_sam(model) is not model:
        raise ValueError("resize_sam expects the SAM model itself; resize before applying adapters")
    vision = model.config.vision_config
    patch = vision.patch_size
    if not isinstance(image_size, int) or image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    if image_size == vision.image_size:
        return model
    config_dict = model.config.to_dict()
    config_dict["vision_config"]["image_size"] = image_size
    config_dict["prompt_encoder_config"]["image_size"] = image_size
    # Derived field that to_dict() carries; the new config recomputes it from the new image size.
    config_dict["prompt_encoder_config"].pop("image_embedding_size", None)
    new_config = type(model.config).from_dict(config_dict)
    grid = image_size // patch
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("vision_encoder.pos_embed"):
            state[key] = _interpolate_grid(value, grid)
    for index in range(vision.num_hidden_layers):
        if index in vision.global_attn_indexes or vision.window_size == 0:
            for axis in ("rel_pos_h", "rel_pos_w"):
                key = f"vision_encoder.layers.{index}.attn.{axis}"
                if key in state:
                    state[key] = _interpolate_rel_pos(state[key], 2 * grid - 1)
    new_model = type(model)(new_config)
    new_model.load_state_dict(state, strict=True)
    return new_model.to(next(model.parameters()).device).train(model.training)


def load_sam(name_or_path: str | Path, *, image_size: int | None = None, local_files_only: bool = False) -> nn.Module:
    """Load a SAM model: a convlora embedded name, a local directory, or a Hugging Face hub id.

    ``SamModel`` and ``SamHQModel`` checkpoints (and therefore MedSAM and SlimSAM ones) are read
    through transformers from safetensors; a merged Conv-LoRA checkpoint written by
    ``convlora.save_merged`` is rebuilt with its conv side branches.

    Args:
        name_or_path: e.g. ``"facebook/sam-vit-base"``, ``"flaviagiammarino/medsam-vit-base"``, or a
            directory with ``config.json`` and safetensors weights.
        image_size: resize the model to this input size (see :func:`resize_sam`).
        local_files_only: never try the network.

    >>> model = load_sam("facebook/sam-vit-base")  # doctest: +SKIP
    """
    from . import assets
    from .export import MERGED_WEIGHTS_NAME, load_merged

    name = str(name_or_path)
    path = Path(name)
    if name in assets.EMBEDDED_MODELS:
        model = assets.load_embedded(name)
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a SAM checkpoint: it has no config.json")
        model_type = _read_model_type(config_file)
        if (path / MERGED_WEIGHTS_NAME).is_file():
            model = load_merged(path)
        else:
            try:
                model = _from_pretrained(_model_class(model_type, config_file), path, local_files_only=True)
            except OSError as error:
                raise ValueError(f"{path} is not a SAM checkpoint: {error}") from error
    elif path.exists() or name.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise ValueError(
            f"{name} is a file; pass the directory holding config.json and model.safetensors (transformers' SAM layout)"
        )
    else:
        if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
            raise ValueError(f"{name} does not exist (expected a SAM checkpoint folder, an embedded name or a hub id)")
        try:
            model = _from_pretrained(_hub_model_class(name, local_files_only), name, local_files_only=local_files_only)
        except OSError as error:
            raise ValueError(
                f"Could not load SAM model {name!r}: not an embedded model ({sorted(assets.EMBEDDED_MODELS)}), "
                f"not a local directory, and the hub could not provide it ({error.__class__.__name__}: {error})"
            ) from error
    find_sam(model)
    if image_size is not None:
        model = resize_sam(model, image_size)
    return model


def _from_pretrained(model_cls: type[nn.Module], source: str | Path, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` from safetensors only (nothing unpickled), refusing weights that do not fill the model.

    transformers would re-initialise missing or mis-shaped tensors at random with a warning; a partly random
    SAM is refused here instead, naming a tensor (and both shapes).
    """
    from safetensors import SafetensorError

    try:
        model, info = model_cls.from_pretrained(
            source, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except SafetensorError as error:
        raise ValueError(f"{source} holds an unreadable safetensors file (truncated or corrupted?): {error}") from error
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0])
    if mismatched:
        key, found, expected = mismatched[0]
        raise ValueError(
            f"{source}: tensor {key} has shape {list(found)} but its config.json describes {list(expected)} "
            f"({len(mismatched)} tensors differ); the weights belong to another model"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{source}: the weights lack {len(missing)} tensors of the SAM its config.json describes, e.g. "
            f"{missing[:3]}; they belong to another model or are incomplete"
        )
    return model


def _read_model_type(config_file: Path) -> str:
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON model config: {error}") from error
    return model_type


def _model_class(model_type: str | None, source: Any) -> type[nn.Module]:
    if model_type == "sam":
        return SamModel
    if model_type == "sam_hq":
        from transformers import SamHQModel

        return SamHQModel
    raise ValueError(f"{source} describes model_type={model_type!r}; convlora supports 'sam' and 'sam_hq'")


def _hub_model_class(name: str, local_files_only: bool) -> type[nn.Module]:
    from transformers import AutoConfig

    # never run code shipped with a checkpoint (transformers would ask interactively when this is unset)
    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only, trust_remote_code=False)
    return _model_class(config.model_type, name)


def parameter_counts(variant: str = "vit-b", config: Any = None, *, plain_lora: bool = False) -> dict[str, Any]:
    """Parameter counts of a released SAM variant with adapters, built on the meta device (no weights).

    Args:
        variant: ``"vit-b"``, ``"vit-l"`` or ``"vit-h"``.
        config: the adapter configuration (defaults when ``None``).
        plain_lora: count PEFT's LoRA with the same targets instead of Conv-LoRA.

    Returns:
        A dict with ``model`` (base parameters), ``adapter`` (LoRA or Conv-LoRA tensors),
        ``conv_experts`` (the expert mixtures' share of ``adapter``), ``mask_decoder`` (trained in full),
        ``trainable`` (adapter + mask decoder) and ``merged_extra`` (what a merged model keeps on top of the
        base architecture).

    >>> parameter_counts("vit-b")["model"]
    93735728
    """
    from .config import ConvLoraConfig
    from .export import merged_extra_parameters

    config = ConvLoraConfig() if config is None else config
    with torch.device("meta"):
        model = SamModel(sam_config(variant))
    base_total = count_parameters(model)
    decoder = count_parameters(model.mask_decoder)
    peft_model = apply_conv_lora(model, config, plain_lora=plain_lora)
    adapter = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    experts = sum(p.numel() for n, p in peft_model.named_parameters() if "conv_lora_experts" in n)
    trainable = count_parameters(peft_model, trainable_only=True)
    merged = peft_model.merge_and_unload()
    return {
        "variant": variant,
        "method": "lora" if plain_lora else "conv_lora",
        "model": base_total,
        "adapter": adapter,
        "conv_experts": experts,
        "mask_decoder": decoder,
        "trainable": trainable,
        "merged_extra": merged_extra_parameters(merged),
    }


def describe_targets(model: nn.Module) -> list[str]:
    """Names of the modules that carry adapters in a PEFT-wrapped model (for logs and tests).

    Args:
        model: a PEFT-wrapped model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


_LAYER_INDEX = re.compile(r"vision_encoder\.layers\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """Encoder layer index in a module name, e.g. ``3`` for ``vision_encoder.layers.3.attn.qkv``."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None
