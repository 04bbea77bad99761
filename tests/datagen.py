"""Small fake datasets in the real on-disk formats, for tests that must not need the real data.

Import it from a test module as ``import datagen`` (pytest's default "prepend" import mode puts ``tests/``
on ``sys.path``). Every function writes under the given root (use ``tmp_path``), is deterministic for a
given ``seed`` and returns the folder it wrote.

- :func:`make_cifar10`, :func:`make_cifar100`: the python-pickle layouts the official archives unpack to
  (``cifar-10-batches-py/``, ``cifar-100-python/``), labels balanced over the classes.
- :func:`make_imagefolder`: ``root/<class>/*.JPEG`` real JPEGs written with PIL.
- :func:`make_imagenet_tree`: ``root/train/<wnid>/`` and ``root/val/<wnid>/``.
- :func:`make_imagenet_shards`: such a tree converted into litdata shards by ``datamodules.convert``.
- :func:`make_flat_imagenet_val`: flat ``ILSVRC2012_val_*.JPEG`` files plus a ground-truth file.
- :func:`corrupt_file`: overwrite a file with bytes that are not an image.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CIFAR10_TRAIN_FILES",
    "DEFAULT_WNIDS",
    "balanced_labels",
    "corrupt_file",
    "make_cifar10",
    "make_cifar100",
    "make_flat_imagenet_val",
    "make_imagefolder",
    "make_imagenet_shards",
    "make_imagenet_tree",
    "random_images",
    "write_pickle",
]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_WNIDS = ("n01440764", "n01443537", "n01484850")


def write_pickle(path: str | Path, obj: object) -> Path:
    """Pickle ``obj`` to ``path`` (protocol 2, readable with ``pickle.load(f, encoding="latin1")``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """``n`` labels, each class ``n // num_classes`` or one more times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).tolist()


def random_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random CIFAR rows: uint8 ``(n, 3072)``, R then G then B planes of 32 x 32."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _cifar_batch(n: int, label_key: str, num_classes: int, rng: np.random.Generator, name: str) -> dict:
    return {
        "batch_label": name,
        label_key: balanced_labels(n, num_classes, rng),
        "data": random_images(n, rng),
        "filenames": [f"{name}_{i:05d}.png" for i in range(n)],
    }


def make_cifar10(root: str | Path, n_train_per_batch: int = 100, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta); return that folder.

    Labels are balanced within each batch, so the training set has ``5 * n_train_per_batch / 10`` per class.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    for i, name in enumerate(CIFAR10_TRAIN_FILES, start=1):
        write_pickle(
            folder / name, _cifar_batch(n_train_per_batch, "labels", 10, rng, f"training batch {i} of 5")
        )
    write_pickle(folder / "test_batch", _cifar_batch(n_test, "labels", 10, rng, "testing batch 1 of 1"))
    write_pickle(
        folder / "batches.meta",
        {"num_cases_per_batch": n_train_per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072},
    )
    return folder


def make_cifar100(root: str | Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/`` (train, test, meta with fine and coarse labels); return the folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    for name, n in (("train", n_train), ("test", n_test)):
        batch = _cifar_batch(n, "fine_labels", 100, rng, name)
        batch["coarse_labels"] = [label // 5 for label in batch["fine_labels"]]
        write_pickle(folder / name, batch)
    write_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
        },
    )
    return folder


def _write_jpeg(path: Path, size: int, rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def make_imagefolder(
    root: str | Path,
    classes: Sequence[str] = DEFAULT_WNIDS,
    n_per_class: int = 4,
    size: int = 64,
    seed: int = 0,
    prefix: str = "",
) -> Path:
    """Write ``root/<class>/<prefix><class>_<i>.JPEG`` real JPEGs of ``size`` x ``size``; return ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            _write_jpeg(root / cls / f"{prefix}{cls}_{i}.JPEG", size, rng)
    return root


def make_imagenet_tree(
    root: str | Path,
    classes: Sequence[str] = DEFAULT_WNIDS,
    n_train_per_class: int = 6,
    n_val_per_class: int = 2,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; return ``root``."""
    root = Path(root)
    make_imagefolder(root / "train", classes, n_train_per_class, size, seed)
    make_imagefolder(root / "val", classes, n_val_per_class, size, seed + 1, prefix="val_")
    return root


def make_imagenet_shards(tree: str | Path, out: str | Path, chunk_bytes: str = "6KB") -> Path:
    """Convert a :func:`make_imagenet_tree` tree into shards in ``out`` with the project's converter (one
    worker; chunks of ``chunk_bytes``, so that a few small images make several chunks); return ``out``."""
    from datamodules.convert import convert_imagenet

    convert_imagenet(tree, out, workers=1, chunk_bytes=chunk_bytes)
    return Path(out)


def make_flat_imagenet_val(
    val_dir: str | Path,
    wnids: Sequence[str],
    labels_format: str = "kaggle",
    size: int = 16,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``val_dir/ILSVRC2012_val_%08d.JPEG`` (image i has class ``wnids[i-1]``) and a ground-truth file.

    ``labels_format`` "kaggle" writes ``LOC_val_solution.csv`` (ImageId,PredictionString with boxes);
    "plain" writes ``val_labels.txt`` with ``<file name> <wnid>`` lines. Returns ``(val_dir, labels_path)``,
    the labels file being written beside ``val_dir``.
    """
    rng = np.random.default_rng(seed)
    val_dir = Path(val_dir)
    val_dir.mkdir(parents=True, exist_ok=True)
    stems = [f"ILSVRC2012_val_{i:08d}" for i in range(1, len(wnids) + 1)]
    for stem in stems:
        _write_jpeg(val_dir / f"{stem}.JPEG", size, rng)
    if labels_format == "kaggle":
        path = val_dir.parent / "LOC_val_solution.csv"
        rows = [f"{stem},{wnid} 1 2 10 12 {wnid} 3 4 8 9 " for stem, wnid in zip(stems, wnids)]
        path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif labels_format == "plain":
        path = val_dir.parent / "val_labels.txt"
        path.write_text("".join(f"{stem}.JPEG {wnid}\n" for stem, wnid in zip(stems, wnids)))
    else:
        raise ValueError(f"labels_format must be 'kaggle' or 'plain', got {labels_format!r}")
    return val_dir, path


def corrupt_file(path: str | Path, payload: bytes = b"this is not an image\n") -> Path:
    """Overwrite ``path`` with bytes that no image decoder accepts; return the path."""
    path = Path(path)
    path.write_bytes(payload)
    return path


def read_cifar_pickle(folder: Path, name: str, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """The `data` array and the labels of one CIFAR pickle file, read directly (the tests' reference)."""
    with open(folder / name, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return entry["data"], np.asarray(entry[label_key])
