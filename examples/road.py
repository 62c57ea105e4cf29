"""Road segmentation in aerial images (Massachusetts Roads).

With no arguments: generate the synthetic road data (data/road), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/road.

Real data: the Massachusetts Roads dataset (1,171 aerial images of 1500x1500 px with road masks, split
into train/valid/test). Use DATA/train, DATA/val and DATA/test, each with images/ and masks/ (TIFF images
and masks are read directly). Paper settings: structure loss, lr 3e-4, 20 epochs, IoU.

    python examples/road.py                                   # synthetic data, embedded base
    python examples/road.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/road.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("road", sys.argv[1:], description=__doc__.splitlines()[0])
