"""The fine-tuning engine: one Accelerate loop for every method, device and process count.

``train(config)`` runs on a laptop CPU, one GPU, or many (``accelerate launch -m convlora train ...``):
Accelerate places the model, wraps it for DDP and handles mixed precision; data order, augmentation,
gradient accumulation, checkpoints and evaluation are explicit here so that an interrupted run resumes
bitwise identically (on CPU) and evaluation is exact under any number of processes.

What a run writes to ``output_dir``: ``config.json`` (resolved settings), ``checkpoints/`` (resumable,
rotated), ``adapter/`` (the best model's artifact + model card), ``metrics.json``, ``logs/`` (TensorBoard),
``curves.png`` and ``val_overlays.png``; ``embedding_cache/`` when a frozen image encoder's outputs are cached
on disk (:mod:`convlora.training.embedding_cache`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from .._compat import forget_accelerate_settings
from .._io import check_apart, check_owned, check_versioned, owned_folder, write_json
from ..artifact import TaskInfo, apply_task_settings, continue_from_export, export_trained, load_trained
from ..artifact.methods import METHODS, build_task_model
from ..artifact.peft_methods import PEFT_METHODS, ignored_settings, reads
from ..data import build_datasets
from ..data.prompts import MIXED_KINDS
from ..evaluation.evaluate import evaluate_split
from ..evaluation.metrics import default_metric
from ..evaluation.prompted import evaluate_prompted
from ..evaluation.retention import object_kind_of
from ..instances.evaluate import evaluate_instance_split
from ..instances.model import InstanceSettings
from ..instances.step import InstanceStep
from ..models import count_parameters, family_of, load_sam, segmentation_logits
from ..models.family import enable_gradient_checkpointing
from ..tuner.moe import moe_aux_loss
from .checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from .config import DECODER_GROUP, TrainConfig, apply_resumed_settings, resolve_defaults, resume_config
from .embedding_cache import CACHE_FOLDER, EmbeddingCache, plan_embedding_cache
from .losses import build_loss
from .progress import Progress
from .prompted import JointStep, PromptedStep, joint_prompted_step, prepare_prompted_model
from .report import model_card, plot_curves, save_overlay_grid
from .retention_monitor import (
    RetentionMonitor,
    check_keep_data,
    select_checkpoint,
    selection_record,
    start_retention,
)


class TrainingError(RuntimeError):
    """Training stopped because it cannot go on (e.g. a non-finite loss)."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Args:
        run_dir: the run folder.
        adapter_dir: the exported best model (``run_dir / "adapter"``), loadable with ``load_trained``.
        task: what the model segments and how to rebuild it.
        metric: the validation metric that picked the best model.
        best_value: its best value (``None`` if no evaluation ran).
        best_epoch: the epoch of the best value.
        steps: optimiser steps taken.
        history: one dict of validation metrics per evaluation.
        test_metrics: metrics of the best model on the test set, if there is one.
        trainable_parameters: parameters that were trained.
        wall_time: seconds, resumed parts included.
        stopped_early: whether early stopping ended the run.
        selection: which evaluation's model was kept and why (``TrainConfig.select``; see ``metrics.json``).
    """

    run_dir: Path
    adapter_dir: Path
    task: TaskInfo
    metric: str
    best_value: float | None
    best_epoch: int | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, float] | None = None
    trainable_parameters: int = 0
    wall_time: float = 0.0
    stopped_early: bool = False
    selection: dict[str, Any] = field(default_factory=dict)


class TrainStep(nn.Module):
    """The module Accelerate wraps: images and labels in, losses out.

    It returns the task loss and the Conv-LoRA auxiliary loss together because, under DDP, the auxiliary
    loss must come out of the wrapped forward; reading it from the layers afterwards breaks DDP's
    gradient bookkeeping.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss to back-propagate (task + MoE auxiliary, ``"loss"``) and its two parts, detached."""
        logits = segmentation_logits(self.model, pixel_values)  # (b, k, s/4, s/4)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        task = self.loss_fn(logits, labels)
        aux = moe_aux_loss(self.model)
        return {"loss": task + aux, "task": task.detach(), "aux": aux.detach()}


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[Any]:
    """What AdamW trains: the trainable parameters, with SAM's mask decoder in a group of its own at ``decoder_lr``.

    Without ``decoder_lr`` (every run but an instance run with ``joint_prompted``) it is the plain list of trainable
    parameters, one group at ``lr``.

    Args:
        model: the task model, its trainable parameters set.
        config: the run's settings, resolved (``decoder_lr`` filled in where it applies).

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> model = random_sam(tiny_sam_config())
    >>> config = TrainConfig(data="d", mode="instances", joint_prompted=0.25, lr=1e-2, decoder_lr=2e-3)
    >>> [(group["name"], group["lr"]) for group in parameter_groups(model, config)]
    [('rest', 0.01), ('mask_decoder', 0.002)]
    """
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if config.decoder_lr is None:
        return [param for _, param in named]
    decoder = [param for name, param in named if "mask_decoder." in name]
    rest = [param for name, param in named if "mask_decoder." not in name]
    groups = [
        {"params": rest, "name": "rest", "lr": config.lr},
        {"params": decoder, "name": DECODER_GROUP, "lr": config.decoder_lr},
    ]
    return [group for group in groups if group["params"]]


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's share of a seeded shuffle of the training set for one epoch.

    Every process draws the same permutation and takes every ``world_size``-th index, trimmed so all
    processes get the same count.

    >>> epoch_order(10, seed=0, epoch=0) == epoch_order(10, seed=0, epoch=0)
    True
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    per_process = num_samples // world_size
    return order[rank::world_size][:per_process]


def _make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    forget_accelerate_settings()
    return Accelerator(
        # Without a GPU, processes started by `accelerate launch` / torchrun train on CPU with gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # Top-1 routing leaves some experts without samples in a step; DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _rng_states(accelerator: Any) -> dict[str, torch.Tensor]:
    """Every process's torch (and CUDA) random state, gathered on all processes."""
    states = {}
    local = torch.get_rng_state().to(accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0)) if accelerator.num_processes > 1 else local.unsqueeze(0)
    for rank in range(gathered.shape[0]):
        states[f"torch.{rank}"] = gathered[rank].cpu()
    if torch.cuda.is_available():
        local_cuda = torch.cuda.get_rng_state().to(accelerator.device).unsqueeze(0)
        gathered_cuda = accelerator.gather(local_cuda) if accelerator.num_processes > 1 else local_cuda
        for rank in range(gathered_cuda.shape[0]):
            states[f"cuda.{rank}"] = gathered_cuda[rank].cpu()
    return states


