"""Leaf disease segmentation (agriculture).

With no arguments: generate the synthetic leaf data (data/leaf), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/leaf.

Real data: a leaf disease segmentation set (e.g. the public leaf-disease segmentation dataset with
images and lesion masks in separate folders, about 500 images). Lay it out as DATA/images + DATA/masks, or
with train/val/test subfolders. Paper settings: structure loss, lr 3e-4, 30 epochs, IoU.

    python examples/leaf.py                                   # synthetic data, embedded base
    python examples/leaf.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/leaf.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("leaf", sys.argv[1:], description=__doc__.splitlines()[0])
