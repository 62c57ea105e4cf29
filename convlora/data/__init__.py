"""Reading users' segmentation datasets: discovery, decoding, inspection, the torch Dataset, augmentation.

- :mod:`~convlora.data.discover` finds the samples (folder layouts, CSV files, splits);
- :mod:`~convlora.data.decode` reads one image or mask (bit depths, channels, colour tables);
- :mod:`~convlora.data.classes` reads class names and colours; :mod:`~convlora.data.instances` instance maps;
- :mod:`~convlora.data.inspect` checks a whole dataset into a :mod:`~convlora.data.report`;
- :mod:`~convlora.data.dataset` and :mod:`~convlora.data.transforms` feed training;
- :mod:`~convlora.data.prompts` derives objects and box/point prompts from masks, and
  :mod:`~convlora.data.prompt_files` reads users' prompts (JSON or COCO files).

>>> from convlora.data import check_dataset, SegmentationDataset
>>> report = check_dataset("data/polyp")  # doctest: +SKIP
>>> print(report.format())  # doctest: +SKIP
>>> train = SegmentationDataset.from_report(report, "train", image_size=256)  # doctest: +SKIP
"""

from .classes import ClassTable, colors_to_ids, read_class_names, read_class_table, read_classes
from .dataset import SegmentationData, SegmentationDataset, build_datasets, load_datasets, reading_of
from .decode import (
    IMAGE_EXTENSIONS,
    INTENSITIES,
    ImageReading,
    mask_to_labels,
    read_image,
    read_image_size,
    read_mask,
    to_rgb8,
)
from .discover import split_samples
from .inspect import MASK_READINGS, check_dataset, infer_mode, inspect_dataset
from .instances import instance_ids, instance_masks
from .prompt_files import build_prompts, load_prompts, read_prompts_file, write_coco_boxes, write_prompts_file
from .prompts import (
    Objects,
    PromptConfig,
    Prompts,
    boxes_from_masks,
    correction_points,
    find_objects,
    points_from_masks,
)
from .report import ALL, IGNORE_INDEX, DatasetError, DatasetReport, Problem, Sample
from .transforms import AugmentConfig, augment_sample, sample_generator

__all__ = [
    "ALL",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "INTENSITIES",
    "MASK_READINGS",
    "AugmentConfig",
    "ClassTable",
    "DatasetError",
    "DatasetReport",
    "ImageReading",
    "Objects",
    "Problem",
    "PromptConfig",
    "Prompts",
    "Sample",
    "SegmentationData",
    "SegmentationDataset",
    "augment_sample",
    "boxes_from_masks",
    "build_datasets",
    "build_prompts",
    "check_dataset",
    "colors_to_ids",
    "correction_points",
    "find_objects",
    "infer_mode",
    "inspect_dataset",
    "instance_ids",
    "instance_masks",
    "load_datasets",
    "load_prompts",
    "mask_to_labels",
    "points_from_masks",
    "read_class_names",
    "read_class_table",
    "read_classes",
    "read_image",
    "read_image_size",
    "read_mask",
    "read_prompts_file",
    "reading_of",
    "sample_generator",
    "split_samples",
    "to_rgb8",
    "write_coco_boxes",
    "write_prompts_file",
]
