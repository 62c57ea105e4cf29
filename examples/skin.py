"""Skin lesion segmentation in dermoscopy (ISIC 2017).

With no arguments: generate the synthetic skin data (data/skin), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/skin.

Real data: the ISIC 2017 challenge (part 1: lesion segmentation; 2,000 training, 150 validation and 600
test images). Put each split's images in DATA/<split>/images and its masks in DATA/<split>/masks with
<split> in train, val, test; the masks' `_segmentation` suffix is recognised. Paper settings: structure loss,
lr 1e-4, 30 epochs, IoU (Jaccard) for model selection.

    python examples/skin.py                                   # synthetic data, embedded base
    python examples/skin.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/skin.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("skin", sys.argv[1:], description=__doc__.splitlines()[0])
