"""Fail early and clearly, never corrupt what was written, never lose a run.

Bad training data, bad configs and bad models are refused before anything trains, with one line naming
the file or argument, what was found and what was expected. Every artifact is written under a temporary
name and renamed; a run that dies after a checkpoint resumes to the same adapter bit for bit; a non-finite loss or
a failed save stops the run and keeps the last good checkpoint. Nothing is unpickled, nothing from a
checkpoint is executed, and a long run's memory stays flat. (Dataset errors themselves are covered one by
one in ``test_data_errors.py``.)
"""

import ast
import contextlib
import errno
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import convlora
import convlora.training.checkpoint
import convlora.training.losses
from convlora import Segmenter, load_sam, load_trained
from convlora._io import LOCK_FILE, OUTPUT_MARKER, WriteError, sha256_file
from convlora.artifact import TASK_FILE, TaskInfo, export_trained
from convlora.artifact.methods import build_task_model
from convlora.cli import main
from convlora.data import DatasetError, SegmentationDataset, load_datasets
from convlora.inference import merge_model
from convlora.models import random_sam, tiny_sam_config
from convlora.models.adapter_check import check_adapter_matches
from convlora.training.checkpoint import list_checkpoints
from convlora.training.config import load_config
from convlora.training.engine import TrainingError, train
from convlora.tuner.config import ConvLoraConfig

PACKAGE = Path(convlora.__file__).parent
ENGINE = importlib.import_module("convlora.training.engine")  # the module; ``convlora.train`` is the function
TMP_NAME = re.compile(r"^\..+\.tmp$")  # the temporary names of convlora._io


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sam_dir, polyp_dir) -> Path:
    root = tmp_path_factory.mktemp("robust")
    (root / "sam").symlink_to(tiny_sam_dir)
    random_sam(tiny_sam_config(hidden_size=48), seed=0).save_pretrained(root / "sam48")
    random_sam(tiny_sam_config(num_hidden_layers=4, global_attn_indexes=(1, 3)), seed=0).save_pretrained(root / "sam4")
    (root / "polyp").symlink_to(polyp_dir)
    return root


