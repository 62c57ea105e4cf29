"""ConvLoraConfig: defaults, derived fields, validation with clear errors, safe loading of saved configs; TrainConfig's
typed nested settings, its one type checker, and the settings a user gave."""

import dataclasses
import json
import re

import pytest
from peft import PeftConfig

from convlora import ConvLoraConfig


def test_defaults_follow_the_paper_reference_setup():
    config = ConvLoraConfig()
    assert (config.r, config.lora_alpha, config.num_experts, config.top_k) == (3, 32, 8, 1)
    assert config.expert_scales == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert (config.aux_loss_weight, config.expert_conv, config.interpolation) == (0.01, "full", "bicubic")
    assert config.modules_to_save == ["mask_decoder"]
    assert config.scaling == pytest.approx(32 / 3)


def test_target_presets_and_layer_subsets_resolve_to_an_anchored_regex():
    config = ConvLoraConfig(target_preset="attention_mlp", layers=[3, 1])
    assert config.layers == [1, 3]
    pattern = config.target_modules
    assert re.fullmatch(pattern, "vision_encoder.layers.3.mlp.lin2")
    assert re.fullmatch(pattern, "vision_encoder.layers.1.attn.proj")
    assert not re.fullmatch(pattern, "vision_encoder.layers.2.attn.qkv")
    assert not re.fullmatch(pattern, "mask_decoder.transformer.layers.1.mlp.lin1")


BAD = [
    ({"r": 0}, "r must be >= 1"),
    ({"r": 2.5}, "r must be an integer"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"num_experts": 0}, "num_experts must be >= 1"),
    ({"top_k": 3, "num_experts": 2}, r"top_k \(3\) cannot exceed num_experts \(2\)"),
    ({"expert_scales": [1, 2]}, "expert_scales has 2 entries but num_experts is 8"),
    ({"num_experts": 2, "expert_scales": [1, -2]}, "expert_scales must all be > 0"),
    ({"num_experts": 2, "expert_scales": "12"}, "expert_scales must be a list of numbers"),
    ({"expert_conv": "grouped"}, "expert_conv must be 'full' or 'depthwise'"),
    ({"interpolation": "area"}, "interpolation must be one of"),
    ({"aux_loss_weight": -1}, "aux_loss_weight must be >= 0"),
    ({"weighted_combine": "yes"}, "weighted_combine must be true or false"),
    ({"target_preset": "everything"}, "Unknown target_preset 'everything'"),
    ({"layers": [-1]}, "layers must be a list of non-negative layer indices"),
    ({"target_modules": ["qkv"], "target_preset": "qkv"}, "either target_modules or target_preset"),
    ({"target_parameters": ["weight"]}, "target_parameters is not supported"),
    ({"format_version": 99}, "newer convlora"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_impossible_values_are_refused_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvLoraConfig(**kwargs)


def test_a_saved_config_round_trips(tmp_path):
    config = ConvLoraConfig(r=4, num_experts=3, expert_conv="depthwise", layers=[0])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ConvLoraConfig)
    assert loaded.to_dict() == config.to_dict()


def test_a_saved_config_with_unknown_fields_is_refused_not_silently_trimmed(tmp_path):
    ConvLoraConfig().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["expert_dilation"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown fields \['expert_dilation'\]"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not know: \['expert_dilation'\]"):
        ConvLoraConfig.from_pretrained(tmp_path)


def test_a_typo_in_a_field_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown fields \['num_expert'\]"):
        ConvLoraConfig(num_expert=4)


def test_a_config_from_a_newer_format_is_refused(tmp_path):
    ConvLoraConfig().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version=2 by a newer convlora"):
        PeftConfig.from_pretrained(tmp_path)


# --- TrainConfig: typed nested settings, one checker, the settings a user gave ------------------------------------


