"""Lightning data modules for the Residual Attention Network experiments (Wang et al., CVPR 2017).

- :class:`ImageDataModule`: the base; each dataset's facts as class attributes (``DATASET_NAME``,
  ``NUM_CLASSES``, ``MEAN``, ``STD``, ``DATASET_FOLDER``), the one ``data_dir`` rule
  (:meth:`~ImageDataModule.resolve_data_dir`, :meth:`~ImageDataModule.find_dataset`) and the training order
  that resumes mid-epoch.
- :class:`CIFAR10DataModule`, :class:`CIFAR100DataModule`: in-memory uint8 splits, stratified seeded
  validation split, optional symmetric label noise, batched on-device augmentation
  (:func:`augment_cifar_batch`).
- :class:`ImageNetDataModule`: ILSVRC ``train/`` and ``val/`` class-per-folder trees, or their litdata
  shards (``format="litdata"``, :class:`ShardedImageTree`); ``decode="cuda"`` decodes on the GPU.
- ``sampling``: seeded random streams and the resumable samplers shared by the datamodules (the chunk-local
  :class:`ChunkedResumableSampler` for shards).
- ``python -m datamodules.convert imagenet``: writes an ImageNet tree as litdata shards.
- ``python -m datamodules.imagenet_valprep``: sorts the flat official validation images into wnid folders.
"""

from .base import ImageDataModule
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
    DataDirNotAFolderError,
    DatasetIntegrityError,
    DatasetLayoutError,
    DatasetNotFoundError,
    DatasetSizeWarning,
    DataSettingError,
)
from .imagenet import ImageNetDataModule
from .imagenet_shards import ShardedImageTree
from .sampling import ChunkedResumableSampler, ResumableSampler, derived_generator, derived_seed
from .transforms import (
    augment_cifar_batch,
    crop_flip_batch,
    normalize_batch,
    random_crop_flip_params,
    reference_cifar_transform,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModuleBase",
    "ChunkedResumableSampler",
    "CorruptImageError",
    "DataDirNotAFolderError",
    "DataSettingError",
    "DatasetIntegrityError",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "DatasetSizeWarning",
    "ImageDataModule",
    "ImageNetDataModule",
    "InMemoryImageDataset",
    "ResumableSampler",
    "ShardedImageTree",
    "augment_cifar_batch",
    "corrupt_labels",
    "crop_flip_batch",
    "derived_generator",
    "derived_seed",
    "normalize_batch",
    "passthrough_collate",
    "random_crop_flip_params",
    "reference_cifar_transform",
    "stratified_split",
]
