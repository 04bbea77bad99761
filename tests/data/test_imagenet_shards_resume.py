"""Exact resume from the shards: a run killed mid-epoch and resumed from its checkpoint ends with the weights
of the uninterrupted run, bit for bit (CPU, deterministic), also when the resumed run has other loader
workers. The order's position lives in the datamodule's state in the checkpoint, not in a loader's."""

from __future__ import annotations

from pathlib import Path

import datagen
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_MODEL_KWARGS
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import ImageNetDataModule
from ran.train.callbacks import RNGStateCallback
from ran.train.module import ImageClassifier

pytestmark = pytest.mark.filterwarnings(
    "ignore::datamodules.errors.DatasetSizeWarning", "ignore::UserWarning", "ignore::DeprecationWarning"
)


class Interrupted(Exception):
    """Stands for a kill -9: the run stops dead after a given step."""


class StopAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted(f"killed after step {trainer.global_step}")


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 12 training images in batches of 4: 3 batches per epoch, in 4 or more chunks.
    root = tmp_path_factory.mktemp("shards")
    tree = datagen.make_imagenet_tree(root / "tree", n_train_per_class=4, n_val_per_class=1, size=36)
    return datagen.make_imagenet_shards(tree, root / "shards")


def _fit(
    shards: Path,
    max_steps: int,
    tmp_path: Path | None = None,
    stop_after: int | None = None,
    ckpt_path: Path | None = None,
    workers: int = 0,
) -> ImageClassifier:
    pl.seed_everything(0)
    module = ImageClassifier(arch="attention56_cifar", num_classes=3, model_kwargs=TINY_MODEL_KWARGS, lr=0.05)
    callbacks: list[pl.Callback] = [RNGStateCallback()]
    if tmp_path is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
        )
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        deterministic=True,
        logger=False,
        enable_checkpointing=tmp_path is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = ImageNetDataModule(
        str(shards),
        format="litdata",
        batch_size=4,
        num_workers=workers,
        pin_memory=False,
        image_size=32,
        eval_size=32,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def uninterrupted(shards) -> ImageClassifier:
    return _fit(shards, 5)


@pytest.mark.parametrize(
    "resume_workers", [0, pytest.param(2, marks=pytest.mark.slow)], ids=["same-workers", "other-workers"]
)
def test_shards_resume_mid_epoch_is_exact(shards, uninterrupted, tmp_path, resume_workers):
    """5 steps; the checkpoint at step 4 is 1 batch into epoch 1, the kill 1 step later."""
    with pytest.raises(Interrupted):
        _fit(shards, 5, tmp_path, stop_after=5)
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=False)["ImageNetDataModule"]
    assert state["train_order"] == {"epoch": 1, "batches_consumed": 1, "run_seed": 0}
    resumed = _fit(shards, 5, ckpt_path=tmp_path / "step=4.ckpt", workers=resume_workers)
    a, b = uninterrupted.net.state_dict(), resumed.net.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
