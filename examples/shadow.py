"""Shadow detection (SBU Shadow).

With no arguments: generate the synthetic shadow data (data/shadow), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/shadow.

Real data: SBU Shadow (about 4,000 training and 638 test images). Its ShadowImages/ and ShadowMasks/
folders become DATA/train/images + DATA/train/masks (and likewise for the test set). Paper settings:
balanced BCE, lr 1e-4, 10 epochs, balanced error rate (lower is better).

    python examples/shadow.py                                   # synthetic data, embedded base
    python examples/shadow.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/shadow.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("shadow", sys.argv[1:], description=__doc__.splitlines()[0])
