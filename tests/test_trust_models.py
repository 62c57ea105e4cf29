"""Models that do not silently differ: what convlora saves, loads or adapts is the model the user expects.

- ``merge_and_unload()`` + the ordinary ``save_pretrained`` keep Conv-LoRA's conv side branches (convlora's
  layout; stock transformers refuses it) instead of writing a checkpoint that loads as another model.
- Loading and adapting leave the base's behaviour alone on every family; SAM 2's / SAM 3's single mask
  token is a task setting, recorded in the task file and applied by ``load_trained``.
- Adapting a model that already has adapters is refused, never reset; ``add_weighted_adapter`` says why not.
"""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import SamModel

from convlora import ConvLoraConfig, Segmenter, apply_conv_lora, load_sam
from convlora.artifact import TASK_FILE, TaskInfo, export_trained, load_trained
from convlora.artifact.methods import METHODS
from convlora.models import apply_lora, install_class_decoder, random_sam, tiny_sam_config
from convlora.models.family import find_sam, model_class, prepare_model, segmentation_logits
from convlora.models.merged_io import MERGED_WEIGHTS_NAME
from convlora.models.sam2 import tiny_sam2_config
from convlora.models.sam3 import tiny_sam3_config
from convlora.tuner.merged import ConvLoraMergedLinear


def tiny_sam_hq_config():
    from transformers import SamHQConfig

    parts = {
        key: {k: v for k, v in value.items() if k != "model_type"}
        for key, value in tiny_sam_config().to_dict().items()
        if key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    }
    parts["mask_decoder_config"]["vit_dim"] = 32  # the HQ decoder reads the encoder's first global block
    return SamHQConfig(**parts)


# family -> (config builder, input size)
FAMILIES = {
    "sam": (tiny_sam_config, 64),
    "sam_hq": (tiny_sam_hq_config, 64),
    "sam2": (lambda: tiny_sam2_config(image_size=128), 128),
    "sam3": (tiny_sam3_config, 224),
}
ADAPTER = {"r": 2, "lora_alpha": 4, "num_experts": 2, "target_preset": "attention_mlp", "layers": [0, 1]}


def images(family: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[family][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return segmentation_logits(model.eval(), pixel_values)


def stock_base(family: str):
    """The random tiny SAM as stock transformers builds it: its own class and a fresh config, no convlora call."""
    config = FAMILIES[family][0]()
    model = model_class(config.model_type, "test")(config)
    model.load_state_dict(random_sam(FAMILIES[family][0](), seed=0).state_dict())
    return model.eval()


def trained_adapter(family: str, folder, **settings) -> None:
    """Save a Conv-LoRA adapter that is far from identity: random B and gates, a mask decoder moved off the base."""
    torch.manual_seed(0)
    model = apply_conv_lora(random_sam(FAMILIES[family][0](), seed=0), ConvLoraConfig(**ADAPTER, **settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(folder))


def merged_conv_lora():
    """A merged Conv-LoRA SAM whose side branches change the masks (checked)."""
    model = apply_conv_lora(random_sam(tiny_sam_config(), seed=0), ConvLoraConfig(**ADAPTER, init_lora_weights=False))
    merged = model.merge_and_unload().eval()
    folded_only = copy.deepcopy(merged)
    for layer in folded_only.modules():
        if isinstance(layer, ConvLoraMergedLinear):
            layer.side_branches.clear()
    assert not torch.equal(logits(folded_only, images("sam")), logits(merged, images("sam")))
    return merged


# --- merge_and_unload() + save_pretrained() ---------------------------------------------------------------------


def test_save_pretrained_of_a_merged_conv_lora_model_reloads_exactly_and_stock_transformers_refuses_it(tmp_path):
    merged = merged_conv_lora()
    expected = logits(merged, images("sam"))
    merged.save_pretrained(tmp_path / "merged")
    names = {path.name for path in (tmp_path / "merged").iterdir()}
    assert MERGED_WEIGHTS_NAME in names and "model.safetensors" not in names
    assert "convlora_merged" in json.loads((tmp_path / "merged" / "config.json").read_text())
    restored = load_sam(tmp_path / "merged")
    assert torch.equal(logits(restored, images("sam")), expected)
    with pytest.raises(OSError, match="model.safetensors"):
        SamModel.from_pretrained(tmp_path / "merged")
    restored.save_pretrained(tmp_path / "again")  # what load_sam gives saves the same way
    assert torch.equal(logits(load_sam(tmp_path / "again"), images("sam")), expected)


def test_the_merged_save_follows_deepcopy_to_and_eval_and_refuses_options_it_cannot_honour(tmp_path):
    merged = merged_conv_lora()
    copied = copy.deepcopy(merged).to("cpu").eval()
    with torch.no_grad():
        next(layer for layer in copied.modules() if isinstance(layer, ConvLoraMergedLinear)).bias.add_(0.5)
    copied.save_pretrained(tmp_path / "copy")
    assert torch.equal(logits(load_sam(tmp_path / "copy"), images("sam")), logits(copied, images("sam")))
    assert not torch.equal(logits(copied, images("sam")), logits(merged, images("sam")))
    for option in ({"push_to_hub": True}, {"max_shard_size": "1GB"}, {"state_dict": merged.state_dict()}):
        with pytest.raises(ValueError, match=rf"save_pretrained\({next(iter(option))}=.*convlora\.save_merged"):
            merged.save_pretrained(tmp_path / "refused", **option)
    merged.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "other_rank").exists()


def test_a_merged_plain_lora_model_still_saves_a_vanilla_transformers_checkpoint(tmp_path):
    lora = apply_lora(random_sam(tiny_sam_config(), seed=0), ConvLoraConfig(**ADAPTER, init_lora_weights=False))
    merged = lora.merge_and_unload().eval()
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert torch.equal(
        logits(SamModel.from_pretrained(tmp_path / "merged"), images("sam")), logits(merged, images("sam"))
    )


def test_save_pretrained_of_a_class_decoder_model_keeps_its_class_tokens(tmp_path):
    base = install_class_decoder(random_sam(tiny_sam_config(), seed=0), num_classes=3)
    merged = apply_lora(base, ConvLoraConfig(**ADAPTER, init_lora_weights=False)).merge_and_unload().eval()
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_sam(tmp_path / "merged"), images("sam")), logits(merged, images("sam")))
    with pytest.raises(OSError, match="model.safetensors"):
        SamModel.from_pretrained(tmp_path / "merged")


