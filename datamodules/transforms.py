"""The batched CIFAR augmentation and its per-image reference.

The paper (Wang et al., CVPR 2017, Sec. 4.1) trains on CIFAR with "the standard data augmentation": 4-pixel
zero padding on each side, a random 32x32 crop, a random horizontal flip, and per-pixel mean subtraction.
We normalise with the per-channel mean *and* standard deviation (the usual modern variant); the constants
are dataset facts, held by the datamodule classes (``CIFAR10DataModule.MEAN``, ``.STD``).

:func:`augment_cifar_batch` does this for a whole uint8 batch on the training device in a few tensor ops
(one gather for all crops, one ``where`` for the flips, one scale-and-shift), so the data pipeline is never
the bottleneck. :func:`reference_cifar_transform` is the same augmentation as per-image torchvision
transforms; the tests check that the two agree (exactly for fixed offsets, and in distribution for random
ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = [
    "augment_cifar_batch",
    "crop_flip_batch",
    "normalize_batch",
    "random_crop_flip_params",
    "reference_cifar_transform",
]


def random_crop_flip_params(
    batch_size: int,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw per-image crop offsets and flip decisions.

    Returns ``(top, left, flips)``: int64 offsets uniform in ``[0, 2 * padding]`` into the padded image (as
    ``RandomCrop(32, padding=4)`` draws them) and a bool tensor, True with probability 0.5 when ``flip``.
    """
    top = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator, device=device)
    if flip:
        flips = torch.rand(batch_size, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=device)
    return top, left, flips


def crop_flip_batch(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flips: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad each image by ``padding``, crop it to its size at ``(top, left)``, mirror it where ``flips``.

    Deterministic given the offsets and works for any dtype. Image ``i`` equals
    ``hflip(crop(pad(images[i], padding), top[i], left[i], H, W))`` when ``flips[i]``. All crops are one
    advanced-indexing gather from a strided window view of the padded batch, and the flips one ``where``; no
    Python loop over images and no host-device synchronisation.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W) view, no copy
    crops = windows[torch.arange(b, device=device), :, top.to(device), left.to(device)]  # (B, C, H, W)
    return torch.where(flips.to(device).view(b, 1, 1, 1), crops.flip(3), crops)


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Return float32 ``(x / 255 - mean) / std`` per channel (uint8 input) or ``(x - mean) / std`` (float)."""
    device = images.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    max_value = 255.0 if images.dtype == torch.uint8 else 1.0
    out = images.to(torch.float32, copy=True)  # never modify the caller's tensor in place
    return out.mul_(1.0 / (max_value * std_t)).sub_(mean_t / std_t)


def augment_cifar_batch(
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """The paper's CIFAR training augmentation for a whole batch: pad, random crop, random flip, normalise.

    Args:
        images_uint8: ``(B, 3, 32, 32)`` uint8 images, on any device.
        mean, std: per-channel normalisation constants on the [0, 1] scale (the datamodule's MEAN, STD).
        generator: a ``torch.Generator`` on the images' device for reproducible draws (global RNG if None).
        padding: zero padding on each side before the random crop (4 in the paper).
        flip: random horizontal flip with p = 0.5 per image.

    Returns:
        ``(B, 3, 32, 32)`` float32 normalised images on the same device.
    """
    top, left, flips = random_crop_flip_params(
        images_uint8.shape[0], padding=padding, flip=flip, generator=generator, device=images_uint8.device
    )
    return normalize_batch(crop_flip_batch(images_uint8, top, left, flips, padding=padding), mean, std)


def reference_cifar_transform(mean: Sequence[float], std: Sequence[float], padding: int = 4) -> v2.Compose:
    """The same augmentation as per-image torchvision transforms (for PIL images or uint8 CHW tensors).

    ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, conversion to float on [0, 1], ``Normalize``.
    Slow (one Python call chain per image); kept as the reference the batched path is tested against.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(32, padding=padding),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
