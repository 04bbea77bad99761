"""Lightning data modules for the Residual Attention Network experiments (Wang et al., CVPR 2017).

- :class:`CIFAR10DataModule`, :class:`CIFAR100DataModule`: in-memory uint8 splits, stratified seeded
  validation split, optional symmetric label noise, batched on-device augmentation
  (:func:`augment_cifar_batch`).
- :class:`ImageNetDataModule`: ILSVRC ``train/`` and ``val/`` class-per-folder trees.
- ``python -m datamodules.imagenet_valprep``: sorts the flat official validation images into wnid folders.
"""

from .cifar import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModuleBase,
    InMemoryImageDataset,
    corrupt_labels,
    passthrough_collate,
    stratified_split,
)
from .errors import (
    CorruptImageError,
    DatasetIntegrityError,
    DatasetLayoutError,
    DatasetNotFoundError,
    DatasetSizeWarning,
)
from .imagenet import ImageNetDataModule
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_cifar_batch,
    crop_flip_batch,
    normalize_batch,
    random_crop_flip_params,
    reference_cifar_transform,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFARDataModuleBase",
    "CorruptImageError",
    "DatasetIntegrityError",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "DatasetSizeWarning",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetDataModule",
    "InMemoryImageDataset",
    "augment_cifar_batch",
    "corrupt_labels",
    "crop_flip_batch",
    "normalize_batch",
    "passthrough_collate",
    "random_crop_flip_params",
    "reference_cifar_transform",
    "stratified_split",
]
