"""A CLI that explains itself and defaults that do what a user expects: help from the config's field metadata,
defaults by model size, resumes that name what they change, and progress output fit for logs."""

import contextlib
import dataclasses
import io
import json
import re

import pytest
import torch

from convlora.cli import build_parser, config_overrides, main
from convlora.data import AugmentConfig
from convlora.training.config import (
    GROUPS,
    AdapterSettings,
    TrainConfig,
    apply_resumed_settings,
    load_config,
    load_config_given,
    resolve_defaults,
    resume_config,
    resume_differences,
)
from convlora.training.progress import Progress, quiet_library_bars

FIELDS = dataclasses.fields(TrainConfig)


def train_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    return out.getvalue()


def parse_train(argv: list[str]) -> TrainConfig:
    args, extra = build_parser().parse_known_args(["train", *argv])
    return load_config(args.config, config_overrides(args) + extra)


# ------------------------------------------------------------------------------------------------ help


def test_every_field_has_one_line_of_help_and_a_known_group():
    for f in FIELDS:
        assert f.metadata.get("group") in GROUPS, f.name
        text = f.metadata.get("help", "")
        assert text and "\n" not in text and len(text) < 250, f.name
        assert f.metadata.get("resume") in ("apply", "refuse", "ignore"), f.name


def test_train_help_lists_every_field_with_its_type_default_and_help_grouped_in_order():
    text = train_help()
    flat = " ".join(text.split())
    positions = [text.index(f"\n{group} settings:\n") for group in GROUPS]
    assert positions == sorted(positions)
    for f in FIELDS:
        match = re.search(rf"^  --{f.name} (\S+)", text, re.M)
        assert match, f"--{f.name} missing from convlora train --help"
        assert " ".join(f.metadata["help"].split()) in flat, f.name
        section = text[: match.start()].rsplit(" settings:\n", 1)[0].rsplit("\n", 1)[-1]
        assert section == f.metadata["group"], f.name
    assert re.search(r"--lr NUMBER +Peak learning rate", text)
    assert re.search(r"--epochs INT +Passes over the training set\. \(default: 10\)", text)
    assert "--mode {auto,binary,multiclass,instances}" in text and "--conv_lora JSON" in text
    assert "(default: unset)" in flat and "(default: true)" in flat and "(required)" in flat


def test_field_options_reach_the_config_with_nested_keys_and_beat_the_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "from_file", "lr": 1e-3, "epochs": 7}))
    config = parse_train(
        ["--config", str(path), "--lr", "3e-4", "--conv_lora.r", "4", "--augment.hflip", "0", "--mode=binary"]
    )
    assert (config.data, config.lr, config.epochs, config.mode) == ("from_file", 3e-4, 7, "binary")
    assert config.conv_lora == AdapterSettings(r=4) and config.augment == AugmentConfig(hflip=0)


def test_an_abbreviated_or_unknown_key_is_refused_not_guessed():
    with pytest.raises(ValueError, match=r"unknown keys \['epoch'\]"):
        parse_train(["--data", "d", "--epoch", "3"])


def test_choices_declared_in_the_metadata_are_validated():
    modes = r"\['auto', 'binary', 'multiclass', 'instances'\]"
    with pytest.raises(ValueError, match=rf"mode must be one of {modes}, got 'bin'"):
        parse_train(["--data", "d", "--mode", "bin"])
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        parse_train(["--data", "d", "--mixed_precision", "fp8"])


def test_init_adapter_is_a_model_setting_and_refused_for_a_full_fine_tune():
    assert parse_train(["--data", "d", "--init_adapter", "runs/x/adapter"]).init_adapter == "runs/x/adapter"
    with pytest.raises(ValueError, match="init_adapter does not apply to method 'full'"):
        parse_train(["--data", "d", "--method", "full", "--init_adapter", "runs/x/adapter"])


# -------------------------------------------------------------------------------------------- defaults


