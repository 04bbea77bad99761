"""Exceptions and warnings raised by the data modules.

Each subclasses a built-in (``FileNotFoundError``, ``NotADirectoryError``, ``ValueError``, ``RuntimeError``,
``UserWarning``) so callers that do not
know this package can still catch them.
"""

from __future__ import annotations

__all__ = [
    "CorruptImageError",
    "CorruptImageWarning",
    "DataDirNotAFolderError",
    "DataSettingError",
    "DatasetIntegrityError",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "DatasetSizeWarning",
]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder (or a file of it) is absent and could not be downloaded."""


class DataDirNotAFolderError(NotADirectoryError):
    """``data_dir`` names a file, not a folder."""


class DataSettingError(ValueError):
    """A data setting the dataset cannot satisfy (e.g. a validation split as large as the training set)."""


class DatasetLayoutError(RuntimeError):
    """The dataset is present but its on-disk layout or a file's structure is wrong."""


class DatasetIntegrityError(DatasetLayoutError):
    """A file's md5 differs from the official one (only checked on request)."""


class DatasetSizeWarning(UserWarning):
    """A split's size differs from the official count (e.g. a subset or a test copy)."""


class CorruptImageError(RuntimeError):
    """An image file could not be decoded."""


class CorruptImageWarning(UserWarning):
    """An unreadable image was skipped (``skip_corrupt=True``)."""
