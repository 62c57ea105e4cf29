"""``SegmentationDataset`` (lazy, picklable, deterministic augmentation) and the train/val/test builder.

>>> from convlora.data import load_datasets
>>> data = load_datasets("data/polyp", image_size=256)  # doctest: +SKIP
>>> item = data.train[0]  # doctest: +SKIP
>>> item["pixel_values"].shape, item["labels"].shape  # doctest: +SKIP
(torch.Size([3, 256, 256]), torch.Size([256, 256]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.processing import (
    IGNORE_INDEX,
    SAM_INPUT,
    InputFormat,
    ResizeInfo,
    postprocess_masks,
    preprocess,
    preprocess_mask,
)
from .classes import Color
from .decode import ImageReading, mask_to_labels, read_image, read_image_size, read_mask
from .discover import split_samples
from .inspect import check_dataset
from .instances import check_instance_masks, instance_labels
from .report import ALL, ENCODINGS, MODES, DatasetError, DatasetReport, Sample
from .transforms import AugmentConfig, augment_sample, sample_generator

INSTANCES = "instances"  # the training mode of one id per object (not a mode of the inspection's report)


class SegmentationDataset(Dataset):
    """Images (and masks) fitted to SAM's square input, read from disk one sample at a time.

    Nothing but paths and settings is kept on the object, so it pickles into DataLoader workers and
    memory does not grow with the dataset. An item is a dict:

    - ``pixel_values``: float32 ``(3, S, S)``, ImageNet-normalised, padded bottom/right with 0;
    - ``labels``: int64 ``(S, S)`` class ids, 255 = ignore (padding included); binary datasets give
      0/1/255. Absent when the sample has no mask;
    - ``original_size``: int64 ``(2,)`` tensor ``(h, w)``; ``index``: position in the dataset;
      ``path``: the image path.

    With ``augment`` set, each item is augmented with a generator seeded by ``(seed, epoch, index)``:
    the same epoch gives the same item in any process, another epoch another draw. Call
    :meth:`set_epoch` before building each epoch's DataLoader (a ``persistent_workers`` loader keeps the
    copy it started with).

    Args:
        samples: the samples (see :func:`~convlora.data.check_dataset` for validated ones).
        image_size: the model's square input size ``S``.
        mode: ``"binary"``, ``"multiclass"``, ``"instances"`` (labels are object ids renumbered 1..n with 255
            skipped, see :func:`~convlora.data.instances.instance_labels`), or ``None`` for unlabelled samples.
        num_classes: classes including the background (2 for binary and instances).
        mask_encoding: how masks store labels (``"0/255"``, ``"0/1"``, ``"ids"``); by default ``"0/255"``
            for binary (which also reads 0/1 masks) and ``"ids"`` for multi-class.
        augment: augmentation settings; ``None`` (evaluation) fits images without randomness.
        seed: augmentation seed.
        class_names: a name per class, for reports.
        reading: how images are read (:class:`~convlora.data.ImageReading` or its dict; defaults when ``None``).
        class_colors: ``(r, g, b)`` -> class id, for colour-coded masks.
        input_format: the model family's normalisation and resizing (SAM's by default; see
            ``ModelFamily.input_format``).

    >>> dataset = SegmentationDataset([Sample("a.png", "a_mask.png", key="a")], image_size=256)
    >>> len(dataset)
    1
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        image_size: int = 1024,
        mode: str | None = "binary",
        num_classes: int = 2,
        mask_encoding: str | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        reading: ImageReading | Mapping[str, Any] | None = None,
        class_colors: Mapping[Color, int] | None = None,
        input_format: InputFormat = SAM_INPUT,
    ) -> None:
        if mode is not None and mode not in (*MODES, INSTANCES):
            raise ValueError(f"mode must be one of {(*MODES, INSTANCES)} or None (unlabelled), got {mode!r}")
        if mode in ("binary", INSTANCES) and num_classes != 2:
            raise ValueError(f"mode={mode!r} means num_classes=2, got {num_classes}")
        if not 2 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 2..255 (255 marks ignored pixels), got {num_classes}")
        if mask_encoding is None:
            mask_encoding = {"binary": "0/255", INSTANCES: "instances"}.get(str(mode), "ids")
        if mask_encoding not in ENCODINGS:
            raise ValueError(f"mask_encoding must be one of {ENCODINGS}, got {mask_encoding!r}")
        if mode is None and any(s.labelled for s in samples):
            raise ValueError("mode=None is for unlabelled samples; these have masks: pass 'binary' or 'multiclass'")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        self.samples = tuple(samples)
        self.image_size = image_size
        self.mode = mode
        self.num_classes = int(num_classes)
        self.mask_encoding = mask_encoding
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.class_names = list(class_names) if class_names is not None else None
        self.reading = ImageReading.of(reading)
        self.class_colors = dict(class_colors) if class_colors else None
        self.input_format = input_format

    @classmethod
    def from_report(
        cls,
        report: DatasetReport,
        split: str | None = None,
        *,
        image_size: int = 1024,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        reading: ImageReading | Mapping[str, Any] | None = None,
        input_format: InputFormat = SAM_INPUT,
    ) -> SegmentationDataset:
        """The usable samples of one split (or all) of an inspected dataset, read as the report decided.

        Images are read with ``reading``, or as the inspection read them when ``None``, and fitted to the
        model as ``input_format`` says (the model family's; SAM's by default).

        >>> from convlora.data import check_dataset
        >>> dataset = SegmentationDataset.from_report(check_dataset("data/polyp"), "train")  # doctest: +SKIP
        """
        return cls(
            report.usable_samples(split),
            image_size=image_size,
            mode=report.mode,
            num_classes=report.num_classes or 2,
            mask_encoding=report.mask_encoding,
            augment=augment,
            seed=seed,
            class_names=report.class_names or None,
            reading=reading if reading is not None else (report.image_reading or None),
            class_colors=report.class_colors or None,
            input_format=input_format,
        )

    @property
    def image_size(self) -> int:
        """The model's square input size ``S``."""
        return self._image_size

    @image_size.setter
    def image_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"image_size must be a positive integer, got {value!r}")
        self._image_size = value

    @property
    def labelled(self) -> bool:
        """Whether every sample has a mask."""
        return bool(self.samples) and all(s.labelled for s in self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws the next items use."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _sample(self, index: int) -> Sample:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.samples)} samples")
        return self.samples[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        sample = self._sample(index)
        image = read_image(sample.image, self.reading)
        labels = self._labels(sample, image.shape[:2])
        if self.augment is not None and self.augment.enabled:
            generator = sample_generator(self.seed, self.epoch, index)
            pixel_values, target = augment_sample(
                image, labels, self.image_size, self.augment, generator, self.input_format
            )
        else:
            pixel_values, _ = preprocess(image, self.image_size, self.input_format)
            pad = self.input_format.pad_to_square
            target = None if labels is None else preprocess_mask(labels, self.image_size, pad)
        item: dict[str, Any] = {
            "pixel_values": pixel_values,
            "original_size": torch.tensor(image.shape[:2], dtype=torch.int64),
            "index": index,
            "path": sample.image,
        }
        if target is not None:
            item["labels"] = target
        return item

    def _labels(self, sample: Sample, image_size: tuple[int, int]) -> np.ndarray | None:
        if sample.mask is None:
            return None
        if self.mode == INSTANCES:
            labels = instance_labels(read_mask(sample.mask, self.class_colors))
            if labels.shape != tuple(image_size):
                raise DatasetError(
                    f"{sample.mask}: mask is {labels.shape[0]}x{labels.shape[1]} but its image is "
                    f"{image_size[0]}x{image_size[1]}; expected the same size"
                )
            return labels
        labels = mask_to_labels(read_mask(sample.mask, self.class_colors), self.mask_encoding)
        if labels.dtype != np.uint8:  # 16/32-bit masks: a dtype every torch op supports
            labels = labels.astype(np.int64)
        if labels.shape != tuple(image_size):
            raise DatasetError(
                f"{sample.mask}: mask is {labels.shape[0]}x{labels.shape[1]} but its image is "
                f"{image_size[0]}x{image_size[1]}; expected the same size"
            )
        limit = 2 if self.mode == "binary" else self.num_classes
        bad = (labels >= limit) & (labels != IGNORE_INDEX)
        if bad.any():
            found = sorted(np.unique(labels[bad]).tolist())[:8]
            raise DatasetError(
                f"{sample.mask}: labels {found} outside 0..{limit - 1} (255 = ignore) for this {self.mode} dataset; "
                "inspect_dataset lists every such mask"
            )
        return labels

    def original_size(self, index: int) -> tuple[int, int]:
        """``(h, w)`` of a sample's image, from the inspection or the file header."""
        sample = self._sample(index)
        return sample.size if sample.size is not None else read_image_size(sample.image)

    def resize_info(self, index: int) -> ResizeInfo:
        """How sample ``index`` is fitted into the input (without augmentation)."""
        return ResizeInfo.fit(self.original_size(index), self.image_size, self.input_format.pad_to_square)

    def original_image(self, index: int) -> np.ndarray:
        """A sample's image as uint8 ``(h, w, 3)`` at its original size."""
        return read_image(self._sample(index).image, self.reading)

    def original_mask(self, index: int) -> np.ndarray:
        """A sample's labels (class ids, binary 0/1, 255 = ignore) as int64 ``(h, w)`` at the original size."""
        sample = self._sample(index)
        if sample.mask is None:
            raise ValueError(f"sample {index} ({sample.image}) has no mask")
        labels = self._labels(sample, self.original_size(index))
        return np.asarray(labels, dtype=np.int64)

    def original_ids(self, index: int) -> np.ndarray:
        """A sample's mask values as stored (instance or class ids; colour masks mapped), ``(h, w)`` int64.

        With ``mask_encoding="instances"``, :func:`~convlora.data.instance_masks` splits it into objects.
        """
        sample = self._sample(index)
        if sample.mask is None:
            raise ValueError(f"sample {index} ({sample.image}) has no mask")
        return np.asarray(read_mask(sample.mask, self.class_colors), dtype=np.int64)

    def postprocess(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """Mask logits ``(b, c, s, s)`` of sample ``index`` at its original ``(h, w)``: ``(b, c, h, w)``."""
        return postprocess_masks(logits, self.resize_info(index))


@dataclass
class SegmentationData:
    """The datasets of a training run and what they segment.

    Args:
        train: training samples (augmented).
        val: validation samples (never augmented).
        test: labelled test samples, or ``None``.
        mode: ``"binary"`` or ``"multiclass"``.
        num_classes: classes including the background (2 for binary).
        class_names: a name per class.
        task_family: the synthetic domain named in ``dataset.json`` for a binary dataset that has one (the
            training picks its main metric by it), else the mode.
        reports: the inspection report of each source (``"data"``, ``"val_data"``, ``"test_data"``).
        notes: how the splits were made (for the run's log).
        image_reading: how images were read (``ImageReading.to_dict()``), to record with the trained model.
        domain: the ``domain`` of ``dataset.json``, if any.
    """

    train: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset | None
    mode: str
    num_classes: int
    class_names: list[str]
    task_family: str
    reports: dict[str, DatasetReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    image_reading: dict[str, Any] = field(default_factory=lambda: ImageReading().to_dict())
    domain: str | None = None

    def set_image_size(self, image_size: int, input_format: InputFormat | None = None) -> None:
        """Fit every dataset to a model input of ``image_size`` (and the model family's ``input_format``)."""
        for dataset in (self.train, self.val, self.test):
            if dataset is not None:
                dataset.image_size = image_size
                if input_format is not None:
                    dataset.input_format = input_format

    def summary(self) -> str:
        """A few lines for the run's log: sizes, mode, classes, how files were read, skipped samples."""
        test = f", test {len(self.test)}" if self.test is not None else ""
        lines = [
            f"data: train {len(self.train)}, val {len(self.val)}{test} samples; {self.mode}, "
            f"{self.num_classes} classes ({', '.join(self.class_names[:10])}{' ...' * (len(self.class_names) > 10)})"
        ]
        lines.extend(f"data: {note}" for note in self.notes)
        for name, report in self.reports.items():
            where = "" if name == "data" else f"{name}: "
            lines.extend(f"data: {where}{note}" for note in report.notes)
            lines.extend(f"data: {where}warning: {warning}" for warning in report.warnings)
            if report.skipped:
                lines.append(f"data: skipped {report.skipped} bad samples of {name} ({report.source})")
        return "\n".join(lines)


def _split_of(report: DatasetReport, preferred: str) -> list[Sample]:
    """The usable samples of ``preferred`` when the source has that split folder, else of the whole source."""
    return report.usable_samples(preferred if preferred in report.samples else None)


def load_datasets(
    data: str | Path,
    *,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    mode: str | None = None,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    augment: AugmentConfig | None = None,
    image_size: int = 1024,
    workers: int | None = None,
    reading: ImageReading | Mapping[str, Any] | None = None,
    mask_reading: str = "auto",
) -> SegmentationData:
    """Check a training dataset (and optional separate val/test sets) and build the three datasets.

    Validation samples come from ``val_data``, else from ``data``'s ``val/`` folder, else from a seeded
    hash split of the training samples (:func:`~convlora.data.split_samples`). The test set comes from
    ``test_data``, else from a labelled ``test/`` folder. ``mode`` and ``num_classes`` are decided on
    ``data`` and then checked on the other sets.

    Args:
        data: dataset folder or CSV file with masks.
        val_data: separate validation dataset.
        test_data: separate labelled test dataset.
        mode: ``"binary"``, ``"multiclass"`` or ``None`` (inferred).
        num_classes: classes including the background, or ``None``.
        val_fraction: share held out for validation when no validation set is given.
        seed: seed of the split and of the augmentation.
        skip_bad: leave out bad samples (and say how many) instead of raising.
        augment: training augmentation; the defaults of :class:`AugmentConfig` when ``None``.
        image_size: the model's square input size (``set_image_size`` changes it later).
        workers: threads used to inspect files.
        reading: how images are read (:class:`~convlora.data.ImageReading` or its dict), the same for every set.
        mask_reading: ``"auto"``, ``"instances"`` or ``"classes"`` (see :func:`~convlora.data.inspect_dataset`).

    Raises:
        DatasetError: listing the problems of a dataset (see :func:`~convlora.data.check_dataset`).

    >>> data = load_datasets("data/polyp", val_fraction=0.1, seed=1)  # doctest: +SKIP
    """
    reading = ImageReading.of(reading)
    instances = mode == INSTANCES
    if instances:
        main = _instance_report(data, num_classes, skip_bad, workers, reading, mask_reading)
    else:
        main = check_dataset(
            data, mode, num_classes, skip_bad=skip_bad, workers=workers, reading=reading, mask_reading=mask_reading
        )
    if not any(main.labelled.values()) or main.mode is None or main.num_classes is None:
        raise DatasetError(f"{data}: training needs masks, but no masks/ folder or mask column was found", main)
    reports = {"data": main}
    notes: list[str] = []
    augment = AugmentConfig() if augment is None else augment

    def dataset(report: DatasetReport, samples: list[Sample], with_augment: bool) -> SegmentationDataset:
        return SegmentationDataset(
            samples,
            image_size=image_size,
            mode=INSTANCES if instances else report.mode,
            num_classes=main.num_classes or 2,
            mask_encoding=report.mask_encoding,
            augment=augment if with_augment else None,
            seed=seed,
            class_names=main.class_names,
            reading=reading,
            class_colors=report.class_colors or None,
        )

    def checked(source: str | Path, name: str) -> DatasetReport:
        readings = {"instances": "instances", "0/255": "classes", "0/1": "classes", "ids": "classes"}
        report = check_dataset(
            source,
            main.mode,
            main.num_classes,
            skip_bad=skip_bad,
            workers=workers,
            reading=reading,
            mask_reading=readings.get(str(main.mask_encoding), mask_reading),
        )
        if not report.usable_samples() or not all(report.labelled.get(s, False) for s in report.splits):
            raise DatasetError(f"{source}: {name} needs masks for every image", report)
        reports[name] = report
        return report

    train_samples = _split_of(main, "train")
    if "train" not in main.samples and ALL not in main.samples:
        raise DatasetError(f"{data}: has val/test splits but no train split", main)
    if val_data is not None:
        val_report = checked(val_data, "val_data")
        val = dataset(val_report, _split_of(val_report, "val"), False)
    elif "val" in main.samples and main.usable_samples("val"):
        val = dataset(main, main.usable_samples("val"), False)
    else:
        train_samples, val_samples = split_samples(train_samples, val_fraction, seed)
        notes.append(
            f"no validation set: held out {len(val_samples)} samples (val_fraction {val_fraction}, seed {seed})"
        )
        val = dataset(main, val_samples, False)
    test = None
    if test_data is not None:
        test_report = checked(test_data, "test_data")
        test = dataset(test_report, _split_of(test_report, "test"), False)
    elif "test" in main.samples:
        if main.labelled.get("test"):
            test = dataset(main, main.usable_samples("test"), False)
        else:
            notes.append("test/ has no masks: no test evaluation")
    if not train_samples:
        raise DatasetError(f"{data}: no training samples", main)
    return SegmentationData(
        train=dataset(main, train_samples, True),
        val=val,
        test=test,
        mode=INSTANCES if instances else main.mode,
        num_classes=main.num_classes,
        class_names=list(main.class_names),
        task_family=INSTANCES if instances else _task_family(main),
        reports=reports,
        notes=notes,
        image_reading=reading.to_dict(),
        domain=main.domain,
    )


def _task_family(report: DatasetReport) -> str:
    """The domain of a binary dataset that names one (its main metric follows it), else the mode."""
    return str(report.domain) if report.mode == "binary" and report.domain else str(report.mode)


def _instance_report(
    data: str | Path,
    num_classes: int | None,
    skip_bad: bool,
    workers: int | None,
    reading: ImageReading,
    mask_reading: str,
) -> DatasetReport:
    """The inspection of a dataset for ``mode="instances"``, refusing masks that hold no instance ids.

    The masks are inspected as for any mode (``mask_reading`` applies: ``"instances"`` forces the instance
    reading); they must read as instance maps, and at least one of a sample of them must hold two objects.
    """
    if num_classes not in (None, 2):
        raise ValueError(f"num_classes={num_classes}: --mode instances segments objects of one kind; leave it unset")
    if mask_reading == "classes":
        raise ValueError("--mode instances reads masks as instance ids; mask_reading 'classes' contradicts it")
    report = check_dataset(
        data, None, None, skip_bad=skip_bad, workers=workers, reading=reading, mask_reading=mask_reading
    )
    if report.mask_encoding != "instances":
        if report.mode == "multiclass":
            raise DatasetError(
                f"{data}: --mode instances needs masks holding one id per object, but they read as class maps "
                f"({report.num_classes} classes, ids shared by separate regions); train them with --mode multiclass, "
                "or pass --mask_reading instances if each id is one object",
                report,
            )
        raise DatasetError(
            f"{data}: --mode instances needs masks holding one id per object, but they are binary masks "
            f"({report.mask_encoding} encoding: one object id per image); train them with --mode binary, or label "
            "each object with its own id (16-bit PNG/TIFF label images)",
            report,
        )
    labelled = [s for s in report.usable_samples() if s.mask is not None]
    picked = labelled[:: max(1, len(labelled) // 32)][:32]
    try:
        check_instance_masks([read_mask(s.mask) for s in picked if s.mask is not None], str(data))
    except ValueError as error:
        raise DatasetError(str(error), report) from None
    return report


def build_datasets(config: Any) -> SegmentationData:
    """:func:`load_datasets` with the settings of a ``TrainConfig`` (``data``, ``val_data``, ``mode`` ...).

    The image reading comes from ``intensity``, ``intensity_range`` and ``channels``, the mask reading from
    ``mask_reading`` (their defaults where the config lacks them).

    >>> from convlora.training.config import load_config
    >>> data = build_datasets(load_config(overrides=["--data", "data/polyp"]))  # doctest: +SKIP
    """
    mode = None if config.mode in (None, "auto") else config.mode
    return load_datasets(
        config.data,
        val_data=config.val_data,
        test_data=config.test_data,
        mode=mode,
        num_classes=config.num_classes,
        val_fraction=config.val_fraction,
        seed=config.seed,
        skip_bad=config.skip_bad,
        augment=config.augment_config(),
        image_size=config.image_size or 1024,
        reading=reading_of(config),
        mask_reading=getattr(config, "mask_reading", "auto"),
    )


def reading_of(config: Any) -> ImageReading:
    """The :class:`~convlora.data.ImageReading` of a ``TrainConfig`` (defaults for the fields it lacks).

    >>> from types import SimpleNamespace
    >>> reading_of(SimpleNamespace(intensity="fixed", intensity_range=[0, 4095], channels=None)).intensity_range
    (0.0, 4095.0)
    """
    return ImageReading(
        intensity=getattr(config, "intensity", "percentile"),
        intensity_range=getattr(config, "intensity_range", None),
        channels=getattr(config, "channels", None),
    )
