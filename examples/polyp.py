"""Polyp segmentation in colonoscopy (Kvasir-SEG, CVC-ClinicDB).

With no arguments: generate the synthetic polyp data (data/polyp), measure the embedded base SAM zero-shot,
fine-tune it with Conv-LoRA and print both, in a few minutes on a 2-core CPU. Outputs go to runs/polyp.

Real data: Kvasir-SEG (1,000 colonoscopy images with polyp masks, from Simula's dataset page) and
CVC-ClinicDB. Lay it out as DATA/images/*.jpg + DATA/masks/*.jpg (Kvasir ships exactly this; JPEG masks
are thresholded at 128), or as DATA/train/... and DATA/test/... for a fixed split. Paper settings: structure
loss, lr 1e-4, 30 epochs, S-measure for model selection.

    python examples/polyp.py                                   # synthetic data, embedded base
    python examples/polyp.py --data-dir DATA --model facebook/sam-vit-base
    accelerate launch examples/polyp.py --data-dir DATA --model facebook/sam-vit-base   # several GPUs
"""

import sys

from convlora.examples import run_example

if __name__ == "__main__":
    run_example("polyp", sys.argv[1:], description=__doc__.splitlines()[0])