# --- the base model's behaviour is left alone ---------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loading_and_a_fresh_adapter_leave_the_base_models_outputs_untouched(family, tmp_path):
    vanilla = stock_base(family)
    expected = logits(vanilla, images(family))
    vanilla.save_pretrained(tmp_path / "base")
    assert torch.equal(logits(load_sam(tmp_path / "base"), images(family)), expected)
    base = random_sam(FAMILIES[family][0](), seed=0)
    assert torch.equal(logits(base, images(family)), expected)
    model = apply_conv_lora(base, ConvLoraConfig(**ADAPTER)).eval()
    assert torch.equal(logits(model, images(family)), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, images(family)), expected)
    decoder = find_sam(model).mask_decoder
    assert getattr(decoder, "dynamic_multimask_via_stability", True) is True  # SAM 2 / 3 keep transformers' setting


@pytest.mark.parametrize("family", ["sam2", "sam3"])
def test_stock_peft_transformers_load_adapter_and_convlora_load_a_saved_adapter_alike(family, tmp_path):
    trained_adapter(family, tmp_path / "adapter", init_lora_weights=False)
    stock_base(family).save_pretrained(tmp_path / "base")
    stock = logits(PeftModel.from_pretrained(stock_base(family), str(tmp_path / "adapter")), images(family))
    assert not torch.equal(stock, logits(stock_base(family), images(family)))
    integrated = stock_base(family)
    integrated.load_adapter(str(tmp_path / "adapter"))  # transformers' own PEFT integration
    assert torch.equal(logits(integrated, images(family)), stock)
    ours = METHODS["conv_lora"].load(load_sam(tmp_path / "base"), tmp_path / "adapter", "base")
    assert torch.equal(logits(ours, images(family)), stock)
    # convlora's evaluation setting, reproduced on the stock loader with the documented helper
    single = prepare_model(PeftModel.from_pretrained(stock_base(family), str(tmp_path / "adapter")))
    assert torch.equal(logits(single, images(family)), logits(prepare_model(ours), images(family)))
    assert not torch.equal(logits(single, images(family)), stock)


