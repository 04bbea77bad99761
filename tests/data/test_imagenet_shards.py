"""ImageNet as litdata shards: the converter (`datamodules.convert`), the shards read back in the folder
tree's index order (`datamodules.imagenet_shards`), the chunk-local training order over two ranks, and the GPU
decode's worker side and refusal on a CPU (`datamodules.decoding`)."""

from __future__ import annotations

import json
import signal
import types
from pathlib import Path

import datagen
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules import DatasetNotFoundError, DataSettingError, ImageNetDataModule
from datamodules.convert import main as convert_main
from datamodules.decoding import (
    collate_encoded,
    decode_batch,
    encoded_from_bytes,
    encoded_train_params,
)
from datamodules.errors import CorruptImageError, CorruptImageWarning
from datamodules.imagenet import imagenet_train_transform
from datamodules.imagenet_shards import SHARDS_FILE, ShardedImageTree
from datamodules.sampling import ChunkedResumableSampler

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

KW = dict(batch_size=4, num_workers=0, pin_memory=False, image_size=32, eval_size=32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return datagen.make_imagenet_tree(tmp_path_factory.mktemp("tree"), n_train_per_class=8, n_val_per_class=3)


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    return datagen.make_imagenet_shards(tree, tmp_path_factory.mktemp("shards") / "shards")


# ---------------------------------------------------------------------------------------------- the converter
def test_shards_hold_every_file_byte_for_byte_with_its_sorted_wnid_label(tree, shards):
    from litdata import StreamingDataset

    info = json.loads((shards / SHARDS_FILE).read_text())
    assert info["classes"] == sorted(datagen.DEFAULT_WNIDS)
    for split, count in (("train", 24), ("val", 9)):
        items = StreamingDataset(str(shards / split))
        assert len(items) == info["splits"][split]["images"] == count
        assert info["splits"][split]["chunks"] > 2  # several chunks, so that the order tests mean something
        stored = [items[i] for i in range(count)]
        for item in stored:
            path = tree / split / item["path"]
            assert bytes(item["image"]) == path.read_bytes()
            assert item["label"] == info["classes"].index(path.parent.name)
        names = [item["path"] for item in stored]
        assert sorted(names) == sorted(
            p.relative_to(tree / split).as_posix() for p in (tree / split).rglob("*.JPEG")
        )
        if split == "val":
            assert names == sorted(names)  # the folder's order
        else:
            assert names != sorted(names)  # a seeded mix: every chunk holds several classes


def test_shards_read_back_as_the_folder_tree_item_for_item(tree, shards):
    folder, sharded = (
        ImageNetDataModule(str(tree), **KW),
        ImageNetDataModule(str(shards), format="litdata", **KW),
    )
    assert sharded.classes == folder.classes and sharded.num_classes == 3
    folder.setup("fit")
    sharded.setup("fit")
    assert sharded.train_dataset.targets == folder.train_dataset.targets
    sharded.train_dataset[0]
    assert sharded.train_dataset._stream().batch_decode == 0  # one item deserialised per read
    for split in ("train_dataset", "val_dataset"):
        a, b = getattr(folder, split), getattr(sharded, split)
        for i in range(len(a)):
            torch.manual_seed(i)  # the same augmentation draws for the same image
            image_a, label_a = a[i]
            torch.manual_seed(i)
            image_b, label_b = b[i]
            assert torch.equal(image_a, image_b) and label_a == label_b
    # Evaluation: the same batches in the same order.
    for x, y in zip(folder.val_dataloader(), sharded.val_dataloader()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    # The hold-out picks the same images in both formats.
    a = ImageNetDataModule(str(tree), holdout_per_class=2, **KW)
    b = ImageNetDataModule(str(shards), format="litdata", holdout_per_class=2, **KW)
    a.setup("fit")
    b.setup("fit")
    assert a.val_dataset.indices == b.val_dataset.indices and len(b.train_dataset) == 18
    assert torch.equal(a.val_dataset[0][0], b.val_dataset[0][0])


def test_convert_keeps_a_finished_split_and_refuses_what_it_did_not_write(tree, shards, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*")}
    assert convert_main(["imagenet", "--data-dir", str(tree), "--out", str(shards)]) == 0
    assert "train: already converted" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in shards.rglob("*")} == before  # nothing rewritten

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert convert_main(["imagenet", "--data-dir", str(tree), "--out", str(foreign)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err and "nothing was written" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # The tree itself is never taken for an output folder.
    assert convert_main(["imagenet", "--data-dir", str(tree), "--out", str(tree)]) == 1
    assert "not shards of this converter" in capsys.readouterr().err

    other = datagen.make_imagenet_tree(tmp_path / "other", classes=("n0001", "n0002"), n_train_per_class=2)
    assert convert_main(["imagenet", "--data-dir", str(other), "--out", str(shards)]) == 1
    assert "holds shards of other classes" in capsys.readouterr().err


def test_convert_leaves_the_callers_ctrl_c_handler(tree, tmp_path):
    """litdata's optimize() installs a SIGINT handler that exits with status 0 and never takes it back."""
    before = signal.getsignal(signal.SIGINT)
    assert convert_main(["imagenet", "--data-dir", str(tree), "--out", str(tmp_path / "s")]) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_convert_reports_a_bad_tree_in_one_line(tmp_path, capsys):
    assert (
        convert_main(["imagenet", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "s")]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train/<wnid>/*.JPEG" in err
    datagen.make_imagefolder(tmp_path / "t" / "train", n_per_class=2, size=16)
    datagen.make_imagefolder(
        tmp_path / "t" / "val", classes=datagen.DEFAULT_WNIDS[:2], n_per_class=1, size=16
    )
    assert convert_main(["imagenet", "--data-dir", str(tmp_path / "t"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 missing" in err
    assert not (tmp_path / "s").exists()  # checked before anything is written


def test_datamodule_without_shards_names_the_converter(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python -m datamodules.convert imagenet"):
        ImageNetDataModule(str(tmp_path), format="litdata")


SLOW_CONVERT = """
import sys, time
import datamodules.convert as convert
plain = convert.shard_item
def slow(entry):
    time.sleep(0.2)
    return plain(entry)
convert.shard_item = slow
sys.exit(convert.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_interrupted_conversion_resumes_to_the_same_shards(tree, shards, tmp_path):
    """kill -9 once litdata has checkpointed a chunk; the same command then finishes the split, and the result
    reads back as the uninterrupted conversion."""
    import subprocess
    import sys
    import time

    out = tmp_path / "shards"
    args = ["imagenet", "--data-dir", str(tree), "--out", str(out), "--workers", "1", "--chunk-bytes", "6KB"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, *args, "--splits", "train"])
    deadline = time.monotonic() + 120
    while not (out / "train" / ".checkpoints" / "checkpoint-0.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / SHARDS_FILE).exists()
    assert convert_main(args) == 0
    a, b = ShardedImageTree(shards, "train"), ShardedImageTree(out, "train")
    assert len(a) == len(b) == 24
    assert all(np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) for i in range(24))


# ---------------------------------------------------------------------------------------------- the order
def test_chunked_order_is_seeded_sharded_disjoint_and_local():
    chunk_sizes = [18, 22, 20, 20, 21, 19, 20, 19]  # 159 images stored in 8 chunks
    positions = np.random.default_rng(0).permutation(159)  # where dataset index i is stored
    dataset = list(range(159))

    def order(**kwargs) -> list[int]:
        args = dict(batch_size=4, seed=1, positions=positions, chunk_sizes=chunk_sizes, window=1) | kwargs
        return list(ChunkedResumableSampler(dataset, **args))

    epoch0 = order()
    assert sorted(epoch0) == dataset and epoch0 == order() and epoch0 != order(epoch=1) != order(seed=2)
    assert order(epoch=1, start_batch=3) == order(epoch=1)[12:]
    chunk_of = np.searchsorted(np.cumsum(chunk_sizes), positions, side="right")
    for batch in np.asarray(epoch0[:156]).reshape(-1, 4):
        assert list(positions[batch]) == sorted(positions[batch])  # read in storage order
    windows = [set(chunk_of[epoch0[i : i + 20]]) for i in range(0, 140, 20)]
    assert all(len(w) <= 2 for w in windows)  # a window of one chunk's worth: at most 2 chunks (a random
    # order would draw 20 images from about 7 of the 8 chunks)

    ranks = [order(num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 80  # ceil(159 / 2), padded by one repeat
    assert set(ranks[0]) | set(ranks[1]) == set(dataset) and len(set(ranks[0]) & set(ranks[1])) == 1
    chunks = [set(chunk_of[r]) for r in ranks]
    assert len(chunks[0] & chunks[1]) <= 2  # contiguous runs: a rank reads (almost) only its own chunks


def _rank_order(dm: ImageNetDataModule, rank: int, world: int = 2) -> list[int]:
    """The training order that rank `rank` of `world` gets from the datamodule (a stand-in trainer)."""
    dm.trainer = types.SimpleNamespace(world_size=world, global_rank=rank, current_epoch=0)
    try:
        return [index for index, _ in dm.train_dataloader().sampler]
    finally:
        dm.trainer = None


def test_two_ranks_get_disjoint_shards_covering_the_epoch(shards):
    dm = ImageNetDataModule(str(shards), format="litdata", **KW)
    dm.setup("fit")
    ranks = [_rank_order(dm, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12 and set(ranks[0]) | set(ranks[1]) == set(range(24))
    assert not set(ranks[0]) & set(ranks[1])
    assert isinstance(dm._train_sampler, ChunkedResumableSampler)


def test_the_order_does_not_depend_on_the_loader_workers(shards):
    def batches(workers: int) -> list[torch.Tensor]:
        dm = ImageNetDataModule(str(shards), format="litdata", **{**KW, "num_workers": workers})
        dm.setup("fit")
        return [torch.cat([x.flatten(), y.float()]) for x, y in dm.train_dataloader()]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


# ---------------------------------------------------------------------------------------------- decoding
def test_unreadable_stored_image_is_named_or_skipped(tmp_path):
    root = datagen.make_imagenet_tree(tmp_path / "tree", n_train_per_class=2, n_val_per_class=1, size=16)
    bad = datagen.corrupt_file(
        root / "train" / datagen.DEFAULT_WNIDS[1] / f"{datagen.DEFAULT_WNIDS[1]}_0.JPEG"
    )
    shards = datagen.make_imagenet_shards(root, tmp_path / "shards")
    name = bad.relative_to(root / "train").as_posix()
    dm = ImageNetDataModule(str(shards), format="litdata", **{**KW, "batch_size": 6})
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=name):
        next(iter(dm.train_dataloader()))
    dm = ImageNetDataModule(str(shards), format="litdata", skip_corrupt=True, **{**KW, "batch_size": 6})
    dm.setup("fit")
    with pytest.warns(CorruptImageWarning, match=name):
        images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (6, 3, 32, 32)


def test_gpu_decode_is_refused_in_one_line_without_cuda(shards, tmp_path, monkeypatch, capsys):
    from ran.cli.main import main as ran_main
    from ran.tools.bench import main as bench_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dm = ImageNetDataModule(str(shards), format="litdata", decode="cuda", **KW)
    with pytest.raises(DataSettingError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and "decode='cuda'" in message and "leave out `--data.decode`" in message
    args = ["--data", "imagenet", "--format", "litdata", "--decode", "cuda", "--data-dir", str(shards)]
    with pytest.raises(SystemExit, match="ran.bench: decode='cuda'"):
        bench_main(args)
    config = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "imagenet" / "quick_cpu.yaml"
    status = ran_main(
        [
            "fit",
            "-c",
            str(config),
            "--data.format",
            "litdata",
            "--data.data_dir",
            str(shards),
            "--data.decode",
            "cuda",
            "--run.root",
            str(tmp_path / "runs"),
            "--trainer.max_steps",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1] == f"ran fit: error: {message}"


def test_gpu_path_draws_the_cpu_path_augmentation_and_applies_it_identically(tree):
    """The worker side of decode=cuda (box and flip from the seeded generator) and decode_batch, run on the
    CPU here: the same output as the CPU path's v2 transforms on the same decoded pixels."""
    from torchvision.io import decode_jpeg

    files = sorted((tree / "train").rglob("*.JPEG"))[:6]
    samples, expected = [], []
    reference = imagenet_train_transform(24, ImageNetDataModule.MEAN, ImageNetDataModule.STD)
    for seed, path in enumerate(files):
        encoded = encoded_from_bytes(path.read_bytes())
        torch.manual_seed(seed)
        samples.append((encoded_train_params()(encoded), 0))
        torch.manual_seed(seed)
        expected.append(reference(decode_jpeg(encoded.data)))
    images, labels = decode_batch(
        collate_encoded(samples), "cpu", 24, 28, ImageNetDataModule.MEAN, ImageNetDataModule.STD
    )
    assert images.shape == (6, 3, 24, 24) and labels.tolist() == [0] * 6
    assert torch.allclose(images, torch.stack(expected), atol=1e-5)


def test_gpu_path_decodes_what_nvjpeg_rejects_with_pil(tmp_path):
    from PIL import Image

    png = tmp_path / "disguised.JPEG"  # ILSVRC's training set holds a PNG named .JPEG
    Image.new("RGB", (20, 16), (200, 10, 10)).save(png, format="PNG")
    sample = ((encoded_from_bytes(png.read_bytes()), None, False), 1)
    images, _ = decode_batch(collate_encoded([sample]), "cpu", 8, 10, (0, 0, 0), (1, 1, 1))
    assert images.shape == (1, 3, 8, 8) and torch.allclose(images[0, 0], torch.full((8, 8), 200 / 255))


class RecordOrder(pl.Callback):
    """Writes what rank r trained on: its loader's sampler (the datamodule's, unless Lightning swapped it) and
    that sampler's indices."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        ours = trainer.datamodule._train_sampler
        record = {
            "kept": trainer.train_dataloader.sampler is ours,
            "sampler": type(ours).__name__,
            "indices": [index for index, _ in ours],
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_spawn_keeps_the_chunked_order_and_gives_each_rank_its_own_shard(shards, tmp_path):
    from conftest import TINY_MODEL_KWARGS

    from ran.train.module import ImageClassifier

    dm = ImageNetDataModule(str(shards), format="litdata", **KW)
    module = ImageClassifier(arch="attention56_cifar", num_classes=3, model_kwargs=TINY_MODEL_KWARGS)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,  # one epoch: 24 images, 2 ranks, batches of 4
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordOrder(tmp_path)],
    )
    trainer.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["kept"] and r["sampler"] == "ChunkedResumableSampler" for r in ranks)
    dm.setup("fit")  # the spawned ranks set up their own copies
    assert ranks[0]["indices"] == _rank_order(dm, 0) and ranks[1]["indices"] == _rank_order(dm, 1)
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(24))
