"""Every PEFT method a SAM user would try, by name, on one engine: PEFT's own methods (through their own configs)
and BitFit, driven by one table through build, one optimiser step, export, a fresh-process reload and the merge,
on a tiny SAM and a tiny SAM 2; then the options they take and the inputs they refuse.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from convlora import ConvLoraConfig
from convlora.artifact import TaskInfo, apply_task_settings, export_trained, load_trained
from convlora.artifact.methods import METHODS, build_task_model, method_for_adapter
from convlora.artifact.peft_methods import PEFT_METHODS, build_peft_config, check_peft_options, peft_options
from convlora.cli import main
from convlora.inference import merge_model
from convlora.models import describe_targets, random_sam, tiny_sam2_config, tiny_sam_config
from convlora.models.adapters import apply_lora
from convlora.training.config import load_config, load_config_given, resume_config

# method -> (the output equals the base model's at initialisation, PEFT config class or None)
CASES = {
    "lora": (True, "LoraConfig"),
    "dora": (True, "LoraConfig"),
    "loha": (True, "LoHaConfig"),
    "lokr": (True, "LoKrConfig"),
    "ia3": (True, "IA3Config"),
    "boft": (True, "BOFTConfig"),
    "vera": (True, "VeraConfig"),
    "ln_tuning": (True, "LNTuningConfig"),
    "bitfit": (True, None),
}
FAMILIES = {"sam": (tiny_sam_config, 64), "sam2": (tiny_sam2_config, 256)}
ADAPTER = {"r": 2, "lora_alpha": 4.0}


def pixels(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))


def masks(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x, multimask_output=False).pred_masks


def run_family(family: str, folder: Path) -> dict:
    """Every method of the table on one family: outputs at init and after one step, trainable/changed names, exports."""
    make_config, size = FAMILIES[family]
    (folder / "base").mkdir()
    random_sam(make_config(), seed=0).save_pretrained(folder / "base")
    x = pixels(size)
    safetensors.torch.save_file({"pixels": x}, str(folder / "pixels.safetensors"))
    results = {"pixels": x, "folder": folder}
    for method in CASES:
        task = TaskInfo("binary", 2, ["background", "object"], size, str(folder / "base"), method)
        base = apply_task_settings(random_sam(make_config(), seed=0), task).eval()
        reference = masks(base, x)
        adapter = ConvLoraConfig(**ADAPTER) if METHODS[method].uses_adapter else None
        model = build_task_model(base, task, adapter).eval()
        at_init = masks(model, x)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        loss = (model(pixel_values=x, multimask_output=False).pred_masks - 1).pow(2).mean()
        loss.backward()
        optimiser.step()
        model.eval()
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        export_trained(model, task, folder / method)
        results[method] = {
            "reference": reference,
            "at_init": at_init,
            "trained": masks(model, x),
            "trainable": trainable,
            "changed": changed,
            "folder": folder / method,
            "model": model,
        }
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = run_family(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


PAIRS = [(family, method) for family in FAMILIES for method in CASES]


def test_the_table_names_every_registered_peft_method_and_bitfit():
    assert set(PEFT_METHODS) <= set(CASES) and "bitfit" in METHODS
    for method, (_, config_class) in CASES.items():
        if config_class is not None:
            assert PEFT_METHODS[method].config_class.__name__ == config_class
            assert METHODS[method].uses_adapter and METHODS[method].library == "peft"


@pytest.mark.parametrize(("family", "method"), PAIRS)
def test_a_new_adapter_leaves_the_model_as_it_was(runs, family, method):
    result = runs(family)[method]
    identity, _ = CASES[method]
    if identity:
        torch.testing.assert_close(result["at_init"], result["reference"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("family", "method"), PAIRS)
def test_one_optimiser_step_changes_only_the_methods_trainable_tensors(runs, family, method):
    result = runs(family)[method]
    changed, trainable = result["changed"], result["trainable"]
    assert changed and changed <= trainable
    in_encoder = [name for name in changed if "vision_encoder" in name]
    assert in_encoder, f"{method} changed nothing in the image encoder"
    if method == "bitfit":
        assert all(name.endswith(".bias") for name in in_encoder)
    else:
        prefix = {"lora": "lora_", "dora": "lora_", "loha": "hada_", "lokr": "lokr_", "ia3": "ia3_"}
        prefix |= {"boft": "boft_", "vera": "vera_lambda_", "ln_tuning": "ln_tuning_"}
        assert all(f".{prefix[method]}" in name for name in in_encoder), in_encoder
    assert not torch.equal(result["trained"], result["at_init"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_export_reloads_in_a_fresh_process_with_equal_outputs(runs, family, tmp_path):
    results = runs(family)
    folders = {method: str(results[method]["folder"]) for method in CASES}
    out = tmp_path / "outputs.safetensors"
    script = (
        "import json, sys, torch, safetensors.torch\n"
        "from convlora.artifact import load_trained\n"
        "folders, pixels, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
        "x = safetensors.torch.load_file(pixels)['pixels']\n"
        "found = {}\n"
        "for method, folder in folders.items():\n"
        "    model, task = load_trained(folder)\n"
        "    assert task.method == method, (task.method, method)\n"
        "    with torch.no_grad():\n"
        "        found[method] = model(pixel_values=x, multimask_output=False).pred_masks.contiguous()\n"
        "safetensors.torch.save_file(found, out)\n"
    )
    pixels_file = results["folder"] / "pixels.safetensors"
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(folders), str(pixels_file), str(out)], check=True, timeout=300
    )
    reloaded = safetensors.torch.load_file(str(out))
    for method in CASES:
        assert torch.equal(reloaded[method], results[method]["trained"]), method


@pytest.mark.parametrize(("family", "method"), [pair for pair in PAIRS if METHODS[pair[1]].mergeable])
def test_every_mergeable_method_merges_into_a_plain_model_with_the_same_outputs(runs, family, method, tmp_path):
    result = runs(family)[method]
    report = merge_model(result["folder"], tmp_path / "merged")
    assert report["extra_parameters"] == 0
    merged, task = load_trained(tmp_path / "merged")
    assert task.merged and not describe_targets(merged)
    x = runs(family)["pixels"]
    torch.testing.assert_close(masks(merged, x), result["trained"], rtol=0, atol=1e-5)


def test_bitfit_does_not_merge_and_exports_only_biases_and_the_decoder(runs, tmp_path):
    folder = runs("sam")["bitfit"]["folder"]
    names = safetensors.torch.load_file(str(folder / "bitfit_model.safetensors"))
    encoder = [name for name in names if name.startswith("vision_encoder.")]
    assert encoder and all(name.endswith(".bias") for name in encoder)
    assert all(name.startswith(("vision_encoder.", "mask_decoder.")) for name in names)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_model(folder, tmp_path / "merged")


def test_a_plain_peft_folder_loads_as_its_method(runs, tmp_path):
    results = runs("sam")
    base = results["folder"] / "base"
    for method in PEFT_METHODS:
        plain = tmp_path / method
        plain.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(results[method]["folder"] / name, plain / name)
        model, task = load_trained(plain, base_model=str(base))
        assert task.method == method  # DoRA's adapter_config says LORA with use_dora: loaded as dora
        assert torch.equal(masks(model, results["pixels"]), results[method]["trained"])


def test_an_adapter_of_a_method_convlora_does_not_offer_is_refused_naming_those_it_loads():
    with pytest.raises(ValueError, match=r"x holds a OFT adapter; convlora loads BOFT, CONV_LORA, IA3, LN_TUNING, "):
        method_for_adapter("OFT", "x")


# --------------------------------------------------------------------------- how each method is configured


def test_lora_through_the_table_is_the_same_config_as_apply_lora():
    ours = METHODS["lora"].build(random_sam(tiny_sam_config()), ConvLoraConfig(**ADAPTER))
    theirs = apply_lora(random_sam(tiny_sam_config()), ConvLoraConfig(**ADAPTER))
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()


def test_ia3_scales_the_mlp_hidden_activation_of_the_targeted_blocks():
    config = build_peft_config(random_sam(tiny_sam_config()), "ia3", ConvLoraConfig(target_preset="attention_mlp"))
    assert set(config.feedforward_modules) == {f"vision_encoder.layers.{i}.mlp.lin2" for i in (0, 1)}
    assert set(build_peft_config(random_sam(tiny_sam_config()), "ia3").feedforward_modules) == set()  # qkv only


def test_ln_tuning_tunes_the_layer_norms_of_the_chosen_encoder_blocks():
    model = METHODS["ln_tuning"].build(random_sam(tiny_sam_config()), ConvLoraConfig(layers=[1]))
    assert describe_targets(model) == [
        f"base_model.model.vision_encoder.layers.1.{name}" for name in ("layer_norm1", "layer_norm2")
    ]


def test_options_pass_through_to_the_peft_config():
    model = METHODS["lora"].build(random_sam(tiny_sam_config()), ConvLoraConfig(), options={"use_rslora": True})
    assert model.peft_config["default"].use_rslora
    config = load_config(overrides=["--data", "d", "--method", "boft", "--peft.boft_block_size", "8"])
    assert config.peft == {"boft_block_size": 8}
    assert build_peft_config(random_sam(tiny_sam_config()), "boft", options=config.peft).boft_block_size == 8
    assert "use_dora" not in peft_options("dora") and "use_dora" in peft_options("lora")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("loha", {"use_dora": True}, r"peft.use_dora is an option of dora/lora, not of loha; loha's options: \["),
        ("vera", {"projection_key": 1}, r"peft.projection_key is not an option of vera \(VeraConfig\); its options: "),
        ("loha", {"alpha": 8}, r"peft.alpha: loha takes alpha from the adapter settings; set --conv_lora.lora_alpha"),
        ("dora", {"use_dora": False}, r"peft.use_dora: dora sets use_dora=True itself"),
        ("lora", {"target_modules": "x"}, r"peft.target_modules is set by convlora"),
        ("lora", {"use_rslora": "yes"}, r"peft.use_rslora must be true or false, got 'yes'"),
        ("boft", {"boft_block_size": 4, "boft_block_num": 2}, r"peft options .* of boft: "),
        ("decoder", {"r": 4}, r"configure PEFT's methods .*; method 'decoder' is not one of them"),
        ("bitfit", {"r": 4}, r"method 'bitfit' is not one of them"),
        ("conv_lora", {"r": 4}, r"method conv_lora takes its settings as --conv_lora.KEY"),
    ],
)
def test_bad_options_are_refused_naming_the_option(method, options, message):
    with pytest.raises(ValueError, match=message):
        check_peft_options(method, options)


def test_the_command_line_refuses_an_option_of_another_method():
    with pytest.raises(ValueError, match="use_dora is an option of dora/lora, not of loha"):
        load_config(overrides=["--data", "d", "--method", "loha", "--peft.use_dora", "true"])
    with pytest.raises(ValueError, match="do not apply with init_adapter"):
        load_config(overrides=["--data", "d", "--method", "lora", "--peft.use_rslora", "true", "--init_adapter", "a"])


def test_a_module_a_method_cannot_adapt_is_named():
    config = ConvLoraConfig(target_modules=r"vision_encoder\.patch_embed\.projection")
    with pytest.raises(ValueError, match=r"vera cannot adapt vision_encoder.patch_embed.projection: it is a Conv2d"):
        build_peft_config(random_sam(tiny_sam_config()), "vera", config)
    with pytest.raises(ValueError, match="lora_dropout=0.1: ia3 has no dropout"):
        build_peft_config(random_sam(tiny_sam_config()), "ia3", ConvLoraConfig(lora_dropout=0.1))
    with pytest.raises(ValueError, match=r"layers \[5\] out of range"):
        build_peft_config(random_sam(tiny_sam_config()), "ln_tuning", ConvLoraConfig(layers=[5]))


def test_a_resume_keeps_saved_options_and_refuses_a_changed_one():
    saved = load_config(overrides=["--data", "d", "--method", "lora", "--peft.use_rslora", "true"]).to_dict()
    config, notes = resume_config(saved, *load_config_given(overrides=["--data", "d", "--epochs", "3"]))
    assert config.peft == {"use_rslora": True} and notes == ["epochs: 10 -> 3"]
    with pytest.raises(ValueError, match="peft"):
        resume_config(saved, *load_config_given(overrides=["--data", "d", "--peft.use_rslora", "false"]))


def test_params_counts_any_registered_method_on_the_meta_device(capsys):
    assert main(["params", "--variants", "vit-b", "--methods", "dora", "ia3", "bitfit"]) == 0
    out = capsys.readouterr().out
    # DoRA: LoRA's 12 x r (768 + 2304) plus a magnitude per output; (IA)3: one scale per qkv output
    assert "| vit-b | 93,735,728 | DoRA | 138,240 | 0 | 4,058,340 | 4,196,580 | 0 |" in out
    assert "| vit-b | 93,735,728 | (IA)3 | 27,648 | 0 | 4,058,340 | 4,085,988 | 0 |" in out
    assert "| BitFit |" in out and "does not merge |" in out


def test_the_engine_trains_dora_with_options_and_exports_it(tiny_sam_dir, polyp_dir, tmp_path, capsys):
    from convlora.training.engine import train

    args = ["--data", str(polyp_dir), "--model", str(tiny_sam_dir), "--output_dir", str(tmp_path / "run")]
    args += ["--method", "dora", "--epochs", "1", "--batch_size", "4", "--overlay_samples", "0"]
    args += ["--peft.use_rslora", "true", "--conv_lora.r", "2", "--conv_lora.num_experts", "2"]
    result = train(load_config(overrides=args), show_progress=False)
    assert "conv_lora.num_experts is not read by method dora" in capsys.readouterr().out
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["use_dora"], saved["use_rslora"], saved["r"]) == ("LORA", True, True, 2)
    model, task = load_trained(result.adapter_dir)
    assert task.method == "dora"
    magnitudes = [name for name, _ in model.named_parameters() if "lora_magnitude_vector" in name]
    assert magnitudes
    assert "dora" in (result.adapter_dir / "README.md").read_text()


def test_the_benchmark_counts_each_methods_own_tensors_as_the_comparison_page_lists_them():
    import json
    import re
    from pathlib import Path

    from convlora.bench.quality import own_parameters

    root = Path(__file__).resolve().parents[1]
    config = json.loads((root / "benchmarks" / "configs" / "peft_methods.json").read_text())
    counts = own_parameters({"config": config})
    page = (root / "docs" / "concepts" / "comparison.md").read_text()
    listed = {
        m.group(1): int(m.group(2).replace(",", ""))
        for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|[^|]*\|[^|]*\| ([\d,]+) \|", page, re.M)
    }
    assert counts == {name: listed[name] for name in counts} and len(counts) == 10
