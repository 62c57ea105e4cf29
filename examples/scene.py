"""Multi-class segmentation (Trans10K-style scenes).

With no arguments: generate the synthetic scene data (data/scene), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/scene.

Real data: Trans10K (10,428 images of transparent objects with `things` and `stuff` classes) or any
index-mask dataset. Masks must hold class ids (0 = background, 255 = ignore); Trans10K's colour masks need
converting to ids once. Put the class names in DATA/classes.json (a JSON list, index = id). The model gets
one query token per class in SAM's mask decoder (see docs: multi-class). Paper settings: CE + Dice,
lr 1e-4, 30 epochs, mIoU.

    python examples/scene.py                                   # synthetic data, embedded base
    python examples/scene.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/scene.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("scene", sys.argv[1:], description=__doc__.splitlines()[0])
