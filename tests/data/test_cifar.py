"""The CIFAR datamodules (`datamodules.cifar`): validation split and label noise, the loaders and the
resumable training order, a Trainer's fit; on small fake data in the real format (``datagen``)."""

from __future__ import annotations

from types import SimpleNamespace

import datagen
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import (
    CIFAR10DataModule,
    ResumableSampler,
    corrupt_labels,
    stratified_split,
)

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


# ------------------------------------------------------------------------------------------- splits and noise
def test_stratified_split_unit():
    labels = torch.arange(500) % 10
    train, val = stratified_split(labels, 105, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[val], minlength=10)
    assert counts.sum() == 105 and set(counts.tolist()) == {10, 11}
    assert len(train) + len(val) == 500 and not set(train.tolist()) & set(val.tolist())
    again = stratified_split(labels, 105, 10, torch.Generator().manual_seed(0))[1]
    other = stratified_split(labels, 105, 10, torch.Generator().manual_seed(1))[1]
    assert torch.equal(val, again) and not torch.equal(val, other)
    # A class with too few images gives what it has; the others make up the rest.
    uneven = torch.cat(
        [torch.zeros(3, dtype=torch.long), torch.ones(50, dtype=torch.long), torch.full((50,), 2)]
    )
    _, val = stratified_split(uneven, 30, 3)
    counts = torch.bincount(uneven[val], minlength=3).tolist()
    assert counts[0] == 3 and sorted(counts[1:]) == [13, 14]
    with pytest.raises(ValueError, match="val_size"):
        stratified_split(labels, 500, 10)


def test_datamodule_val_split_is_stratified_seeded_and_disjoint(cifar10_root):
    dms = [CIFAR10DataModule(str(cifar10_root), val_size=100, seed=s) for s in (3, 3, 4)]
    for dm in dms:
        dm.setup("fit")
    a, b, c = dms
    assert torch.bincount(a.val_dataset.labels, minlength=10).tolist() == [10] * 10
    assert not set(a.train_indices.tolist()) & set(a.val_indices.tolist())
    assert len(a.train_indices) + len(a.val_indices) == 500
    assert torch.equal(a.val_indices, b.val_indices) and not torch.equal(a.val_indices, c.val_indices)


def test_val_size_zero_means_no_validation(cifar10_root):
    dm = CIFAR10DataModule(str(cifar10_root), val_size=0)
    dm.setup("fit")
    assert dm.split_sizes == {"train": 500, "val": 0} and dm.val_dataset is None
    assert dm.val_dataloader() == []


def test_corrupt_labels_unit():
    labels = torch.arange(2000) % 10
    noisy, realised = corrupt_labels(labels, 0.7, 10, torch.Generator().manual_seed(0))
    assert abs(realised - 0.7) < 0.03
    assert realised == pytest.approx((noisy == labels).double().mean().item())
    assert noisy.min() >= 0 and noisy.max() < 10 and torch.equal(labels, torch.arange(2000) % 10)
    # Replacements are spread over the other classes (not e.g. always label + 1).
    changed = noisy != labels
    shifts = ((noisy - labels) % 10)[changed]
    assert set(shifts.tolist()) == set(range(1, 10))
    assert torch.equal(corrupt_labels(labels, 1.0, 10)[0], labels)
    assert (corrupt_labels(labels, 0.0, 10)[0] != labels).all()


def test_label_noise_on_training_part_only(tmp_path):
    folder = datagen.make_cifar10(tmp_path, n_train_per_batch=420, n_test=50)
    dm = CIFAR10DataModule(str(tmp_path), val_size=100, clean_label_ratio=0.7, seed=1)
    dm.setup()
    train_raw = torch.from_numpy(
        np.concatenate([datagen.read_cifar_pickle(folder, f"data_batch_{i}")[1] for i in range(1, 6)])
    )
    assert dm.train_labels.numel() == 2000
    assert isinstance(dm.realised_clean_ratio, float) and abs(dm.realised_clean_ratio - 0.7) < 0.03
    assert dm.realised_clean_ratio == pytest.approx(
        (dm.train_labels == dm.train_labels_clean).double().mean().item()
    )
    assert torch.equal(dm.train_labels_clean, train_raw[dm.train_indices])  # the clean labels stay available
    assert torch.equal(dm.train_dataset.labels, dm.train_labels)  # training uses the noisy ones
    assert torch.equal(dm.val_dataset.labels, train_raw[dm.val_indices])  # validation untouched
    assert torch.equal(
        dm.test_dataset.labels, torch.from_numpy(datagen.read_cifar_pickle(folder, "test_batch")[1])
    )
    again = CIFAR10DataModule(str(tmp_path), val_size=100, clean_label_ratio=0.7, seed=1)
    again.setup("fit")
    assert torch.equal(again.train_labels, dm.train_labels)


