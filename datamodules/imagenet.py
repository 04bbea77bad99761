"""ImageNet (ILSVRC 2012) data module: ``train/`` and ``val/`` class-per-folder JPEG trees.

Training follows the common ImageNet recipe (random-resized crop, horizontal flip, per-channel
normalisation). Wang et al., CVPR 2017, Sec. 4.2 train Attention-56/92 with scale and aspect-ratio
augmentation and evaluate single crops of 224x224 (and 320x320); ``eval_size`` selects the crop and the
shorter side is resized to ``round(eval_size / 0.875)`` first (224 -> 256, 320 -> 366).

Images are decoded with PIL through torchvision's ``default_loader`` in DataLoader workers: portable, and
handles every JPEG/PNG variant in ILSVRC (CMYK, greyscale). ``torchvision.io.decode_jpeg`` (libjpeg-turbo,
optionally on the GPU) is a faster alternative when decoding becomes the bottleneck.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import v2

from .base import ImageDataModule
from .errors import CorruptImageError, CorruptImageWarning, DatasetLayoutError, DatasetNotFoundError
from .loaders import split_loader
from .sampling import SeededSamples, derived_generator, derived_seed

__all__ = [
    "ImageNetDataModule",
    "ImageTreeDataset",
    "eval_resize_size",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

# Ratio of crop to resized shorter side in the standard ImageNet evaluation (224 / 256).
EVAL_CROP_RATIO = 0.875

# Independent random streams derived from the one user-facing seed (3 is the training order's, in base.py).
_STREAM_HOLDOUT, _STREAM_AUGMENT = 0, 2


def eval_resize_size(eval_size: int) -> int:
    """Shorter-side resize before the ``eval_size`` centre crop: ``round(eval_size / 0.875)``."""
    return round(eval_size / EVAL_CROP_RATIO)


def imagenet_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip, to [0, 1] float, Normalize."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),  # the v2 equivalent of ToTensor
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )


def imagenet_eval_transform(eval_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the shorter side to ``round(eval_size / 0.875)``, centre-crop ``eval_size``, Normalize."""
    return v2.Compose(
        [
            v2.Resize(eval_resize_size(eval_size), antialias=True),
            v2.CenterCrop(eval_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )


class ImageTreeDataset(ImageFolder):
    """``ImageFolder`` with an optional fixed class mapping and explicit handling of unreadable images.

    Images are validated lazily, when loaded (a pre-scan would decode all 1.28M ImageNet files at every
    start). An unreadable file raises :class:`CorruptImageError` naming its path; with ``skip_corrupt`` it is
    reported once with a :class:`CorruptImageWarning` and the next readable sample is returned instead
    (with that sample's label), so an epoch keeps its length.

    Args:
        root: the tree, ``root/<class>/<image>``.
        transform: applied to the decoded PIL image.
        class_to_idx: use this class mapping (e.g. the training tree's for ``val/``) instead of the folders'.
        skip_corrupt: skip unreadable images with a warning instead of raising.
        loader: image decoder (torchvision's ``default_loader``: PIL, converted to RGB).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        class_to_idx: dict[str, int] | None = None,
        skip_corrupt: bool = False,
        loader: Callable[[str], Any] = default_loader,
    ) -> None:
        self._fixed_class_to_idx = class_to_idx
        self.skip_corrupt = skip_corrupt
        self.corrupt_paths: set[str] = set()
        super().__init__(str(root), transform=transform, loader=loader, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._fixed_class_to_idx is None:
            return super().find_classes(directory)
        mapping = dict(self._fixed_class_to_idx)
        return sorted(mapping, key=mapping.__getitem__), mapping

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for _ in range(len(self.samples)):
            path, target = self.samples[index]
            if path not in self.corrupt_paths:
                try:
                    image = self.loader(path)
                except (
                    Exception
                ) as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError, ...
                    if not self.skip_corrupt:
                        raise CorruptImageError(
                            f"Could not decode image {path} ({type(exc).__name__}: {exc}). Delete or "
                            f"replace the file, or set `--data.skip_corrupt true` to skip unreadable images "
                            f"with a warning."
                        ) from exc
                    self.corrupt_paths.add(path)
                    warnings.warn(
                        f"Skipping unreadable image {path} ({type(exc).__name__}: {exc}); "
                        f"using the next image instead.",
                        CorruptImageWarning,
                        stacklevel=2,
                    )
                else:
                    if self.transform is not None:
                        image = self.transform(image)
                    if self.target_transform is not None:
                        target = self.target_transform(target)
                    return image, target
            index = (index + 1) % len(self.samples)
        raise CorruptImageError(
            f"No readable image in {self.root}: all {len(self.samples)} files failed to decode"
        )


class ImageNetDataModule(ImageDataModule):
    """ImageNet from ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG`` (ILSVRC layout).

    The official validation images come as one flat folder; sort them into wnid folders once with
    ``python -m datamodules.imagenet_valprep --val-dir DIR --labels FILE``.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``, each with one sub-folder per class (same
            classes).
        batch_size: images per batch and per device.
        num_workers: DataLoader worker processes (decoding JPEGs needs several).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (only used when ``num_workers > 0``).
        image_size: side of the training crop (RandomResizedCrop, scale (0.08, 1), ratio (3/4, 4/3)).
        eval_size: side of the evaluation centre crop, after resizing the shorter side to
            ``round(eval_size / 0.875)``: 224 -> 256 -> 224 (standard), 320 -> 366 -> 320 (paper's 320 test).
        skip_corrupt: skip unreadable image files with a warning naming each, instead of failing on the first.
        holdout_per_class: if > 0, hold out that many training images per class (seeded) as the validation
            set for model selection, and use ``val/`` as the test set. If 0, ``val/`` serves as both
            validation and test set: the ILSVRC convention, since the official test labels are not public.
        seed: seeds the hold-out split, the training augmentation (per image, from ``(seed, epoch, index)``,
            whichever worker loads it) and, with ``seed_everything``'s seed, the training order (see
            :class:`ImageDataModule`).
        num_classes: number of classes; counted from the class folders of ``train/`` when None. If given
            while the tree is present, it must match the count.

    Attributes:
        num_classes: the tree's number of classes (set at construction, for ``LightningCLI`` argument links);
            ``NUM_CLASSES`` is ILSVRC's 1000.
        classes: class folder names (wnids), index order.
    """

    DATASET_NAME: ClassVar[str] = "ImageNet"
    NUM_CLASSES: ClassVar[int] = 1000
    MEAN: ClassVar[tuple[float, float, float]] = (0.485, 0.456, 0.406)
    STD: ClassVar[tuple[float, float, float]] = (0.229, 0.224, 0.225)
    DATASET_FOLDER: ClassVar[None] = None  # data_dir is the dataset's folder (any name)

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        image_size: int = 224,
        eval_size: int = 224,
        skip_corrupt: bool = False,
        holdout_per_class: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if holdout_per_class < 0:
            raise ValueError(f"holdout_per_class must be >= 0, got {holdout_per_class}")
        self.save_hyperparameters()
        self.data_dir = self.resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.image_size = image_size
        self.eval_size = eval_size
        self.skip_corrupt = skip_corrupt
        self.holdout_per_class = holdout_per_class

        self.classes: list[str] | None = None
        if (self.data_dir / "train").is_dir():
            self.classes = self._class_folders(self.data_dir / "train")
            if num_classes is not None and num_classes != len(self.classes):
                raise DatasetLayoutError(
                    f"num_classes={num_classes} but {self.data_dir / 'train'} has "
                    f"{len(self.classes)} class folders"
                )
            num_classes = len(self.classes)
        elif num_classes is None:
            raise DatasetNotFoundError(
                f"{self.missing_message(self.data_dir)} Or pass `--data.num_classes` to build it without "
                f"the tree."
            )
        self.num_classes: int = num_classes

        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # ------------------------------------------------------------------ layout checks
    @classmethod
    def layout(cls, root: str | Path) -> str:
        return (
            f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class with the same "
            f"class folders in both"
        )

    @classmethod
    def fix_hint(cls) -> str:
        return (
            "point `--data.data_dir` at the folder that contains train/ and val/ (sort the official flat "
            "validation images into class folders with `python -m datamodules.imagenet_valprep`)."
        )

    def _layout_hint(self) -> str:
        return f"Expected {self.layout(self.data_dir)}. Fix: {self.fix_hint()}"

    def _class_folders(self, root: Path) -> list[str]:
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        if not classes:
            raise DatasetLayoutError(f"{root} has no class folders. {self._layout_hint()}")
        return classes

    def _tree(self, split: str, transform: Callable, classes: list[str]) -> ImageTreeDataset:
        """Load ``data_dir/split`` with the training class mapping; check its classes, none of them empty."""
        root = self.data_dir / split
        if not root.is_dir():
            raise DatasetNotFoundError(f"ImageNet {split} folder not found: {root}. {self._layout_hint()}")
        found = self._class_folders(root)
        if found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DatasetLayoutError(
                f"{root}: class folders differ from {self.data_dir / 'train'}: "
                f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}. "
                f"{self._layout_hint()}"
            )
        dataset = ImageTreeDataset(
            root,
            transform,
            class_to_idx={c: i for i, c in enumerate(classes)},
            skip_corrupt=self.skip_corrupt,
        )
        counts = Counter(dataset.targets)
        empty = [str(root / c) for i, c in enumerate(classes) if counts[i] == 0]
        if empty:
            raise DatasetLayoutError(
                f"{len(empty)} class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): "
                f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}. {self._layout_hint()}"
            )
        return dataset

    def _holdout_split(self, targets: list[int]) -> tuple[list[int], list[int]]:
        """``holdout_per_class`` seeded random images per class for validation; the rest for training."""
        generator = derived_generator(self.seed, _STREAM_HOLDOUT)
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_class.setdefault(t, []).append(i)
        train_idx, val_idx = [], []
        for c in sorted(by_class):
            members = by_class[c]
            if len(members) <= self.holdout_per_class:
                raise ValueError(
                    f"holdout_per_class={self.holdout_per_class} but class {self.classes[c]} has only "
                    f"{len(members)} training images"
                )
            perm = torch.randperm(len(members), generator=generator).tolist()
            val_idx += [members[j] for j in perm[: self.holdout_per_class]]
            train_idx += [members[j] for j in perm[self.holdout_per_class :]]
        return sorted(train_idx), sorted(val_idx)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Scan the trees that ``stage`` needs and build the datasets."""
        train_root = self.data_dir / "train"
        self.check_data_dir(self.data_dir)
        if not train_root.is_dir():
            raise DatasetNotFoundError(self.missing_message(self.data_dir))
        if self.classes is None:
            self.classes = self._class_folders(train_root)
        eval_tf = imagenet_eval_transform(self.eval_size, self.MEAN, self.STD)
        train_tf = imagenet_train_transform(self.image_size, self.MEAN, self.STD)
        if stage in (None, "fit", "validate"):
            if self.holdout_per_class > 0:
                if self.train_dataset is None:
                    train_tree = self._tree("train", train_tf, self.classes)
                    train_idx, val_idx = self._holdout_split(train_tree.targets)
                    holdout_tree = copy.copy(train_tree)  # shares the sample list, evaluation transform
                    holdout_tree.transform = eval_tf
                    self.train_dataset = Subset(train_tree, train_idx)
                    self.val_dataset = Subset(holdout_tree, val_idx)
            else:
                if stage != "validate" and self.train_dataset is None:
                    self.train_dataset = self._tree("train", train_tf, self.classes)
                if self.val_dataset is None:
                    if self.test_dataset is None:
                        self.test_dataset = self._tree("val", eval_tf, self.classes)
                    self.val_dataset = self.test_dataset
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._tree("val", eval_tf, self.classes)
            if self.holdout_per_class == 0:
                self.val_dataset = self.test_dataset

    def _loader(self, dataset: Dataset | None, split: str) -> DataLoader:
        """An evaluation split's loader, in the split's order."""
        return split_loader(
            dataset,
            "ImageNetDataModule",
            split,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented training batches of float ``(B, 3, image_size, image_size)`` tensors in the resumable
        seeded order (see :class:`ImageDataModule`), each image's crop and flip seeded by
        ``(seed, epoch, index)``."""
        samples = None
        if self.train_dataset is not None:
            samples = SeededSamples(self.train_dataset, derived_seed(self.seed, _STREAM_AUGMENT))
        return self._train_loader(
            samples,
            stamp_epoch=True,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """The hold-out (``holdout_per_class > 0``) or ``val/`` (otherwise), centre-cropped."""
        return self._loader(self.val_dataset, "validation")

    def test_dataloader(self) -> DataLoader:
        """``val/``, centre-cropped to ``eval_size``."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()

    def train_batches(self, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches as a training step receives them: the training dataloader's decoded,
        augmented batches moved to ``device`` (for measuring the pipeline; needs ``setup("fit")``)."""
        device = torch.device(device)
        for images, labels in self.train_dataloader():
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
