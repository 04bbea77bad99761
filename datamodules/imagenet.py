"""ImageNet (ILSVRC 2012) data module: ``train/`` and ``val/`` class-per-folder JPEG trees, or the litdata
shards converted from them (``format="litdata"``, :mod:`datamodules.imagenet_shards`).

Training follows the common ImageNet recipe (random-resized crop, horizontal flip, per-channel
normalisation). Wang et al., CVPR 2017, Sec. 4.2 train Attention-56/92 with scale and aspect-ratio
augmentation and evaluate single crops of 224x224 (and 320x320); ``eval_size`` selects the crop and the
shorter side is resized to ``round(eval_size / 0.875)`` first (224 -> 256, 320 -> 366).

Images are decoded with PIL in DataLoader workers (torchvision's ``default_loader`` for files): portable,
and handles every JPEG/PNG variant in ILSVRC (CMYK, greyscale). ``decode="cuda"`` decodes on the GPU
instead (:mod:`datamodules.decoding`). Both formats share the class order (sorted wnids), the transforms
and the per-image seeded augmentation; they differ in the training order (a full permutation for files, a
chunk-local one for shards: :class:`~datamodules.sampling.ChunkedResumableSampler`).
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import v2

from .base import ImageDataModule
from .decoding import (
    CheckedImages,
    EncodedBatch,
    check_decode_device,
    collate_encoded,
    decode_batch,
    encoded_eval_params,
    encoded_from_bytes,
    encoded_train_params,
)
from .errors import DatasetLayoutError, DatasetNotFoundError
from .imagenet_shards import ShardedImageTree, read_shards_info, storage_layout
from .loaders import split_loader
from .sampling import ChunkedResumableSampler, SeededSamples, derived_generator, derived_seed

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


class ImageTreeDataset(CheckedImages, ImageFolder):
    """``ImageFolder`` with an optional fixed class mapping and explicit handling of unreadable images.

    Images are validated lazily, when loaded (a pre-scan would decode all 1.28M ImageNet files at every
    start); an unreadable file follows :class:`~datamodules.decoding.CheckedImages` (an error naming its
    path, or with ``skip_corrupt`` a warning and the next readable sample).

    Args:
        root: the tree, ``root/<class>/<image>``.
        transform: applied to the decoded PIL image (or, with ``encoded``, to the ``EncodedImage``).
        class_to_idx: use this class mapping (e.g. the training tree's for ``val/``) instead of the folders'.
        skip_corrupt: skip unreadable images with a warning instead of raising.
        loader: image decoder (torchvision's ``default_loader``: PIL, converted to RGB).
        encoded: return each file's encoded bytes for the GPU decode instead of decoding it.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        class_to_idx: dict[str, int] | None = None,
        skip_corrupt: bool = False,
        loader: Callable[[str], Any] = default_loader,
        encoded: bool = False,
    ) -> None:
        self._fixed_class_to_idx = class_to_idx
        self._init_checks(skip_corrupt)
        self.encoded = encoded
        super().__init__(str(root), transform=transform, loader=loader, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._fixed_class_to_idx is None:
            return super().find_classes(directory)
        mapping = dict(self._fixed_class_to_idx)
        return sorted(mapping, key=mapping.__getitem__), mapping

    def _where(self) -> str:
        return str(self.root)

    def _sample(self, index: int) -> tuple[str, int, Callable[[], Any]]:
        path, target = self.samples[index]
        if self.encoded:
            return path, target, lambda: encoded_from_bytes(Path(path).read_bytes())
        return path, target, lambda: self.loader(path)


class ImageNetDataModule(ImageDataModule):
    """ImageNet from ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG`` (ILSVRC layout), or
    from the shards that ``python -m datamodules.convert imagenet`` makes of them (``format="litdata"``).

    The official validation images come as one flat folder; sort them into wnid folders once with
    ``python -m datamodules.imagenet_valprep --val-dir DIR --labels FILE``.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``, each with one sub-folder per class (same
            classes); with ``format="litdata"``, the converted shards' folder.
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
        format: ``folder`` (the JPEG trees) or ``litdata`` (the converted shards, for cluster file systems).
        decode: ``cpu`` (PIL in the workers) or ``cuda`` (nvJPEG on the training GPU; ``setup`` refuses it
            without one).
        shuffle_window: with ``format="litdata"``, the chunks that the training order mixes at a time.

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
        format: Literal["folder", "litdata"] = "folder",
        decode: Literal["cpu", "cuda"] = "cpu",
        shuffle_window: int = 8,
    ) -> None:
        super().__init__(seed)
        if format not in ("folder", "litdata"):
            raise ValueError(f"format must be 'folder' or 'litdata', got {format!r}")
        if decode not in ("cpu", "cuda"):
            raise ValueError(f"decode must be 'cpu' or 'cuda', got {decode!r}")
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
        self.format, self.decode, self.shuffle_window = format, decode, shuffle_window

        self.classes: list[str] | None = None
        if format == "litdata":
            if num_classes is None or (self.data_dir / "ran_shards.json").is_file():
                self.classes = list(read_shards_info(self.data_dir)["classes"])
        elif (self.data_dir / "train").is_dir():
            self.classes = self._class_folders(self.data_dir / "train")
            if num_classes is not None and num_classes != len(self.classes):
                raise DatasetLayoutError(
                    f"num_classes={num_classes} but {self.data_dir / 'train'} has "
                    f"{len(self.classes)} class folders"
                )
        elif num_classes is None:
            raise DatasetNotFoundError(
                f"{self.missing_message(self.data_dir)} Or pass `--data.num_classes` to build it without "
                f"the tree."
            )
        if self.classes is not None:
            if num_classes is not None and num_classes != len(self.classes):
                raise DatasetLayoutError(
                    f"num_classes={num_classes} but {self.data_dir} has {len(self.classes)} classes"
                )
            num_classes = len(self.classes)
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

    def tree(self, split: str) -> ImageTreeDataset:
        """The folder tree's ``split`` (``train`` or ``val``), checked, untransformed (for the converter)."""
        if self.classes is None:
            self.classes = self._class_folders(self.data_dir / "train")
        return self._tree(split, None, self.classes)

    def _split(self, split: str, transform: Callable, classes: list[str]) -> Dataset:
        """``split`` in this datamodule's format and decode."""
        if self.format == "litdata":
            encoded = self.decode == "cuda"
            return ShardedImageTree(self.data_dir, split, transform, classes, self.skip_corrupt, encoded)
        return self._tree(split, transform, classes)

    def _tree(self, split: str, transform: Callable | None, classes: list[str]) -> ImageTreeDataset:
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
            encoded=self.decode == "cuda",
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
        """Scan the trees (or open the shards) that ``stage`` needs and build the datasets."""
        train_root = self.data_dir / "train"
        self.check_data_dir(self.data_dir)
        check_decode_device(self.decode)  # here, not at construction, which LightningCLI wraps
        if self.format == "litdata":
            self.classes = list(read_shards_info(self.data_dir)["classes"])
        elif not train_root.is_dir():
            raise DatasetNotFoundError(self.missing_message(self.data_dir))
        if self.classes is None:
            self.classes = self._class_folders(train_root)
        if self.decode == "cuda":  # the workers draw the augmentation; the GPU applies it
            train_tf, eval_tf = encoded_train_params(), encoded_eval_params
        else:
            eval_tf = imagenet_eval_transform(self.eval_size, self.MEAN, self.STD)
            train_tf = imagenet_train_transform(self.image_size, self.MEAN, self.STD)
        if stage in (None, "fit", "validate"):
            if self.holdout_per_class > 0:
                if self.train_dataset is None:
                    train_tree = self._split("train", train_tf, self.classes)
                    train_idx, val_idx = self._holdout_split(train_tree.targets)
                    holdout_tree = copy.copy(train_tree)  # shares the sample list, evaluation transform
                    holdout_tree.transform = eval_tf
                    self.train_dataset = Subset(train_tree, train_idx)
                    self.val_dataset = Subset(holdout_tree, val_idx)
            else:
                if stage != "validate" and self.train_dataset is None:
                    self.train_dataset = self._split("train", train_tf, self.classes)
                if self.val_dataset is None:
                    if self.test_dataset is None:
                        self.test_dataset = self._split("val", eval_tf, self.classes)
                    self.val_dataset = self.test_dataset
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._split("val", eval_tf, self.classes)
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
            collate_fn=collate_encoded if self.decode == "cuda" else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented training batches of float ``(B, 3, image_size, image_size)`` tensors in the resumable
        seeded order (see :class:`ImageDataModule`; for shards, chunk-local), each image's crop and flip
        seeded by ``(seed, epoch, index)``. With ``decode="cuda"`` the loader yields encoded batches that
        :meth:`on_before_batch_transfer` decodes on the GPU."""
        samples, order = None, None
        if self.train_dataset is not None:
            samples = SeededSamples(self.train_dataset, derived_seed(self.seed, _STREAM_AUGMENT))
            layout = storage_layout(self.train_dataset)
            if layout is not None:
                positions, chunk_sizes = layout
                order = functools.partial(
                    ChunkedResumableSampler,
                    positions=positions,
                    chunk_sizes=chunk_sizes,
                    window=self.shuffle_window,
                )
        return self._train_loader(
            samples,
            stamp_epoch=True,
            order=order,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_encoded if self.decode == "cuda" else None,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode="cuda"``, decode an encoded batch on the training device."""
        if isinstance(batch, EncodedBatch):
            trainer = self.trainer
            return self._decode(batch, trainer.strategy.root_device if trainer is not None else "cuda")
        return batch

    def _decode(self, batch: EncodedBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size if batch.boxes is not None else self.eval_size
        return decode_batch(batch, device, size, eval_resize_size(self.eval_size), self.MEAN, self.STD)

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
        for batch in self.train_dataloader():
            images, labels = self._decode(batch, device) if isinstance(batch, EncodedBatch) else batch
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
