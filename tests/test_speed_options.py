"""Speed options give the default path's losses: precision, channels_last, torch.compile, gradient
accumulation.

Each runs a few optimizer steps of a tiny network on the same seeded batches through the real LightningModule
and Trainer, and compares the training losses with the default fp32 path.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from ran.module import ImageClassifier

TINY = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
STEPS = 4


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_losses(
    batch_size: int = 16, accumulate: int = 1, precision: str = "32-true", **module_kwargs
) -> list[float]:
    """Training losses of STEPS optimizer steps on 16-image batches (split into micro-batches if
    accumulating)."""
    pl.seed_everything(0, verbose=False)
    images = torch.randn(STEPS * 16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (STEPS * 16,), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=batch_size
    )
    module = ImageClassifier(
        arch="attention56_cifar",
        num_classes=10,
        model_kwargs=TINY,
        milestones=(100,),
        lr=0.05,
        **module_kwargs,
    )
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        precision=precision,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
        deterministic=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == STEPS
    return recorder.losses


@pytest.fixture(scope="module")
def default_losses() -> list[float]:
    return train_losses()


def test_training_moves_the_loss(default_losses):
    assert len(default_losses) == STEPS and default_losses[0] != default_losses[-1]


def test_channels_last_matches_the_default_path(default_losses):
    """Same arithmetic in another memory layout, but oneDNN's NHWC kernels sum in another order; BatchNorm's
    backward cancels large terms, so after a few SGD steps the losses agree within rel. 5e-3, not 1e-6."""
    losses = train_losses(channels_last=True)
    assert losses[0] == pytest.approx(default_losses[0], rel=1e-6)  # before any update: the same forward
    torch.testing.assert_close(losses, default_losses, rtol=5e-3, atol=0.0)


def test_bf16_mixed_matches_the_default_path_within_bf16_precision(default_losses):
    """bf16 keeps 8 bits of mantissa: losses agree within 2% over four steps."""
    torch.testing.assert_close(train_losses(precision="bf16-mixed"), default_losses, rtol=2e-2, atol=0.0)


def test_gradient_accumulation_matches_the_default_path(default_losses):
    """Two micro-batches of 8 per step: the gradient is the mean over 16 images as in the default path; only
    BatchNorm's statistics come from 8 images instead of 16, so the step losses agree within 5%. (Lightning
    reports each micro-batch's loss divided by the accumulation, so a step's loss is their sum.)"""
    losses = train_losses(batch_size=8, accumulate=2)
    assert len(losses) == 2 * STEPS
    per_step = [losses[i] + losses[i + 1] for i in range(0, len(losses), 2)]
    torch.testing.assert_close(per_step, default_losses, rtol=5e-2, atol=0.0)


@pytest.mark.slow
def test_torch_compile_matches_the_default_path(default_losses):
    """Inductor's fused kernels reorder float32 sums as channels_last does: within rel. 5e-3 after four
    steps."""
    losses = train_losses(compile=True)
    assert losses[0] == pytest.approx(default_losses[0], rel=1e-5)
    torch.testing.assert_close(losses, default_losses, rtol=5e-3, atol=0.0)


def test_compiled_module_checkpoints_the_plain_network():
    module = ImageClassifier(arch="attention56_cifar", model_kwargs=TINY, compile=True)
    plain_keys = list(module.state_dict())
    module.compile_network()
    assert module._compiled is not None and list(module.state_dict()) == plain_keys
    assert not any("_orig_mod" in k for k in plain_keys)
