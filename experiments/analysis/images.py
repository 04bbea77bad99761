"""The input images of the analyses: CIFAR test images, ImageNet `val/` images, or seeded random images."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from datamodules import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule, normalize_batch
from datamodules.imagenet import eval_resize_size

__all__ = [
    "DATAMODULES",
    "DATASETS",
    "AnalysisImages",
    "load_analysis_images",
]

DATAMODULES = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule, "imagenet": ImageNetDataModule}
DATASETS = tuple(DATAMODULES)


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
    module = DATAMODULES[dataset]
    mean, std = module.MEAN, module.STD
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
    data_dir = module.find_dataset(data_dir)  # the one data_dir rule and message of every command
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
    dm = module(data_dir=str(data_dir))
    dm.setup("test")
    images = dm.test_dataset.images[:num_images]
    source = f"the first {images.shape[0]} {module.DATASET_NAME} test images of {dm.dataset_dir}"
    return AnalysisImages(images, mean, std, source)
