"""Speed options give the default path's losses: precision, channels_last, torch.compile, gradient
accumulation.

Each runs a few optimizer steps of a tiny network on the same seeded batches through the real LightningModule
and Trainer, and compares the training losses with the default fp32 path.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from ran.train.module import ImageClassifier
from ran.train.recipe import check_compile_mode

TINY = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
STEPS = 4


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train(
    batch_size: int = 16,
    accumulate: int = 1,
    precision: str = "32-true",
    steps: int = STEPS,
    accelerator: str = "cpu",
    **module_kwargs,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Training losses of `steps` optimizer steps on 16-image batches (split into micro-batches if
    accumulating), and the network's final state (on the CPU)."""
    pl.seed_everything(0, verbose=False)
    images = torch.randn(steps * 16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (steps * 16,), generator=torch.Generator().manual_seed(2))
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
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
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
    assert trainer.global_step == steps
    return recorder.losses, {k: v.detach().cpu() for k, v in module.net.state_dict().items()}


def train_losses(**kwargs) -> list[float]:
    return train(**kwargs)[0]


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


def test_compile_mode_reaches_torch_compile_and_cuda_graph_modes_fall_back_off_cuda(monkeypatch):
    modes: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: modes.append(mode) or net)
    module = ImageClassifier(model_kwargs=TINY, compile=True, compile_mode="max-autotune-no-cudagraphs")
    module.compile_network()
    assert modes == ["max-autotune-no-cudagraphs"] and not module._cuda_graphs
    module = ImageClassifier(model_kwargs=TINY, compile=True, compile_mode="reduce-overhead")
    with pytest.warns(UserWarning, match="reduce-overhead captures CUDA graphs, which need a CUDA device"):
        module.compile_network()
    assert modes[-1] == "default" and not module._cuda_graphs


def test_cuda_graph_compile_modes_refuse_ddp_and_say_what_to_use():
    hp = {"compile": True, "compile_mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="use --model.compile_mode max-autotune-no-cudagraphs or default"):
        check_compile_mode(hp, world_size=2)
    check_compile_mode(hp, world_size=1)
    check_compile_mode({**hp, "compile": False}, world_size=8)
    check_compile_mode({**hp, "compile_mode": "max-autotune-no-cudagraphs"}, world_size=8)


CUDA_STEPS = 50


@pytest.fixture(scope="module")
def eager_cuda() -> tuple[list[float], dict[str, torch.Tensor]]:
    return train(steps=CUDA_STEPS, accelerator="cuda", precision="bf16-mixed", channels_last=True)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: compare CUDA-graph modes with eager"
)
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compiled_cuda_step_matches_eager_over_50_steps(mode, eager_cuda):
    """bf16-mixed channels_last on the GPU, 50 steps: the compiled network's losses and final weights against
    eager's, within bf16's precision (8 mantissa bits; the difference grows over 50 SGD steps)."""
    losses, weights = train(
        steps=CUDA_STEPS,
        accelerator="cuda",
        precision="bf16-mixed",
        channels_last=True,
        compile=True,
        compile_mode=mode,
    )
    eager_losses, eager_weights = eager_cuda
    print(f"{mode}: losses {losses[0]:.5f} .. {losses[-1]:.5f}")
    print(f"eager: losses {eager_losses[0]:.5f} .. {eager_losses[-1]:.5f}")
    torch.testing.assert_close(losses, eager_losses, rtol=5e-2, atol=0.0)
    for name, value in eager_weights.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[name], value, rtol=5e-2, atol=5e-3, msg=name)