def _restore_rng(states: dict[str, torch.Tensor], rank: int, world: int, source: Path) -> None:
    saved = sum(1 for key in states if key.startswith("torch."))
    if saved != world:
        raise ValueError(
            f"{source} was written by a run with {saved} process(es); resume it with the same number, not {world}"
        )
    key = f"torch.{rank}"
    torch.set_rng_state(states[key])
    if torch.cuda.is_available() and f"cuda.{rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{rank}"])


@dataclass
class TrainState:
    """Everything about a run's progress that a checkpoint must carry (``progress.json``), and nothing else.

    Args:
        metric: the validation metric that picks the best model.
        epoch: the epoch in progress (or the next one, between epochs).
        batches_done: batches of this epoch already trained on (this process's share).
        global_step: optimiser steps taken.
        best: ``{"metric", "value", "epoch", "step"}`` of the best evaluation so far.
        history: one dict of validation metrics per evaluation.
        evals_without_improvement: evaluations since the best one (early stopping).
        train_loss: mean losses of each log window, ``{"step", "loss", "task", "aux"}``.
        loss_window: running sums of the log window in progress (so that a resumed run logs the same means).
        elapsed: seconds of training before this process started (resumed runs).
        scheduler: the learning-rate scheduler's state.
        step_kinds: optimiser steps of each kind (``prompt_free``, ``prompted``) of a joint run (``joint_prompted``).
    """

    metric: str
    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evals_without_improvement: int = 0
    train_loss: list[dict[str, Any]] = field(default_factory=list)
    loss_window: dict[str, float] = field(default_factory=lambda: dict(_EMPTY_WINDOW))
    elapsed: float = 0.0
    scheduler: dict[str, Any] = field(default_factory=dict)
    step_kinds: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.best = {"metric": self.metric, "value": None, "epoch": None, "step": None, **self.best}

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to a checkpoint's ``progress.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Any) -> TrainState:
        """A state from a checkpoint's ``progress.json`` (also convlora 0.1's, which kept the metric in ``best``)."""
        check_versioned(data, source, known={f.name for f in fields(cls)}, version=0)
        data = {"metric": data.get("best", {}).get("metric"), **data}
        return cls(**data)

    def add_losses(self, losses: dict[str, float], log_every: int, last_step: int) -> None:
        """Count one optimiser step's losses into the log window; close the window every ``log_every`` steps."""
        for key in ("loss", "task", "aux"):
            self.loss_window[key] += losses[key]
        self.loss_window["steps"] += 1
        if self.global_step % log_every == 0 or self.global_step == last_step:
            count = self.loss_window.pop("steps")
            self.train_loss.append({"step": self.global_step, **{k: v / count for k, v in self.loss_window.items()}})
            self.loss_window = dict(_EMPTY_WINDOW)


