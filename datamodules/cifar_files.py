"""The on-disk layout of a CIFAR dataset folder (the python-pickle files the official archives unpack to):
which files, downloading the archive, reading the batches and checking their structure.

`CIFARFolder` is the file half of the CIFAR datamodules (`datamodules.cifar`): it reads `data_dir`,
`check_md5`, `download` and `num_classes` of the datamodule it is mixed into and raises the errors of
`datamodules.errors` naming the path, the problem and the fix.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchvision.datasets.utils import calculate_md5, check_integrity, download_and_extract_archive

from .errors import DatasetIntegrityError, DatasetLayoutError, DatasetNotFoundError, DatasetSizeWarning

__all__ = ["CIFARFolder"]


def _normalise_keys(obj: dict) -> dict:
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CIFARFolder:
    """The files of one CIFAR dataset folder, `data_dir / DATASET_FOLDER`; a subclass names torchvision's
    dataset class as `source`, which gives the folder's name, file names, official checksums and download
    URL."""

    data_dir: Path
    check_md5: bool
    download: bool
    num_classes: int
    DATASET_NAME: ClassVar[str]
    DATASET_FOLDER: ClassVar[str]

    # Constants set by each dataset subclass: `source`, torchvision's dataset class, gives the on-disk layout
    # (DATASET_FOLDER), file names, official checksums and download URL (see __init_subclass__); the dataset
    # facts of ImageDataModule (DATASET_NAME, NUM_CLASSES, MEAN, STD) are stated.
    source: ClassVar[type]
    train_files: ClassVar[tuple[tuple[str, str], ...]]  # (file name, official md5)
    test_files: ClassVar[tuple[tuple[str, str], ...]]
    meta_file: ClassVar[tuple[str, str]]
    meta_key: ClassVar[str]  # class names in the meta file
    label_key: ClassVar[str]  # labels in each batch file
    url: ClassVar[str]
    archive_filename: ClassVar[str]
    archive_md5: ClassVar[str]
    NUM_CLASSES: ClassVar[int]
    official_train_size: ClassVar[int] = 50_000
    official_test_size: ClassVar[int] = 10_000

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        source = cls.__dict__.get("source")
        if source is not None:
            cls.DATASET_FOLDER = source.base_folder
            cls.train_files = tuple((name, md5) for name, md5 in source.train_list)
            cls.test_files = tuple((name, md5) for name, md5 in source.test_list)
            cls.meta_file = (source.meta["filename"], source.meta["md5"])
            cls.meta_key = source.meta["key"]
            cls.url, cls.archive_filename, cls.archive_md5 = source.url, source.filename, source.tgz_md5

    @classmethod
    def layout(cls, root: str | Path) -> str:
        names = ", ".join(name for name, _ in cls._all_files())
        folder = Path(root) / cls.DATASET_FOLDER
        return f"{folder}/ containing {names} (what the official {cls.archive_filename} unpacks to)"

    @classmethod
    def fix_hint(cls) -> str:
        return (
            f"point `--data.data_dir` at the folder that contains `{cls.DATASET_FOLDER}` (or at that folder "
            f"itself), or run once with `--data.download true` on a machine with network access (downloads "
            f"{cls.url})."
        )

    @classmethod
    def _all_files(cls) -> tuple[tuple[str, str], ...]:
        return (*cls.train_files, *cls.test_files, cls.meta_file)

    @property
    def dataset_dir(self) -> Path:
        """The dataset folder, ``data_dir / DATASET_FOLDER``."""
        return self.data_dir / self.DATASET_FOLDER

    def _missing_files(self) -> list[str]:
        return [name for name, _ in self._all_files() if not (self.dataset_dir / name).is_file()]

    def _check_present(self) -> None:
        """Raise a clear error if data_dir is a file, or the dataset folder or one of its files is absent."""
        self.check_data_dir(self.data_dir)
        if not self.dataset_dir.is_dir():
            raise DatasetNotFoundError(self.missing_message(self.data_dir))
        missing = self._missing_files()
        if missing:
            raise DatasetLayoutError(
                f"{self.DATASET_NAME} folder {self.dataset_dir} is incomplete: missing "
                f"{', '.join(str(self.dataset_dir / m) for m in missing)}. "
                f"Expected {self.layout(self.data_dir)}. "
                f"Re-extract the official archive there, or delete the folder and rerun with "
                f"`--data.download true`."
            )

    def prepare_data(self) -> None:
        """Download and extract the official archive if asked and the data is absent; else check presence."""
        try:
            self._check_present()
            return
        except (DatasetNotFoundError, DatasetLayoutError):
            if not self.download:
                raise
        missing = self._missing_files() if self.dataset_dir.is_dir() else []
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            download_and_extract_archive(
                self.url, str(self.data_dir), filename=self.archive_filename, md5=self.archive_md5
            )
        except Exception as exc:  # offline, proxy, HTTP error, truncated download, bad md5, ...
            what = "the missing file(s)" if missing else f"`{self.DATASET_FOLDER}`"
            absent = (
                f"{self.dataset_dir} lacks {', '.join(missing)}"
                if missing
                else f"{self.dataset_dir} does not exist"
            )
            raise DatasetNotFoundError(
                f"{self.DATASET_NAME}: {absent}, and downloading {self.url} into {self.data_dir} failed "
                f"({type(exc).__name__}: {exc}). Fix: copy {what} there from the official "
                f"{self.archive_filename} (download it on a machine with network access), or point "
                f"`--data.data_dir` at a complete copy."
            ) from exc
        self._check_present()

    def _read_pickle(self, name: str, md5: str) -> dict:
        path = self.dataset_dir / name
        if self.check_md5 and not check_integrity(str(path), md5):
            raise DatasetIntegrityError(
                f"{path}: md5 {calculate_md5(str(path))} differs from the official {md5}. This copy is "
                f"not byte-identical to the official archive; if it is a re-packed copy it may still be "
                f"valid and loads with `check_md5=False` (the default, which checks structure instead). "
                f"For the official files, delete {self.dataset_dir} and rerun with `--data.download true`."
            )
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="latin1")
        except FileNotFoundError:
            self._check_present()
            raise
        except Exception as exc:
            raise DatasetLayoutError(
                f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc}). The file is damaged "
                f"or not from the official archive; re-extract it (expected {self.layout(self.data_dir)})."
            ) from exc
        if not isinstance(obj, dict):
            raise DatasetLayoutError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
        return _normalise_keys(obj)

    def _read_batches(self, files: tuple[tuple[str, str], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and structurally check batch files; return uint8 ``(N, 3, 32, 32)`` images, int64 labels."""
        datas, labels = [], []
        for name, md5 in files:
            path = self.dataset_dir / name
            entry = self._read_pickle(name, md5)
            for key in ("data", self.label_key):
                if key not in entry:
                    raise DatasetLayoutError(
                        f"{path}: no '{key}' entry (found keys {sorted(entry)}); expected 'data' and "
                        f"'{self.label_key}' as in the official {self.DATASET_NAME} files"
                    )
            data = entry["data"]
            if (
                not isinstance(data, np.ndarray)
                or data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 3072
            ):
                desc = (
                    f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
                )
                raise DatasetLayoutError(
                    f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}"
                )
            lab = np.asarray(entry[self.label_key])
            if lab.ndim != 1 or lab.shape[0] != data.shape[0]:
                raise DatasetLayoutError(
                    f"{path}: '{self.label_key}' has shape {lab.shape}, "
                    f"expected ({data.shape[0]},) to match 'data'"
                )
            if lab.size and (
                not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= self.num_classes
            ):
                bad = (
                    lab.dtype
                    if not np.issubdtype(lab.dtype, np.integer)
                    else f"range [{lab.min()}, {lab.max()}]"
                )
                raise DatasetLayoutError(
                    f"{path}: '{self.label_key}' must be integers in [0, {self.num_classes}), found {bad}"
                )
            datas.append(data)
            labels.append(lab.astype(np.int64))
        images = torch.from_numpy(np.ascontiguousarray(np.concatenate(datas))).view(-1, 3, 32, 32)
        return images, torch.from_numpy(np.concatenate(labels))

    def _read_meta(self) -> list[str]:
        name, md5 = self.meta_file
        meta = self._read_pickle(name, md5)
        names = meta.get(self.meta_key)
        if not isinstance(names, (list, tuple)) or len(names) != self.num_classes:
            found = f"{len(names)} names" if isinstance(names, (list, tuple)) else f"keys {sorted(meta)}"
            raise DatasetLayoutError(
                f"{self.dataset_dir / name}: expected '{self.meta_key}' with {self.num_classes} class names, "
                f"found {found}"
            )
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    def _report_size(self, split: str, n: int, official: int) -> None:
        rank_zero_info(f"{self.DATASET_NAME}: {n} {split} images in {self.dataset_dir}")
        if n != official:
            rank_zero_warn(
                f"{self.DATASET_NAME} {split} set in {self.dataset_dir} has {n} images, not the official "
                f"{official}: a subset or a modified copy.",
                category=DatasetSizeWarning,
            )
