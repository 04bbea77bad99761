"""The one DataLoader construction that every datamodule's split goes through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def split_loader(
    dataset: Dataset | None,
    owner: str,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    collate_fn: Callable[[Any], Any] | None = None,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    loader_class: type[DataLoader] = DataLoader,
) -> DataLoader:
    """A DataLoader over one split; a clear error when `setup()` has not made the split yet.

    The training split passes its own ``sampler`` (the resumable order), a ``generator`` (so that starting
    an epoch draws nothing from the global RNG) and ``loader_class``.
    """
    if dataset is None:
        raise RuntimeError(f"{owner}: the {split} split is not set up; call setup() first")
    return loader_class(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        **({"collate_fn": collate_fn} if collate_fn is not None else {}),
    )
