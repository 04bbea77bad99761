"""ImageNet as litdata shards: what ``python -m datamodules.convert imagenet`` writes, read back in the
folder tree's own index order.

A cluster file system (Lustre, NFS, GPFS) serves 1.28M small files slowly: every image costs a metadata
lookup. The converter packs each split's JPEG bytes, unchanged, into litdata chunks (about 64 MB each) that
the workers read with litdata's ``StreamingDataset``. The layout of ``SHARDS``:

- ``ran_shards.json``: the format and version, the classes (wnids, sorted: the standard index) and, per
  converted split, its image count and the tree it came from.
- ``<split>/``: a litdata dataset (``index.json``, ``chunk-*.bin``); each item is
  ``{"image": JPEG bytes, "label": class index, "path": "<wnid>/<file>"}``.
- ``<split>_order.npz``: ``positions`` (where the folder tree's image ``i`` is stored) and ``targets`` (the
  folder tree's labels), so that :class:`ShardedImageTree` item ``i`` is ``ImageTreeDataset`` item ``i``:
  the same image, label and seeded augmentation, and the same hold-out split.

The training images are stored in a seeded random order (so that every chunk holds a random mix of
classes, which :class:`~datamodules.sampling.ChunkedResumableSampler` relies on); the validation images in
the folder's order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from .decoding import CheckedImages, encoded_from_bytes, pil_from_bytes
from .errors import DatasetLayoutError, DatasetNotFoundError

__all__ = [
    "SHARDS_FILE",
    "SHARDS_FORMAT",
    "SHARDS_VERSION",
    "ShardedImageTree",
    "order_file",
    "read_shards_info",
    "shards_fix_hint",
    "storage_layout",
]

SHARDS_FILE = "ran_shards.json"
SHARDS_FORMAT = "ran.imagenet-shards"
SHARDS_VERSION = 1


def order_file(root: str | os.PathLike, split: str) -> Path:
    """The file holding a split's ``positions`` and ``targets``."""
    return Path(root) / f"{split}_order.npz"


def shards_fix_hint() -> str:
    return (
        "convert the tree once with `python -m datamodules.convert imagenet --data-dir TREE --out SHARDS` "
        "and point `--data.data_dir` at SHARDS (with `--data.format litdata`)."
    )


def read_shards_info(root: str | os.PathLike) -> dict[str, Any]:
    """``SHARDS/ran_shards.json``; :class:`DatasetNotFoundError` where it is absent,
    :class:`DatasetLayoutError` where it is of another format or version."""
    path = Path(root) / SHARDS_FILE
    if not path.is_file():
        raise DatasetNotFoundError(f"ImageNet shards not found: expected {path}. Fix: {shards_fix_hint()}")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path} is unreadable ({exc}). Fix: {shards_fix_hint()}") from exc
    if not isinstance(info, dict) or info.get("format") != SHARDS_FORMAT:
        raise DatasetLayoutError(f"{path} is not a {SHARDS_FORMAT} file. Fix: {shards_fix_hint()}")
    if info.get("version") != SHARDS_VERSION:
        raise DatasetLayoutError(
            f"{path} is version {info.get('version')}; this code reads version {SHARDS_VERSION}. "
            f"Fix: convert the tree again into a new folder: {shards_fix_hint()}"
        )
    return info


class ShardedImageTree(CheckedImages, Dataset):
    """One converted split, indexed as the folder tree it came from: item ``i`` is the tree's image ``i``.

    Each process (the main one and every DataLoader worker) opens its own ``StreamingDataset`` on first use.
    Unreadable images follow :class:`~datamodules.decoding.CheckedImages` (named by their path in the tree).

    Args:
        root: the shards' folder (``SHARDS``).
        split: ``train`` or ``val``.
        transform: applied to the decoded PIL image (or, with ``encoded``, to the
            :class:`~datamodules.decoding.EncodedImage`).
        classes: the class order the caller expects; checked against the shards'.
        skip_corrupt: skip unreadable images with a warning instead of raising.
        encoded: return encoded bytes for the GPU decode instead of decoding with PIL.

    Attributes:
        classes, class_to_idx, targets: as ``ImageFolder``'s.
        positions: where each image is stored; chunk_sizes: the images of each chunk (storage order).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        skip_corrupt: bool = False,
        encoded: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        info = read_shards_info(self.root)
        entry = info.get("splits", {}).get(split)
        folder = self.root / split
        if entry is None or not (folder / "index.json").is_file():
            raise DatasetNotFoundError(
                f"{self.root} holds no converted {split} split ({folder}/index.json). "
                f"Fix: {shards_fix_hint()}"
            )
        self.classes: list[str] = list(info["classes"])
        if classes is not None and list(classes) != self.classes:
            raise DatasetLayoutError(
                f"{self.root}: the shards' classes differ from the expected ones ({len(self.classes)} "
                f"against {len(classes)}). Fix: convert the tree again: {shards_fix_hint()}"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        with np.load(order_file(self.root, split)) as order:
            self.positions = order["positions"].astype(np.int64)
            self.targets: list[int] = order["targets"].tolist()
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
        self.chunk_sizes = [int(c["chunk_size"]) for c in chunks]
        if not (sum(self.chunk_sizes) == len(self.positions) == len(self.targets) == entry["images"]):
            raise DatasetLayoutError(
                f"{folder}: {sum(self.chunk_sizes)} stored images, {len(self.positions)} in "
                f"{order_file(self.root, split).name}, {entry['images']} in {SHARDS_FILE}: an incomplete or "
                f"mixed conversion. Fix: convert again into an empty folder: {shards_fix_hint()}"
            )
        self.transform = transform
        self.target_transform = None
        self.encoded = encoded
        self._init_checks(skip_corrupt)
        self._items: Any = None
        self._items_pid: int | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_items"] = state["_items_pid"] = None  # each worker opens its own
        return state

    def _where(self) -> str:
        return str(self.root / self.split)

    def _stream(self) -> Any:
        if self._items is None or self._items_pid != os.getpid():
            from litdata import StreamingDataset

            # One item at a time: litdata's default for non-image formats deserialises a window of 256 items
            # around each one read, which costs about 1 ms an image in this random access.
            items = StreamingDataset(str(self.root / self.split), batch_decode=0)
            self._items, self._items_pid = items, os.getpid()
        return self._items

    def _sample(self, index: int) -> tuple[str, int, Callable[[], Any]]:
        item = self._stream()[int(self.positions[index])]
        data = item["image"]
        load = (lambda: encoded_from_bytes(data)) if self.encoded else (lambda: pil_from_bytes(data))
        return f"{item['path']} (in {self._where()})", int(item["label"]), load


def storage_layout(dataset: Dataset) -> tuple[np.ndarray, list[int]] | None:
    """``(positions, chunk_sizes)`` of a :class:`ShardedImageTree` or a ``Subset`` of one (the training split
    beside a hold-out), for :class:`~datamodules.sampling.ChunkedResumableSampler`; None for others."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, ShardedImageTree):
        tree = dataset.dataset
        return tree.positions[np.asarray(dataset.indices, dtype=np.int64)], tree.chunk_sizes
    if isinstance(dataset, ShardedImageTree):
        return dataset.positions, dataset.chunk_sizes
    return None
