"""Camouflaged object segmentation (CAMO, COD10K).

With no arguments: generate the synthetic camouflage data (data/camouflage), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/camouflage.

Real data: CAMO (1,250 images) and COD10K (10,000 images). Both ship images and binary ground truth in
separate folders: copy or link them to DATA/train/images + DATA/train/masks and DATA/test/images +
DATA/test/masks (matched by file stem). Paper settings: structure loss, lr 1e-4, 20 epochs, S-measure.

    python examples/camouflage.py                                   # synthetic data, embedded base
    python examples/camouflage.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/camouflage.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("camouflage", sys.argv[1:], description=__doc__.splitlines()[0])