def test_load_trained_applies_the_single_mask_token_its_task_file_records(tmp_path):
    family = "sam2"
    trained_adapter(family, tmp_path / "adapter", init_lora_weights=False)
    stock_base(family).save_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(stock_base(family), str(tmp_path / "adapter"))
    task = TaskInfo("binary", 2, ["background", "object"], 128, str(tmp_path / "base"), "conv_lora")
    export_trained(model, task, tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / TASK_FILE).read_text())
    assert recorded["single_mask_token"] is True
    single = logits(
        prepare_model(PeftModel.from_pretrained(stock_base(family), str(tmp_path / "adapter"))), images(family)
    )
    loaded, loaded_task = load_trained(tmp_path / "run")
    assert loaded_task.single_mask_token is True
    assert torch.equal(logits(loaded, images(family)), single)
    assert torch.equal(logits(Segmenter.from_pretrained(tmp_path / "run", device="cpu").model, images(family)), single)
    # a task file written before the field existed keeps behaving as it did (single token on SAM 2 / 3)
    del recorded["single_mask_token"]
    (tmp_path / "run" / TASK_FILE).write_text(json.dumps(recorded))
    assert torch.equal(logits(load_trained(tmp_path / "run")[0], images(family)), single)
    recorded["single_mask_token"] = False
    (tmp_path / "run" / TASK_FILE).write_text(json.dumps(recorded))
    stock = logits(PeftModel.from_pretrained(stock_base(family), str(tmp_path / "adapter")), images(family))
    assert not torch.equal(stock, single)
    assert torch.equal(logits(load_trained(tmp_path / "run")[0], images(family)), stock)


def test_the_training_engine_trains_and_evaluates_sam2_on_the_single_mask_token_it_records(tmp_path):
    from convlora.synthetic import write_dataset
    from convlora.training.config import load_config
    from convlora.training.engine import _make_accelerator, _start

    random_sam(tiny_sam2_config(image_size=128), seed=0).save_pretrained(tmp_path / "sam2")
    write_dataset("polyp", tmp_path / "polyp", train=4, val=2, test=0, size=64, seed=0)
    paths = [
        "--data",
        str(tmp_path / "polyp"),
        "--model",
        str(tmp_path / "sam2"),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    config = load_config(overrides=[*paths, "--epochs", "1", "--batch_size", "2"])
    run = _start(config, _make_accelerator(config, tmp_path / "run"), show_progress=False)
    try:
        decoders = [m for m in run.model.modules() if "dynamic_multimask_via_stability" in vars(m)]
        assert len(decoders) == 2 and not any(
            m.dynamic_multimask_via_stability for m in decoders
        )  # base + trained copy
        assert run.task.single_mask_token is True
    finally:
        run.accelerator.end_training()


# --- adapting a model that already has adapters ---------------------------------------------------------------


def test_applying_conv_lora_again_is_refused_and_the_trained_adapter_is_kept(tmp_path):
    model = apply_conv_lora(random_sam(tiny_sam_config(), seed=0), ConvLoraConfig(**ADAPTER, init_lora_weights=False))
    config = model.peft_config["default"]
    expected = logits(model, images("sam"))
    for target in (model, model.base_model.model):
        with pytest.raises(ValueError, match=r"already has a Conv-LoRA adapter 'default'.*add_adapter\(name, config\)"):
            apply_conv_lora(target, ConvLoraConfig(**ADAPTER))
        with pytest.raises(ValueError, match="already has a Conv-LoRA adapter named 'default'") as error:
            get_peft_model(target, ConvLoraConfig(**ADAPTER))
        assert "\n" not in str(error.value)
    assert model.peft_config == {"default": config}
    assert torch.equal(logits(model, images("sam")), expected)
    model.add_adapter("second", ConvLoraConfig(**ADAPTER))  # the way to a second adapter still works
    model.set_adapter("default")
    assert torch.equal(logits(model, images("sam")), expected)
    model.save_pretrained(str(tmp_path / "adapter"))
    integrated = random_sam(tiny_sam_config(), seed=0)
    integrated.load_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"SamModel already has a Conv-LoRA adapter 'default'"):
        apply_conv_lora(integrated)


def test_conv_lora_on_a_lora_adapted_model_names_the_lora_adapter():
    lora = apply_lora(random_sam(tiny_sam_config(), seed=0), ConvLoraConfig(**ADAPTER, init_lora_weights=False))
    config = lora.peft_config["default"]
    with pytest.raises(ValueError, match=r"already has a LORA adapter 'default'.*merge_and_unload\(\) or unload\(\)"):
        apply_conv_lora(lora, ConvLoraConfig(**ADAPTER))
    with pytest.raises(
        ValueError, match=r"'vision_encoder\.layers\.0\.attn\.qkv' already has a LORA adapter \(default\)"
    ):
        get_peft_model(lora.base_model.model, ConvLoraConfig(**ADAPTER), adapter_name="extra")
    assert lora.peft_config == {"default": config}


def test_add_weighted_adapter_is_refused_with_the_reason():
    model = apply_conv_lora(random_sam(tiny_sam_config(), seed=0), ConvLoraConfig(**ADAPTER))
    model.add_adapter("other", ConvLoraConfig(**ADAPTER))
    with pytest.raises(NotImplementedError, match=r"not defined for Conv-LoRA: its conv experts .* non-linear"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert set(model.peft_config) == {"default", "other"}
