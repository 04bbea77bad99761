"""Seeded random streams and a training order that resumes mid-epoch, shared by every datamodule.

Exact resume (kill -9 mid-epoch, resume from the last checkpoint, and the run ends with the weights of the
uninterrupted run) needs the data side to continue where it stopped: the epoch's order is a permutation
drawn from ``(seed, epoch)`` alone (:class:`ResumableSampler`), the datamodule counts the batches that
training has consumed and saves ``(epoch, batches consumed)`` in its ``state_dict``, and the resumed epoch
skips exactly those batches. Augmentation draws are seeded per batch from ``(seed, rank, epoch, batch)``
(CIFAR, on the device) or per sample from ``(seed, epoch, index)`` (:class:`SeededSamples`, ImageNet), so
they do not depend on the global RNG, the number of DataLoader workers or where a run was interrupted, and
nothing but the position needs saving.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "ChunkedResumableSampler",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeededSamples",
    "derived_generator",
    "derived_seed",
]


def _seed_state(seed: int, *stream: int) -> int:
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0])


def derived_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed derived from ``(seed, *stream)`` via numpy's ``SeedSequence`` (room to add an epoch).

    Different ``stream`` values give statistically independent seeds for the same user seed.
    """
    return _seed_state(seed, *stream) >> 1


def derived_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, *stream)`` via numpy's ``SeedSequence``."""
    return torch.Generator(device=device).manual_seed(_seed_state(seed, *stream))


class ResumableSampler(DistributedSampler):
    """The training order: one seeded permutation per epoch, sharded over ranks, resumable mid-epoch.

    The permutation of epoch ``e`` is ``DistributedSampler``'s (seeded with ``seed + e``; rank ``r`` of
    ``R`` takes every R-th index, padded to equal length), so it depends on nothing but the seed and the
    epoch. Being a ``DistributedSampler``, Lightning keeps it under DDP and calls :meth:`set_epoch` each
    epoch. ``batches_consumed`` counts the batches of the current pass that training has taken (the
    datamodule calls :meth:`batch_consumed` for each); the pass after a restore starts ``start_batch``
    batches in, skipping the indices those batches held without loading them.

    Args:
        dataset: the training split.
        batch_size: images per batch, to turn batches into indices.
        seed: the order's seed (the same on every rank).
        num_replicas, rank: the process group (1 and 0 on a single device).
        epoch, start_batch: where the first pass starts (a restored position).
        stamp_epoch: yield ``(index, epoch)`` pairs instead of indices, for :class:`SeededSamples`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        stamp_epoch: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.epoch = epoch
        self.start_batch = start_batch
        self.stamp_epoch = stamp_epoch
        self.pass_epoch = epoch  # the epoch of the pass under way
        self.batches_consumed = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch_order(self) -> Iterator[int]:
        """This rank's indices for ``self.epoch``, padded to ``num_samples`` (``DistributedSampler``'s)."""
        return super().__iter__()

    def __iter__(self) -> Iterator[Any]:
        start, self.start_batch = self.start_batch, 0
        self.pass_epoch, self.batches_consumed = self.epoch, start
        indices = itertools.islice(self.epoch_order(), start * self.batch_size, None)
        if self.stamp_epoch:
            return ((index, self.pass_epoch) for index in indices)
        return indices

    def batch_consumed(self) -> None:
        """Count one batch of the current pass as taken by training."""
        self.batches_consumed += 1

    def state_dict(self, epoch_length: int | None = None) -> dict[str, int]:
        """``{"epoch", "batches_consumed"}``: where a restored run starts. A pass that has consumed all its
        batches (``epoch_length``, default the whole epoch; less under ``limit_train_batches``) is saved as
        the start of the next epoch."""
        length = self.batches_per_epoch if epoch_length is None else min(epoch_length, self.batches_per_epoch)
        if self.batches_consumed >= length:
            return {"epoch": self.pass_epoch + 1, "batches_consumed": 0}
        return {"epoch": self.pass_epoch, "batches_consumed": self.batches_consumed}


class ChunkedResumableSampler(ResumableSampler):
    """The training order of images stored in chunks (litdata shards), resumable as :class:`ResumableSampler`.

    Read in a fully random order, a chunked store opens a different chunk for almost every image; this order
    keeps the reads local and mixes as well as a chunked store allows (the converter writes the training
    images in a seeded random order, so each chunk holds a random mix of classes). Epoch ``e``, seeded with
    ``(seed, e)``: the chunks in a random order, each chunk's images in storage order, padded by wrapping
    around to ``num_replicas * num_samples`` and cut into one contiguous run per rank (disjoint, covering
    the epoch; a rank reads its own chunks only); each run shuffled within consecutive windows of
    ``window`` chunks' worth of images; and each batch's indices sorted by storage position (a batch is a
    set: the order inside it changes nothing in training, but a worker then reads each chunk once per batch).

    Args:
        positions: where each dataset index is stored (index ``i`` at position ``positions[i]``).
        chunk_sizes: the images of each chunk, in storage order.
        window: chunks per shuffling window.
        dataset, batch_size, seed, num_replicas, rank, epoch, start_batch, stamp_epoch: as
            :class:`ResumableSampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        positions: Any,
        chunk_sizes: Any,
        window: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_size, seed, **kwargs)
        self.positions = np.asarray(positions, dtype=np.int64)
        if len(self.positions) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(self.positions)} positions for a dataset of {len(dataset)}")  # type: ignore[arg-type]
        bounds = np.cumsum(np.asarray(chunk_sizes, dtype=np.int64))
        self.chunks = np.searchsorted(bounds, self.positions, side="right")
        self.window_size = max(1, window * -(-int(bounds[-1]) // len(bounds)))

    def epoch_order(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk_place = rng.permutation(int(self.chunks.max()) + 1)  # each chunk's place in this epoch
        order = np.lexsort((self.positions, chunk_place[self.chunks]))
        order = np.resize(order, self.total_size)  # wraps around: the padding repeats the first images
        keys = rng.random(self.total_size)
        lo, hi = self.rank * self.num_samples, (self.rank + 1) * self.num_samples
        run, keys = order[lo:hi], keys[lo:hi]
        run = run[np.lexsort((keys, np.arange(len(run)) // self.window_size))]
        full = len(run) // self.batch_size * self.batch_size
        batches = run[:full].reshape(-1, self.batch_size)
        batches = np.take_along_axis(batches, np.argsort(self.positions[batches], axis=1), axis=1)
        tail = run[full:][np.argsort(self.positions[run[full:]])]
        return iter(np.concatenate([batches.ravel(), tail]).tolist())


class ResumableDataLoader(DataLoader):
    """The training DataLoader. Its position is restored by its datamodule (whose ``state_dict`` Lightning
    restores before the loader is built); ``state_dict``/``load_state_dict`` are here, empty, because
    Lightning warns that a mid-epoch resume is unreliable for a loader without them."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class SeededSamples(Dataset):
    """A dataset whose random per-image transforms are seeded from ``(seed, epoch, index)``.

    Indexed with the ``(index, epoch)`` pairs of a :class:`ResumableSampler` with ``stamp_epoch=True``;
    each item is loaded with torch's CPU generator seeded for that sample (and its state restored after),
    so an image gets the same crop and flip whichever worker loads it and whether or not the run was
    resumed. torchvision's v2 transforms draw from that generator.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]
