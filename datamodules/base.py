"""The base of every datamodule: its dataset's facts, the one ``data_dir`` rule, and a resumable order.

Each dataset fact is a class attribute of its datamodule, readable without building one (``ran``, the
experiments and the tests read them there): :attr:`ImageDataModule.NUM_CLASSES`, ``MEAN``, ``STD``,
``DATASET_FOLDER`` and ``DATASET_NAME``. Every command turns a user's data directory into the dataset's
location with :meth:`ImageDataModule.resolve_data_dir` and reports a missing dataset with
:meth:`ImageDataModule.missing_message`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
from torch.utils.data import Dataset

from .errors import DataDirNotAFolderError, DatasetNotFoundError
from .loaders import split_loader
from .sampling import ResumableDataLoader, ResumableSampler, derived_generator, derived_seed

__all__ = ["ImageDataModule"]

# The stream of the training order, independent of the datamodules' other seeded streams (0-2).
_STREAM_ORDER = 3


class ImageDataModule(pl.LightningDataModule):
    """Shared by the CIFAR and ImageNet datamodules; not used on its own.

    Dataset facts (class attributes):
        DATASET_NAME: the dataset's name in messages.
        NUM_CLASSES: the number of classes, or None where the class folders decide (an ImageNet tree).
        MEAN, STD: per-channel mean and standard deviation of the training images on the [0, 1] scale.
        DATASET_FOLDER: the folder the dataset unpacks to inside ``data_dir``, or None when ``data_dir`` is
            itself the dataset's folder.

    Training order: the training loader's :class:`~datamodules.sampling.ResumableSampler` draws each
    epoch's permutation from ``(seed, the run's seed, epoch)``; :meth:`state_dict` saves the epoch and the
    batches consumed, and a resumed run skips exactly those (Lightning saves a datamodule's state in its
    checkpoints and restores it before asking for the loaders). The run's seed is ``seed_everything``'s
    (``PL_GLOBAL_SEED``, the seed Lightning's own distributed sampler uses; 0 when unset), so runs of
    different seeds see different orders, as with a shuffled loader.
    """

    DATASET_NAME: ClassVar[str]
    NUM_CLASSES: ClassVar[int | None]
    MEAN: ClassVar[tuple[float, float, float]]
    STD: ClassVar[tuple[float, float, float]]
    DATASET_FOLDER: ClassVar[str | None] = None

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self._train_sampler: ResumableSampler | None = None
        self._restored_order: dict[str, int] | None = None
        self._run_seed = 0

    # ------------------------------------------------------------------ where the dataset is
    @classmethod
    def resolve_data_dir(cls, data_dir: str | os.PathLike) -> Path:
        """The folder that holds ``DATASET_FOLDER``: ``data_dir`` itself, or its parent when ``data_dir`` is
        the dataset folder (named ``DATASET_FOLDER`` and without a ``DATASET_FOLDER`` inside). Raises
        nothing: datamodules resolve at construction, which LightningCLI runs while parsing (and would wrap
        an error in its own), and report a bad folder when they read it (:meth:`check_data_dir`).
        """
        path = Path(data_dir).expanduser().absolute()
        folder = cls.DATASET_FOLDER
        if folder is not None and path.name == folder and not (path / folder).is_dir():
            return path.parent
        return path

    @classmethod
    def dataset_path(cls, data_dir: str | os.PathLike) -> Path:
        """The dataset's own folder for a user's ``data_dir`` (either one of :meth:`resolve_data_dir`)."""
        root = cls.resolve_data_dir(data_dir)
        return root / cls.DATASET_FOLDER if cls.DATASET_FOLDER is not None else root

    @classmethod
    def layout(cls, root: str | os.PathLike) -> str:
        """What ``root`` must contain, in words."""
        raise NotImplementedError

    @classmethod
    def fix_hint(cls) -> str:
        """How to point at the dataset (or get it), in words."""
        raise NotImplementedError

    @classmethod
    def missing_message(cls, data_dir: str | os.PathLike) -> str:
        """The one message for a dataset that is not where ``data_dir`` says."""
        root = cls.resolve_data_dir(data_dir)
        return f"{cls.DATASET_NAME} not found: expected {cls.layout(root)}. Fix: {cls.fix_hint()}"

    @classmethod
    def check_data_dir(cls, data_dir: str | os.PathLike) -> None:
        """Raise :class:`DataDirNotAFolderError` when ``data_dir`` is a file."""
        path = Path(data_dir).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise DataDirNotAFolderError(f"data_dir {path} is a file, not a folder. Fix: {cls.fix_hint()}")

    @classmethod
    def find_dataset(cls, data_dir: str | os.PathLike) -> Path:
        """The dataset's folder for ``data_dir``; :class:`DatasetNotFoundError` with
        :meth:`missing_message` when it is not there. For commands that read a dataset without a datamodule's
        download."""
        cls.check_data_dir(data_dir)
        path = cls.dataset_path(data_dir)
        if not path.is_dir():
            raise DatasetNotFoundError(cls.missing_message(data_dir))
        return path

    # ------------------------------------------------------------------ the resumable training order
    def _train_loader(
        self,
        dataset: Dataset | None,
        stamp_epoch: bool = False,
        order: Callable[..., ResumableSampler] | None = None,
        **loader_args: Any,
    ) -> Any:
        """The training loader over ``dataset`` with a :class:`ResumableSampler` (or the subclass that
        ``order`` builds) that starts at the restored position, or else at the start of the trainer's current
        epoch."""
        if dataset is None:  # split_loader's message
            return split_loader(None, type(self).__name__, "train", shuffle=False, **loader_args)
        trainer = self.trainer
        position = self._restored_order or {
            "epoch": trainer.current_epoch if trainer is not None else 0,
            "batches_consumed": 0,
            "run_seed": int(os.getenv("PL_GLOBAL_SEED", 0)),
        }
        self._restored_order = None
        self._train_sampler = (order or ResumableSampler)(
            dataset,
            batch_size=loader_args["batch_size"],
            seed=derived_seed(self.seed, _STREAM_ORDER, position["run_seed"]),
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            epoch=position["epoch"],
            start_batch=position["batches_consumed"],
            stamp_epoch=stamp_epoch,
        )
        self._run_seed = position["run_seed"]
        return split_loader(
            dataset,
            type(self).__name__,
            "train",
            shuffle=False,
            sampler=self._train_sampler,
            generator=derived_generator(self.seed, _STREAM_ORDER),
            loader_class=ResumableDataLoader,
            **loader_args,
        )

    def _order_state(self) -> dict[str, int]:
        assert self._train_sampler is not None
        trainer = self.trainer
        length = trainer.num_training_batches if trainer is not None else None
        length = None if length is None or math.isinf(length) else int(length)
        return {**self._train_sampler.state_dict(length), "run_seed": self._run_seed}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed (the position saved in checkpoints)."""
        if self._train_sampler is not None and self.trainer is not None and self.trainer.training:
            self._train_sampler.batch_consumed()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training order's position: ``{"train_order": {"epoch", "batches_consumed", "run_seed"}}``."""
        return {"train_order": self._order_state()} if self._train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training order's position (applied when the training loader is next built)."""
        self._restored_order = state_dict.get("train_order")