# ---------------------------------------------------------------------------------------------- loaders
def test_loader_fetches_whole_batch_in_one_op(cifar10_root, monkeypatch):
    dm = CIFAR10DataModule(str(cifar10_root), val_size=50, batch_size=32)
    dm.setup()

    def no_single_items(self, index):
        raise AssertionError("__getitem__ must not be used for batches")

    monkeypatch.setattr(type(dm.train_dataset), "__getitem__", no_single_items)
    seen = []
    for images, labels in dm.train_dataloader():
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape[1:] == (3, 32, 32) and images.shape[0] == labels.shape[0] <= 32
        seen.append(labels)
    assert sum(len(s) for s in seen) == 450
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == len(dm.predict_dataloader()) == 4
    assert isinstance(dm.predict_dataloader().dataset, type(dm.test_dataset))


def test_loader_accepts_lightning_distributed_sampler(cifar10_root):
    from pytorch_lightning.utilities.data import _update_dataloader

    dm = CIFAR10DataModule(str(cifar10_root), val_size=0, batch_size=25)
    dm.setup("fit")
    loader = dm.train_dataloader()
    indices = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ranked = _update_dataloader(loader, sampler)
        assert isinstance(ranked, DataLoader) and ranked.collate_fn is loader.collate_fn
        images, labels = next(iter(ranked))
        assert images.shape == (25, 3, 32, 32)
        indices.append(set(sampler))
    assert not indices[0] & indices[1] and len(indices[0] | indices[1]) == 500


def test_training_order_is_seeded_resumable_and_follows_the_trainers_epoch(cifar10_root, monkeypatch):
    def first_labels(dm) -> list[int]:
        return next(iter(dm.train_dataloader()))[1].tolist()

    def data(seed=0, epoch=0):
        dm = CIFAR10DataModule(str(cifar10_root), val_size=50, batch_size=25, seed=seed)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(
            current_epoch=epoch, world_size=1, global_rank=0, training=True, num_training_batches=18
        )
        return dm

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    reference = first_labels(data())
    assert first_labels(data()) == reference  # no global RNG involved
    assert first_labels(data(seed=1)) != reference and first_labels(data(epoch=2)) != reference
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")  # seed_everything's seed changes the order too
    assert first_labels(data()) != reference

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    dm = data(epoch=2)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.epoch == 2
    batches = [labels for _, labels in loader]
    dm.on_after_batch_transfer((torch.zeros(25, 3, 32, 32, dtype=torch.uint8), batches[0]), 0)
    dm.on_after_batch_transfer((torch.zeros(25, 3, 32, 32, dtype=torch.uint8), batches[1]), 0)
    state = dm.state_dict()
    assert state["train_order"] == {"epoch": 2, "batches_consumed": 2, "run_seed": 7}
    monkeypatch.setenv("PL_GLOBAL_SEED", "9")  # the restored run seed wins over a new one
    resumed = data(epoch=2)
    resumed.load_state_dict(state)
    rest = [labels for _, labels in resumed.train_dataloader()]
    assert len(rest) == len(batches) - 2 and all(torch.equal(a, b) for a, b in zip(rest, batches[2:]))


class _TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        self.batches: list[tuple[str, torch.dtype, tuple]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.batches.append(("train", images.dtype, tuple(images.shape)))
        return torch.nn.functional.cross_entropy(self.linear(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        self.batches.append(("val", batch[0].dtype, tuple(batch[0].shape)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("val_size", [0, 50])
def test_trainer_fit(cifar10_root, val_size):
    dm = CIFAR10DataModule(str(cifar10_root), val_size=val_size, batch_size=50)
    model = _TinyModel()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    kinds = [kind for kind, _, _ in model.batches]
    assert kinds.count("train") == 2 and kinds.count("val") == (1 if val_size else 0)
    assert all(dtype == torch.float32 and shape == (50, 3, 32, 32) for _, dtype, shape in model.batches)
