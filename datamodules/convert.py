"""``python -m datamodules.convert imagenet --data-dir TREE --out SHARDS``: ImageNet trees as litdata shards.

Each split's JPEG files are packed, byte for byte, into litdata chunks (``litdata.optimize``, several worker
processes, a progress bar) with their label (the index of their wnid among the sorted wnids, as the folder
datamodule numbers them) and their path; the layout is described in :mod:`datamodules.imagenet_shards`.
Train the shards with ``--data.format litdata --data.data_dir SHARDS``.

The conversion resumes: an interrupted split continues from litdata's checkpoint when the same command is
run again, and a split already converted is kept. Nothing is overwritten: a folder that holds anything else
(other files, or shards of another tree) is refused with one line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetLayoutError, DataSettingError
from .imagenet import ImageNetDataModule, ImageTreeDataset
from .imagenet_shards import SHARDS_FILE, SHARDS_FORMAT, SHARDS_VERSION, order_file, read_shards_info

__all__ = ["ConvertError", "convert_imagenet", "main"]

PROG = "python -m datamodules.convert"
SPLITS = ("train", "val")


class ConvertError(RuntimeError):
    """The conversion cannot go on: the message says why and what to do."""


def shard_item(entry: list[Any]) -> dict[str, Any]:
    """One stored item: ``[path, label, relative path]`` -> the file's bytes, unchanged, label and path."""
    path, label, name = entry
    return {"image": Path(path).read_bytes(), "label": int(label), "path": name}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _ours(path: Path) -> bool:
    """Whether ``path``, inside the shards' folder, is one this converter writes."""
    if path.name in SPLITS and path.is_dir():  # a split: litdata's files only
        litdata = ("index.json", ".checkpoints")
        return all(p.name in litdata or p.name.startswith("chunk-") for p in path.iterdir())
    known = (SHARDS_FILE, *(order_file(".", s).name for s in SPLITS))
    return path.name in known or path.name.endswith(".tmp")


def _check_out(out: Path, classes: list[str]) -> dict[str, Any]:
    """The shards' info to extend: a new one for an empty or absent folder, the folder's own where it holds
    shards of the same classes; :class:`ConvertError` for anything else."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file. Fix: name a new or empty folder.")
    if (out / SHARDS_FILE).is_file():
        info = read_shards_info(out)
        if info["classes"] != classes:
            raise ConvertError(
                f"{out} holds shards of other classes ({len(info['classes'])} against the tree's "
                f"{len(classes)}). Fix: convert into a new folder."
            )
        return info
    others = sorted(p.name for p in out.iterdir() if not _ours(p)) if out.is_dir() else []
    if others:
        raise ConvertError(
            f"{out} already holds files that are not shards of this converter ({', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''}); nothing was written. Fix: name a new or empty folder."
        )
    return {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "classes": classes, "splits": {}}


def _storage_order(split: str, count: int, seed: int) -> np.ndarray:
    """The folder index stored at each position: a seeded permutation for training (every chunk a random
    mix of classes), the folder's order otherwise."""
    if split == "train":
        return np.random.default_rng(seed).permutation(count)
    return np.arange(count)


def _verify(folder: Path, names: list[str], stored: np.ndarray) -> int:
    """Check that the litdata dataset in ``folder`` holds ``len(stored)`` items and that the first item of
    every chunk, and the last item, are the expected files; return the number of chunks."""
    from litdata import StreamingDataset

    chunks = [int(c["chunk_size"]) for c in json.loads((folder / "index.json").read_text())["chunks"]]
    if sum(chunks) != len(stored):
        raise ConvertError(
            f"{folder} holds {sum(chunks)} images, expected {len(stored)}. Fix: delete {folder} and convert "
            f"again."
        )
    items = StreamingDataset(str(folder))
    for position in {*np.cumsum([0, *chunks[:-1]]).tolist(), len(stored) - 1}:
        found, expected = items[position]["path"], names[int(stored[position])]
        if found != expected:
            raise ConvertError(
                f"{folder}: item {position} is {found}, expected {expected}. Fix: delete {folder} and "
                f"convert again."
            )
    return len(chunks)