def test_the_learning_rate_follows_the_size_of_the_embedded_base():
    from convlora.models import load_sam

    config, notes = resolve_defaults(load_config(data="d"), load_sam("convlora-tiny"))
    assert config.lr == 2e-3
    assert any(
        note.startswith("lr = 0.002: the default for a small base model (convlora-tiny has 0.75M") for note in notes
    )


def test_a_vit_b_sized_base_gets_the_papers_learning_rate():
    from transformers import SamModel

    from convlora.models import sam_config

    with torch.device("meta"):
        vit_b = SamModel(sam_config("vit-b"))
    config, notes = resolve_defaults(load_config(data="d", model="facebook/sam-vit-base"), vit_b)
    assert config.lr == 1e-4
    assert "93.74M parameters" in notes[0]


def test_an_explicit_learning_rate_wins_over_the_size_class(make_sam):
    config, notes = resolve_defaults(load_config(overrides=["--data", "d", "--lr", "5e-5"]), make_sam())
    assert config.lr == 5e-5 and notes == ["lr = 5e-05 (as set)"]


# --------------------------------------------------------------------------------------------- resumes


def saved_run(**fields) -> dict:
    return TrainConfig(**{"data": "d", "lr": 1e-3, "output_dir": "runs/a", **fields}).to_dict()


def test_a_resume_names_every_setting_it_changes():
    saved = saved_run(epochs=5)
    changed = TrainConfig(data="d", lr=2e-4, epochs=8, max_steps=50, grad_clip=0.5, output_dir="runs/a")
    assert resume_differences(saved, changed) == [
        "lr: 0.001 -> 0.0002",
        "grad_clip: 1.0 -> 0.5",
        "epochs: 5 -> 8",
        "max_steps: None -> 50",
    ]
    assert resume_differences(saved, TrainConfig(**{**saved, "resume": "latest"})) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": "facebook/sam-vit-base"}, "model: 'convlora-tiny' -> 'facebook/sam-vit-base'"),
        ({"method": "lora"}, "method: 'conv_lora' -> 'lora'"),
        ({"data": "other"}, "data: 'd' -> 'other'"),
        ({"mode": "binary"}, "mode: 'auto' -> 'binary'"),
        ({"conv_lora": {"r": 8}}, "conv_lora.r: 3 -> 8"),
        ({"batch_size": 2}, "batch_size: 4 -> 2"),
        ({"seed": 1}, "seed: 0 -> 1"),
    ],
)
def test_a_resume_that_would_change_what_the_checkpoint_means_is_refused(change, named):
    saved = saved_run()
    with pytest.raises(ValueError, match=re.escape(named)):
        resume_differences(saved, TrainConfig(**{**saved, **change}))


def test_every_refused_difference_is_named_at_once():
    saved = saved_run()
    with pytest.raises(ValueError) as error:
        resume_differences(saved, TrainConfig(**{**saved, "model": "m", "method": "lora", "lr": 5e-4}))
    assert "model:" in str(error.value) and "method:" in str(error.value) and "lr:" not in str(error.value)


def test_equivalent_nested_settings_and_fields_the_checkpoint_predates_are_no_difference():
    saved = saved_run(conv_lora={}, augment={"scale": [1.0, 1.0]})
    del saved["init_adapter"]  # a run saved before the field existed
    same = TrainConfig(**{**saved, "conv_lora": {"r": 3, "num_experts": 8}, "augment": {"hflip": 0.5}})
    assert resume_differences(saved, same) == []


def test_a_resume_keeps_the_saved_values_of_settings_not_given_again():
    saved = saved_run(epochs=30, batch_size=2, conv_lora={"r": 4})
    given = load_config_given(overrides=["--data", "d", "--resume", "latest", "--lr", "3e-4"])
    config, notes = resume_config(saved, *given)
    assert (config.epochs, config.batch_size, config.conv_lora, config.lr) == (30, 2, AdapterSettings(r=4), 3e-4)
    assert config.resume == "latest" and notes == ["lr: 0.001 -> 0.0003"]
    nested = load_config_given(overrides=["--data", "d", "--conv_lora.r", "4", "--augment.hflip", "0.25"])
    config, notes = resume_config(saved_run(conv_lora={"r": 4, "num_experts": 4}), *nested)
    assert config.conv_lora == AdapterSettings(r=4, num_experts=4) and notes == ["augment.hflip: 0.5 -> 0.25"]


