"""The embedding cache: a frozen image encoder's outputs, computed once per image and reused every epoch.

Methods that train nothing inside SAM's image encoder (``decoder``, also prompted) would otherwise run the
most expensive part of the model again on every image of every epoch. The cache takes the place of the
encoder's ``forward`` on the training model's own instance (module names and weights are untouched): each
image of a batch is looked up by the SHA-256 of its input tensor (the decoded image after every
preprocessing step: size, intensity mapping, channels, normalisation; and the autocast setting); hits come
back as the encoder's own output type, misses (only those images) are computed and stored. What is stored is
the encoder's whole output (SAM: the image embeddings; SAM-HQ: also its intermediate embeddings; SAM 2 / SAM
3: the feature pyramid and its position encodings), before anything trainable reads it: SAM 2's decoder
convolutions on the high-resolution features still train.

:func:`plan_embedding_cache` says whether it is valid: every parameter of the image encoder is frozen, and
for training images augmentation is off and the encoder has nothing random or batch-dependent in training
(validation images are never augmented). Entries live in memory, or on disk as one safetensors file per image
in ``RUN/embedding_cache/``, written atomically; each file records its key and the model fingerprint
(:func:`model_fingerprint`) and is recomputed, never trusted, when they do not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.utils import ModelOutput

from .._io import WriteError, atomic_file
from ..data.transforms import AugmentConfig
from ..models import find_sam

CACHE_MODES = ("auto", "memory", "disk", "off")
CACHE_FOLDER = "embedding_cache"
FORMAT = "1"
# keyword arguments the families' models pass to their image encoder that leave its output as the cache holds it
_PLAIN_CALL = {"return_dict": (None, True), "output_hidden_states": (None, False), "output_attentions": (None, False)}


@dataclass(frozen=True)
class CachePlan:
    """Whether a run caches its image encoder's outputs, and why not where it does not.

    Args:
        use: whether any image is cached (the image encoder is frozen and the cache is not off).
        train: whether training images are cached too (no augmentation, nothing random in the encoder).
        reason: one line saying why the cache, or its training part, is not used; ``None`` when fully used.

    >>> CachePlan(use=True, train=False, reason="augmentation is on").train
    False
    """

    use: bool
    train: bool
    reason: str | None = None


def _augmentations(augment: AugmentConfig) -> list[str]:
    """The augment settings that change the encoder's input, as ``augment.NAME=VALUE``."""
    found = [f"augment.{name}={getattr(augment, name):g}" for name in ("hflip", "vflip") if getattr(augment, name) > 0]
    if augment.scale != (1.0, 1.0):
        found.append(f"augment.scale={list(augment.scale)}")
    names = ("brightness", "contrast", "saturation")
    found += [f"augment.{name}={value:g}" for name, value in zip(names, augment.jitter, strict=True) if value > 0]
    return found


def _random_parts(encoder: nn.Module) -> list[str]:
    """Modules of the encoder whose training-mode output is random (dropout, drop-path) or depends on the batch."""
    found = []
    for name, module in encoder.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"{name} (dropout p={module.p:g})")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name} (batch norm)")
        else:
            rates = [(a, getattr(module, a, None)) for a in ("dropout", "attention_dropout", "drop_prob", "dropout_p")]
            found += [f"{name} ({a}={v:g})" for a, v in rates if isinstance(v, float) and v > 0]
    return found