def test_adapter_settings_are_convlora_config_fields_of_the_same_types_unset_by_default():
    from typing import Optional, get_type_hints

    from convlora.training.config import AdapterSettings

    ours, theirs = get_type_hints(AdapterSettings), get_type_hints(ConvLoraConfig)
    assert {name: Optional[theirs[name]] for name in ours} == ours  # noqa: UP045 (Optional of a union)
    # every field of Conv-LoRA's own is a setting of a run, but the saved-file version and the unsupported one
    own = {f.name for f in dataclasses.fields(ConvLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own - set(ours) == {"format_version", "target_parameters"}
    assert AdapterSettings().to_dict() == {} and AdapterSettings().build().to_dict() == ConvLoraConfig().to_dict()


def test_nested_settings_from_toml_json_and_dot_keys_are_typed_dataclasses(tmp_path):
    pytest.importorskip("tomllib")
    from convlora.data import AugmentConfig
    from convlora.data.prompts import PromptConfig
    from convlora.training.config import AdapterSettings, load_config

    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\nprompt = "box"\n[conv_lora]\nr = 2\nlayers = [0]\n[augment]\nscale = [0.8, 1]\n')
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"data": "d", "prompt": "box", "conv_lora": {"r": 2}, "augment": {"hflip": 0}}))
    from_toml = load_config(toml, ["--prompting.max_objects", "4", "--conv_lora.lora_alpha", "16"])
    assert from_toml.conv_lora == AdapterSettings(r=2, layers=[0], lora_alpha=16.0)
    assert from_toml.augment == AugmentConfig(scale=(0.8, 1.0)) and isinstance(from_toml.augment.scale[1], float)
    assert from_toml.prompting == PromptConfig(kind="box", max_objects=4)
    from_json = load_config(json_file, ["--augment.scale", "0.5,1.5"])
    assert from_json.augment == AugmentConfig(hflip=0.0, scale=(0.5, 1.5)) and from_json.conv_lora.build().r == 2


def test_to_dict_keeps_nested_mappings_and_round_trips_through_json():
    from convlora.training.config import TrainConfig

    config = TrainConfig(data="d", prompt="box", conv_lora={"r": 2}, augment={"scale": [0.5, 1.5]}, channels="0,2")
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["conv_lora"] == {"r": 2} and saved["augment"]["scale"] == [0.5, 1.5]
    assert "kind" not in saved["prompting"] and saved["prompting"]["max_objects"] == 8 and saved["channels"] == [0, 2]
    assert TrainConfig.from_dict(saved) == config


def test_the_prompt_field_sets_the_prompt_kind_also_after_replace():
    from convlora.data.prompts import PromptConfig
    from convlora.training.config import TrainConfig

    config = TrainConfig(data="d", prompt="box", prompting=PromptConfig(max_objects=2))
    assert (config.prompting.kind, config.prompting.max_objects) == ("box", 2)
    assert dataclasses.replace(config, prompt="point").prompting.kind == "point"


def test_text_stays_text_where_the_type_allows_it_and_becomes_a_list_where_it_does_not():
    from convlora.training.config import load_config

    regex = load_config(overrides=["--data", "d", "--conv_lora.target_modules", r"layers\.[0-2]{1,2}\.attn\.qkv"])
    assert regex.conv_lora.target_modules == r"layers\.[0-2]{1,2}\.attn\.qkv"
    assert load_config(overrides=["--data", "d", "--conv_lora.layers", "0,2"]).conv_lora.layers == [0, 2]
    assert load_config(overrides=["--data", "d", "--channels", "1"]).channels == [1]