def _convert_split(
    tree: ImageTreeDataset, split: str, out: Path, workers: int, chunk_bytes: str, seed: int
) -> dict[str, Any]:
    """Write ``split`` into ``out/split`` (resuming litdata's checkpoint there) and its order file."""
    from litdata import optimize

    root = Path(tree.root)
    names = [Path(path).relative_to(root).as_posix() for path, _ in tree.samples]
    stored = _storage_order(split, len(tree.samples), seed)
    inputs = [[tree.samples[i][0], tree.samples[i][1], names[i]] for i in stored.tolist()]
    folder = out / split
    checkpoint = folder / ".checkpoints" / "config.json"
    if checkpoint.is_file():
        saved = json.loads(checkpoint.read_text()).get("num_workers", workers)
        if saved != workers:
            print(f"{split}: resuming with the first run's {saved} workers, not {workers}", file=sys.stderr)
            workers = saved
        print(f"{split}: resuming the interrupted conversion in {folder}", file=sys.stderr)
    if not (folder / "index.json").is_file() or checkpoint.is_file():
        sigint = signal.getsignal(signal.SIGINT)  # litdata installs its own (os._exit(0)) and leaves it
        try:
            optimize(
                fn=shard_item,
                inputs=inputs,
                output_dir=str(folder),
                chunk_bytes=chunk_bytes,
                num_workers=workers,
                keep_data_ordered=True,  # item i of the shards is inputs[i]
                reorder_files=False,
                use_checkpoint=True,
                start_method=multiprocessing.get_start_method(),  # litdata would set spawn for the process
            )
        except ValueError as exc:  # litdata: the checkpoint is of other inputs
            raise ConvertError(
                f"{folder} holds an interrupted conversion of other images ({exc}). Fix: delete {folder} or "
                f"convert into a new folder."
            ) from exc
        finally:
            signal.signal(signal.SIGINT, sigint)
    chunks = _verify(folder, names, stored)
    positions = np.empty_like(stored)
    positions[stored] = np.arange(len(stored))
    targets = np.asarray(tree.targets, dtype=np.int64)
    tmp = out / f"{split}_order.tmp.npz"
    np.savez(tmp, positions=positions, targets=targets)
    os.replace(tmp, order_file(out, split))
    size = sum(p.stat().st_size for p in folder.glob("chunk-*"))
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"{split}: {len(stored):,} images in {chunks} chunks ({shown}) -> {folder}")
    return {"images": len(stored), "chunks": chunks, "tree": str(root), "order_seed": seed}


def convert_imagenet(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    splits: tuple[str, ...] = SPLITS,
    workers: int | None = None,
    chunk_bytes: str = "64MB",
    seed: int = 0,
) -> dict[str, Any]:
    """Convert the ``splits`` of the ImageNet tree in ``data_dir`` into shards in ``out``; return the shards'
    info (``ran_shards.json``). Splits already converted from the same tree are kept."""
    dm = ImageNetDataModule(str(data_dir), num_workers=0)
    out = Path(out).expanduser().absolute()
    assert dm.classes is not None
    info = _check_out(out, dm.classes)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    trees = {split: dm.tree(split) for split in splits}  # every layout check before any writing
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        done = info["splits"].get(split)
        source = str(dm.data_dir / split)
        if done is not None:
            if done["tree"] != source:
                raise ConvertError(
                    f"{out / split} holds shards of {done['tree']}, not {source}. Fix: convert into a new "
                    f"folder."
                )
            print(f"{split}: already converted in {out / split}, kept")
            continue
        info["splits"][split] = _convert_split(trees[split], split, out, workers, chunk_bytes, seed)
        _write_json(out / SHARDS_FILE, info)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=("imagenet",), help="the dataset to convert")
    p.add_argument("--data-dir", required=True, help="the folder holding train/<wnid>/ and val/<wnid>/")
    p.add_argument("--out", required=True, help="the shards' folder: new, empty or interrupted")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--workers", type=int, help="reading processes (default: the CPU cores, at most 8)")
    p.add_argument("--chunk-bytes", default="64MB", help="the size of a chunk (default 64MB)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the training images' storage order")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    try:
        splits = tuple(args.splits)
        convert_imagenet(args.data_dir, args.out, splits, args.workers, args.chunk_bytes, args.seed)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConvertError, FileNotFoundError, NotADirectoryError, DatasetLayoutError, DataSettingError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