def plan_embedding_cache(model: nn.Module, mode: str, augment: AugmentConfig) -> CachePlan:
    """Whether the image encoder's outputs of ``model`` can be cached for a run, with the reason when not.

    The encoder must be frozen: every one of its parameters has ``requires_grad`` off (checked, whatever the
    method's name). Training images are cached only when nothing changes the encoder's input or output from
    one epoch to the next: all augmentation off, and no dropout, drop-path or batch norm active in it.

    Args:
        model: the task model, built by its method (which parameters train is final).
        mode: ``TrainConfig.embedding_cache`` (a value of ``CACHE_MODES``).
        augment: the run's training augmentation.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> plan = plan_embedding_cache(random_sam(tiny_sam_config()).requires_grad_(False), "auto", AugmentConfig())
    >>> plan.use, plan.train, "augment.hflip=0.5" in plan.reason
    (True, False, True)
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"embedding_cache must be one of {list(CACHE_MODES)}, got {mode!r}")
    if mode == "off":
        return CachePlan(use=False, train=False, reason="embedding cache: off (embedding_cache off)")
    encoder = find_sam(model).vision_encoder
    trainable = [name for name, param in encoder.named_parameters() if param.requires_grad]
    if trainable:
        return CachePlan(
            use=False,
            train=False,
            reason=f"embedding cache: off: {len(trainable)} parameter tensors of the image encoder train (e.g. "
            f"vision_encoder.{trainable[0]}), so its outputs change at every step; only a frozen encoder is cached",
        )
    why = []
    changes = _augmentations(augment)
    if changes:
        why.append(f"augmentation changes the encoder's input ({', '.join(changes)}); set it off to cache them")
    random = _random_parts(encoder)
    if random:
        why.append(f"the image encoder is random or batch-dependent in training ({', '.join(random[:2])})")
    if why:
        return CachePlan(use=True, train=False, reason="embedding cache: training images not cached: " + "; ".join(why))
    return CachePlan(use=True, train=True)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what decides the image encoder's outputs: the model class, its vision config and every weight.

    Args:
        model: a SAM of any family, or a module containing one.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> model_fingerprint(random_sam(tiny_sam_config())) == model_fingerprint(random_sam(tiny_sam_config(), seed=1))
    False
    """
    sam = find_sam(model)
    config = getattr(sam.config, "vision_config", None) or sam.config
    digest = hashlib.sha256(type(sam).__name__.encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sam.vision_encoder.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _autocast_tag(device: torch.device) -> str:
    if torch.is_autocast_enabled(device.type):
        return str(torch.get_autocast_dtype(device.type))
    return "none"


class _CachedForward:
    """The ``forward`` the cache installs on the encoder instance (an object, so that it follows deepcopy)."""

    def __init__(self, cache: EmbeddingCache) -> None:
        self.cache = cache

    def __call__(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return self.cache.forward(pixel_values, *args, **kwargs)


class EmbeddingCache:
    """The image encoder's outputs per image, in memory or on disk, used in place of the encoder's forward.

    Build it from a :func:`plan_embedding_cache` that allows it, :meth:`attach` it to the frozen encoder, and
    run the steps that may use it inside :meth:`use` (``"train"`` only when the plan caches training images);
    outside :meth:`use` the encoder runs as usual.

    Args:
        model: the task model (its SAM's ``vision_encoder`` is cached).
        mode: ``"auto"`` (memory when the expected total fits ``budget_mib``, else disk), ``"memory"`` or
            ``"disk"``.
        train: whether training images may be cached (``CachePlan.train``).
        expected_images: how many images will be cached, for ``auto`` and the size reported.
        folder: where the disk cache lives (``RUN/embedding_cache``).
        budget_mib: the memory ``auto`` may use.
        base: the base model's name, recorded in disk entries for people reading them.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> model = random_sam(tiny_sam_config()).requires_grad_(False)
    >>> cache = EmbeddingCache(model, "memory", train=True, expected_images=2).attach(image_size=64)
    >>> images = torch.randn(2, 3, 64, 64)
    >>> with cache.use("train"):
    ...     first, again = model.vision_encoder(images), model.vision_encoder(images)
    >>> torch.equal(first.last_hidden_state, again.last_hidden_state), cache.hits, cache.computed
    (True, 2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        *,
        train: bool,
        expected_images: int,
        folder: str | Path | None = None,
        budget_mib: int = 4096,
        base: str = "",
    ) -> None:
        if mode not in ("auto", "memory", "disk"):
            raise ValueError(f"EmbeddingCache mode must be 'auto', 'memory' or 'disk', got {mode!r}")
        if mode != "memory" and folder is None:
            raise ValueError(f"embedding cache mode {mode!r} needs a folder for the disk cache")
        self.sam = find_sam(model)
        self.encoder = self.sam.vision_encoder
        self.requested = mode
        self.mode = mode
        self.train = train
        self.expected_images = expected_images
        self.folder = Path(folder) if folder is not None else None
        self.budget_mib = budget_mib
        self.base = base
        self.fingerprint = ""
        self.hits = self.computed = self.stale = 0
        self.stored_bytes = 0
        self.image_bytes = 0
        self.write_error: str | None = None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._stored: set[str] = set()
        self._active = False
        self._output_class: type | None = None
        self._layout: list[tuple[str, type | None, int]] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._inner: Any = None

    # --- installing -------------------------------------------------------------------------------------------

    def attach(self, image_size: int, channels: int = 3) -> EmbeddingCache:
        """Learn the encoder's output layout from one blank image, settle ``auto``, and take over its forward.

        Args:
            image_size: the side of the model's square input.
            channels: input channels.

        Raises:
            ValueError: the encoder already has a cache, or its output is not a ``ModelOutput`` of tensors.
        """
        if isinstance(self.encoder.__dict__.get("forward"), _CachedForward):
            raise ValueError("this image encoder already has an embedding cache attached")
        parameter = next(self.encoder.parameters())
        blank = torch.zeros(1, channels, image_size, image_size, device=parameter.device)
        training = self.encoder.training
        try:  # in eval mode: dropout would draw from (and shift) the run's random numbers
            with torch.no_grad():
                output = self.encoder.eval()(blank)
        finally:
            self.encoder.train(training)
        self._learn_layout(output)
        self.image_bytes = sum(t.numel() * t.element_size() for t in self._split(output)[0].values())
        if self.mode == "auto":
            fits = self.image_bytes * self.expected_images <= self.budget_mib * 2**20
            self.mode = "memory" if fits else "disk"
        if self.mode == "disk":
            self.fingerprint = model_fingerprint(self.sam)
        self._inner = self.encoder.__dict__.get("forward")  # another library's per-instance forward, if any
        self.encoder.forward = _CachedForward(self)
        return self

    def detach(self) -> None:
        """Give the encoder its own forward back (the cached entries stay readable on disk)."""
        if isinstance(self.encoder.__dict__.get("forward"), _CachedForward):
            if self._inner is None:
                del self.encoder.forward
            else:
                self.encoder.forward = self._inner

    @contextlib.contextmanager
    def use(self, split: str) -> Iterator[None]:
        """Serve the encoder's calls from the cache inside this block; ``"train"`` only when training images may be.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        previous = self._active
        self._active = self.train or split != "train"
        try:
            yield
        finally:
            self._active = previous

    # --- the forward ------------------------------------------------------------------------------------------

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        if self._inner is not None:
            return self._inner(*args, **kwargs)
        return type(self.encoder).forward(self.encoder, *args, **kwargs)

    def forward(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """The encoder's output for ``pixel_values`` ``(b, c, s, s)``: cached entries, and the rest computed."""
        plain = all(key in _PLAIN_CALL and value in _PLAIN_CALL[key] for key, value in kwargs.items())
        if not self._active or args or not plain or not isinstance(pixel_values, torch.Tensor):
            return self._original(pixel_values, *args, **kwargs)
        if pixel_values.requires_grad:  # a gradient wanted with respect to the image: nothing to reuse
            return self._original(pixel_values, **kwargs)
        tag = _autocast_tag(pixel_values.device)
        host = pixel_values.detach().to("cpu").contiguous()
        keys = [self._key(host[i], tag) for i in range(host.shape[0])]
        entries = [self._lookup(key) for key in keys]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        self.hits += len(keys) - len(missing)
        if missing:
            everything = len(missing) == len(keys)
            chosen = pixel_values if everything else pixel_values[missing]
            output = self._original(chosen, **kwargs)
            self.computed += len(missing)
            for i, entry in zip(missing, self._split(output), strict=True):
                self._store(keys[i], entry)
                entries[i] = entry
            if everything:  # exactly what the encoder gave: a run's first epoch is the uncached run's
                return output
        return self._join(entries, pixel_values.device)

    @staticmethod
    def _key(image: torch.Tensor, tag: str) -> str:
        digest = hashlib.sha256(f"{tuple(image.shape)}|{image.dtype}|{tag}|".encode())
        digest.update(image.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def _learn_layout(self, output: Any) -> None:
        if not isinstance(output, ModelOutput):
            kind = type(output).__name__
            raise ValueError(f"the image encoder returns a {kind}, not a ModelOutput, which is not cached")
        self._output_class = type(output)
        for name, value in output.items():
            if isinstance(value, torch.Tensor):
                self._layout.append((name, None, 1))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                self._layout.append((name, type(value), len(value)))
            else:
                raise ValueError(f"the image encoder's output {name} is a {type(value).__name__}, which is not cached")
        self._shapes = {name: tuple(t.shape) for name, t in self._split(output)[0].items()}

    def _split(self, output: Any) -> list[dict[str, torch.Tensor]]:
        """One flat ``{name: tensor}`` per image (``name.j`` for the j-th map of a list), as compact CPU copies."""
        tensors: dict[str, torch.Tensor] = {}
        for name, container, _ in self._layout:
            value = output[name]
            if container is None:
                tensors[name] = value
            else:
                tensors.update({f"{name}.{j}": item for j, item in enumerate(value)})
        count = next(iter(tensors.values())).shape[0]
        dense = {"copy": True, "memory_format": torch.contiguous_format}  # safetensors stores contiguous tensors
        return [{name: t[i].detach().to("cpu", **dense) for name, t in tensors.items()} for i in range(count)]

    def _join(self, entries: list[dict[str, torch.Tensor]], device: torch.device) -> Any:
        fields: dict[str, Any] = {}
        for name, container, length in self._layout:
            if container is None:
                fields[name] = torch.stack([entry[name] for entry in entries]).to(device)
            else:
                maps = [torch.stack([entry[f"{name}.{j}"] for entry in entries]).to(device) for j in range(length)]
                fields[name] = container(maps)
        assert self._output_class is not None
        return self._output_class(**fields)

    # --- storage ----------------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def _lookup(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.mode == "memory":
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if (meta.get("format"), meta.get("key"), meta.get("model")) != (FORMAT, key, self.fingerprint):
                    raise ValueError("written for another image or model")
                if set(handle.keys()) != set(self._shapes):
                    raise ValueError("holds other tensors")
                entry = {name: handle.get_tensor(name) for name in self._shapes}
            if any(tuple(entry[name].shape) != shape for name, shape in self._shapes.items()):
                raise ValueError("holds tensors of other shapes")
        except (OSError, SafetensorError, ValueError, RuntimeError):
            self.stale += 1  # recomputed and overwritten, never trusted
            return None
        if key not in self._stored:
            self._stored.add(key)
            self.stored_bytes += sum(t.numel() * t.element_size() for t in entry.values())
        return entry

    def _store(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.mode == "memory":
            self._memory[key] = entry
            self.stored_bytes += size
            return
        if self.write_error is not None:
            return
        metadata = {"format": FORMAT, "key": key, "model": self.fingerprint, "base": self.base}
        try:
            with atomic_file(self._path(key)) as handle:
                handle.write(safetensors.torch.save(entry, metadata=metadata))
        except WriteError as error:
            self.write_error = str(error)
            warnings.warn(f"embedding cache: {error}; images not yet cached are computed again", stacklevel=2)
            return
        if key not in self._stored:
            self._stored.add(key)
            self.stored_bytes += size

    # --- reporting --------------------------------------------------------------------------------------------

    @property
    def images(self) -> int:
        """Images held by the cache now (this process's)."""
        return len(self._memory) if self.mode == "memory" else len(self._stored)

    def describe(self) -> str:
        """The line a run prints when it starts: what will be cached, how much, and where."""
        mib = self.image_bytes * self.expected_images / 2**20
        where = "in memory" if self.mode == "memory" else f"on disk at {self.folder}"
        splits = "training and validation images" if self.train else "validation images"
        if self.mode == "disk" and self.folder is not None and self.folder.is_dir():
            present = sum(1 for _ in self.folder.glob("*.safetensors"))
            splits += f"; {present} there already" if present else ""
        return f"embedding cache: {self.expected_images} images, {mib:.2f} MiB, {where} ({splits})"

    def summary(self) -> dict[str, Any]:
        """What the cache did, for ``metrics.json``."""
        return {
            "mode": self.mode,
            "requested": self.requested,
            "train_images": self.train,
            "images": self.images,
            "mib": round(self.stored_bytes / 2**20, 3),
            "mib_per_image": round(self.image_bytes / 2**20, 4),
            "path": str(self.folder) if self.mode == "disk" else None,
            "hits": self.hits,
            "computed": self.computed,
            "stale": self.stale,
            "write_error": self.write_error,
        }
