"""CIFAR-10 and CIFAR-100 data modules (Krizhevsky, 2009), as used by Wang et al., CVPR 2017, Sec. 4.1.

Both read the python-pickle layout that the official archives unpack to and differ only in constants, so
they share :class:`CIFARDataModuleBase`. A whole split lives in memory as one uint8 ``(N, 3, 32, 32)``
tensor; the DataLoader fancy-indexes a batch in one op and the augmentation runs batched on the training
device in :meth:`CIFARDataModuleBase.on_after_batch_transfer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import CIFAR10, CIFAR100

from .base import ImageDataModule
from .cifar_files import CIFARFolder
from .errors import (
    DataSettingError,
)
from .loaders import split_loader
from .sampling import derived_generator, derived_seed
from .transforms import augment_cifar_batch, normalize_batch

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModuleBase",
    "InMemoryImageDataset",
    "corrupt_labels",
    "passthrough_collate",
    "stratified_split",
]

# Independent random streams derived from the one user-facing seed (3 is the training order's, in base.py).
_STREAM_SPLIT, _STREAM_NOISE, _STREAM_AUGMENT = 0, 1, 2


def stratified_split(
    labels: torch.Tensor, val_size: int, num_classes: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(train_idx, val_idx)`` with ``val_size`` held out, stratified by class.

    Each class gives ``val_size // num_classes`` images, as far as it has them; the remainder goes one image
    each to classes chosen at random. Which images are held out is random too (seeded by ``generator``).
    Both index tensors are sorted int64.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for a training set of {n} images, got {val_size}")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    quota = [0] * num_classes
    remaining = val_size
    open_classes = [c for c in range(num_classes) if counts[c] > 0]
    while remaining > 0:
        share = remaining // len(open_classes)
        if share == 0:  # fewer images left than classes with spare images: one more each for a random few
            for i in torch.randperm(len(open_classes), generator=generator)[:remaining].tolist():
                quota[open_classes[i]] += 1
            break
        for c in open_classes:
            take = min(share, counts[c] - quota[c])
            quota[c] += take
            remaining -= take
        open_classes = [c for c in open_classes if quota[c] < counts[c]]

    val_parts = [torch.empty(0, dtype=torch.long)]
    for c in range(num_classes):
        if quota[c]:
            members = torch.nonzero(labels == c).squeeze(1)
            val_parts.append(members[torch.randperm(members.numel(), generator=generator)[: quota[c]]])
    val_idx = torch.sort(torch.cat(val_parts)).values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    return torch.nonzero(~is_val).squeeze(1), val_idx


def corrupt_labels(
    labels: torch.Tensor, clean_ratio: float, num_classes: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Symmetric label noise: keep each label with probability ``clean_ratio``, else draw a different class.

    The replacement is uniform over the other ``num_classes - 1`` classes, i.e. the noise transition matrix
    has ``r`` on the diagonal and ``(1 - r) / (C - 1)`` elsewhere (the setting of the paper's noisy-label
    experiment, Sec. 4.1, Table 4). Returns ``(noisy_labels, realised_clean_ratio)``; the input is unchanged.
    """
    if not 0.0 <= clean_ratio <= 1.0:
        raise ValueError(f"clean_label_ratio must be in [0, 1], got {clean_ratio}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    if clean_ratio == 1.0 or n == 0:
        return labels.clone(), 1.0
    keep = torch.rand(n, generator=generator) < clean_ratio
    shift = torch.randint(1, num_classes, (n,), generator=generator)
    noisy = torch.where(keep, labels, (labels + shift) % num_classes)
    return noisy, float((noisy == labels).double().mean())


class InMemoryImageDataset(Dataset):
    """Images held as one ``(N, C, H, W)`` tensor and int64 labels; a whole batch is one fancy-index.

    ``__getitems__`` makes the DataLoader fetch the batch with one indexing op (use it with
    :func:`passthrough_collate`); samplers, including Lightning's ``DistributedSampler``, work unchanged.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def passthrough_collate(batch: Any) -> Any:
    """Collate for :class:`InMemoryImageDataset`: its ``__getitems__`` already returns a batched tuple."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)  # a dataset without __getitems__ gives a list of samples


class CIFARDataModuleBase(CIFARFolder, ImageDataModule):
    """Shared CIFAR logic; use :class:`CIFAR10DataModule` or :class:`CIFAR100DataModule`.

    Args:
        data_dir: the folder that contains the dataset folder (``cifar-10-batches-py`` /
            ``cifar-100-python``), or that folder itself (see :meth:`ImageDataModule.resolve_data_dir`).
        batch_size: images per batch and per device.
        val_size: training images held out for validation (model selection), stratified by class and
            seeded. ``0`` means no validation split: ``val_dataloader`` returns an empty list, which Lightning
            treats as "no validation" (so nothing may monitor a validation metric). The test set is never
            used for model selection.
        seed: seeds the validation split, the label noise, the augmentation (per rank, epoch and batch)
            and, with ``seed_everything``'s seed, the training order (see :class:`ImageDataModule`).
        download: download and extract the official archive in ``prepare_data`` if the data is absent.
        check_md5: also compare each file's md5 with the official one. Off by default: integrity is checked
            by structure (shapes, dtype, label range), so re-packed copies with other md5s load.
        clean_label_ratio: fraction r of training labels kept; each is otherwise replaced by a different,
            uniformly drawn class (paper Sec. 4.1, noisy-label robustness). Applied after the validation
            split, to the training part only. 1.0 means no noise.
        augment: apply the paper's augmentation (4-pixel zero padding, random 32x32 crop, random horizontal
            flip) to training batches. Every batch is normalised with the dataset's per-channel mean/std.
        num_workers: DataLoader worker processes. The data is in memory and a batch is one indexing op, so 0
            (the main process) is normally fastest.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.

    Attributes:
        num_classes: ``NUM_CLASSES`` (an init-time attribute, for ``LightningCLI`` argument links).
        classes: class names from the meta file (after ``setup``).
        train_labels: labels used for training, noisy if ``clean_label_ratio < 1`` (after ``setup("fit")``).
        train_labels_clean: the original training labels.
        realised_clean_ratio: fraction of ``train_labels`` equal to ``train_labels_clean`` (float; None
            before setup).
        train_indices, val_indices: positions in the official training set of the two parts.
        split_sizes: ``{"train": ..., "val": ..., "test": ...}`` for the splits set up so far.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = False,
        check_md5: bool = False,
        clean_label_ratio: float = 1.0,
        augment: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(seed)
        if type(self) is CIFARDataModuleBase:
            raise TypeError("CIFARDataModuleBase is abstract: use CIFAR10DataModule or CIFAR100DataModule")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= clean_label_ratio <= 1.0:
            raise ValueError(f"clean_label_ratio must be in [0, 1], got {clean_label_ratio}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.data_dir = self.resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.val_size = val_size
        self.download = download
        self.check_md5 = check_md5
        self.clean_label_ratio = clean_label_ratio
        self.augment = augment
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_classes: int = self.NUM_CLASSES

        self.classes: list[str] | None = None
        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self.train_labels: torch.Tensor | None = None
        self.train_labels_clean: torch.Tensor | None = None
        self.realised_clean_ratio: float | None = None
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.split_sizes: dict[str, int] = {}
        self._aug_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        """Read what ``stage`` needs: train and val for ``fit``/``validate``, test for ``test``/``predict``.

        Raises :class:`DatasetNotFoundError` or :class:`DatasetLayoutError` naming the path and the problem.
        """
        self._check_present()
        if self.classes is None:
            self.classes = self._read_meta()
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self._setup_train_val()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            images, labels = self._read_batches(self.test_files)
            self._report_size("test", len(labels), self.official_test_size)
            self.test_dataset = InMemoryImageDataset(images, labels)
            self.split_sizes["test"] = len(labels)

    def _setup_train_val(self) -> None:
        images, labels = self._read_batches(self.train_files)
        self._report_size("training", len(labels), self.official_train_size)
        if self.val_size >= len(labels):
            raise DataSettingError(
                f"val_size={self.val_size} but the {self.DATASET_NAME} training set in {self.dataset_dir} "
                f"has {len(labels)} images. Fix: hold out fewer, e.g. "
                f"`--data.val_size {min(5000, len(labels) // 10)}` (0 for no validation split)."
            )
        train_idx, val_idx = stratified_split(
            labels, self.val_size, self.num_classes, derived_generator(self.seed, _STREAM_SPLIT)
        )
        self.train_indices, self.val_indices = train_idx, val_idx
        if val_idx.numel():
            self.val_dataset = InMemoryImageDataset(images[val_idx], labels[val_idx])
            train_images, self.train_labels_clean = images[train_idx], labels[train_idx]
        else:
            self.val_dataset = None
            train_images, self.train_labels_clean = images, labels
        self.train_labels, self.realised_clean_ratio = corrupt_labels(
            self.train_labels_clean,
            self.clean_label_ratio,
            self.num_classes,
            derived_generator(self.seed, _STREAM_NOISE),
        )
        if self.clean_label_ratio < 1.0:
            rank_zero_info(
                f"{self.DATASET_NAME}: label noise with clean ratio {self.clean_label_ratio} on the training "
                f"part, realised {self.realised_clean_ratio:.4f}"
            )
        self.train_dataset = InMemoryImageDataset(train_images, self.train_labels)
        self.split_sizes.update(train=len(train_idx), val=len(val_idx))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: InMemoryImageDataset | None, split: str) -> DataLoader:
        """An evaluation split's loader, in the split's order."""
        return split_loader(
            dataset,
            type(self).__name__,
            split,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=True,
            collate_fn=passthrough_collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Uint8 training batches ``(images, labels)`` in the resumable seeded order (see
        :class:`ImageDataModule`), augmented in ``on_after_batch_transfer``."""
        return self._train_loader(
            self.train_dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=True,
            collate_fn=passthrough_collate,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or ``[]`` when ``val_size == 0`` (Lightning then skips validation)."""
        if self.val_size == 0:
            return []
        return self._loader(self.val_dataset, "validation")

    def test_dataloader(self) -> DataLoader:
        """The official test set (for the final report only, never for model selection)."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """The official test set."""
        return self._loader(self.test_dataset, "test")

    # ------------------------------------------------------------------ on-device augmentation
    def _augmentation_generator(self, device: torch.device) -> torch.Generator:
        """The generator for the next training batch, seeded from ``(seed, rank, epoch, batch position)``.

        A function of the position, not a stream with a state, so a resumed run draws what the uninterrupted
        one drew on any number of devices (a saved stream would hold rank 0's state only).
        """
        if self._aug_generator is None or self._aug_generator.device != device:
            self._aug_generator = torch.Generator(device=device)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = self._train_sampler
        epoch, batch = (sampler.pass_epoch, sampler.batches_consumed) if sampler is not None else (0, 0)
        return self._aug_generator.manual_seed(derived_seed(self.seed, _STREAM_AUGMENT, rank, epoch, batch))

    def prepare_batch(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """A uint8 batch on its device as float normalised images, augmented (when ``augment``) for
        training with the training augmentation stream: what every training and evaluation step receives."""
        if train and self.augment:
            generator = self._augmentation_generator(images.device)
            return augment_cifar_batch(images, self.MEAN, self.STD, generator=generator)
        return normalize_batch(images, self.MEAN, self.STD)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn a uint8 batch on the device into float normalised images; augment it while training.
        A batch of images alone (the model summary's `example_input_array`) is normalised."""
        if isinstance(batch, torch.Tensor):
            return self.prepare_batch(batch, train=False)
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        images = self.prepare_batch(images, train=training)
        return super().on_after_batch_transfer((images, labels), dataloader_idx)  # counts the batch

    def train_batches(self, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches as a training step receives them: the training dataloader's uint8
        batches moved to ``device``, then augmented and normalised there (``prepare_batch``), for measuring
        the pipeline; needs ``setup("fit")``."""
        device = torch.device(device)
        for images, labels in self.train_dataloader():
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            yield self.prepare_batch(images, train=True), labels


class CIFAR10DataModule(CIFARDataModuleBase):
    __doc__ = (
        "CIFAR-10: 10 classes, 50,000 training and 10,000 test 32x32 images (``cifar-10-batches-py``).\n"
        + (CIFARDataModuleBase.__doc__ or "").split("\n", 1)[1]
    )

    DATASET_NAME = "CIFAR-10"
    source = CIFAR10
    label_key = "labels"
    NUM_CLASSES = 10
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModuleBase):
    __doc__ = (
        "CIFAR-100: 100 fine classes, 50,000 training and 10,000 test 32x32 images (``cifar-100-python``).\n"
        + (CIFARDataModuleBase.__doc__ or "").split("\n", 1)[1]
    )

    DATASET_NAME = "CIFAR-100"
    source = CIFAR100
    label_key = "fine_labels"
    NUM_CLASSES = 100
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)