def test_a_config_built_in_python_counts_as_given_except_for_values_resolved_by_size():
    saved = saved_run(epochs=30)
    config, notes = resume_config(saved, TrainConfig(data="d", output_dir="runs/a", resume="latest"))
    assert (config.epochs, config.lr) == (10, 1e-3) and notes == ["epochs: 30 -> 10"]


def test_a_resumed_optimizer_and_schedule_take_the_new_learning_rate():
    from transformers import get_cosine_schedule_with_warmup

    def make(lr: float, total: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=lr, weight_decay=0.1)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, 0, total)

    old_opt, old_sched = make(1e-3, 10)
    for _ in range(4):
        old_opt.step()
        old_sched.step()
    new_opt, new_sched = make(2e-4, 20)
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    assert new_opt.param_groups[0]["lr"] != pytest.approx(2e-4 * new_sched.lr_lambdas[0](4))  # the trap
    apply_resumed_settings(new_opt, new_sched, TrainConfig(data="d", lr=2e-4, weight_decay=0.01))
    expected = 2e-4 * new_sched.lr_lambdas[0](4)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert new_opt.param_groups[0]["weight_decay"] == 0.01
    new_sched.step()
    assert new_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * new_sched.lr_lambdas[0](5))


# -------------------------------------------------------------------------------------------- progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_one_plain_line_every_log_interval():
    out = io.StringIO()
    progress = Progress(total=25, initial=0, every=10, stream=out)
    for step in range(25):
        progress.update({"loss": 1.0 / (step + 1), "task": 0.0}, lr=2e-3, img_s=16.0)
        if step == 12:
            progress.write("epoch 0: iou=0.5000")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("  ")[0] for line in lines] == [
        "train step 10/25 (40%)",
        "epoch 0: iou=0.5000",
        "train step 20/25 (80%)",
        "train step 25/25 (100%)",
    ]
    assert "loss 0.1000  lr 2.00e-03  img_s 16.0" in lines[0]


def test_a_resumed_run_counts_from_its_step_and_a_disabled_one_prints_only_messages():
    out = io.StringIO()
    progress = Progress(total=30, initial=20, every=10, stream=out)
    for _ in range(10):
        progress.update({"loss": 0.5})
    progress.close()
    assert out.getvalue().splitlines()[0].startswith("train step 30/30 (100%)  loss 0.5000")
    quiet = io.StringIO()
    silent = Progress(total=5, enabled=False, every=1, stream=quiet)
    silent.update({"loss": 0.5})
    silent.write("hello")
    silent.close()
    assert quiet.getvalue() == "hello\n"


def test_on_a_terminal_progress_is_a_redrawn_bar():
    out = FakeTerminal()
    progress = Progress(total=25, every=10, stream=out)
    for _ in range(25):
        progress.update({"loss": 0.25}, lr=1e-3, img_s=4.0)
    progress.write("a message")
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "25/25" in text and "loss=0.2500" in text
    assert "train step" not in text
    assert "a message\n" in text


def test_library_progress_bars_are_turned_off_only_without_a_terminal():
    import transformers

    transformers.utils.logging.enable_progress_bar()  # an earlier CLI run in this process may have turned them off
    assert quiet_library_bars((FakeTerminal(), FakeTerminal())) is False
    assert transformers.utils.logging.is_progress_bar_enabled()
    try:
        assert quiet_library_bars((FakeTerminal(), io.StringIO())) is True
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        import huggingface_hub.utils

        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
