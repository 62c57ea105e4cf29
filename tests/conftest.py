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

import numpy as np
import pytest
import torch
from PIL import Image

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
def keep_folder(tmp_path_factory):
    """A keep set for retention tests: two 64 px images with two bright rectangles each (binary masks)."""
    path = tmp_path_factory.mktemp("shared") / "keep"
    (path / "images").mkdir(parents=True)
    (path / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[8:24, 10:30] = 255
        mask[40:56, 36 - 4 * i : 58] = 255
        image[mask > 0] = [200, 80 + 40 * i, 60]
        Image.fromarray(image).save(path / "images" / f"keep{i}.png")
        Image.fromarray(mask).save(path / "masks" / f"keep{i}.png")
    return path


@pytest.fixture(scope="session")
def nuclei_dir(tmp_path_factory):
    """One generated 64 px nuclei dataset (instance-id masks; 6 train, 2 val, 2 test images) shared by every module."""
    path = tmp_path_factory.mktemp("shared") / "nuclei"
    write_dataset("nuclei", path, train=6, val=2, test=2, size=64, seed=0)
    return path


@pytest.fixture(scope="session")
def polyp_dir(tmp_path_factory):
    """One generated 64 px polyp dataset (8 train, 4 val, 4 test images) shared by every test module."""
    path = tmp_path_factory.mktemp("shared") / "polyp"
    write_dataset("polyp", path, train=8, val=4, test=4, size=64, seed=0)
    return path
