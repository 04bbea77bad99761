"""The input images of the analyses: CIFAR test images, ImageNet `val/` images, or seeded random images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from datamodules import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageNetDataModule,
    normalize_batch,
)
from datamodules.imagenet import eval_resize_size

__all__ = [
    "DATAMODULES",
    "DATASETS",
    "NORMALISATION",
    "AnalysisImages",
    "load_analysis_images",
    "missing_data_dir",
]

DATAMODULES = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule, "imagenet": ImageNetDataModule}
DATASETS = tuple(DATAMODULES)
NORMALISATION = {
    "cifar10": (CIFAR10DataModule.mean, CIFAR10DataModule.std),
    "cifar100": (CIFAR100DataModule.mean, CIFAR100DataModule.std),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
LAYOUTS = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "imagenet": "train/ and val/"}


@dataclass
class AnalysisImages:
    """uint8 images (B, 3, H, W), their dataset's normalisation and a sentence on where they come from."""

    images: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def normalised(self) -> torch.Tensor:
        return normalize_batch(self.images, self.mean, self.std)


def load_analysis_images(
    dataset: str, data_dir: str | os.PathLike | None, num_images: int, *, image_size: int = 32, seed: int = 0
) -> AnalysisImages:
    """The first `num_images` CIFAR test images, `num_images` ImageNet `val/` images spread evenly over the
    classes (resized and centre-cropped to `image_size`), or, without `data_dir`, uniform random images of
    `image_size` (seeded) normalised with `dataset`'s statistics."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid choices: {', '.join(DATASETS)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    mean, std = NORMALISATION[dataset]
    if data_dir is None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(
            0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=generator
        )
        source = (
            f"{num_images} random uniform {image_size}x{image_size} images (seed {seed}; no --data-dir "
            f"given), normalised with {dataset} statistics"
        )
        return AnalysisImages(images, mean, std, source)
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(missing_data_dir(data_dir, dataset))
    if dataset == "imagenet":
        dm = ImageNetDataModule(str(data_dir), num_workers=0, pin_memory=False, eval_size=image_size)
        dm.setup("test")
        tree = dm.test_dataset
        tree.transform = v2.Compose(
            [
                v2.Resize(eval_resize_size(image_size), antialias=True),
                v2.CenterCrop(image_size),
                v2.PILToTensor(),
            ]
        )
        count = min(num_images, len(tree))
        indices = torch.linspace(0, len(tree) - 1, count).round().long().tolist()
        images = torch.stack([tree[i][0] for i in indices])
        source = (
            f"{count} ImageNet images of {data_dir / 'val'} spread over its {len(dm.classes)} classes, "
            f"centre-cropped to {image_size}x{image_size}"
        )
        return AnalysisImages(images, mean, std, source)
    module = DATAMODULES[dataset]
    if not (data_dir / module.base_folder).is_dir() and data_dir.name == module.base_folder:
        data_dir = data_dir.parent  # the dataset folder itself was given
    dm = module(data_dir=str(data_dir))
    dm.setup("test")
    images = dm.test_dataset.images[:num_images]
    source = f"the first {images.shape[0]} {module.dataset_name} test images of {dm.dataset_dir}"
    return AnalysisImages(images, mean, std, source)


def missing_data_dir(data_dir: Path, dataset: str | None) -> str:
    """The one-line error for a --data-dir that names no folder."""
    if dataset:
        layout = f"{LAYOUTS[dataset]} ({dataset})"
    else:
        layout = ", ".join(f"{LAYOUTS[name]} ({name})" for name in ("cifar10", "cifar100"))
        layout += f" or {LAYOUTS['imagenet']} (imagenet)"
    return (
        f"data directory not found: {data_dir}. Fix: pass --data-dir the folder that contains {layout}, "
        "or leave --data-dir out to use random images"
    )