_EMPTY_WINDOW = {"loss": 0.0, "task": 0.0, "aux": 0.0, "steps": 0}


@dataclass
class Run:
    """The live objects of one training run, handed to the engine's functions instead of closures."""

    config: TrainConfig
    accelerator: Any
    data: Any
    task: TaskInfo
    step_module: nn.Module
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    state: TrainState
    total_steps: int
    batches_per_epoch: int
    started: float
    prompt: Any = None
    bar: Any = None
    stopped_early: bool = False
    cache: EmbeddingCache | None = None
    cache_reason: str | None = None
    epoch_seconds: list[dict[str, Any]] = field(default_factory=list)
    retention: RetentionMonitor | None = None
    retention_note: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def model(self) -> nn.Module:
        """The task model, unwrapped from Accelerate's wrappers."""
        return self.accelerator.unwrap_model(self.step_module).model

    def last_good(self) -> str:
        """Where a user who must stop can continue from, for error messages."""
        last = list_checkpoints(self.run_dir)
        return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"

    def elapsed(self) -> float:
        return self.state.elapsed + time.time() - self.started

    def cached(self, split: str) -> Any:
        """A block in which the image encoder's outputs come from the embedding cache, when the run has one."""
        return self.cache.use(split) if self.cache is not None else contextlib.nullcontext()

    def evaluate(self, model: nn.Module, dataset: Any) -> dict[str, float]:
        """Metrics on a split: prompt-free, or under prompts derived from its masks (fixed seed) when prompted."""
        if self.prompt is not None and self.prompt.prompted:
            return evaluate_prompted(model, dataset, self.prompt, accelerator=self.accelerator)
        if self.task.mode == "instances":
            settings = InstanceSettings.from_dict(self.task.instance_head)
            return evaluate_instance_split(model, dataset, settings, self.accelerator, self.config.batch_size)
        return evaluate_split(model, dataset, self.data, self.accelerator, batch_size=self.config.batch_size)


def train(config: TrainConfig, *, show_progress: bool = True, given: frozenset[str] | None = None) -> TrainResult:
    """Fine-tune SAM as ``config`` says; returns where everything went and the best metric.

    Args:
        config: the run's settings (see :class:`~convlora.training.config.TrainConfig`).
        show_progress: draw a progress bar on the main process.
        given: the settings the user gave (:func:`~convlora.training.config.load_config_given`); a resumed run
            keeps the saved values of the others. ``None``: ``config`` counts as given in full.

    >>> from convlora.training.config import load_config
    >>> result = train(load_config(overrides=["--data", "data/polyp", "--epochs", "3"]))  # doctest: +SKIP
    """
    run_dir = Path(config.output_dir)
    check_apart(
        run_dir,
        {"data": config.data, "model": config.model, "init_adapter": config.init_adapter}
        | {"keep_data": config.keep_data},
        option="output_dir",
    )
    check_owned(run_dir, "run", option="output_dir")  # in every process, before any writes: the same refusal
    with contextlib.ExitStack() as claimed:
        accelerator = _make_accelerator(config, run_dir)
        _claim_run_folder(claimed, run_dir, accelerator)
        return _train(config, accelerator, show_progress, given)


