"""ConvLoraConfig: defaults, derived fields, validation with clear errors, safe loading of saved configs."""

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
