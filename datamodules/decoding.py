"""How an ImageNet image becomes a tensor: the unreadable-image rule that the folder tree and the shards
share, and the optional GPU decode.

CPU decode (the default): DataLoader workers decode each JPEG with PIL (torchvision's ``default_loader``
does the same for a file) and apply the datamodule's torchvision transforms.

GPU decode (``decode="cuda"``): the workers read each image's encoded bytes, check its header with PIL and
draw its augmentation (``RandomResizedCrop``'s box and the flip, from the same per-sample seeded generator
as the CPU path, see :class:`~datamodules.sampling.SeededSamples`); the main process decodes the batch on the
GPU with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``), then crops, resizes, flips and normalises
each image there. An image nvJPEG cannot decode (CMYK, or a PNG named .JPEG, both in ILSVRC's training set)
is decoded by PIL instead. The two paths draw the same boxes and flips, but their pixels differ slightly
(nvJPEG's IDCT and torch's antialiased resize against libjpeg-turbo's and PIL's).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from .errors import CorruptImageError, CorruptImageWarning, DataSettingError

__all__ = [
    "CheckedImages",
    "EncodedBatch",
    "EncodedImage",
    "check_decode_device",
    "collate_encoded",
    "decode_batch",
    "encoded_eval_params",
    "encoded_train_params",
    "pil_from_bytes",
]


def pil_from_bytes(data: bytes | memoryview) -> Image.Image:
    """Decode encoded image bytes with PIL, converted to RGB (as torchvision's ``default_loader`` does)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


@dataclass
class EncodedImage:
    """An image's encoded bytes (a 1-D uint8 tensor) and its size from the header, for the GPU decode."""

    data: torch.Tensor
    height: int
    width: int


def encoded_from_bytes(data: bytes | memoryview) -> EncodedImage:
    """The bytes as a tensor, with the size PIL reads from the header (which fails, as decoding would, for
    bytes that are not an image)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width)


class CheckedImages:
    """The rule for unreadable images, shared by :class:`~datamodules.imagenet.ImageTreeDataset` (files) and
    :class:`~datamodules.imagenet_shards.ShardedImageTree` (shards).

    An image that fails to load raises :class:`CorruptImageError` naming it; with ``skip_corrupt`` it is
    reported once with a :class:`CorruptImageWarning` and the next readable sample is returned instead (with
    that sample's label), so an epoch keeps its length. ``encoded`` returns :class:`EncodedImage` bytes (the
    GPU decode) instead of a decoded PIL image. A subclass defines ``__len__``, :meth:`_sample` and
    :meth:`_where`, and calls :meth:`_init_checks`.
    """

    skip_corrupt: bool = False
    encoded: bool = False
    transform: Callable | None = None
    target_transform: Callable | None = None

    def _init_checks(self, skip_corrupt: bool) -> None:
        self.skip_corrupt = skip_corrupt
        self.corrupt_paths: set[str] = set()
        self._corrupt_indices: set[int] = set()

    def _sample(self, index: int) -> tuple[str, int, Callable[[], Any]]:
        """``(name, target, load)``: the image's name in messages, its label, and a call that returns the
        decoded PIL image (or, with ``encoded``, its :class:`EncodedImage`)."""
        raise NotImplementedError

    def _where(self) -> str:
        """The dataset's location in messages."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for _ in range(len(self)):  # type: ignore[arg-type]
            if index not in self._corrupt_indices:
                name, target, load = self._sample(index)
                try:
                    image = load()
                except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
                    if not self.skip_corrupt:
                        raise CorruptImageError(
                            f"Could not decode image {name} ({type(exc).__name__}: {exc}). Delete or replace "
                            f"the file, or set `--data.skip_corrupt true` to skip unreadable images with a "
                            f"warning."
                        ) from exc
                    self._corrupt_indices.add(index)
                    self.corrupt_paths.add(name)
                    warnings.warn(
                        f"Skipping unreadable image {name} ({type(exc).__name__}: {exc}); "
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
            index = (index + 1) % len(self)  # type: ignore[arg-type]
        raise CorruptImageError(
            f"No readable image in {self._where()}: all {len(self)} failed to decode"  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------------- GPU decode
def check_decode_device(decode: str) -> None:
    """Refuse a decode device this machine lacks, in one line."""
    if decode not in ("cpu", "cuda"):
        raise DataSettingError(f"decode must be 'cpu' or 'cuda', got {decode!r}")
    if decode == "cuda" and not torch.cuda.is_available():
        raise DataSettingError(
            "decode='cuda' decodes JPEGs on a CUDA GPU with nvJPEG, and this machine has none "
            "(torch.cuda.is_available() is False). Fix: leave out `--data.decode` (CPU workers decode)."
        )


class encoded_train_params:  # noqa: N801 (a transform, named as torchvision names its transforms)
    """The GPU path's training transform, in the worker: ``RandomResizedCrop``'s box (scale (0.08, 1), ratio
    (3/4, 4/3)) and a flip with p = 0.5, drawn in the order and from the generator of the CPU path's
    transforms (:func:`~datamodules.imagenet.imagenet_train_transform`)."""

    def __init__(self) -> None:
        self.crop = RandomResizedCrop(1)

    def __call__(self, image: EncodedImage) -> tuple[EncodedImage, tuple[int, int, int, int], bool]:
        shape_only = torch.empty(1, 1, 1).expand(1, image.height, image.width)  # get_params reads the size
        box = self.crop.get_params(shape_only, self.crop.scale, self.crop.ratio)
        flip = bool(torch.rand(1) < 0.5)
        return image, box, flip


def encoded_eval_params(image: EncodedImage) -> tuple[EncodedImage, None, bool]:
    """The GPU path's evaluation transform, in the worker: nothing to draw."""
    return image, None, False


@dataclass
class EncodedBatch:
    """A batch of encoded images for :func:`decode_batch`; ``boxes`` is None for evaluation."""

    data: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    boxes: list[tuple[int, int, int, int]] | None
    flips: list[bool]
    labels: torch.Tensor


def collate_encoded(samples: Sequence[tuple[tuple[EncodedImage, Any, bool], int]]) -> EncodedBatch:
    """Collate ``((EncodedImage, box, flip), label)`` samples into an :class:`EncodedBatch`."""
    boxes = [params[1] for params, _ in samples]
    return EncodedBatch(
        data=[params[0].data for params, _ in samples],
        sizes=[(params[0].height, params[0].width) for params, _ in samples],
        boxes=None if boxes[0] is None else boxes,
        flips=[params[2] for params, _ in samples],
        labels=torch.tensor([label for _, label in samples], dtype=torch.int64),
    )


def _decode_all(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode to uint8 ``(3, H, W)`` tensors on ``device``: the batch with nvJPEG, and an image it rejects
    with PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for item in data:
            try:
                out.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                pil = pil_from_bytes(item.numpy().tobytes())
                out.append(TF.pil_to_tensor(pil).to(device))
        return out


def decode_batch(
    batch: EncodedBatch,
    device: torch.device | str,
    size: int,
    resize: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` on ``device``: float ``(B, 3, size, size)`` images, normalised.

    Training batches (with boxes): each image cropped to its box and resized to ``size`` (antialiased),
    flipped where drawn. Evaluation batches: the shorter side resized to ``resize``, centre-cropped to
    ``size``.
    """
    device = torch.device(device)
    images = _decode_all(batch.data, device)
    out = []
    for i, image in enumerate(images):
        if batch.boxes is not None:
            top, left, height, width = batch.boxes[i]
            image = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
            if batch.flips[i]:
                image = TF.horizontal_flip(image)
        else:
            image = TF.center_crop(TF.resize(image, resize, antialias=True), [size, size])
        out.append(image)
    stacked = torch.stack(out).float().div_(255)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return stacked.sub_(mean_t).div_(std_t), batch.labels.to(device, non_blocking=True)
