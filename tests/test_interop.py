"""PEFT behaviour across processes: exact reload in a fresh interpreter, loud failure without convlora."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

from convlora import ConvLoraConfig, apply_conv_lora


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_fresh_process_reproduces_the_outputs_bit_for_bit(make_sam, images, tmp_path):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = model(pixel_values=images, multimask_output=False).pred_masks.contiguous()
    model.save_pretrained(tmp_path / "adapter")
    save_file({"images": images, "expected": expected}, tmp_path / "reference.safetensors")
    result = run_python(
        """
        import torch
        from safetensors.torch import load_file
        from peft import PeftModel
        import convlora
        from convlora.models import random_sam, tiny_sam_config

        ref = load_file("reference.safetensors")
        model = PeftModel.from_pretrained(random_sam(tiny_sam_config(), seed=0), "adapter").eval()
        with torch.no_grad():
            out = model(pixel_values=ref["images"], multimask_output=False).pred_masks
        print("EQUAL" if torch.equal(out, ref["expected"]) else f"DIFF {(out - ref['expected']).abs().max()}")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EQUAL"


def test_stock_peft_without_convlora_refuses_a_conv_lora_adapter(make_sam, tmp_path):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "sam_config.json").write_text(json.dumps(make_sam().config.to_dict()))
    result = run_python(
        """
        import json, sys
        from peft import PeftConfig, PeftModel
        from transformers import SamConfig, SamModel

        base = SamModel(SamConfig.from_dict(json.load(open("sam_config.json"))))
        outcomes = []
        loads = (
            lambda: PeftModel.from_pretrained(base, "adapter"),
            lambda: PeftConfig.from_pretrained("adapter"),
            lambda: base.load_adapter("adapter"),  # transformers' own PEFT integration
        )
        for load in loads:
            try:
                load()
                outcomes.append("LOADED")
            except Exception as error:
                outcomes.append(f"{type(error).__name__}: {error}")
        assert not any(name.startswith("convlora") for name in sys.modules)
        print("\\n".join(outcomes))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    outcomes = result.stdout.strip().splitlines()
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome != "LOADED"
        assert "CONV_LORA" in outcome
