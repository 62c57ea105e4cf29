"""Getting a SAM model: by embedded name, local folder or hub id (``load_sam``), or at random (``random_sam``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig

from . import embedded
from .family import family_of, model_class
from .merged_io import MERGED_WEIGHTS_NAME, load_merged

# Learned position tables of every family, drawn from N(0, 0.02) by random_sam.
POSITION_TABLES = ("pos_embed", "pos_embed_window", "position_embeddings", "rel_pos_h", "rel_pos_w")


def random_sam(config: Any, seed: int = 0) -> nn.Module:
    """A randomly initialised SAM whose outputs depend on its input (for tests and cost benchmarks).

    transformers initialises SAM's image encoder with a standard deviation of 1e-10 and its neck norms
    at zero, which is right before loading pretrained weights but makes a random model ignore its
    image. This resets every layer with PyTorch's default initialisation instead and draws the position
    tables from ``N(0, 0.02)``: SAM's ``pos_embed`` and relative tables, SAM 2's background and window
    embeddings (zeros in transformers), SAM 3's tiled ``position_embeddings``.

    Args:
        config: a ``SamConfig``, ``SamHQConfig``, ``Sam2Config`` or ``Sam3TrackerConfig`` (the model class
            follows ``config.model_type``).
        seed: random seed, so the same config and seed give the same weights.

    >>> from convlora.models import tiny_sam_config
    >>> model = random_sam(tiny_sam_config(), seed=0)
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config.model_type, "config")(config)
        for name, module in model.named_modules():
            if hasattr(module, "reset_parameters") and not name.endswith("shared_image_embedding"):
                module.reset_parameters()
        for name, param in model.named_parameters():
            if name.endswith(POSITION_TABLES):
                nn.init.normal_(param, std=0.02)
            elif name.endswith("shared_image_embedding.positional_embedding"):
                # transformers draws these Fourier frequencies with std hidden_size / 2, which makes neighbouring
                # pixels' codes unrelated; SAM uses 1 (the prompt encoder shares this tensor).
                nn.init.normal_(param, std=1.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def load_sam(name_or_path: str | Path, *, image_size: int | None = None, local_files_only: bool = False) -> nn.Module:
    """Load a SAM model: a convlora embedded name, a local directory, or a Hugging Face hub id.

    ``SamModel`` and ``SamHQModel`` checkpoints (and therefore MedSAM and SlimSAM ones) are read
    through transformers from safetensors; a merged Conv-LoRA checkpoint written by
    ``convlora.save_merged`` is rebuilt with its conv side branches. The model behaves exactly as
    transformers' own ``from_pretrained`` gives it (SAM 2 / SAM 3 keep their eval-time multimask fallback;
    convlora's single-mask-token setting is a task's, applied by training and ``load_trained``).

    Args:
        name_or_path: e.g. ``"facebook/sam-vit-base"``, ``"flaviagiammarino/medsam-vit-base"``, or a
            directory with ``config.json`` and safetensors weights.
        image_size: resize the model to this input size (its family's ``resize``, e.g. :func:`resize_sam`);
            a family that cannot resize refuses another size.
        local_files_only: never try the network.

    >>> model = load_sam("facebook/sam-vit-base")  # doctest: +SKIP
    """
    name = str(name_or_path)
    path = Path(name)
    if name in embedded.EMBEDDED_MODELS:
        model = embedded.load_embedded(name)
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a SAM checkpoint: it has no config.json")
        model_type = _read_model_type(config_file)
        if (path / MERGED_WEIGHTS_NAME).is_file():
            model = load_merged(path)
        else:
            try:
                model = _from_pretrained(model_class(model_type, config_file), path, local_files_only=True)
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
                f"Could not load SAM model {name!r}: not an embedded model ({sorted(embedded.EMBEDDED_MODELS)}), "
                f"not a local directory, and the hub could not provide it ({error.__class__.__name__}: {error})"
            ) from error
    if image_size is not None:
        model = resize_model(model, image_size)
    return model


def resize_model(model: nn.Module, image_size: int) -> nn.Module:
    """``model`` at ``image_size`` through its family's ``resize`` (unchanged when it already has that size).

    Args:
        model: a SAM model of any family (not wrapped in PEFT).
        image_size: new square input size.

    >>> from convlora.models.sam import tiny_sam_config
    >>> resize_model(random_sam(tiny_sam_config()), 96).config.vision_config.image_size
    96
    """
    family = family_of(model)
    if image_size == family.image_size(model):
        return model
    if family.resize is None:
        raise ValueError(
            f"image_size={image_size}: {family.description} cannot be resized; it takes {family.image_size(model)} px"
        )
    return family.resize(model, image_size)


def _from_pretrained(model_cls: type[nn.Module], source: str | Path, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` from safetensors only (nothing unpickled), refusing weights that do not fill the model.

    transformers would re-initialise missing or mis-shaped tensors at random with a warning; a partly random
    SAM is refused here instead, naming a tensor (and both shapes).
    """
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


def _hub_model_class(name: str, local_files_only: bool) -> type[nn.Module]:

    # never run code shipped with a checkpoint (transformers would ask interactively when this is unset)
    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only, trust_remote_code=False)
    return model_class(config.model_type, name)