def _claim_run_folder(claimed: contextlib.ExitStack, run_dir: Path, accelerator: Any) -> None:
    """The main process claims and locks the run folder for the run; every process learns the outcome.

    A refusal (the folder is another live run's) reaches every process, so none is left waiting for the others
    in a collective operation.
    """
    refusal = None
    if accelerator.is_main_process:
        try:
            claimed.enter_context(owned_folder(run_dir, "run", "train", option="output_dir"))
        except ValueError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        outcome = [refusal]
        broadcast_object_list(outcome, from_process=0)
        refusal = outcome[0]
    if refusal is not None:
        raise ValueError(refusal)


def _train(config: TrainConfig, accelerator: Any, show_progress: bool, given: frozenset[str] | None) -> TrainResult:
    run = _start(config, accelerator, show_progress, given)
    while run.state.global_step < run.total_steps and run.state.epoch < config.epochs:
        _train_epoch(run)
        if run.stopped_early:
            _message(run, f"early stopping: no improvement of {run.state.metric} in "
                          f"{config.early_stopping_patience} evaluations")  # fmt: skip
            break
    if run.bar is not None:
        run.bar.close()
    if run.state.best["value"] is None:  # e.g. resumed after the last evaluation of a finished run
        _evaluate_and_keep_best(run, run.state.epoch - 1)
    run.accelerator.wait_for_everyone()
    result = _finish(run)
    run.accelerator.end_training()
    return result


