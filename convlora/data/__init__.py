"""Reading users' segmentation datasets: discovery, decoding, validation, the torch Dataset, augmentation.

>>> from convlora.data import check_dataset, SegmentationDataset
>>> report = check_dataset("data/polyp")  # doctest: +SKIP
>>> print(report.format())  # doctest: +SKIP
>>> train = SegmentationDataset.from_report(report, "train", image_size=256)  # doctest: +SKIP
"""

from .dataset import SegmentationData, SegmentationDataset, build_datasets, load_datasets
from .folder import (
    ALL,
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetReport,
    Problem,
    Sample,
    check_dataset,
    infer_mode,
    inspect_dataset,
    mask_to_labels,
    read_classes,
    read_image,
    read_image_size,
    read_mask,
    split_samples,
)
from .transforms import AugmentConfig, augment_sample, sample_generator

__all__ = [
    "ALL",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "AugmentConfig",
    "DatasetError",
    "DatasetReport",
    "Problem",
    "Sample",
    "SegmentationData",
    "SegmentationDataset",
    "augment_sample",
    "build_datasets",
    "check_dataset",
    "infer_mode",
    "inspect_dataset",
    "load_datasets",
    "mask_to_labels",
    "read_classes",
    "read_image",
    "read_image_size",
    "read_mask",
    "sample_generator",
    "split_samples",
]
