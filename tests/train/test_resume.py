"""Exact resume, data side: a run interrupted mid-epoch and resumed from its checkpoint ends with the weights
of the uninterrupted run, bit for bit (CPU, deterministic), for the CIFAR and the ImageNet datamodules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datagen
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_MODEL_KWARGS
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import CIFAR10DataModule, ImageNetDataModule, ResumableSampler
from datamodules.sampling import SeededSamples
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
    """`Trainer(deterministic=True)` switches torch's deterministic mode on for the whole process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _fit(
    make_data: Callable[[], pl.LightningDataModule],
    num_classes: int,
    max_steps: int,
    ckpt_dir: Path | None = None,
    save_every: int | None = None,
    stop_after: int | None = None,
    ckpt_path: str | Path | None = None,
) -> ImageClassifier:
    """Train the tiny network from seed 0 (or from `ckpt_path`) to `max_steps` and return it."""
    pl.seed_everything(0)
    module = ImageClassifier(
        arch="attention56_cifar", num_classes=num_classes, model_kwargs=TINY_MODEL_KWARGS, lr=0.05
    )
    callbacks: list[pl.Callback] = [RNGStateCallback()]
    if save_every is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
            )
        )
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        deterministic=True,
        logger=False,
        enable_checkpointing=save_every is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return module


def _assert_same_weights(a: ImageClassifier, b: ImageClassifier) -> None:
    """The networks' parameters and buffers are equal bit for bit. (The module's best-validation metric is
    not compared: a checkpoint saved after an epoch's last batch precedes that epoch's validation, which
    Lightning does not repeat on resume.)"""
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _interrupted_then_resumed(make_data, num_classes, total, checkpoint_step, tmp_path) -> ImageClassifier:
    """Train with a checkpoint every `checkpoint_step` steps, die up to 2 steps after the first, resume from
    it."""
    with pytest.raises(Interrupted):
        _fit(
            make_data,
            num_classes,
            total,
            tmp_path,
            checkpoint_step,
            stop_after=min(checkpoint_step + 2, total),
        )
    ckpt = tmp_path / f"step={checkpoint_step}.ckpt"
    return _fit(make_data, num_classes, total, ckpt_path=ckpt)


# 30 training images in batches of 8: 4 batches per epoch (the last of 6); 6 steps end 2 batches into epoch 1.
CIFAR_STEPS = 6


@pytest.fixture(scope="module")
def small_cifar10(tmp_path_factory) -> Path:
    """Fake CIFAR-10 with 40 training images (10 held out for validation) and 10 test images."""
    root = tmp_path_factory.mktemp("cifar10-small")
    datagen.make_cifar10(root, n_train_per_batch=8, n_test=10)
    return root


def _cifar(root: Path) -> Callable[[], CIFAR10DataModule]:
    return lambda: CIFAR10DataModule(str(root), batch_size=8, val_size=10, seed=3)


@pytest.fixture(scope="module")
def cifar_uninterrupted(small_cifar10) -> ImageClassifier:
    return _fit(_cifar(small_cifar10), 10, CIFAR_STEPS)


@pytest.mark.parametrize("checkpoint_step", [2, 4, 5], ids=["mid-epoch-0", "epoch-end", "mid-epoch-1"])
def test_cifar_resume_is_exact(small_cifar10, cifar_uninterrupted, checkpoint_step, tmp_path):
    resumed = _interrupted_then_resumed(_cifar(small_cifar10), 10, CIFAR_STEPS, checkpoint_step, tmp_path)
    _assert_same_weights(resumed, cifar_uninterrupted)


def test_cifar_resume_without_the_data_state_differs(small_cifar10, cifar_uninterrupted, tmp_path):
    """The control: the same resume with the datamodule's saved position removed redraws the data."""
    with pytest.raises(Interrupted):
        _fit(_cifar(small_cifar10), 10, CIFAR_STEPS, tmp_path, 5, stop_after=6)
    checkpoint = torch.load(tmp_path / "step=5.ckpt", weights_only=False)
    state = checkpoint["CIFAR10DataModule"]
    assert state["train_order"]["epoch"] == 1 and state["train_order"]["batches_consumed"] == 1
    del state["train_order"]
    torch.save(checkpoint, tmp_path / "no_order.ckpt")
    resumed = _fit(_cifar(small_cifar10), 10, CIFAR_STEPS, ckpt_path=tmp_path / "no_order.ckpt")
    with pytest.raises(AssertionError, match="tensors differ"):
        _assert_same_weights(resumed, cifar_uninterrupted)


def test_imagenet_resume_is_exact(tmp_path):
    # 12 training images in batches of 4: 3 batches per epoch; 5 steps, the checkpoint 1 batch into epoch 1.
    root = datagen.make_imagenet_tree(tmp_path / "tree", n_train_per_class=4, n_val_per_class=1, size=36)

    def make_data() -> ImageNetDataModule:
        return ImageNetDataModule(
            str(root), batch_size=4, num_workers=0, pin_memory=False, image_size=32, eval_size=32
        )

    uninterrupted = _fit(make_data, 3, 5)
    resumed = _interrupted_then_resumed(make_data, 3, 5, 4, tmp_path)
    _assert_same_weights(resumed, uninterrupted)


# ---------------------------------------------------------------------------------------------- the sampler
def test_sampler_order_depends_on_seed_and_epoch_only_and_skips_consumed_batches():
    dataset = list(range(23))

    def order(**kwargs) -> list[int]:
        return list(ResumableSampler(dataset, batch_size=4, seed=kwargs.pop("seed", 1), **kwargs))

    epoch0, epoch1 = order(), order(epoch=1)
    assert sorted(epoch0) == dataset and epoch0 == order() and epoch0 != epoch1 and epoch0 != order(seed=2)
    assert order(epoch=1, start_batch=2) == epoch1[8:]
    shards = [order(num_replicas=2, rank=r) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12 and set(shards[0]) | set(shards[1]) == set(dataset)

    sampler = ResumableSampler(dataset, batch_size=4, seed=1, epoch=1, start_batch=2)
    assert (
        list(sampler) == epoch1[8:] and list(sampler) == epoch1
    )  # the skip applies to the restored pass only
    for _ in range(3):
        sampler.batch_consumed()
    assert sampler.state_dict() == {"epoch": 1, "batches_consumed": 3}
    assert sampler.state_dict(epoch_length=3) == {"epoch": 2, "batches_consumed": 0}  # limit_train_batches
    for _ in range(3):
        sampler.batch_consumed()
    assert sampler.state_dict() == {"epoch": 2, "batches_consumed": 0}  # all 6 batches: the next epoch


def test_stamped_sampler_and_per_sample_seeded_augmentation():
    class Draw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> float:
            return torch.rand(1).item()  # what a torchvision transform would draw

    sampler = ResumableSampler(list(range(10)), batch_size=4, seed=0, epoch=2, stamp_epoch=True)
    keys = list(sampler)
    assert {epoch for _, epoch in keys} == {2} and sorted(i for i, _ in keys) == list(range(10))
    samples = SeededSamples(Draw(), seed=5)
    state = torch.get_rng_state()
    assert samples[(3, 2)] == samples[(3, 2)] != samples[(3, 1)]
    assert samples[(3, 2)] != SeededSamples(Draw(), seed=6)[(3, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