def _start(config: TrainConfig, accelerator: Any, show_progress: bool, given: frozenset[str] | None = None) -> Run:
    """Everything before the first step: data, model, optimiser, schedule, resume, trackers."""
    started = time.time()
    run_dir = Path(config.output_dir)
    is_main = accelerator.is_main_process
    resume_from = resolve_resume(run_dir, config.resume)
    if resume_from is None and config.resume is None and list_checkpoints(run_dir):
        raise ValueError(
            f"output_dir {run_dir} already holds checkpoints of a run; continue it with --resume latest, "
            "or choose another output_dir"
        )
    notes: list[str] = []
    if resume_from is not None and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        config, changed = resume_config(saved, config, given)
        notes += [f"resume applies {change}" for change in changed]
    set_seed(config.seed)
    check_keep_data(config.keep_data)

    data = build_datasets(config)
    base = load_sam(config.model, image_size=config.image_size)
    config, defaults = resolve_defaults(config, base)
    prompt = config.prompting
    if prompt.prompted and data.mode == "multiclass":
        raise ValueError(
            f"prompt={config.prompt!r}: prompted training takes binary or instance masks; {config.data} is multi-class "
            "(train it prompt-free, or give one object class per dataset)"
        )
    # joint training mixes prompted steps (any of box, point, box + point) into prompt-free ones; their objects are
    # a binary mask's components or an instance map's ids (touching objects stay apart)
    joint = replace(prompt, kind="mixed") if config.joint_prompted > 0 else None
    if joint is not None and data.mode == "multiclass":
        raise ValueError(
            f"joint_prompted={config.joint_prompted:g}: prompted steps train SAM's own decoder on binary or instance "
            f"objects; {config.data} is multiclass, whose model has a class-query decoder instead (drop joint_prompted)"
        )
    # prompted, SAM's IoU head learns the IoU of each prompted mask, so it stays trainable
    freeze_iou_head = config.freeze_iou_head and not prompt.prompted and joint is None
    notes += defaults
    family = family_of(base)
    image_size = family.image_size(base)
    task = TaskInfo(
        mode=data.mode,
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        image_size=image_size,
        base_model=config.model,
        method=config.method,
        image_reading=data.image_reading,
        prompt=prompt.kind,
        instance_head={"hidden_channels": config.instance_channels} if data.mode == "instances" else None,
    )
    apply_task_settings(base, task)  # evaluate on the mask token that training uses (SAM 2 / SAM 3)
    data.set_image_size(image_size, family.input_format)
    # the base is scored on its keep sets before the method's adapters go into it
    retention, retention_note = start_retention(config, task.mode, base, data.val, accelerator)
    notes.append(retention_note)
    adapter_config = config.conv_lora.build() if METHODS[config.method].uses_adapter else None
    if config.init_adapter is not None:
        model = continue_from_export(
            base,
            task,
            config.init_adapter,
            freeze_iou_head=freeze_iou_head,
            adapter_settings=config.conv_lora.to_dict(),
        )
        notes.append(f"starting from the weights of {config.init_adapter} (init_adapter)")
    else:
        model = build_task_model(base, task, adapter_config, freeze_iou_head=freeze_iou_head, peft_options=config.peft)
    if config.method in PEFT_METHODS:
        notes += [
            f"conv_lora.{key} is not read by method {config.method} (it reads {', '.join(reads(config.method))})"
            for key in ignored_settings(config.method, config.conv_lora.to_dict())
        ]
    if prompt.prompted or joint is not None:
        prepare_prompted_model(model, joint or prompt)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)

    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = len(data.train) // world
    if per_process == 0:
        raise ValueError(f"data: {len(data.train)} training samples cannot be shared by {world} processes")
    batches_per_epoch = math.ceil(per_process / config.batch_size)
    total_steps = config.epochs * math.ceil(batches_per_epoch / config.grad_accum)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    metric = config.metric or default_metric(task.mode, data.task_family).name

    state = TrainState(metric=metric)
    rng_states = None
    if resume_from is not None:
        rng_states, progress = load_checkpoint(resume_from, model, optimizer)
        state = TrainState.from_dict(progress, resume_from / "progress.json")
        scheduler.load_state_dict(state.scheduler)
        apply_resumed_settings(optimizer, scheduler, config)
        if is_main:
            print(f"Resuming from {resume_from} (step {state.global_step}, epoch {state.epoch})")

    if prompt.prompted:
        step_module: nn.Module = PromptedStep(model, prompt, seed=config.seed)
    elif task.mode == "instances":
        step_module = InstanceStep(model)
    else:
        step_module = TrainStep(model, build_loss(config.loss, task.mode))
    if joint is not None:
        object_kind = object_kind_of(task.mode)  # an instance run's objects: one per id
        step_module = JointStep(step_module, PromptedStep(model, joint, object_kind=object_kind, seed=config.seed))
        objects = "instances (one object per id)" if object_kind == "instances" else "objects"
        notes.append(
            f"joint training: about {config.joint_prompted:.0%} of the steps are prompted ({', '.join(MIXED_KINDS)} "
            f"drawn from the training {objects}), the rest prompt-free"
        )
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    cache, cache_reason = _embedding_cache(config, model, data, image_size)
    notes += [cache_reason] if cache_reason else []
    notes += [cache.describe()] if cache is not None else []
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config.to_dict())
        print(data.summary())
        for note in notes:
            print(note)
        print(
            f"model: {config.model} at {image_size}x{image_size}, method {config.method}, "
            f"{count_parameters(model, trainable_only=True):,} trainable parameters; {total_steps} optimizer steps "
            f"on {world} process(es)"
        )
        accelerator.init_trackers("convlora", config=_scalar_config(config))
    if rng_states is not None:
        _restore_rng(rng_states, rank, world, resume_from)
    bar = Progress(total_steps, state.global_step, enabled=show_progress and is_main, every=config.log_every_steps)
    return Run(
        config=config,
        accelerator=accelerator,
        data=data,
        task=task,
        step_module=step_module,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        state=state,
        total_steps=total_steps,
        batches_per_epoch=batches_per_epoch,
        started=started,
        prompt=prompt,
        bar=bar,
        cache=cache,
        cache_reason=cache_reason,
        retention=retention,
        retention_note=retention_note,
    )


