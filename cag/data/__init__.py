"""Data: the real datasets (GTA5, SYNTHIA, Cityscapes), their joint transforms, and file formats.

``cag.data.datasets`` reads the on-disk layouts of docs/data.md §1-§3,
``cag.data.transforms`` is the released augmentation (docs/data.md §6) and
``cag.data.io`` the exact file formats. The built-in benchmark generator lives in
``cag.data.synthetic`` (import it explicitly).
"""
from .datasets import (
    Cityscapes,
    DatasetReport,
    GTA5,
    MissingFilesWarning,
    Problem,
    SegmentationDataset,
    Synthia,
    check_dataset,
    open_dataset,
)
from .io import DataError
from .transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaleWidth,
    Resize,
    ToFloat,
    eval_transform,
    train_transform,
)

__all__ = [
    "Cityscapes",
    "Compose",
    "DataError",
    "DatasetReport",
    "GTA5",
    "MissingFilesWarning",
    "Problem",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScaleWidth",
    "Resize",
    "SegmentationDataset",
    "Synthia",
    "ToFloat",
    "check_dataset",
    "eval_transform",
    "open_dataset",
    "train_transform",
]
