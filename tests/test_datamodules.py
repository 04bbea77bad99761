"""Tests for the ``datamodules`` package, on small fake data in the real on-disk formats (``datagen``)."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import datagen
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import CIFAR10
from torchvision.transforms.v2 import functional as TF

from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModuleBase,
    CorruptImageError,
    DataDirNotAFolderError,
    DatasetIntegrityError,
    DatasetLayoutError,
    DatasetNotFoundError,
    DatasetSizeWarning,
    DataSettingError,
    ImageNetDataModule,
    ResumableSampler,
    augment_cifar_batch,
    corrupt_labels,
    crop_flip_batch,
    normalize_batch,
    random_crop_flip_params,
    reference_cifar_transform,
    stratified_split,
)
from datamodules.errors import CorruptImageWarning
from datamodules.imagenet import eval_resize_size
from datamodules.imagenet_valprep import main as valprep_main

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_MEAN, CIFAR10_STD = CIFAR10DataModule.MEAN, CIFAR10DataModule.STD
CIFAR100_MEAN, CIFAR100_STD = CIFAR100DataModule.MEAN, CIFAR100DataModule.STD


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    """Read-only fake CIFAR-10: 5 x 100 training images (50 per class), 100 test images."""
    root = tmp_path_factory.mktemp("cifar10")
    datagen.make_cifar10(root, n_train_per_batch=100, n_test=100)
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    """Read-only fake CIFAR-100: 500 training images (5 per class), 200 test images."""
    root = tmp_path_factory.mktemp("cifar100")
    datagen.make_cifar100(root, n_train=500, n_test=200)
    return root


def _raw(folder: Path, name: str, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    with open(folder / name, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return entry["data"], np.asarray(entry[label_key])


def _stub_trainer(training: bool, global_rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(training=training, global_rank=global_rank)


# ---------------------------------------------------------------------------------------------- CIFAR reading
def test_cifar10_reads_standard_layout(cifar10_root):
    dm = CIFAR10DataModule(str(cifar10_root), val_size=50, batch_size=16)
    assert dm.num_classes == 10
    with pytest.warns(DatasetSizeWarning, match="500 images, not the official 50000"):
        dm.setup("fit")
    dm.setup("test")
    assert dm.split_sizes == {"train": 450, "val": 50, "test": 100}
    assert dm.classes[:2] == ["airplane", "automobile"]

    folder = cifar10_root / "cifar-10-batches-py"
    raw = [_raw(folder, f"data_batch_{i}") for i in range(1, 6)]
    data = torch.from_numpy(np.concatenate([d for d, _ in raw])).view(-1, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([lab for _, lab in raw]))
    for dataset, idx in ((dm.train_dataset, dm.train_indices), (dm.val_dataset, dm.val_indices)):
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (3, 32, 32)
        assert dataset.labels.dtype == torch.int64
        assert torch.equal(dataset.images, data[idx])
        assert torch.equal(dataset.labels, labels[idx])
    test_data, test_labels = _raw(folder, "test_batch")
    assert torch.equal(dm.test_dataset.images.reshape(100, -1), torch.from_numpy(test_data))
    assert torch.equal(dm.test_dataset.labels, torch.from_numpy(test_labels))
    # R plane first, row-major: pixel (c, y, x) is column c * 1024 + y * 32 + x of the pickle's row.
    assert dm.test_dataset.images[3, 2, 5, 7] == test_data[3, 2 * 1024 + 5 * 32 + 7]


def test_cifar100_reads_fine_labels_and_own_constants(cifar100_root):
    dm = CIFAR100DataModule(str(cifar100_root), val_size=200)
    assert (
        dm.num_classes == 100 and dm.MEAN == (0.5071, 0.4865, 0.4409) and dm.STD == (0.2673, 0.2564, 0.2762)
    )
    dm.setup()
    assert dm.split_sizes == {"train": 300, "val": 200, "test": 200}
    assert torch.bincount(dm.val_dataset.labels, minlength=100).tolist() == [2] * 100
    _, fine = _raw(cifar100_root / "cifar-100-python", "test", "fine_labels")
    assert torch.equal(dm.test_dataset.labels, torch.from_numpy(fine))
    assert dm.classes[0] == "fine_00" and len(dm.classes) == 100
    images = dm.test_dataset.images[:4]
    out, _ = dm.on_after_batch_transfer((images, dm.test_dataset.labels[:4]), 0)
    torch.testing.assert_close(out, normalize_batch(images, CIFAR100_MEAN, CIFAR100_STD))


def test_constructor_is_cli_friendly():
    for cls in (CIFAR10DataModule, ImageNetDataModule):
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self":
                assert param.annotation is not inspect.Parameter.empty, (
                    f"{cls.__name__}.{name} lacks a type hint"
                )
    for name, param in inspect.signature(CIFAR10DataModule.__init__).parameters.items():
        if name != "self":
            assert param.default is not inspect.Parameter.empty, name
            assert f"{name}:" in CIFAR10DataModule.__doc__, f"{name} is not documented"
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CIFAR100DataModule, "data")
    cfg = parser.parse_args(
        ["--data.val_size", "0", "--data.download", "true", "--data.clean_label_ratio", "0.5"]
    )
    dm = CIFAR100DataModule(**cfg.data)
    assert (dm.val_size, dm.download, dm.clean_label_ratio, dm.num_classes) == (0, True, 0.5, 100)


def test_base_class_is_abstract_and_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match="CIFAR10DataModule"):
        CIFARDataModuleBase()
    with pytest.raises(ValueError, match="clean_label_ratio"):
        CIFAR10DataModule(clean_label_ratio=1.5)
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(val_size=-1)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_data_names_path_layout_and_fix(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"))
    expected = str(tmp_path / "nowhere" / "cifar-10-batches-py")
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        for part in (
            expected,
            "data_batch_1",
            "test_batch",
            "batches.meta",
            "--data.download true",
            "--data.data_dir",
        ):
            assert part in message
    assert isinstance(info.value, FileNotFoundError)


def test_data_dir_may_be_the_dataset_folder_or_its_parent(cifar10_root, tmp_path):
    folder = cifar10_root / "cifar-10-batches-py"
    for data_dir in (cifar10_root, folder):
        assert CIFAR10DataModule.resolve_data_dir(data_dir) == cifar10_root
        assert CIFAR10DataModule.find_dataset(data_dir) == folder
        dm = CIFAR10DataModule(str(data_dir), val_size=50)
        dm.prepare_data()
        dm.setup("test")
        assert dm.dataset_dir == folder and dm.split_sizes["test"] == 100
    nested = tmp_path / "cifar-10-batches-py"  # a parent that happens to carry the folder's name
    datagen.make_cifar10(nested, n_train_per_batch=10, n_test=10)
    assert CIFAR10DataModule.resolve_data_dir(nested) == nested
    assert CIFAR10DataModule.resolve_data_dir(tmp_path / "new" / "cifar-10-batches-py") == tmp_path / "new"
    # ImageNet has no folder name of its own: data_dir is the folder holding train/ and val/.
    assert ImageNetDataModule.resolve_data_dir(tmp_path) == tmp_path


def test_one_missing_message_for_every_command(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR100DataModule.find_dataset(tmp_path / "nowhere")
    assert str(info.value) == CIFAR100DataModule.missing_message(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as from_module:
        CIFAR100DataModule(str(tmp_path / "nowhere")).setup("test")
    assert str(from_module.value) == str(info.value)
    message = ImageNetDataModule.missing_message(tmp_path)
    assert message.startswith("ImageNet not found") and f"{tmp_path}/train/<wnid>/*.JPEG" in message


def test_dataset_facts_are_class_attributes():
    assert (
        CIFAR10DataModule.NUM_CLASSES,
        CIFAR100DataModule.NUM_CLASSES,
        ImageNetDataModule.NUM_CLASSES,
    ) == (
        10,
        100,
        1000,
    )
    assert CIFAR10DataModule.DATASET_FOLDER == "cifar-10-batches-py" == CIFAR10.base_folder
    assert CIFAR100DataModule.DATASET_FOLDER == "cifar-100-python"
    assert ImageNetDataModule.DATASET_FOLDER is None
    assert ImageNetDataModule.MEAN == (0.485, 0.456, 0.406) and ImageNetDataModule.STD == (
        0.229,
        0.224,
        0.225,
    )
    assert CIFAR10DataModule.MEAN == (0.4914, 0.4822, 0.4465)


def test_data_dir_that_is_a_file_is_one_clear_error(tmp_path):
    afile = tmp_path / "data"
    afile.write_text("not a folder")
    for step in (
        CIFAR10DataModule(str(afile), download=True).prepare_data,
        CIFAR10DataModule(str(afile)).setup,
        ImageNetDataModule(str(afile), num_classes=3).setup,
        lambda: CIFAR100DataModule.find_dataset(afile),
    ):
        with pytest.raises(DataDirNotAFolderError) as info:
            step()
        message = str(info.value)
        assert isinstance(info.value, NotADirectoryError) and "\n" not in message
        assert f"data_dir {afile} is a file, not a folder" in message and "--data.data_dir" in message


def test_val_size_not_smaller_than_training_set_is_one_clear_error(cifar10_root):
    for val_size in (500, 50_000):
        dm = CIFAR10DataModule(str(cifar10_root), val_size=val_size)
        with pytest.raises(DataSettingError) as info:
            dm.setup("fit")
        message = str(info.value)
        assert isinstance(info.value, ValueError) and "\n" not in message
        assert f"val_size={val_size}" in message and "has 500 images" in message
        assert "--data.val_size 50" in message


def test_missing_batch_file_names_it(tmp_path):
    folder = datagen.make_cifar10(tmp_path, n_train_per_batch=10, n_test=10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetLayoutError, match="data_batch_3"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()


def _break_garbage(entry, path):
    path.write_bytes(b"not a pickle")


def _set(key, value):
    def mutate(entry, path):
        entry[key] = value(entry) if callable(value) else value
        datagen.write_pickle(path, entry)

    return mutate


def _drop(key):
    def mutate(entry, path):
        del entry[key]
        datagen.write_pickle(path, entry)

    return mutate


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (_break_garbage, "not a readable CIFAR pickle"),
        (_drop("labels"), "no 'labels' entry"),
        (_set("data", lambda e: e["data"].astype(np.float32)), "uint8 array of shape"),
        (_set("data", lambda e: e["data"][:, :1024]), "uint8 array of shape"),
        (_set("labels", lambda e: e["labels"][:-1]), "to match 'data'"),
        (_set("labels", lambda e: [10] + e["labels"][1:]), r"integers in \[0, 10\)"),
    ],
    ids=["garbage", "no-labels", "float-data", "wrong-shape", "short-labels", "label-range"],
)
def test_malformed_batch_names_file_and_problem(tmp_path, mutate, problem):
    folder = datagen.make_cifar10(tmp_path, n_train_per_batch=10, n_test=10)
    path = folder / "data_batch_4"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    mutate(entry, path)
    dm = CIFAR10DataModule(str(tmp_path), val_size=10)
    dm.prepare_data()  # every file is present: structure is checked when reading
    with pytest.raises(DatasetLayoutError, match=problem) as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


def test_md5_is_opt_in(cifar10_root):
    CIFAR10DataModule(str(cifar10_root), val_size=10).setup(
        "fit"
    )  # not the official bytes: loads by structure
    dm = CIFAR10DataModule(str(cifar10_root), val_size=10, check_md5=True)
    with pytest.raises(DatasetIntegrityError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "batches.meta" in message and "md5" in message and "check_md5=False" in message
    assert CIFAR10.meta["md5"] in message


# ---------------------------------------------------------------------------------------------- download
def test_download_offline_gives_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("datamodules.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()
    message = str(info.value)
    assert CIFAR10.url in message and str(tmp_path) in message and "name resolution" in message
    assert "--data.data_dir" in message


def test_download_offline_names_the_missing_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("datamodules.cifar.download_and_extract_archive", offline)
    folder = datagen.make_cifar10(tmp_path, n_train_per_batch=10, n_test=10)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()
    message = str(info.value)
    assert f"{folder} lacks test_batch" in message and "name resolution" in message
    assert "copy the missing file(s) there" in message and "\n" not in message


def test_download_uses_official_archive_and_only_when_absent(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        datagen.make_cifar100(download_root, n_train=200, n_test=100)

    monkeypatch.setattr("datamodules.cifar.download_and_extract_archive", fake_download)
    dm = CIFAR100DataModule(str(tmp_path / "new"), download=True, val_size=100)
    dm.prepare_data()
    dm.prepare_data()  # present now: no second download
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        )
    ]
    dm.setup("fit")
    assert dm.split_sizes["val"] == 100


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
    train_raw = torch.from_numpy(np.concatenate([_raw(folder, f"data_batch_{i}")[1] for i in range(1, 6)]))
    assert dm.train_labels.numel() == 2000
    assert isinstance(dm.realised_clean_ratio, float) and abs(dm.realised_clean_ratio - 0.7) < 0.03
    assert dm.realised_clean_ratio == pytest.approx(
        (dm.train_labels == dm.train_labels_clean).double().mean().item()
    )
    assert torch.equal(dm.train_labels_clean, train_raw[dm.train_indices])  # the clean labels stay available
    assert torch.equal(dm.train_dataset.labels, dm.train_labels)  # training uses the noisy ones
    assert torch.equal(dm.val_dataset.labels, train_raw[dm.val_indices])  # validation untouched
    assert torch.equal(dm.test_dataset.labels, torch.from_numpy(_raw(folder, "test_batch")[1]))
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


# ---------------------------------------------------------------------------------------------- augmentation
def _test_image() -> torch.Tensor:
    """A 3 x 32 x 32 uint8 image with structure: horizontal ramp, vertical ramp, noise."""
    ramp = torch.arange(32, dtype=torch.float32) * 8
    red = ramp.view(1, 32).expand(32, 32)
    green = ramp.view(32, 1).expand(32, 32)
    blue = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0)).float()
    return torch.stack([red, green, blue]).to(torch.uint8)


def test_crop_flip_matches_torchvision_for_fixed_offsets():
    images = torch.randint(
        0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    top = torch.tensor([0, 8, 4, 0, 8, 3])
    left = torch.tensor([0, 8, 4, 8, 0, 5])
    flips = torch.tensor([False, True, False, True, False, True])
    out = crop_flip_batch(images, top, left, flips, padding=4)
    for i in range(6):
        expected = TF.crop(TF.pad(images[i], [4]), int(top[i]), int(left[i]), 32, 32)
        if flips[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[i], expected), i
    assert torch.equal(crop_flip_batch(images, top * 0 + 4, left * 0 + 4, flips & False), images)


def test_normalisation_matches_reference_formula():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    out = normalize_batch(images, CIFAR10_MEAN, CIFAR10_STD)
    assert out.dtype == torch.float32 and images.dtype == torch.uint8
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)


def test_augmentation_params_distribution():
    top, left, flips = random_crop_flip_params(20000, generator=torch.Generator().manual_seed(0))
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    counts = torch.bincount(top, minlength=9).float() / 20000
    assert (counts - 1 / 9).abs().max() < 0.015


def test_batched_augmentation_matches_reference_in_distribution():
    image = _test_image()
    n = 4000
    torch.manual_seed(0)
    reference = reference_cifar_transform(CIFAR10_MEAN, CIFAR10_STD)
    ref_mean = torch.stack([reference(image) for _ in range(n)]).mean(0)
    batch = image.expand(n, 3, 32, 32).contiguous()
    ours_mean = augment_cifar_batch(batch, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(1)).mean(
        0
    )
    tolerance = 0.2  # about 5 standard errors of a per-pixel mean over 4000 copies (normalised units)
    assert (ours_mean - ref_mean).abs().max() < tolerance
    assert (ours_mean - ref_mean).abs().mean() < 0.05
    # Negative controls: without the flip, or with other padding, the difference is far larger.
    no_flip = augment_cifar_batch(
        batch, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(1), flip=False
    ).mean(0)
    assert (no_flip - ref_mean).abs().max() > 3 * tolerance
    pad2 = augment_cifar_batch(
        batch, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(1), padding=2
    ).mean(0)
    assert (pad2 - ref_mean).abs().max() > 3 * tolerance


def test_augmentation_is_seeded():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment_cifar_batch(images, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(5))
    b = augment_cifar_batch(images, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(5))
    c = augment_cifar_batch(images, CIFAR10_MEAN, CIFAR10_STD, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_on_after_batch_transfer_train_and_eval(cifar10_root):
    dm = CIFAR10DataModule(str(cifar10_root), val_size=50, batch_size=16, seed=7)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    normalised = normalize_batch(batch[0], CIFAR10_MEAN, CIFAR10_STD)

    out, labels = dm.on_after_batch_transfer(batch, 0)  # no trainer attached: evaluation path
    assert torch.equal(out, normalised) and labels is batch[1]
    dm.trainer = _stub_trainer(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], normalised)

    dm.trainer = _stub_trainer(training=True)
    train_out, _ = dm.on_after_batch_transfer(batch, 0)
    assert train_out.dtype == torch.float32 and train_out.shape == (16, 3, 32, 32)
    assert not torch.equal(train_out, normalised)
    assert batch[0].dtype == torch.uint8  # input untouched

    twin = CIFAR10DataModule(str(cifar10_root), val_size=50, seed=7)
    twin.trainer = _stub_trainer(training=True)
    assert torch.equal(twin.on_after_batch_transfer(batch, 0)[0], train_out)  # same seed and rank: same draws
    other_rank = CIFAR10DataModule(str(cifar10_root), val_size=50, seed=7)
    other_rank.trainer = _stub_trainer(training=True, global_rank=1)
    assert not torch.equal(other_rank.on_after_batch_transfer(batch, 0)[0], train_out)

    no_aug = CIFAR10DataModule(str(cifar10_root), augment=False)
    no_aug.trainer = _stub_trainer(training=True)
    assert torch.equal(no_aug.on_after_batch_transfer(batch, 0)[0], normalised)


def test_augmentation_follows_the_restored_position(cifar10_root):
    def data(**trainer_args):
        dm = CIFAR10DataModule(str(cifar10_root), val_size=50, batch_size=25)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(
            **{"current_epoch": 0, "world_size": 1, "global_rank": 0, "training": True}
            | {"num_training_batches": 18}
            | trainer_args
        )
        return dm

    dm = data()
    loader = iter(dm.train_dataloader())
    first, second = next(loader), next(loader)
    out_first = dm.on_after_batch_transfer(first, 0)[0]
    state = dm.state_dict()
    out_second = dm.on_after_batch_transfer(second, 0)[0]
    resumed = data()
    resumed.load_state_dict({**state, "aug_generator_state": torch.zeros(16, dtype=torch.uint8)})  # old key
    batch = next(iter(resumed.train_dataloader()))
    assert torch.equal(batch[1], second[1])  # the order resumes at the second batch ...
    assert torch.equal(resumed.on_after_batch_transfer(batch, 0)[0], out_second)  # ... augmented as before
    assert not torch.equal(dm.on_after_batch_transfer(first, 0)[0], out_first)  # a later position draws anew
    other_rank = data(global_rank=1, world_size=2)
    other_rank.train_dataloader()
    assert not torch.equal(other_rank.on_after_batch_transfer(first, 0)[0], out_first)


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


# ---------------------------------------------------------------------------------------------- ImageNet
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return datagen.make_imagenet_tree(
        tmp_path_factory.mktemp("imagenet"), n_train_per_class=6, n_val_per_class=2
    )


def _imagenet(root, **kwargs) -> ImageNetDataModule:
    args = dict(batch_size=4, num_workers=0, pin_memory=False, image_size=32, eval_size=32) | kwargs
    return ImageNetDataModule(str(root), **args)


def test_imagenet_loaders(imagenet_root):
    dm = _imagenet(imagenet_root)
    assert dm.num_classes == 3 and dm.classes == list(datagen.DEFAULT_WNIDS)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and type(images) is torch.Tensor
    assert labels.dtype == torch.int64 and labels.max() < 3
    assert len(dm.train_dataset) == 18 and len(dm.val_dataset) == 6
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # ILSVRC convention: val/ is both validation and test set
    assert eval_resize_size(224) == 256 and eval_resize_size(320) == 366


def test_imagenet_default_sizes(imagenet_root):
    dm = ImageNetDataModule(str(imagenet_root), batch_size=2, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 3, 224, 224)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 3, 224, 224)


def test_imagenet_holdout(imagenet_root):
    dm = _imagenet(imagenet_root, holdout_per_class=2, seed=0)
    dm.setup("fit")
    dm.setup("test")
    val_targets = [dm.val_dataset.dataset.targets[i] for i in dm.val_dataset.indices]
    assert sorted(val_targets) == [0, 0, 1, 1, 2, 2]
    assert not set(dm.val_dataset.indices) & set(dm.train_dataset.indices) and len(dm.train_dataset) == 12
    assert "val" in dm.test_dataset.root and len(dm.test_dataset) == 6
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 3, 32, 32)
    again = _imagenet(imagenet_root, holdout_per_class=2, seed=0)
    again.setup("fit")
    assert again.val_dataset.indices == dm.val_dataset.indices


def test_imagenet_num_classes_and_missing_tree(tmp_path, imagenet_root):
    with pytest.raises(DatasetNotFoundError) as info:
        ImageNetDataModule(str(tmp_path / "absent"))
    assert str(tmp_path / "absent" / "train") in str(info.value) and "train/<wnid>/*.JPEG" in str(info.value)
    assert ImageNetDataModule(str(tmp_path / "absent"), num_classes=1000).num_classes == 1000
    with pytest.raises(DatasetLayoutError, match="num_classes=5"):
        ImageNetDataModule(str(imagenet_root), num_classes=5)


def test_imagenet_layout_errors(tmp_path):
    datagen.make_imagefolder(tmp_path / "train", n_per_class=2, size=16)
    dm = _imagenet(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "val")):
        dm.setup("fit")
    datagen.make_imagefolder(tmp_path / "val", classes=datagen.DEFAULT_WNIDS[:2], n_per_class=1, size=16)
    with pytest.raises(DatasetLayoutError, match="1 missing"):
        dm.setup("fit")
    (tmp_path / "val" / datagen.DEFAULT_WNIDS[2]).mkdir()
    with pytest.raises(DatasetLayoutError, match=f"without images.*{datagen.DEFAULT_WNIDS[2]}"):
        dm.setup("fit")


def test_imagenet_corrupt_file_error_and_skip(tmp_path):
    root = datagen.make_imagenet_tree(tmp_path, n_train_per_class=2, n_val_per_class=1, size=16)
    bad = datagen.corrupt_file(
        root / "train" / datagen.DEFAULT_WNIDS[1] / f"{datagen.DEFAULT_WNIDS[1]}_0.JPEG"
    )
    dm = _imagenet(root, batch_size=6)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=str(bad)):
        next(iter(dm.train_dataloader()))

    dm = _imagenet(root, batch_size=6, skip_corrupt=True)
    dm.setup("fit")
    with pytest.warns(CorruptImageWarning, match=str(bad)):
        images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (6, 3, 32, 32)  # the epoch keeps its length
    assert dm.train_dataset.corrupt_paths == {str(bad)}


# ---------------------------------------------------------------------------------------------- valprep
WNIDS = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]


@pytest.mark.parametrize("labels_format", ["kaggle", "plain"])
def test_valprep_sorts_files(tmp_path, labels_format, capsys):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS, labels_format=labels_format)
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels), "--dry-run"]) == 0
    assert "would move 5 images into 3 class folders" in capsys.readouterr().out
    assert len(list(val_dir.glob("*.JPEG"))) == 5  # dry run moves nothing

    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 0
    assert "moved 5 images into 3 class folders" in capsys.readouterr().out
    assert not list(val_dir.glob("*.JPEG"))
    for i, wnid in enumerate(WNIDS, start=1):
        assert (val_dir / wnid / f"ILSVRC2012_val_{i:08d}.JPEG").is_file()

    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 0  # rerun: nothing to do
    assert "moved 0 images into 0 class folders; 5 already sorted" in capsys.readouterr().out


def test_valprep_refuses_to_overwrite(tmp_path, capsys):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS)
    clash = val_dir / WNIDS[1] / "ILSVRC2012_val_00000002.JPEG"
    clash.parent.mkdir()
    clash.write_bytes(b"existing")
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(labels)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert len(list(val_dir.glob("*.JPEG"))) == 5 and clash.read_bytes() == b"existing"


def test_valprep_rejects_numeric_ground_truth(tmp_path, capsys):
    val_dir, _ = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS[:2])
    numeric = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    numeric.write_text("ILSVRC2012_val_00000001.JPEG 490\nILSVRC2012_val_00000002.JPEG 361\n")
    assert valprep_main(["--val-dir", str(val_dir), "--labels", str(numeric)]) == 1
    assert "not a WordNet id" in capsys.readouterr().err


def test_valprep_runs_as_module(tmp_path):
    val_dir, labels = datagen.make_flat_imagenet_val(tmp_path / "val", WNIDS[:2], labels_format="plain")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "datamodules.imagenet_valprep",
            "--val-dir",
            str(val_dir),
            "--labels",
            str(labels),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "moved 2 images" in result.stdout and (val_dir / WNIDS[1] / "ILSVRC2012_val_00000002.JPEG").is_file()
    )


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.real_data
def test_real_cifar10_counts():
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA / 'cifar-10-batches-py'}")
    dm = CIFAR10DataModule(str(SHARED_DATA))
    dm.prepare_data()
    dm.setup()
    assert dm.split_sizes == {"train": 45000, "val": 5000, "test": 10000}
    assert torch.bincount(dm.val_dataset.labels).tolist() == [500] * 10
    assert dm.train_dataset.images.shape == (45000, 3, 32, 32) and dm.train_dataset.images.is_contiguous()