def _embedding_cache(
    config: TrainConfig, model: nn.Module, data: Any, image_size: int
) -> tuple[EmbeddingCache | None, str | None]:
    """The run's embedding cache (``None`` where it is not valid or is off) and the line saying why not."""
    plan = plan_embedding_cache(model, config.embedding_cache, config.augment)
    if not plan.use:
        return None, plan.reason
    cache = EmbeddingCache(
        model,
        config.embedding_cache,
        train=plan.train,
        expected_images=(len(data.train) if plan.train else 0) + len(data.val),
        folder=Path(config.output_dir) / CACHE_FOLDER,
        budget_mib=config.embedding_cache_mib,
        base=config.model,
    )
    try:
        return cache.attach(image_size), plan.reason
    except ValueError as error:
        return None, f"embedding cache: off: {error}"


def _train_epoch(run: Run) -> None:
    """Train the rest of the current epoch (from ``state.batches_done``), then evaluate and checkpoint."""
    config, state, accelerator = run.config, run.state, run.accelerator
    epoch, world = state.epoch, accelerator.num_processes
    run.data.train.set_epoch(epoch)
    order = epoch_order(len(run.data.train), config.seed, epoch, accelerator.process_index, world)
    skip = state.batches_done
    loader = DataLoader(
        run.data.train,
        batch_size=config.batch_size,
        sampler=order[skip * config.batch_size :],
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + epoch),
        drop_last=False,
    )
    run.step_module.train()
    group: list[dict[str, Any]] = []
    remaining = run.batches_per_epoch - skip
    window_start, window_images = time.time(), 0
    epoch_start = time.perf_counter()
    for batch in loader:
        group.append(batch)
        remaining -= 1
        if len(group) < config.grad_accum and remaining > 0:
            continue
        kind = {}
        if config.joint_prompted > 0:  # every process and micro-batch of the step agree
            kind = {"prompted": joint_prompted_step(state.global_step + 1, config.joint_prompted, config.seed)}
        with run.cached("train"):
            losses = _optimizer_step(
                accelerator, run.step_module, run.optimizer, group, config.grad_clip, run.trainable, kind
            )
        if not math.isfinite(losses["loss"]):
            raise TrainingError(
                f"non-finite loss ({losses['loss']}) at step {state.global_step + 1} (epoch {epoch}); "
                f"{run.last_good()}. Lower lr, enable grad_clip, or check the data."
            )
        run.scheduler.step()
        state.global_step += 1
        state.batches_done += len(group)
        if kind:
            name = "prompted" if kind["prompted"] else "prompt_free"
            state.step_kinds[name] = state.step_kinds.get(name, 0) + 1
        window_images += sum(len(b["pixel_values"]) for b in group) * world
        group = []
        state.add_losses(losses, config.log_every_steps, run.total_steps)
        step = state.global_step
        if accelerator.is_main_process:
            lr = run.scheduler.get_last_lr()[0]
            if step % config.log_every_steps == 0:
                accelerator.log({f"train/{k}": v for k, v in losses.items()} | {"train/lr": lr}, step=step)
            rate = window_images / max(1e-9, time.time() - window_start)
            run.bar.update(losses, lr=lr, img_s=rate)
        if config.save_every_steps and step % config.save_every_steps == 0 and step < run.total_steps:
            _save_snapshot(run)
        if step >= run.total_steps:
            break
    done = state.global_step >= run.total_steps
    trained, batches = time.perf_counter() - epoch_start, state.batches_done - skip
    if state.batches_done >= run.batches_per_epoch or done:
        if (epoch + 1) % config.eval_every_epochs == 0 or done or epoch + 1 == config.epochs:
            _evaluate_and_keep_best(run, epoch)
        state.epoch = epoch + 1
        state.batches_done = 0
        _save_snapshot(run)
    seconds = {"train_seconds": round(trained, 4), "seconds": round(time.perf_counter() - epoch_start, 4)}
    run.epoch_seconds.append({"epoch": epoch, "batches": batches, **seconds})


