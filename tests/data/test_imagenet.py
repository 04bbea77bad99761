"""The ImageNet datamodule (`datamodules.imagenet`) on a small JPEG tree in the real layout (``datagen``)."""

from __future__ import annotations

from pathlib import Path

import datagen
import pytest
import torch

from datamodules import (
    CorruptImageError,
    DatasetLayoutError,
    DatasetNotFoundError,
    ImageNetDataModule,
)
from datamodules.errors import CorruptImageWarning
from datamodules.imagenet import eval_resize_size

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


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
