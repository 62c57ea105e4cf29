"""Nothing a user owns is destroyed: every command that writes a folder refuses folders it did not make,
outputs that hold their inputs, and a second process on the same folder; a killed predict continues.

Each test sets up real folders on disk, runs the command as a user would (``convlora.cli.main`` or a
subprocess) and checks both the refusal and that every file is still there, byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from convlora._io import (
    LOCK_FILE,
    atomic_dir,
    check_owned,
    folder_kind,
    owned_folder,
    remove_stale_temporaries,
)
from convlora.artifact import TaskInfo, export_trained
from convlora.artifact.methods import build_task_model
from convlora.cli import error_text, main
from convlora.inference import PROGRESS_FILE, predict_folder
from convlora.models import load_sam
from convlora.prompting import iter_predict_prompts, predict_prompts
from convlora.tuner import ConvLoraConfig

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_images(folder: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_sam_dir) -> Path:
    """A trained-looking Conv-LoRA adapter folder (random non-identity weights) inside a run folder."""
    run = tmp_path_factory.mktemp("trust") / "run"
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(tiny_sam_dir), "conv_lora")
    config = ConvLoraConfig(r=2, num_experts=2, init_lora_weights=False)
    return export_trained(build_task_model(load_sam(tiny_sam_dir), task, config), task, run / "adapter")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# --- Folders convlora did not make are never replaced ---------------------------------------------------------


def test_predict_refuses_an_output_folder_holding_the_users_files_and_leaves_them(tmp_path, adapter, capsys):
    home = tmp_path / "home"
    images = write_images(home / "d80" / "images", 2)
    (home / "thesis.tex").write_text("years of work")
    before = snapshot(home)
    code, err = run_cli(["predict", "--model", str(adapter), "--images", str(images), "--output", str(home)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "--output" in err and str(home) in err
    assert snapshot(home) == before


def test_predict_refuses_an_output_that_contains_or_lies_inside_the_images(tmp_path, adapter, capsys):
    images = write_images(tmp_path / "data" / "images", 2)
    before = snapshot(tmp_path)
    for output, word in ((tmp_path / "data", "contains --images"), (images / "preds", "lies inside --images")):
        code, err = run_cli(
            ["predict", "--model", str(adapter), "--images", str(images), "--output", str(output)], capsys
        )
        assert code == 2 and word in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_merge_into_the_run_folder_holding_the_adapter_is_refused_and_the_run_survives(adapter, capsys):
    run = adapter.parent
    before = snapshot(run)
    code, err = run_cli(["merge", "--model", str(adapter), "--output", str(run)], capsys)
    assert code == 2 and "contains --model" in err and err.count("\n") == 1
    code, err = run_cli(["merge", "--model", str(adapter), "--output", str(adapter)], capsys)
    assert code == 2 and "is --model" in err
    assert snapshot(run) == before


def test_every_command_that_writes_a_folder_refuses_a_foreign_one(tmp_path, adapter, polyp_dir, tiny_sam_dir, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.json").write_text("{}")
    before = snapshot(foreign)
    commands = {
        "train": ["train", "--data", str(polyp_dir), "--model", str(tiny_sam_dir), "--output_dir", str(foreign)],
        "merge": ["merge", "--model", str(adapter), "--output", str(foreign)],
        "export": ["export", "--model", str(adapter), "--output", str(foreign)],
        "synth": ["synth", "polyp", str(foreign), "--train", "1", "--val", "1", "--test", "1", "--overwrite"],
        "predict": [
            "predict",
            "--model",
            str(adapter),
            "--images",
            str(polyp_dir / "test" / "images"),
            "--output",
            str(foreign),
        ],
    }
    for name, argv in commands.items():
        code, err = run_cli(argv, capsys)
        assert code == 2, name
        assert "convlora did not write" in err and str(foreign) in err, (name, err)
    assert snapshot(foreign) == before


def test_a_folder_convlora_wrote_is_replaced_but_one_of_another_kind_is_not(tmp_path, adapter, capsys):
    merged = tmp_path / "merged"
    for _ in range(2):  # the second merge replaces the first one's folder
        assert run_cli(["merge", "--model", str(adapter), "--output", str(merged)], capsys)[0] == 0
    assert folder_kind(merged) == "model"
    predictions = tmp_path / "preds"
    with atomic_dir(predictions, "predictions") as tmp:
        (tmp / "predictions.json").write_text("{}")
    before = snapshot(predictions)
    code, err = run_cli(["merge", "--model", str(adapter), "--output", str(predictions)], capsys)
    assert code == 2 and "holds a prediction folder, not a trained or merged model folder" in err
    assert snapshot(predictions) == before


def test_folders_written_before_markers_existed_are_recognised_by_what_they_hold(tmp_path):
    legacy = tmp_path / "old-predictions"
    (legacy / "masks").mkdir(parents=True)
    (legacy / "predictions.json").write_text("{}")
    assert folder_kind(legacy) == "predictions"
    check_owned(legacy, "predictions")
    (legacy / "holiday.jpg").write_bytes(b"\xff\xd8")  # one foreign file: no longer convlora's
    assert folder_kind(legacy) is None
    with pytest.raises(ValueError, match="holiday.jpg"):
        check_owned(legacy, "predictions")


def test_a_file_where_a_folder_should_go_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(ValueError, match="is a file"), atomic_dir(target, "model"):
        pass
    assert target.read_text() == "precious"


def test_stale_temporary_folders_of_dead_processes_on_this_host_are_removed_others_kept(tmp_path):
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.{host}-{dead_pid}-abc123.tmp"
    live = tmp_path / f".out.{host}-{os.getpid()}-def456.tmp"
    elsewhere = tmp_path / f".out.otherhost-{dead_pid}-ghi789.tmp"
    unrelated = tmp_path / ".out.notes.tmp"
    for folder in (stale, live, elsewhere, unrelated):
        (folder / "masks").mkdir(parents=True)
    assert remove_stale_temporaries(tmp_path / "out") == [stale]
    assert not stale.exists() and live.exists() and elsewhere.exists() and unrelated.exists()


# --- One process per run folder --------------------------------------------------------------------------------


def test_a_second_train_on_a_folder_in_use_is_refused_naming_the_holder_and_a_killed_holders_lock_is_stale(
    tmp_path, polyp_dir, tiny_sam_dir, capsys
):
    run = tmp_path / "run"
    args = ["train", "--data", str(polyp_dir), "--model", str(tiny_sam_dir), "--output_dir", str(run)]
    args += ["--batch_size", "4", "--overlay_samples", "0", "--no-progress"]
    # A real `convlora train` in another process, long enough to be still running when we start ours.
    first = subprocess.Popen(
        [sys.executable, "-m", "convlora", *args, "--epochs", "400"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "config.json").is_file():  # written once the run is set up, under the lock
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.2)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["command"] == "train"
        code, err = run_cli([*args, "--epochs", "1"], capsys)
        assert code == 2
        assert f"in use by another convlora train (pid {first.pid}" in err and err.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / LOCK_FILE).is_file()  # left by the kill: stale, since the kernel dropped its flock
    assert run_cli([*args, "--epochs", "1", "--resume", "latest"], capsys)[0] == 0
    assert not (run / LOCK_FILE).exists()  # released at the end
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError), owned_folder(tmp_path / "run", "run", "train"):
        raise RuntimeError("boom")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with (  # and can be taken again, by one at a time
        owned_folder(tmp_path / "run", "run", "train"),
        pytest.raises(ValueError, match="in use by another convlora train"),
        owned_folder(tmp_path / "run", "run", "train"),
    ):
        pass


# --- predict: written image by image, continued after a kill, bad images listed --------------------------------


def test_a_killed_predict_continues_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path, adapter):
    images = write_images(tmp_path / "images", 10, size=384)
    reference = predict_folder(adapter, images, tmp_path / "reference", tile=32)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "convlora", "predict", "--model", str(adapter), "--images", str(images)]
    child = subprocess.Popen(
        [*command, "--output", str(out), "--tile", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / PROGRESS_FILE).is_file() or len((out / PROGRESS_FILE).read_text().splitlines()) < 3:
        assert child.poll() is None, child.stderr.read()  # it must not finish before we kill it
        assert time.time() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    (out / "masks" / ".img09.png.x1y2z3.tmp").write_bytes(b"half a png")  # as a kill mid-write leaves
    done_before = len((out / PROGRESS_FILE).read_text().splitlines()) - 1
    assert 2 <= done_before < 10
    again = predict_folder(adapter, images, out, tile=32)
    assert again["count"] == 10 and again["reused"] >= done_before
    assert not list(out.rglob("*.tmp"))
    assert snapshot(out / "masks") == snapshot(tmp_path / "reference" / "masks")
    assert snapshot(out / "overlays") == snapshot(tmp_path / "reference" / "overlays")
    ours, theirs = (json.loads((folder / "predictions.json").read_text()) for folder in (out, tmp_path / "reference"))
    assert ours["images"] == theirs["images"] and reference["count"] == 10


def test_predict_with_another_model_or_settings_replaces_the_earlier_predictions(tmp_path, adapter):
    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    predict_folder(adapter, images, out)
    assert predict_folder(adapter, images, out)["reused"] == 3  # same settings: nothing to do again
    done = predict_folder(adapter, images, out, overlays=False)
    assert done["reused"] == 0 and not (out / "overlays").exists()


def test_a_bad_image_stops_predict_with_advice_that_works_and_skip_bad_lists_it(tmp_path, adapter, capsys):
    images = write_images(tmp_path / "images", 3)
    (images / "img01.png").write_bytes((images / "img01.png").read_bytes()[:200])  # truncated
    argv = ["predict", "--model", str(adapter), "--images", str(images), "--output", str(tmp_path / "out")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "img01.png" in err and "--skip-bad" in err and "--skip_bad" not in err
    code, err = run_cli([*argv, "--skip-bad"], capsys)
    assert code == 1 and "1 images were left out" in err and "img01.png" in err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["img00.png", "img02.png"]
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(entry["image"]).name for entry in record["bad"]] == ["img01.png"]


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            raise ValueError("data/img02.png is truncated (expected 4096 bytes of pixels)")
        return torch.zeros(1)


def test_an_error_raised_in_a_dataloader_worker_is_reported_in_one_line():
    with pytest.raises(ValueError) as caught:
        list(DataLoader(_Broken(), batch_size=1, num_workers=1))
    assert "Original Traceback" in str(caught.value)  # what PyTorch hands over
    assert error_text(caught.value) == "data/img02.png is truncated (expected 4096 bytes of pixels)"


# --- Prompts: bounded chunks, masks written as they come -------------------------------------------------------


def test_prompts_are_decoded_in_bounded_chunks_with_the_same_results(tiny_sam_dir):
    from convlora.data.prompts import Prompts
    from convlora.models.processing import preprocess

    model = load_sam(tiny_sam_dir)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 60, (50, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(4, 30, (50, 2))], axis=1).astype(np.float32)
    prompts = Prompts(boxes=boxes)
    pixel_values, info = preprocess(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8), 64)
    chunks = list(iter_predict_prompts(model, pixel_values, info, prompts, max_chunk=8))
    assert [len(logits) for logits, _ in chunks] == [8] * 6 + [2]
    logits, scores = predict_prompts(model, pixel_values, info, prompts)  # 50 at once
    assert not logits.requires_grad  # no autograd graph kept for thousands of prompts
    chunked = torch.cat([c for c, _ in chunks])
    torch.testing.assert_close(chunked, logits, atol=1e-5, rtol=1e-5)  # only the batch size differs
    torch.testing.assert_close(torch.cat([s for _, s in chunks]), scores, atol=1e-5, rtol=1e-5)


_MEMORY_PROBE = """
import json, resource, sys
import numpy as np
from PIL import Image
from convlora.inference import predict_folder
count, folder, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rng = np.random.default_rng(0)
corners = rng.uniform(0, 400, (count, 2))
boxes = np.concatenate([corners, corners + rng.uniform(8, 100, (count, 2))], axis=1).round(1).tolist()
json.dump({"a.png": {"boxes": boxes}}, open(folder + "/prompts.json", "w"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
predict_folder(model, folder + "/images", folder + "/out", prompts=folder + "/prompts.json", overlays=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_predict_memory_does_not_grow_with_the_number_of_prompts(tmp_path, tiny_sam_dir):
    """Holding every mask of 1,500 boxes on a 512-px image would take > 3 GB; chunked it is flat."""
    growth = {}
    for count in (20, 1500):
        folder = tmp_path / str(count)
        (folder / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(folder / "images" / "a.png")
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(count), str(folder), str(tiny_sam_dir)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
        )  # fmt: skip
        growth[count] = float(done.stdout.split()[-1])
        assert len(list((folder / "out" / "masks").iterdir())) == count
    assert growth[1500] - growth[20] < 300, growth  # MiB of peak resident memory


def test_single_json_outputs_replace_earlier_results_but_never_other_files(tmp_path, polyp_dir, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not json")
    code, err = run_cli(["inspect", str(polyp_dir), "--json", str(notes)], capsys)
    assert code == 2 and "not a JSON file convlora wrote" in err and notes.read_text() == "not json"
    report = tmp_path / "report.json"
    report.write_text("{}")
    assert run_cli(["inspect", str(polyp_dir), "--json", str(report)], capsys)[0] == 0
    assert json.loads(report.read_text())["source"] == str(polyp_dir)


@pytest.mark.slow
def test_a_refused_run_folder_stops_every_process_of_a_multi_process_run(tmp_path, polyp_dir, tiny_sam_dir):
    """Only the main process takes the lock; the refusal reaches the others, so none waits forever."""
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "convlora", "train"]
    args = ["--data", str(polyp_dir), "--model", str(tiny_sam_dir), "--output_dir", str(run), "--no-progress"]
    with owned_folder(run, "run", "train"):  # another run holds the folder
        done = subprocess.run(
            [*launch, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    assert done.returncode != 0
    assert f"in use by another convlora train (pid {os.getpid()}" in done.stderr
    assert not (run / "config.json").exists()


def test_a_run_folder_of_an_earlier_version_is_recognised_so_demo_and_resume_still_work(tmp_path):
    """Written before markers existed: what `convlora demo` left (run files and the example's comparison)."""
    run = tmp_path / "runs" / "demo"
    for name in ("checkpoints", "adapter", "logs"):
        (run / name).mkdir(parents=True)
    for name in ("config.json", "metrics.json", "comparison.json", "curves.png", "val_overlays.png"):
        (run / name).write_text("{}")
    assert folder_kind(run) == "run"
    check_owned(run, "run")
    (run / "my_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="my_notes.txt"):
        check_owned(run, "run")


def test_predict_in_batches_writes_the_same_masks_in_the_same_order_as_one_by_one(tmp_path, adapter):
    images = write_images(tmp_path / "images", 7)
    predict_folder(adapter, images, tmp_path / "one", batch_size=1)
    predict_folder(adapter, images, tmp_path / "batched", batch_size=4)
    assert snapshot(tmp_path / "one" / "masks") == snapshot(tmp_path / "batched" / "masks")
    one, batched = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("one", "batched"))
    assert (
        [r["image"] for r in batched["images"]]
        == [r["image"] for r in one["images"]]
        == sorted(str(p) for p in images.iterdir())
    )


def test_a_write_that_fails_in_the_background_stops_predict_and_lists_only_finished_images(
    tmp_path, adapter, monkeypatch
):
    import convlora.inference as inference

    images = write_images(tmp_path / "images", 6)
    real, written = inference.save_mask_png, []

    def full_disk_after_three(mask, path, binary=False):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(mask, path, binary=binary)

    monkeypatch.setattr(inference, "save_mask_png", full_disk_after_three)
    with pytest.raises(OSError, match="No space left"):
        predict_folder(adapter, images, tmp_path / "out", batch_size=2)
    listed = (tmp_path / "out" / PROGRESS_FILE).read_text().splitlines()[1:]
    assert len(listed) == 3 and not list((tmp_path / "out").rglob("*.tmp"))
    monkeypatch.setattr(inference, "save_mask_png", real)
    assert predict_folder(adapter, images, tmp_path / "out", batch_size=2)["reused"] == 3  # and it continues