def _save_snapshot(run: Run) -> None:
    """A resumable checkpoint of the run as it is now (then older ones are rotated out)."""
    step = run.state.global_step
    if not all(bool(torch.isfinite(p).all()) for p in run.trainable):  # every process holds the same weights
        raise TrainingError(f"non-finite weights after step {step}; {run.last_good()}. Lower lr or enable grad_clip.")
    states = _rng_states(run.accelerator)
    if run.accelerator.is_main_process:
        run.state.scheduler = run.scheduler.state_dict()
        progress = dict(run.state.to_dict(), elapsed=run.elapsed())
        optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
        try:
            save_checkpoint(checkpoint_dir(run.run_dir, step), run.model, optimizer, states, progress)
        except OSError as error:
            raise TrainingError(
                f"could not save the checkpoint of step {step}: {error}; {run.last_good()}. "
                "Free space (or fix permissions) and continue with --resume latest."
            ) from error
        rotate_checkpoints(run.run_dir, run.config.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _evaluate_and_keep_best(run: Run, epoch: int) -> None:
    """Validation metrics (and retention); the model is exported to ``adapter/`` whenever the rule chooses it.

    The rule (``config.select``) looks at the whole history; a new evaluation either becomes the choice or
    leaves it where it was, so the exported model is always the chosen evaluation's.
    """
    config, state, accelerator = run.config, run.state, run.accelerator
    model = run.model
    with run.cached("val"):
        scores = run.evaluate(model, run.data.val)
    value = scores.get(state.metric)
    if value is None:
        raise ValueError(f"metric {state.metric!r} is not computed for this task; available: {sorted(scores)}")
    kept = run.retention.measure(model, accelerator) if run.retention is not None else {}
    state.history.append({"epoch": epoch, "step": state.global_step, **scores, **kept})
    choice = select_checkpoint(
        state.history, state.metric, config.select, config.min_retention, config.retention_weight
    )
    if choice is not None and choice.index == len(state.history) - 1:
        state.best.update(value=value, epoch=epoch, step=state.global_step)
        if kept:
            state.best["retention"] = kept["retention"]
        state.evals_without_improvement = 0
        if accelerator.is_main_process:
            run.task.metrics = {"val": scores, "best_epoch": epoch} | ({"retention": kept} if kept else {})
            card = model_card(run.task, config, scores, retention=kept, selection=choice.reason)
            try:
                export_trained(model, run.task, run.adapter_dir, card)
            except OSError as error:
                raise TrainingError(
                    f"could not save the best model of epoch {epoch}: {error}; {run.last_good()}. "
                    "Free space (or fix permissions) and continue with --resume latest."
                ) from error
    else:
        state.evals_without_improvement += 1
    if accelerator.is_main_process:
        accelerator.log({f"val/{k}": v for k, v in (scores | kept).items()}, step=state.global_step)
        shown = scores | {k: v for k, v in kept.items() if "/" not in k}  # the means; per protocol in logs/
        _message(run, f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    patience = config.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        run.stopped_early = True
    accelerator.wait_for_everyone()


def _message(run: Run, text: str) -> None:
    """A line for the person watching (under the progress bar when there is one)."""
    if run.accelerator.is_main_process:
        run.bar.write(text)


def _finish(run: Run) -> TrainResult:
    """Test evaluation with the best model, metrics.json, plots and the closing summary."""
    config, state, accelerator, data = run.config, run.state, run.accelerator, run.data
    test_metrics = None
    if data.test is not None or accelerator.is_main_process:
        best_model, _ = load_trained(run.adapter_dir)
        best_model.to(accelerator.device)
        if data.test is not None:
            test_metrics = run.evaluate(best_model, data.test)
        if accelerator.is_main_process and config.overlay_samples:
            save_overlay_grid(best_model, data.val, run.run_dir / "val_overlays.png", config.overlay_samples)
    wall = run.elapsed()
    trainable_count = count_parameters(run.model, trainable_only=True)
    choice = select_checkpoint(
        state.history, state.metric, config.select, config.min_retention, config.retention_weight
    )
    selection = selection_record(choice, config, state.metric)
    result = TrainResult(
        run_dir=run.run_dir,
        adapter_dir=run.adapter_dir,
        task=run.task,
        metric=state.metric,
        best_value=state.best["value"],
        best_epoch=state.best["epoch"],
        steps=state.global_step,
        history=state.history,
        test_metrics=test_metrics,
        trainable_parameters=trainable_count,
        wall_time=wall,
        stopped_early=run.stopped_early,
        selection=selection,
    )
    if accelerator.is_main_process:
        write_json(
            run.run_dir / "metrics.json",
            {
                "best": state.best,
                "history": state.history,
                "test": test_metrics,
                "train_loss": state.train_loss,
                "steps": state.global_step,
                "trainable_parameters": trainable_count,
                "wall_time_seconds": round(wall, 1),
                "stopped_early": run.stopped_early,
                "task": run.task.to_dict(),
                "embedding_cache": _cache_summary(run),
                "epoch_seconds": run.epoch_seconds,
                "selection": selection,
                "retention": run.retention.summary() if run.retention is not None else {"reason": run.retention_note},
                "step_kinds": state.step_kinds,
            },
        )
        plot_curves(state.to_dict() | {"selection": selection}, run.run_dir / "curves.png")
        print(summary(result))
    if run.cache is not None:
        run.cache.detach()
    return result


def _cache_summary(run: Run) -> dict[str, Any]:
    """What ``metrics.json`` records of the embedding cache: what it held and did, or why it was not used."""
    if run.cache is None:
        return {"mode": "off", "reason": run.cache_reason}
    return {**run.cache.summary(), "reason": run.cache_reason}


def _optimizer_step(
    accelerator: Any,
    step_module: nn.Module,
    optimizer: Any,
    group: list[dict[str, Any]],
    grad_clip: float,
    parameters: list[torch.nn.Parameter],
    step_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Accumulate gradients over the micro-batches of ``group`` and take one optimiser step.

    ``step_kwargs`` go to every forward of the step module (a joint run's ``prompted``).
    """
    totals = {"loss": 0.0, "task": 0.0, "aux": 0.0}
    for index, batch in enumerate(group):
        pixel_values = batch["pixel_values"].to(accelerator.device)
        labels = batch["labels"].to(accelerator.device)
        last = index == len(group) - 1
        context = accelerator.no_sync(step_module) if not last else contextlib.nullcontext()
        with context, accelerator.autocast():
            out = step_module(pixel_values, labels, **(step_kwargs or {}))
            accelerator.backward(out["loss"] / len(group))
        for key in totals:
            totals[key] += float(out[key].detach()) / len(group)
    # every process must agree, or one would step while another stops
    broken = torch.tensor([0.0 if math.isfinite(totals["loss"]) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        broken = accelerator.reduce(broken, reduction="sum")
    if broken.item() > 0:
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float("nan"), "task": totals["task"], "aux": totals["aux"]}
    if grad_clip > 0:
        accelerator.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        reduced = accelerator.reduce(torch.tensor(list(totals.values()), device=accelerator.device), "mean")
        totals = dict(zip(totals, reduced.tolist(), strict=True))
    return totals


def _scalar_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def summary(result: TrainResult) -> str:
    """The closing lines a run prints."""
    lines = [
        f"Finished {result.steps} steps in {result.wall_time / 60:.1f} min "
        f"({result.trainable_parameters:,} trainable parameters, method {result.task.method}).",
        f"{'Best' if result.selection.get('rule', 'best') == 'best' else 'Kept'} {result.metric}: "
        f"{result.best_value:.4f} (epoch {result.best_epoch})"
        if result.best_value is not None
        else "No evaluation was run.",
    ]
    if result.selection.get("epoch") is not None:
        lines.append(f"Kept (select {result.selection['rule']}): {result.selection['reason']}")
    if result.test_metrics:
        lines.append("Test: " + ", ".join(f"{k}={v:.4f}" for k, v in result.test_metrics.items()))
    lines.append(f"Model: {result.adapter_dir}  (load it with convlora.load_trained)")
    lines.append(f"Run folder: {result.run_dir} (metrics.json, curves.png, val_overlays.png, logs/)")
    return "\n".join(lines)
