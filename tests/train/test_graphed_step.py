"""`model.cuda_graph`: the static-buffer step (`ran.train.graphed_step`) computes what the normal training
step computes, and the runs it cannot capture are refused with one line.

On a CPU the step runs without capture (the same code, eagerly, on the static buffers); the 50-step
comparison crosses a learning-rate milestone, an epoch's partial last batch and validations. On a CUDA device
the same comparison runs captured, within bf16's precision (`experiments/gpu/fast_path.py` runs it there).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_MODEL_KWARGS
from fits import cifar_fit

import ran.train.module
from ran.cli.main import main
from ran.train.graphed_step import GraphedStep
from ran.train.module import ImageClassifier
from ran.train.recipe import check_cuda_graph

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

STEPS, BATCH, IMAGES = 50, 8, 60  # 8 steps an epoch, the last of 4 images; 50 steps cross 6 epoch ends
MILESTONE = 25


class StepRecorder(pl.Callback):
    """Every step's training loss and learning rate, as the host sees them after the step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


def train(
    steps: int = STEPS,
    accelerator: str = "cpu",
    precision: str = "32-true",
    ckpt_path: Path | None = None,
    save_to: Path | None = None,
    **module_kwargs,
) -> tuple[StepRecorder, ImageClassifier]:
    """`steps` steps of a tiny Attention-56 on fixed random CIFAR-sized batches, validating every epoch."""
    pl.seed_everything(0, verbose=False)
    images = torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (IMAGES,), generator=torch.Generator().manual_seed(2))
    data = torch.utils.data.TensorDataset(images, labels)
    module = ImageClassifier(
        arch="attention56_cifar",
        model_kwargs=dict(TINY_MODEL_KWARGS),
        lr=0.05,
        milestones=(MILESTONE,),
        **module_kwargs,
    )
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        callbacks=[recorder],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return recorder, module


@pytest.fixture(scope="module")
def normal_run() -> tuple[StepRecorder, ImageClassifier]:
    return train()


@pytest.fixture(scope="module")
def static_run() -> tuple[StepRecorder, ImageClassifier]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ran.train.module, "check_cuda_graph", lambda hp, trainer: None)  # run it on the CPU
        return train(cuda_graph=True)


@pytest.mark.slow
def test_the_static_step_gives_the_normal_steps_losses_and_weights_over_50_steps(normal_run, static_run):
    """Bit for bit on a CPU: the same kernels in the same order, the learning rate read from a float32 tensor
    (which the fused SGD kernel rounds as it rounds the number)."""
    (normal, normal_module), (static, static_module) = normal_run, static_run
    assert len(static.losses) == STEPS and static.losses == normal.losses
    assert static.lrs == normal.lrs
    assert normal.lrs[0] == 0.05 and normal.lrs[-1] == pytest.approx(0.005)  # across the milestone
    assert static_module._graphed.warmed_up > 0 and static_module._graphed.graph is None  # no capture
    for (name, value), (_, other) in zip(
        normal_module.state_dict().items(), static_module.state_dict().items(), strict=True
    ):
        assert torch.equal(value, other), name  # weights, BatchNorm statistics, their batch counts
    print(
        f"static step = normal step over {STEPS} steps, bit for bit: "
        f"losses {normal.losses[0]:.6f} .. {normal.losses[-1]:.6f}"
    )