BAD_NESTED = [
    (["--augment.hflip", "often"], r"augment: hflip must be a number, got 'often'"),
    (["--augment.scale", "[1]"], r"augment: scale must be a list of 2 values, got \[1\]"),
    (["--augment.vflip", "2"], r"augment: vflip is a probability"),
    (["--conv_lora.layers", "a,b"], r"conv_lora: layers must be a list such as 0,2 or null, got 'a,b'"),
    (["--conv_lora.noisy_gating", "1"], r"conv_lora: noisy_gating must be true or false or null, got 1"),
    (["--conv_lora", "4"], r"conv_lora must be a mapping of AdapterSettings fields, got 4"),
    (["--prompt", "box", "--prompting.max_objects", "2.5"], r"prompting: max_objects must be an integer, got 2\.5"),
    (["--prompt", "box", "--prompting.kind", "point"], r"prompting\.kind: choose the prompt kind with prompt"),
    (["--prompting.seed", "3"], r"prompting settings \['seed'\] need a prompt kind"),
    (["--intensity_range", "0,Infinity"], r"intensity_range must be a list such as 0,2 or null"),
    (["--conv_lora.r", "true"], r"conv_lora: r must be an integer or null, got True"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_NESTED, ids=[" ".join(s) for s, _ in BAD_NESTED])
def test_a_bad_nested_value_is_refused_naming_its_section_and_key(settings, message):
    from convlora.training.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(overrides=["--data", "d", *settings])


def test_an_unknown_nested_key_names_its_dotted_key_and_the_file(tmp_path):
    from convlora.training.config import load_config

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "d", "conv_lora": {"rank": 4}}))
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: unknown keys ['conv_lora.rank']; known keys of conv_lora")
    ):
        load_config(path)
    with pytest.raises(ValueError, match=re.escape("keyword fields: unknown keys ['augment.flip']")):
        load_config(data="d", augment={"flip": 1})


# RUN/config.json as the version with mapping-typed nested settings wrote it: only the nested keys given
EARLIER_CONFIG_JSON = {
    "data": "d", "val_data": None, "test_data": None, "mode": "auto", "num_classes": None, "val_fraction": 0.2,
    "skip_bad": False, "intensity": "percentile", "intensity_range": None, "channels": None, "mask_reading": "auto",
    "augment": {"scale": [0.8, 1.2]}, "num_workers": 0, "model": "convlora-tiny", "image_size": None,
    "init_adapter": None, "method": "conv_lora", "conv_lora": {"r": 2, "num_experts": 2}, "freeze_iou_head": True,
    "prompt": "box", "prompting": {"max_objects": 4}, "loss": None, "batch_size": 2, "grad_accum": 1, "lr": 0.002,
    "weight_decay": 0.0001, "grad_clip": 1.0, "mixed_precision": None, "gradient_checkpointing": False, "seed": 0,
    "epochs": 30, "max_steps": None, "warmup_ratio": 0.05, "metric": None, "early_stopping_patience": None,
    "eval_every_epochs": 1, "output_dir": "runs/a", "resume": None, "save_every_steps": 0, "keep_checkpoints": 2,
    "log_every_steps": 10, "overlay_samples": 8,
}  # fmt: skip


def test_a_run_saved_with_mapping_settings_resumes_with_its_nested_values():
    from convlora.training.config import AdapterSettings, load_config_given, resume_config

    config, given = load_config_given(overrides=["--data", "d", "--resume", "latest", "--augment.hflip", "0"])
    assert given == {"data", "resume", "augment.hflip"}
    resumed, notes = resume_config(EARLIER_CONFIG_JSON, config, given)
    assert resumed.conv_lora == AdapterSettings(r=2, num_experts=2) and resumed.augment.scale == (0.8, 1.2)
    assert (resumed.prompting.kind, resumed.prompting.max_objects, resumed.epochs) == ("box", 4, 30)
    assert resumed.resume == "latest" and notes == ["augment.hflip: 0.5 -> 0.0"]


def test_without_the_given_keys_a_config_counts_as_given_in_full():
    from convlora.training.config import load_config, resume_config

    config = load_config(overrides=["--data", "d", "--prompt", "box", "--batch_size", "2", "--conv_lora.r", "2"])
    with pytest.raises(ValueError, match=r"conv_lora\.num_experts: 2 -> 8") as refused:
        resume_config(EARLIER_CONFIG_JSON, config)
    assert "prompting.max_objects: 4 -> 8" in str(refused.value) and "conv_lora.r" not in str(refused.value)