def run_args(workspace: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    """8 optimiser steps (2 epochs of 4 batches), a checkpoint after each."""
    args = ["--data", str(data or workspace / "polyp"), "--model", str(workspace / "sam"), "--output_dir", str(out)]
    args += ["--epochs", "2", "--batch_size", "2", "--lr", "3e-3", "--save_every_steps", "1"]
    return [*args, "--overlay_samples", "0", "--log_every_steps", "1", *extra]


def same_adapter(run_a: Path, run_b: Path) -> bool:
    """Whether two runs exported bitwise identical adapters."""
    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (run_a, run_b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of interrupted writes."""
    return [p for p in folder.rglob(".*") if TMP_NAME.match(p.name) or p.name.endswith(".old")]


# ---------------------------------------------------------------- writes are atomic (recorded in one run)

_RECORDERS: list[list[str]] = []
_HOOKED: list = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _audit(event: str, args: tuple) -> None:
    if _RECORDERS and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & _WRITE_FLAGS:
        for record in _RECORDERS:
            record.append(os.fsdecode(args[0]))


@contextlib.contextmanager
def recording_writes():
    """Every file this process opens for writing, and every safetensors file it writes (from Rust)."""
    if not _HOOKED:
        sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is idle outside this block
        _HOOKED.append(_audit)
    writes: list[str] = []
    real = safetensors.torch.serialize_file

    def serialize_file(tensors, filename, metadata=None):
        writes.append(os.fsdecode(filename))
        return real(tensors, filename, metadata=metadata)

    _RECORDERS.append(writes)
    safetensors.torch.serialize_file = serialize_file
    try:
        yield writes
    finally:
        safetensors.torch.serialize_file = real
        _RECORDERS.remove(writes)


@pytest.fixture(scope="module")
def reference(workspace) -> tuple[Path, list[str]]:
    """An uninterrupted run, its merged model, and every file written meanwhile."""
    out = workspace / "reference"
    with recording_writes() as writes:
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
        merge_model(out / "adapter", workspace / "reference-merged")
    return out, writes


def test_every_file_a_run_and_a_merge_write_goes_through_a_temporary_name(workspace, reference):
    run, writes = reference
    ours = [Path(w) for w in writes if Path(w).is_relative_to(workspace)]
    weights = [p for p in ours if p.suffix == ".safetensors"]
    assert len([p for p in weights if "step-" in str(p)]) >= 3 * 8  # each checkpoint: 3 safetensors files
    assert any(".adapter." in str(p) for p in weights) and any(".reference-merged." in str(p) for p in weights)
    for path in ours:
        if path.is_relative_to(run / "logs"):
            continue  # TensorBoard appends to its event files; they are logs, not artifacts
        if path == run / LOCK_FILE:
            continue  # the run's lock: written through its open descriptor, removed when the run ends
        assert any(TMP_NAME.match(part) for part in path.relative_to(workspace).parts), f"written in place: {path}"
    assert not leftovers(workspace)


def test_a_run_leaves_only_safetensors_json_markdown_png_and_logs(workspace, reference):
    run, _ = reference
    allowed = {".safetensors", ".json", ".md", ".png"}
    for folder in (run, workspace / "reference-merged"):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            in_logs = path.is_relative_to(run / "logs")
            tensorboard = in_logs and (path.name.startswith("events.out.tfevents.") or path.name == "hparams.yml")
            assert path.suffix in allowed or tensorboard, path


def test_saved_files_get_the_usual_permissions_not_those_of_temporary_files(workspace, tmp_path):
    """mkstemp, mkdtemp and safetensors create 0600/0700 entries; artifacts must stay readable by others."""
    previous = os.umask(0o022)
    try:
        adapter = make_adapter(workspace, "sam", tmp_path / "adapter")
    finally:
        os.umask(previous)
    assert adapter.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in adapter.iterdir()} == {
        name: 0o644
        for name in ("adapter_config.json", "adapter_model.safetensors", TASK_FILE, "README.md", OUTPUT_MARKER)
    }


# ---------------------------------------------------------------- interrupted runs resume


@pytest.mark.parametrize("crash_after", [3, 5])
def test_a_run_that_dies_after_a_checkpoint_resumes_to_the_same_adapter_bit_for_bit(
    workspace, reference, monkeypatch, crash_after
):
    """The process dies (KeyboardInterrupt, as from Ctrl-C) right after its k-th checkpoint save: mid-epoch
    (k = 3) or just after the epoch-end checkpoint (k = 5); ``--resume latest`` then ends as if nothing happened."""
    out = workspace / f"crashed-{crash_after}"
    real = ENGINE.save_checkpoint
    saved: list[Path] = []

    def save_then_die(directory, *args, **kwargs):
        path = real(directory, *args, **kwargs)
        saved.append(Path(directory))
        if len(saved) == crash_after:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ENGINE, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
    monkeypatch.undo()
    assert list_checkpoints(out)[-1] == saved[-1] and not (out / "metrics.json").exists()

    assert main(["train", *run_args(workspace, out), "--resume", "latest", "--no-progress"]) == 0
    assert same_adapter(reference[0], out)
    history = [json.loads((run / "metrics.json").read_text())["history"] for run in (reference[0], out)]
    assert history[0] == history[1]
    assert not leftovers(out)


# ---------------------------------------------------------------- failed saves


@pytest.mark.parametrize("failure", ["disk full", "permission denied"])
def test_a_failed_checkpoint_save_stops_the_run_keeps_earlier_checkpoints_and_resumes(
    workspace, reference, monkeypatch, failure
):
    """ENOSPC mid-file (safetensors reports it as SafetensorError) or EACCES creating the folder, at step 3."""
    out = workspace / f"failed-{failure.replace(' ', '-')}"
    if failure == "disk full":
        real = convlora.training.checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)  # a half-written checkpoint is left in the temporary folder
            if ".step-00000003." in str(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(convlora.training.checkpoint, "save_file", save_file)
        expected = "No space left on device"
    else:
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(suffix=None, prefix=None, dir=None):
            if prefix and prefix.startswith(".step-00000003."):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real_mkdtemp(suffix, prefix, dir)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        expected = "Permission denied"
    with pytest.raises(TrainingError) as caught:
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
    message = str(caught.value)
    assert "could not save the checkpoint of step 3" in message and expected in message
    assert str(out / "checkpoints" / "step-00000003") in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000002'}" in message
    assert isinstance(caught.value.__cause__, WriteError)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert not (out / "checkpoints" / "step-00000003").exists() and not leftovers(out)

    monkeypatch.undo()  # space freed: the run continues where it stopped, and ends as if nothing happened
    train(load_config(overrides=run_args(workspace, out, "--resume", "latest")), show_progress=False)
    assert same_adapter(reference[0], out)


def test_a_failed_save_of_the_best_model_stops_the_run_naming_the_epoch(workspace, monkeypatch):
    def full_disk(model, task, directory, model_card=None):
        raise WriteError(directory, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(ENGINE, "export_trained", full_disk)
    out = workspace / "failed-export"
    with pytest.raises(TrainingError) as caught:
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
    assert f"could not save the best model of epoch 0: {out / 'adapter'} was not saved" in str(caught.value)
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000004'}" in str(caught.value)


def make_adapter(workspace: Path, base: str, out: Path, **config) -> Path:
    """An exported Conv-LoRA adapter with random (non-identity) weights, without training."""
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(workspace / base), "conv_lora")
    settings = {"r": 2, "num_experts": 2, "init_lora_weights": False, **config}
    model = build_task_model(load_sam(workspace / base), task, ConvLoraConfig(**settings))
    return export_trained(model, task, out)


def test_a_failed_adapter_save_leaves_the_previous_adapter_intact(workspace, tmp_path, monkeypatch):
    adapter = make_adapter(workspace, "sam", tmp_path / "adapter")
    before = sha256_file(adapter / "adapter_model.safetensors")
    real = safetensors.torch.serialize_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    with pytest.raises(WriteError, match=re.escape(str(adapter)) + r" was not saved .*No space left on device"):
        make_adapter(workspace, "sam", adapter, r=4)
    monkeypatch.undo()

    real_replace = os.replace

    def replace(src, dst, **kwargs):  # the swap itself fails: the old folder must come back
        if TMP_NAME.match(Path(src).name) and Path(dst) == adapter:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match="Input/output error"):
        make_adapter(workspace, "sam", adapter, r=4)
    monkeypatch.undo()
    assert sha256_file(adapter / "adapter_model.safetensors") == before
    assert load_trained(adapter)[1].method == "conv_lora" and not leftovers(tmp_path)


# ---------------------------------------------------------------- non-finite values


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    real_build = ENGINE.build_loss

    def build_loss(name, mode):
        loss_fn, calls = real_build(name, mode), []

        def nan_at_step_three(logits, labels):
            calls.append(1)
            loss = loss_fn(logits, labels)
            return loss * float("nan") if len(calls) == 3 else loss

        return nan_at_step_three

    monkeypatch.setattr(ENGINE, "build_loss", build_loss)
    out = workspace / "nan-loss"
    with pytest.raises(TrainingError) as caught:
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
    last = out / "checkpoints" / "step-00000002"
    assert f"non-finite loss (nan) at step 3 (epoch 0); the last good checkpoint is {last}" in str(caught.value)
    assert list_checkpoints(out)[-1] == last
    assert all(torch.isfinite(t).all() for t in load_file(last / "trainable.safetensors").values())


def test_weights_that_turn_non_finite_are_never_checkpointed(workspace, monkeypatch):
    real_step, calls = ENGINE._optimizer_step, []

    def step(accelerator, module, optimizer, group, grad_clip, parameters, *rest):
        losses = real_step(accelerator, module, optimizer, group, grad_clip, parameters, *rest)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                parameters[0].fill_(float("inf"))  # the loss of this step was still finite
        return losses

    monkeypatch.setattr(ENGINE, "_optimizer_step", step)
    out = workspace / "inf-weights"
    message = r"non-finite weights after step 3; the last good checkpoint is .*step-00000002"
    with pytest.raises(TrainingError, match=message):
        train(load_config(overrides=run_args(workspace, out)), show_progress=False)
    assert list_checkpoints(out)[-1].name == "step-00000002"


def test_an_enormous_learning_rate_ends_the_command_with_one_clear_line(workspace, capsys):
    out = workspace / "huge-lr"
    code = main(["train", *run_args(workspace, out, "--lr", "1e6", "--grad_clip", "0"), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert re.fullmatch(r"convlora train: error: non-finite loss \(nan\) at step \d+ \(epoch \d+\); .*", error)


# ---------------------------------------------------------------- bad data at train time


def broken_copy(workspace: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = shutil.copytree(workspace / "polyp", tmp_path / "data")
    lonely = data / "train" / "images" / "lonely.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(lonely)
    return data, lonely


def test_training_refuses_bad_data_before_the_first_step(workspace, tmp_path, capsys):
    data, lonely = broken_copy(workspace, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=re.escape(str(lonely)) + ".*image without mask"):
        train(load_config(overrides=run_args(workspace, out, data=data)), show_progress=False)
    assert not list_checkpoints(out) and not (out / "adapter").exists()
    assert main(["train", *run_args(workspace, out, data=data), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"convlora train: error: dataset {data} has 1 problem:\n  {lonely}: image without mask")


def test_skip_bad_trains_on_the_rest_and_says_how_many_it_skipped(workspace, tmp_path, capsys):
    data, _ = broken_copy(workspace, tmp_path)
    result = train(
        load_config(overrides=run_args(workspace, tmp_path / "run", "--epochs", "1", "--skip_bad", "true", data=data)),
        show_progress=False,
    )
    assert "data: skipped 1 bad samples of data" in capsys.readouterr().out
    assert result.steps == 4  # the 8 good training images, 2 per step


def test_inspect_lists_every_problem_at_once_and_exits_with_1(workspace, tmp_path, capsys):
    data, lonely = broken_copy(workspace, tmp_path)
    orphan = data / "val" / "masks" / "orphan.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(orphan)
    assert main(["inspect", str(data)]) == 1
    text = capsys.readouterr().out
    assert str(lonely) in text and "image without mask" in text
    assert str(orphan) in text and "mask without image" in text


# ---------------------------------------------------------------- bad configs

BAD_SETTINGS = [
    (["--epoch", "3"], r"unknown keys \['epoch'\]"),
    (["--conv_lora.rank", "4"], r"command line: unknown keys \['conv_lora.rank'\]; known keys of conv_lora: \["),
    (["--augment.flip", "true"], r"unknown keys \['augment.flip'\]"),
    (["--epochs", "ten"], r"epochs must be an integer, got 'ten'"),
    (["--batch_size", "2.5"], r"batch_size must be an integer, got 2\.5"),
    (["--skip_bad", "yes"], r"skip_bad must be true or false, got 'yes'"),
    (["--lr", "fast"], r"lr must be a number or null, got 'fast'"),
    (["--lr", "NaN"], r"lr must be a finite number, got nan"),
    (["--lr", "-1"], r"lr must be > 0, got -1"),
    (["--epochs", "0"], r"epochs must be >= 1, got 0"),
    (["--val_fraction", "1"], r"val_fraction must be in \(0, 1\), got 1"),
    (["--method", "adapter"], r"method must be one of \['conv_lora', 'lora', 'decoder', 'full', .*\], got 'adapter'"),
    (["--conv_lora.r", "0"], r"conv_lora: r must be >= 1, got 0"),
    (["--conv_lora.top_k", "3", "--conv_lora.num_experts", "2"], r"top_k \(3\) cannot exceed num_experts \(2\)"),
    (["--conv_lora.lora_alpha", "Infinity"], r"conv_lora: lora_alpha must be a finite number, got inf"),
    (["--method", "full", "--conv_lora.r", "4"], r"conv_lora settings do not apply to method 'full'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS, ids=[" ".join(s) for s, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=["--data", "data/polyp", *settings])


def test_config_files_with_bad_content_are_named(tmp_path):
    unknown = tmp_path / "run.json"
    unknown.write_text(json.dumps({"data": "d", "learning_rate": 0.1}))
    with pytest.raises(ValueError, match=re.escape(str(unknown)) + r": unknown keys \['learning_rate'\]"):
        load_config(unknown)
    broken = tmp_path / "run.toml"
    broken.write_text("data = 'd'\nepochs = \n")
    with pytest.raises(ValueError, match=re.escape(str(broken)) + " is not valid TOML"):
        load_config(broken)
    with pytest.raises(ValueError, match="config file .*missing.json does not exist"):
        load_config(tmp_path / "missing.json")


def test_the_command_line_reports_a_bad_setting_in_one_line(capsys):
    assert main(["train", "--data", "data/polyp", "--conv_lora.r", "0"]) == 2
    assert capsys.readouterr().err == "convlora train: error: conv_lora: r must be >= 1, got 0\n"


def test_an_image_size_that_is_no_multiple_of_the_patch_size_is_refused_before_training(workspace, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="image_size must be a positive multiple of the patch size 8, got 60"):
        train(load_config(overrides=run_args(workspace, out, "--image_size", "60")), show_progress=False)
    assert not list_checkpoints(out)


# ---------------------------------------------------------------- models that are not what they claim


class _Payload:
    """Unpickling this would create a marker file: proof that nothing is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_bomb(path: Path, marker: Path) -> None:
    import pickle  # only to build the bomb; the package itself never imports pickle

    path.write_bytes(pickle.dumps(_Payload(marker)))


def not_sam_folders(workspace: Path, root: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, expected message) for folders that are not loadable SAM checkpoints."""
    cases = {}

    def folder(name: str, config: dict | None = None) -> Path:
        path = root / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        return path

    sam_config = json.loads((workspace / "sam" / "config.json").read_text())
    random_files = folder("random-files")
    (random_files / "weights.dat").write_bytes(os.urandom(64))
    cases["random files"] = (random_files, "is not a SAM checkpoint: it has no config.json")
    cases["other model"] = (folder("bert", {"model_type": "bert"}), r"model_type='bert'; convlora supports 'sam'")
    no_weights = "is not a SAM checkpoint: .*no file named model.safetensors"
    cases["no weights"] = (folder("no-weights", sam_config), no_weights)
    pickled = folder("pickled", sam_config)
    pickle_bomb(pickled / "pytorch_model.bin", marker)
    cases["pickle only"] = (pickled, no_weights)
    garbage = folder("garbage", sam_config)
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    cases["garbage weights"] = (garbage, "unreadable safetensors file")
    wider = folder("wider", sam_config)
    shutil.copy(workspace / "sam48" / "model.safetensors", wider / "model.safetensors")
    cases["other width"] = (wider, r"tensor vision_encoder\.\S+ has shape \[48.*\] but its config.json describes \[32")
    partial = folder("partial", sam_config)
    tensors = load_file(workspace / "sam" / "model.safetensors")
    tensors.pop("mask_decoder.iou_token.weight")
    safetensors.torch.save_file(tensors, partial / "model.safetensors")
    cases["missing tensor"] = (partial, r"lack 1 tensors .*\['mask_decoder\.iou_token\.weight'\]")
    return cases


def test_folders_that_are_not_sam_checkpoints_are_refused_whole_and_never_unpickled(workspace, tmp_path):
    marker = tmp_path / "unpickled"
    for name, (folder, message) in not_sam_folders(workspace, tmp_path, marker).items():
        with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*" + message):
            load_sam(folder)
        assert not marker.exists(), name
    original = tmp_path / "sam_vit_b_01ec64.pth"
    pickle_bomb(original, marker)
    with pytest.raises(ValueError, match="is a file; pass the directory holding config.json and model.safetensors"):
        load_sam(original)
    with pytest.raises(ValueError, match=f"{tmp_path}/nowhere does not exist"):
        load_sam(tmp_path / "nowhere")
    assert not marker.exists()


def test_an_adapter_from_a_wider_base_is_refused_naming_both_shapes_and_the_base_is_untouched(workspace):
    adapter = make_adapter(workspace, "sam48", workspace / "adapter-48")
    message = r"tensor base_model\.model\.vision_encoder\.layers\.0\.attn\.qkv\.conv_lora_A\.weight has shape \[2, 48\]"
    message += r" but the base model expects \[2, 32\]"
    with pytest.raises(ValueError, match=message):
        load_trained(adapter, base_model=str(workspace / "sam"))
    with pytest.raises(ValueError, match=message):
        Segmenter.from_pretrained(adapter, base_model=str(workspace / "sam"), device="cpu")
    base = load_sam(workspace / "sam")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        check_adapter_matches(base, adapter)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT only warns; convlora refuses
def test_an_adapter_from_a_shallower_encoder_is_refused_not_loaded_partially(workspace):
    adapter = make_adapter(workspace, "sam", workspace / "adapter-2-layers")
    with pytest.raises(ValueError, match=r"lacks 12 tensors the base model needs, e\.g\. .*layers\.2\.attn\.qkv"):
        load_trained(adapter, base_model=str(workspace / "sam4"))


def test_a_decoder_from_another_base_is_refused_naming_the_file(workspace, tmp_path):
    random_sam(tiny_sam_config(decoder_size=24), seed=0).save_pretrained(tmp_path / "sam-24")
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(tmp_path / "sam-24"), "decoder")
    exported = export_trained(build_task_model(load_sam(tmp_path / "sam-24"), task), task, tmp_path / "decoder")
    message = r"decoder_model\.safetensors does not fit the mask decoder of .*/sam: tensor iou_prediction_head\.\S+ "
    with pytest.raises(ValueError, match=message + r"has shape \[48\], the decoder's has \[32\]"):
        load_trained(exported, base_model=str(workspace / "sam"))


@pytest.fixture
def adapter(workspace, tmp_path) -> Path:
    return make_adapter(workspace, "sam", tmp_path / "adapter")


def forget_hashes(folder: Path) -> None:
    """What a folder from elsewhere (no recorded SHA-256) looks like: only the file's own checks apply."""
    task = json.loads((folder / TASK_FILE).read_text())
    (folder / TASK_FILE).write_text(json.dumps({**task, "weights_sha256": {}}))


@pytest.mark.parametrize("recorded", [True, False], ids=["sha256 recorded", "no sha256"])
def test_a_truncated_adapter_file_is_refused_naming_it(adapter, recorded):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    if not recorded:
        forget_hashes(adapter)
    message = "is damaged or was altered after export" if recorded else "is not a readable safetensors file"
    with pytest.raises(ValueError, match=re.escape(str(weights)) + " " + message):
        load_trained(adapter)


def header_positions(weights: Path) -> list[int]:
    """Byte positions in the safetensors header: in a decoder key, a dtype, an offset, the JSON, and at random."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + size].decode()
    targeted = [
        header.index("mask_decoder.upscale_conv2.bias") + 14,
        header.index('"F32"') + 2,
        header.index('"data_offsets":[') + 16,
        header.index("{"),
        header.index("conv_lora_B.weight"),
    ]
    return [8 + i for i in targeted] + random.Random(0).sample(range(8, 8 + size), 6)


@pytest.mark.parametrize("recorded", [True, False], ids=["sha256 recorded", "no sha256"])
def test_flipped_bits_in_the_adapter_header_are_refused_naming_the_file(adapter, recorded):
    weights = adapter / "adapter_model.safetensors"
    if not recorded:
        forget_hashes(adapter)
    original = weights.read_bytes()
    for position in header_positions(weights):
        damaged = bytearray(original)
        damaged[position] ^= 0x04
        weights.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=re.escape(str(weights))):
            load_trained(adapter)


def test_altered_tensor_bytes_are_caught_by_the_recorded_sha256(adapter, workspace):
    weights = adapter / "adapter_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-3] ^= 0x40  # a valid float still: only the checksum can tell
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=re.escape(str(weights)) + " is damaged or was altered after export"):
        load_trained(adapter)
    merged = shutil.copytree(workspace / "reference-merged", adapter.parent / "merged")
    assert TaskInfo.read(merged).weights_sha256.keys() == {"convlora_model.safetensors"}
    load_trained(merged)
    with (merged / "convlora_model.safetensors").open("r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\x00")
    with pytest.raises(ValueError, match="convlora_model.safetensors is damaged or was altered after export"):
        load_trained(merged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "format_version=2 by a newer convlora"),
        ({"expert_dilation": 2}, r"unknown fields \['expert_dilation'\]"),
        ({"r": "2"}, "r must be an integer, got '2'"),
    ],
    ids=["newer format", "unknown field", "wrong type"],
)
def test_an_adapter_config_from_a_newer_convlora_is_refused_naming_the_file(adapter, change, message):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        load_trained(adapter)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"format_version": 2}, r"newer convlora \(format 2\)"), ({"tiling": True}, r"unknown fields \['tiling'\]")],
    ids=["newer format", "unknown field"],
)
def test_a_task_file_from_a_newer_convlora_is_refused_naming_the_file(adapter, change, message):
    path = adapter / TASK_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_trained(adapter)


def test_a_pickled_adapter_is_refused_and_never_unpickled(adapter, tmp_path):
    marker = tmp_path / "unpickled"
    forget_hashes(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    pickle_bomb(adapter / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match="adapter_model.safetensors does not exist"):
        load_trained(adapter)
    assert not marker.exists()


def test_an_adapter_whose_base_is_not_on_this_machine_says_how_to_point_at_it(workspace, tmp_path):
    moved = tmp_path / "base-here"
    shutil.copytree(workspace / "sam", moved)
    adapter = make_adapter(workspace, "sam", tmp_path / "adapter")
    task = json.loads((adapter / TASK_FILE).read_text())
    (adapter / TASK_FILE).write_text(json.dumps({**task, "base_model": "/elsewhere/sam"}))
    with pytest.raises(ValueError, match=r"/elsewhere/sam does not exist .*pass base_model / --base-model"):
        load_trained(adapter)
    assert load_trained(adapter, base_model=str(moved))[1].base_model == "/elsewhere/sam"


# ---------------------------------------------------------------- safety of the code itself

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(path: Path) -> list[str]:
    """Pickle imports, torch.load without weights_only=True, trust_remote_code=True, eval/exec/compile."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            func = node.func
            if isinstance(func, ast.Name) and func.id in {"eval", "exec", "compile", "__import__"}:
                found.append(f"{where} calls {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{where} calls torch.load without weights_only=True")
            for name in ("trust_remote_code", "allow_pickle"):
                value = keywords.get(name)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where} passes {name}={ast.unparse(value)}")
    return found


def test_the_package_never_unpickles_nor_executes_code_from_files():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    assert [f"{path.parent.name}/{problem}" for path in sources for problem in unsafe_calls(path)] == []


def test_the_safety_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "convlora_bad.py"
    bad.write_text(
        "import pickle\nimport torch\ntorch.load('x')\nAuto.from_pretrained('x', trust_remote_code=True)\n"
        "eval('1')\nnp.load('x', allow_pickle=True)\ntorch.load('y', weights_only=True)\n"
    )
    assert [p.split(" ", 1)[1] for p in unsafe_calls(bad)] == [
        "imports pickle",
        "calls torch.load without weights_only=True",
        "passes trust_remote_code=True",
        "calls eval()",
        "passes allow_pickle=True",
    ]


# ---------------------------------------------------------------- memory


@pytest.mark.slow
def test_a_long_run_does_not_grow_its_memory_per_epoch(workspace):
    """RSS after 2 warm-up epochs, then over 8 more, in a fresh process (tools/memory_soak.py).

    oneDNN's primitive cache (up to 1024 kernels by default) fills with kernels for the varying per-expert
    batch sizes of noisy routing: bounded, but a slow climb over a short run; capping it leaves convlora's
    own memory to measure. See docs/robustness.md for the uncapped 200-epoch numbers.
    """
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads VmRSS from /proc")
    tool = PACKAGE.parent / "tools" / "memory_soak.py"
    output = workspace / "soak.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", ONEDNN_PRIMITIVE_CACHE_CAPACITY="16")
    done = subprocess.run(
        [sys.executable, str(tool), "--epochs", "10", "--trim", "--output", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(output.read_text())["rss_mib_per_epoch"]
    assert len(rss) == 10
    assert max(rss[2:]) - rss[2] < 4.0, rss  # keeping each step's autograd graph (2.2 MiB) would add ~35 MiB


def test_the_datasets_hold_paths_not_pixels(workspace):
    data = load_datasets(workspace / "polyp", image_size=64)
    for dataset in (data.train, data.val, data.test):
        for index in range(len(dataset)):
            dataset[index]
        held = [v for v in vars(dataset).values() if isinstance(v, (np.ndarray, torch.Tensor))]
        held += [v for s in dataset.samples for v in vars(s).values() if isinstance(v, (np.ndarray, torch.Tensor))]
        assert held == [] and isinstance(dataset, SegmentationDataset)
