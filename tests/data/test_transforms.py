"""The batched CIFAR augmentation (`datamodules.transforms`) against torchvision's per-image reference, and
its seeding in the datamodule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from datamodules import (
    CIFAR10DataModule,
    augment_cifar_batch,
    crop_flip_batch,
    normalize_batch,
    random_crop_flip_params,
    reference_cifar_transform,
)

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

CIFAR10_MEAN, CIFAR10_STD = CIFAR10DataModule.MEAN, CIFAR10DataModule.STD


def _stub_trainer(training: bool, global_rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(training=training, global_rank=global_rank)


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
