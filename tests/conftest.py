"""Shared fixtures: tiny random SAM models (one saved copy for the whole run), and bitwise-reproducible CPU math.

MKL picks matrix kernels by memory alignment, so two identical models in different memory can differ in
the last bit (about 1e-7). MKL's conditional numerical reproducibility mode removes that, which lets the
tests assert ``torch.equal`` across instances and processes. It must be set before MKL first runs.
"""

import os

os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
# Tiny models run fastest on one thread, and two OpenMP threads on a loaded 2-core machine can stall for
# milliseconds at every parallel region.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from convlora.models import random_sam, tiny_sam_config
from convlora.synthetic import write_dataset


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def sam_config():
    """Config of a ~40k-parameter SAM: 64x64 input, 8x8 grid, one windowed and one global layer."""
    return tiny_sam_config()


@pytest.fixture
def make_sam(sam_config):
    """Factory of identical random tiny SAM models (same seed, same weights)."""

    def make(seed: int = 0, config=None):
        return random_sam(config or sam_config, seed=seed)

    return make


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of two random 64x64 images."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory):
    """One saved tiny random SAM (``random_sam(tiny_sam_config(), seed=0)``) shared by every test module."""
    path = tmp_path_factory.mktemp("shared") / "sam"
    random_sam(tiny_sam_config(), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def polyp_dir(tmp_path_factory):
    """One generated 64 px polyp dataset (8 train, 4 val, 4 test images) shared by every test module."""
    path = tmp_path_factory.mktemp("shared") / "polyp"
    write_dataset("polyp", path, train=8, val=4, test=4, size=64, seed=0)
    return path
