"""Write tests/fixtures/v0_1: artifacts of a tiny run made by convlora 0.1 (the flat layout, commit ee7eed3).

The fixture lets the tests prove that adapters, merged checkpoints and training checkpoints written before
the restructure still load and give the same masks. It was made once with the old code:

    git worktree add /tmp/old ee7eed3
    PYTHONPATH=/tmp/old .venv/bin/python tools/make_compat_fixture.py tests/fixtures/v0_1

and is not meant to be rebuilt with a newer convlora (that would test nothing).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import convlora
from convlora.inference import merge_model
from convlora.synthetic import write_dataset


def main(out: str) -> int:
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    sam = convlora.sam.random_sam(convlora.sam.tiny_sam_config(), seed=0)
    sam.save_pretrained(root / "base")
    work = root / "work"
    write_dataset("polyp", work / "data", train=8, val=2, test=0, size=64, seed=0)
    config = convlora.load_config(
        data=str(work / "data"), model=str(root / "base"), output_dir=str(work / "run"), epochs=2,
        batch_size=4, lr=3e-3, save_every_steps=2, keep_checkpoints=5, overlay_samples=0,
        conv_lora={"r": 2, "num_experts": 2},
    )  # fmt: skip
    convlora.train(config, show_progress=False)
    shutil.copytree(work / "run" / "adapter", root / "adapter")
    checkpoints = sorted((work / "run" / "checkpoints").iterdir())
    shutil.copytree(checkpoints[0], root / "checkpoint")
    merge_model(root / "adapter", root / "merged", base_model=str(root / "base"))
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model, _ = convlora.load_trained(root / "adapter", base_model=str(root / "base"))
    merged, _ = convlora.load_trained(root / "merged")
    with torch.no_grad():
        expected = {
            "pixel_values": pixel_values,
            "adapter_logits": model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0],
            "merged_logits": merged(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0],
        }
    save_file({k: v.contiguous() for k, v in expected.items()}, str(root / "expected.safetensors"))
    (root / "README.md").write_text(__doc__)
    (root / "made_by.json").write_text(json.dumps({"convlora": convlora.__version__, "commit": "ee7eed3"}))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
