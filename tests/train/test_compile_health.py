"""torch.compile health, checked on a CPU: every registered network's training forward and loss trace as one
graph without a break, and a compiled fit compiles once for training and once for evaluation, never again:
not at a learning-rate change, an epoch's partial last batch, validation or the soft-mask monitor's hooks.

What decides GPU speed under `model.compile` is decided here already: a graph break splits the step into
pieces with a return to Python between them (and, under CUDA graphs, a graph each), and a recompilation
stops training for as long as the first compile took. Dynamo's own tools report both (`torch._dynamo.explain`
and the counters in `torch._dynamo.utils.counters`); backend 'aot_eager' traces forward and backward as
inductor would without compiling C++ kernels.
"""

from __future__ import annotations

import datagen
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_MODEL_KWARGS
from torch._dynamo.utils import counters

from datamodules import CIFAR10DataModule
from ran.nn.registry import create_model, list_models
from ran.tools.mask_monitor import SoftMaskMonitor
from ran.train.module import ImageClassifier

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

STEPS, BATCH, MILESTONE = 30, 24, 12  # fake CIFAR: 160 training images, 7 steps an epoch, the last of 16


def tiny(name: str) -> dict:
    """Tiny widths for `name`; AttentionNeXt's 32-group convolutions need 32 channels in their bottlenecks."""
    return (
        {**TINY_MODEL_KWARGS, "stage_widths": (64, 64, 64)}
        if name == "attention_next56"
        else TINY_MODEL_KWARGS
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_the_training_forward_and_loss_of_every_network_is_one_graph(name):
    net = create_model(name, num_classes=10, **tiny(name)).train()
    size = net.min_input_size
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
    loss = torch.nn.CrossEntropyLoss()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, y: loss(net(x), y))(x, y)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


@pytest.mark.slow
def test_the_soft_mask_hooks_trace_without_a_break():
    net = create_model("attention56_cifar", num_classes=10, **TINY_MODEL_KWARGS).eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net.soft_masks)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]


class CompileCounter(pl.Callback):
    """Dynamo's compile count after each training step, and whether a validation came before it."""

    def __init__(self) -> None:
        self.after_step: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append(counters["frames"]["total"])


@pytest.mark.slow
def test_a_compiled_fit_compiles_once_for_training_and_once_for_evaluation(tmp_path, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: real_compile(net, backend="aot_eager"))
    datagen.make_cifar10(tmp_path, n_train_per_batch=40, n_test=40)
    data = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=BATCH, val_size=40)
    module = ImageClassifier(
        "attention56_cifar", model_kwargs=dict(TINY_MODEL_KWARGS), compile=True, milestones=(MILESTONE,)
    )
    counter = CompileCounter()
    monitor = SoftMaskMonitor(tmp_path / "run", every_n_validations=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter, monitor],
    )
    torch._dynamo.reset()
    counters.clear()
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == STEPS and len(counter.after_step) == STEPS
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # past the milestone
    assert monitor.validations >= 4 and len(list((tmp_path / "run" / "masks").iterdir())) >= 4
    assert dict(counters["graph_break"]) == {}
    # The sanity check compiles evaluation, the first step training; nothing after, through 4 epochs.
    assert counters["frames"]["total"] == 2 and counters["stats"]["unique_graphs"] == 2
    assert set(counter.after_step) == {2}
    assert module._compiled_batch == {True: BATCH, False: BATCH}  # partial batches ran eagerly
