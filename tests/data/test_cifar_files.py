"""CIFAR's files on disk (`datamodules.cifar_files`): reading the standard layout, the errors that name the
path and the fix, the download; on small fake data in the real format (``datagen``)."""

from __future__ import annotations

import inspect
import pickle
import urllib.error
from pathlib import Path

import datagen
import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModuleBase,
    DataDirNotAFolderError,
    DatasetIntegrityError,
    DatasetLayoutError,
    DatasetNotFoundError,
    DatasetSizeWarning,
    DataSettingError,
    ImageNetDataModule,
    normalize_batch,
)

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CIFAR100_MEAN, CIFAR100_STD = CIFAR100DataModule.MEAN, CIFAR100DataModule.STD


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
    raw = [datagen.read_cifar_pickle(folder, f"data_batch_{i}") for i in range(1, 6)]
    data = torch.from_numpy(np.concatenate([d for d, _ in raw])).view(-1, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([lab for _, lab in raw]))
    for dataset, idx in ((dm.train_dataset, dm.train_indices), (dm.val_dataset, dm.val_indices)):
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (3, 32, 32)
        assert dataset.labels.dtype == torch.int64
        assert torch.equal(dataset.images, data[idx])
        assert torch.equal(dataset.labels, labels[idx])
    test_data, test_labels = datagen.read_cifar_pickle(folder, "test_batch")
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
    _, fine = datagen.read_cifar_pickle(cifar100_root / "cifar-100-python", "test", "fine_labels")
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

    monkeypatch.setattr("datamodules.cifar_files.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()
    message = str(info.value)
    assert CIFAR10.url in message and str(tmp_path) in message and "name resolution" in message
    assert "--data.data_dir" in message


def test_download_offline_names_the_missing_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("datamodules.cifar_files.download_and_extract_archive", offline)
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

    monkeypatch.setattr("datamodules.cifar_files.download_and_extract_archive", fake_download)
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