@pytest.mark.slow
def test_the_static_step_updates_the_training_metrics(normal_run, static_run):
    assert (
        static_run[1].trainer.callback_metrics["train/acc1"]
        == normal_run[1].trainer.callback_metrics["train/acc1"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_a_run_resumed_with_cuda_graph_switched_continues_at_its_step(first, then, tmp_path, monkeypatch):
    """Lightning counts automatic and manual optimizer steps apart; the checkpoint's count carries over."""
    monkeypatch.setattr(ran.train.module, "check_cuda_graph", lambda hp, trainer: None)
    ckpt = tmp_path / "last.ckpt"
    train(steps=3, save_to=ckpt, cuda_graph=first)
    resumed, module = train(steps=6, ckpt_path=ckpt, cuda_graph=then)
    assert len(resumed.losses) == 3 and module.lr_schedulers().last_epoch == 6


def test_the_step_reads_the_schedules_learning_rate_and_runs_a_partial_batch_eagerly():
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    step = GraphedStep(net, torch.nn.functional.cross_entropy, optimizer, capture=False)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    for batch in (slice(0, 8), slice(0, 8), slice(0, 3)):  # two full batches, then a partial one
        logits, _ = step(x[batch], y[batch])
        assert logits.shape == (len(x[batch]), 3) and step.static_x.shape == (8, 4)
        scheduler.step()
    assert all(lr is step.lrs[0] for lr in seen)  # the SGD step read the device tensor ...
    assert step.lrs[0].item() == pytest.approx(0.025)  # ... filled with the schedule's rate of that step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)  # outside the step: the number
    assert torch.equal(step.static_x, x) and step.warmed_up == 2


def trainer(device: str = "cuda", **settings) -> SimpleNamespace:
    defaults = {"world_size": 1, "precision": "bf16-mixed", "accumulate_grad_batches": 1}
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        **{"gradient_clip_val": None, **defaults, **settings},
    )


@pytest.mark.parametrize(
    "settings,hp,says",
    [
        ({"device": "cpu"}, {}, "which needs a CUDA device (this run trains on cpu): leave it out"),
        ({"world_size": 2}, {}, "does not combine with DDP (2 processes)"),
        ({"precision": "16-mixed"}, {}, "use --trainer.precision bf16-mixed"),
        ({"accumulate_grad_batches": 2}, {}, "leave out --trainer.accumulate_grad_batches"),
        ({"gradient_clip_val": 1.0}, {}, "--trainer.gradient_clip_val"),
        ({}, {"compile": True, "compile_mode": "reduce-overhead"}, "use --model.compile_mode default"),
    ],
)
def test_runs_that_cannot_be_captured_are_refused_naming_the_fix(settings, hp, says):
    with pytest.raises(ValueError, match=f"^model.cuda_graph captures the training step.*{re.escape(says)}"):
        check_cuda_graph({"cuda_graph": True, **hp}, trainer(**settings))
    check_cuda_graph({"cuda_graph": False, **hp}, trainer(**settings))  # without cuda_graph: no objection


def test_what_can_be_captured_passes_the_check():
    check_cuda_graph({"cuda_graph": True}, trainer(precision="32-true"))
    check_cuda_graph({"cuda_graph": True, "compile": True, "compile_mode": "default"}, trainer())


def test_ran_fit_refuses_cuda_graph_on_a_cpu_in_one_line_before_training(cifar10_dir, run_root, capsys):
    assert main(cifar_fit(cifar10_dir, run_root, "cg", "--model.cuda_graph", "true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ran fit: error: model.cuda_graph captures the training step as a CUDA graph, which needs a CUDA "
        "device (this run trains on cpu): leave it out"
    ]
    assert not (run_root / "cg" / "checkpoints").exists()


def test_the_module_refuses_cuda_graph_on_a_cpu_outside_the_command_too():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(steps=1, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the captured step")
def test_the_captured_step_gives_the_normal_steps_losses_and_weights_over_50_steps_on_cuda():
    """bf16-mixed channels_last, captured after 3 warm-up steps: within bf16's precision of eager (cuDNN's
    kernels are not bitwise reproducible between the two, which already differ run to run)."""
    settings = {"accelerator": "cuda", "precision": "bf16-mixed", "channels_last": True}
    normal, normal_module = train(**settings)
    graphed, graphed_module = train(cuda_graph=True, **settings)
    assert graphed_module._graphed.graph is not None  # captured
    assert graphed.lrs == normal.lrs
    diffs = [abs(a - b) / abs(b) for a, b in zip(graphed.losses, normal.losses)]
    print(f"captured vs eager over {STEPS} steps: largest relative loss difference {max(diffs):.2e}")
    print(f"eager losses {normal.losses[0]:.5f} .. {normal.losses[-1]:.5f}")
    print(f"graph losses {graphed.losses[0]:.5f} .. {graphed.losses[-1]:.5f}")
    torch.testing.assert_close(graphed.losses, normal.losses, rtol=5e-2, atol=0.0)
    for (name, value), (_, other) in zip(
        normal_module.state_dict().items(), graphed_module.state_dict().items(), strict=True
    ):
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=5e-2, atol=5e-3, msg=name)
        else:
            assert torch.equal(other, value), name  # BatchNorm's batch counts
