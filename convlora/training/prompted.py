"""The prompted training step: prompts drawn from the ground truth, one mask per prompt trained.

Training (:class:`PromptedStep`) follows SAM, MedSAM and micro-sam (see ``docs/guides/prompted.md``):
prompts are drawn from the ground truth (:mod:`convlora.data.prompts`), a single point predicts SAM's
three masks and only the best one is trained, the IoU head learns the real IoU of each mask (MSE), the
prompt encoder stays frozen by default, and optional correction rounds add a click from the error
region with the previous logits as a mask prompt. Encoding images and decoding prompts live in
:mod:`convlora.prompting`, prompted evaluation in :mod:`convlora.evaluation.prompted`.
Joint training (:class:`JointStep`) mixes such steps into prompt-free training (``TrainConfig.joint_prompted``):
binary runs prompt their masks' components, instance runs each instance id of their labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.prompts import (
    IGNORE_INDEX,
    MIXED_KINDS,
    Objects,
    PromptConfig,
    Prompts,
    correction_points,
    derive_prompts,
    find_objects,
    sample_objects,
)
from ..models import find_sam
from ..prompting import (
    coarsest,
    decode_prompts,
    encode_images,
    prompt_tensors,
)
from ..tuner.moe import moe_aux_loss
from .losses import per_mask_losses


def prepare_prompted_model(model: nn.Module, config: PromptConfig) -> list[str]:
    """Set which SAM prompt-path parts train for prompted fine-tuning; returns the names it froze.

    Every part of the trained mask decoder trains (the IoU head and all mask tokens included: prompted
    training uses them), also where the method's build froze them (``freeze_iou_head``); under PEFT only the
    trained copy (``modules_to_save``) is touched. The prompt encoder is frozen unless
    ``config.train_prompt_encoder``, which only method ``full`` can honour (the other methods' exports do not
    hold the prompt encoder). Call it after the method's ``build``.

    Args:
        model: the task model, built by a training method.
        config: the prompt settings.

    Raises:
        ValueError: ``train_prompt_encoder`` with a method that keeps the prompt encoder frozen.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> len(prepare_prompted_model(random_sam(tiny_sam_config()), PromptConfig(kind="box"))) > 0
    True
    """
    named = list(model.named_parameters())
    decoder = [(n, p) for n, p in named if "mask_decoder." in n and ".original_module." not in n]
    if any(p.requires_grad for _, p in decoder):
        for _, param in decoder:
            param.requires_grad_(True)
    # the prompt encoder's own view, so that the positional code it shares with the image side is included
    prompt_encoder = list(find_sam(model).prompt_encoder.named_parameters(prefix="prompt_encoder"))
    if config.train_prompt_encoder:
        if not all(p.requires_grad for _, p in prompt_encoder):
            raise ValueError(
                "train_prompt_encoder needs method 'full': the other methods keep the prompt encoder frozen and "
                "their exports do not hold it"
            )
        return []
    frozen = []
    for name, param in prompt_encoder:
        if param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def draw_objects(
    labels: np.ndarray, config: PromptConfig, rng: np.random.Generator, object_kind: str = "binary"
) -> Objects:
    """The (sampled) objects of one label map for a prompted step.

    Args:
        labels: ``(h, w)`` label map (255 = ignore).
        config: ``min_area`` and ``max_objects`` are read.
        rng: the step's random generator.
        object_kind: see :func:`~convlora.data.prompts.find_objects`.

    >>> len(draw_objects(np.eye(16, dtype=np.int64), PromptConfig(min_area=4), np.random.default_rng(0)))
    1
    """
    objects = find_objects(labels, object_kind, min_area=config.min_area, ignore_index=IGNORE_INDEX)
    return sample_objects(objects, config.max_objects, rng)


class PromptedStep(nn.Module):
    """The prompted training step Accelerate wraps: images and label maps in, losses out.

    Like the engine's prompt-free ``TrainStep`` it returns the task loss together with the Conv-LoRA
    auxiliary loss (under DDP that loss must come out of the wrapped forward). Objects come from the
    labels (``(b, S, S)``, 255 = ignore, in the input frame, after augmentation); images without any
    object are skipped and counted in ``"skipped"``.

    Args:
        model: the task model (any method; SAM's own mask decoder answers the prompts, also beside an instance
            decoder).
        config: the prompt settings (``kind`` other than ``"none"``).
        object_kind: how objects are read from the labels: ``"binary"`` (connected components), ``"instances"``
            (one object per id: touching objects stay apart; an instance run's id labels) or ``"classes"``.
        seed: seed of the prompts. Each call draws from ``(seed, step)`` when ``forward`` gets ``step``, else
            from ``(seed, a number drawn from torch's global generator)``: the engine seeds, saves and restores
            that generator, so runs (and resumed runs) repeat their prompts exactly.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> step = PromptedStep(random_sam(tiny_sam_config()), PromptConfig(kind="box"))
    >>> labels = torch.zeros(1, 64, 64, dtype=torch.long)
    >>> labels[0, 10:30, 12:40] = 1
    >>> sorted(step(torch.randn(1, 3, 64, 64), labels))
    ['aux', 'iou', 'loss', 'objects', 'skipped', 'task']
    """

    def __init__(self, model: nn.Module, config: PromptConfig, object_kind: str = "binary", seed: int = 0) -> None:
        super().__init__()
        if not config.prompted:
            raise ValueError("PromptedStep needs a prompt kind (box, point, box_point or mixed), got 'none'")
        self.model = model
        self.config = config
        self.object_kind = object_kind
        self.seed = seed

    def _rng(self, step: int | None) -> np.random.Generator:
        if step is None:
            step = int(torch.randint(0, 2**62, (1,)).item())
        return np.random.default_rng([self.seed, int(step)])

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, step: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one prompted step: ``loss`` (to back-propagate), ``task``, ``aux``, ``iou`` (mean real
        IoU of the trained masks), ``objects`` (prompts trained) and ``skipped`` (images without objects)."""
        config = self.config
        rng = self._rng(step)
        kind = config.kind if config.kind != "mixed" else str(rng.choice(MIXED_KINDS))
        embeddings = encode_images(self.model, pixel_values)  # the encoder runs once for every prompt
        aux = moe_aux_loss(self.model)
        device = pixel_values.device
        label_maps = labels.detach().cpu().numpy()
        masks, valids, index, prompt_sets = [], [], [], []
        skipped = 0
        for i, label_map in enumerate(label_maps):
            objects = draw_objects(label_map, config, rng, self.object_kind)
            if len(objects) == 0:
                skipped += 1
                continue
            valid = label_map != IGNORE_INDEX
            prompt_sets.append(derive_prompts(objects, kind, config, rng, training=True, valid=valid))
            masks.append(objects.masks)
            valids.append(np.broadcast_to(valid, objects.masks.shape))
            index += [i] * len(objects)
        if not index:  # nothing to prompt: a zero loss that still reaches the encoder's graph
            zero = coarsest(embeddings).float().sum() * 0.0
            return self._result(zero, aux, torch.zeros((), device=device), 0, skipped, device)
        prompts = _concat(prompt_sets)
        object_masks = np.concatenate(masks)
        targets = torch.as_tensor(object_masks, device=device)
        valid = torch.as_tensor(np.concatenate(valids), device=device)
        image_index = torch.as_tensor(index, dtype=torch.int64, device=device)
        multimask = config.multimask_single_point and bool(prompts.single_point.all())
        size = labels.shape[-2:]
        total = torch.zeros((), device=device)
        mask_inputs = None
        for round_index in range(config.correction_rounds + 1):
            low, iou_pred = decode_prompts(
                self.model,
                embeddings,
                image_index,
                mask_inputs=mask_inputs,
                multimask=multimask and round_index == 0,
                **prompt_tensors(prompts, device),
            )
            full = F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)  # (n, m, S, S)
            parts = per_mask_losses(full, targets, valid)
            loss, iou = parts["bce"] + parts["dice"], parts["iou"]
            best = loss.detach().argmin(dim=1)  # the best of SAM's three masks (only one without multimask)
            rows = torch.arange(loss.shape[0], device=device)
            iou_loss = F.mse_loss(iou_pred.float(), iou)  # every predicted mask's IoU estimate, as SAM trains it
            total = total + loss[rows, best].mean() + config.iou_loss_weight * iou_loss
            if round_index == config.correction_rounds:
                break
            previous = (full[rows, best] > 0).detach().cpu().numpy()
            points, point_labels = correction_points(previous, object_masks, rng=rng, valid=np.concatenate(valids))
            prompts = prompts.add_points(points, point_labels)
            mask_inputs = low[rows, best][:, None].detach()
        task = total / (config.correction_rounds + 1)
        return self._result(task, aux, iou[rows, best].mean(), len(index), skipped, device)

    @staticmethod
    def _result(
        task: torch.Tensor, aux: torch.Tensor, iou: torch.Tensor, objects: int, skipped: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            "loss": task + aux,
            "task": task.detach(),
            "aux": aux.detach(),
            "iou": iou.detach(),
            "objects": torch.tensor(float(objects), device=device),
            "skipped": torch.tensor(float(skipped), device=device),
        }


def joint_prompted_step(step: int, fraction: float, seed: int) -> bool:
    """Whether optimiser step ``step`` (counted from 1) of a joint run is a prompted step.

    The prompted steps are spread evenly, a ``fraction`` of them in every window (``round(n * fraction)``
    of ``n`` steps, give or take one), at a phase drawn from ``seed``: the same seed gives the same steps,
    also after a resume.

    Args:
        step: the optimiser step, from 1.
        fraction: the share of prompted steps, in [0, 1].
        seed: the run's seed.

    >>> sum(joint_prompted_step(step, 0.25, seed=0) for step in range(1, 41))
    10
    """
    if fraction <= 0:
        return False
    phase = float(np.random.default_rng([seed, 0x10147]).random())
    return math.floor(step * fraction + phase) > math.floor((step - 1) * fraction + phase)


class JointStep(nn.Module):
    """Prompt-free steps with prompted steps mixed in (``TrainConfig.joint_prompted``): one model, two losses.

    The engine says which kind each optimiser step is (:func:`joint_prompted_step`) through ``prompted``, so
    that every process and every micro-batch of a step agree; under DDP both kinds go through the one
    wrapped forward.

    Args:
        free: the prompt-free step (images and labels in, ``loss`` / ``task`` / ``aux`` out).
        prompted: a :class:`PromptedStep` on the same model.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> class Free(nn.Module):
    ...     def __init__(self, model):
    ...         super().__init__()
    ...         self.model = model
    >>> model = random_sam(tiny_sam_config())
    >>> JointStep(Free(model), PromptedStep(model, PromptConfig(kind="box"))).model is model
    True
    """

    def __init__(self, free: nn.Module, prompted: PromptedStep) -> None:
        super().__init__()
        if free.model is not prompted.model:
            raise ValueError("JointStep: the prompt-free and the prompted step must train the same model")
        self.free = free
        self.prompted = prompted

    @property
    def model(self) -> nn.Module:
        """The model both steps train."""
        return self.prompted.model

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, prompted: bool = False
    ) -> dict[str, torch.Tensor]:
        """The losses of a prompted step when ``prompted``, else of a prompt-free one (``loss``, ``task``, ``aux``)."""
        step = self.prompted if prompted else self.free
        return step(pixel_values, labels)


def _concat(prompt_sets: list[Prompts]) -> Prompts:
    """The prompts of several images as one set (all drawn with the same settings, so the shapes agree)."""

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(p, name) for p in prompt_sets]
        return None if parts[0] is None else np.concatenate(parts)

    return Prompts(cat("boxes"), cat("points"), cat("point_labels"))
