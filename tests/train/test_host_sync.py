"""No host synchronisation per training step: nothing in a `ran fit` step reads a device tensor's value on
the host, except at the steps that log (every `trainer.log_every_n_steps`).

A read (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, an operation whose output size depends on the data)
makes the host wait until the GPU has run everything queued, and then the GPU waits while the host queues
the next step: on a fast GPU, a read per step costs more than the step. On a CPU nothing waits, so these
tests count the reads instead: every ATen operation that would synchronise on CUDA (seen through a
TorchDispatchMode, also when a library calls it from C++) and the Python calls that copy to the host, inside
each training step of a real `ran fit` run: the progress bar on a terminal, the CSV logger, the
learning-rate and throughput monitors, the divergence guard in its GPU mode, validation and checkpoints in
between (validation itself and epoch ends are not counted: they are not per step).
"""

from __future__ import annotations

import io
import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from fits import cifar_fit
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics.classification import MulticlassAccuracy

import ran.cli.app
import ran.train.module
from ran.cli.main import main
from ran.train.callbacks import DivergenceGuard
from ran.train.metrics import TopKAccuracy

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

REPO = Path(__file__).resolve().parents[2]
STEPS, LOG_EVERY = 20, 10  # fake CIFAR: 10 steps an epoch, so a validation and an epoch end in between

# ATen operations that make the host wait for a CUDA device: a value read back, or an output whose size
# depends on the data.
SYNCING_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::bincount",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
}
# Python calls that copy a tensor to the host (on a CPU tensor they dispatch no operation).
HOST_COPIES = ("tolist", "numpy", "cpu")


def caller() -> str:
    """Where a read comes from: the innermost frame of this project, and of a library under it."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
    frames = [f for f in frames if Path(f.filename).name != Path(__file__).name]
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and "/tests/" not in f.filename]
    where = ours[-1] if ours else frames[-1]
    text = f"{Path(where.filename).relative_to(REPO) if ours else where.filename}:{where.lineno} {where.name}"
    if frames and frames[-1] is not where:
        text += f" (via {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name})"
    return text


class SyncCensus(pl.Callback, TorchDispatchMode):
    """Records every host read inside training steps: (step, what, caller). Active from a step's start to
    the next step's start, validation's start or the epoch's end; put into a run with --trainer.callbacks."""

    last: SyncCensus | None = None

    def __init__(self) -> None:
        pl.Callback.__init__(self)
        TorchDispatchMode.__init__(self)
        self.step: int | None = None
        self.steps = 0
        self.reads: list[tuple[int, str, str]] = []
        SyncCensus.last = self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING_OPS:
            self.record(func._schema.name)
        return func(*args, **(kwargs or {}))

    def record(self, what: str) -> None:
        if self.step is not None:
            self.reads.append((self.step, what, caller()))

    def _open(self, step: int) -> None:
        self._close()
        self.step = step
        self.__enter__()

    def _close(self) -> None:
        if self.step is not None:
            self.step = None
            self.__exit__(None, None, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1
        self._open(trainer.global_step + 1)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def census_of_a_fit(cifar10_dir, run_root, monkeypatch, *extra: str) -> SyncCensus:
    """A 20-step `ran fit` with the census in it, as on a GPU: the progress bar refreshing every step (a
    terminal) and the divergence guard reading the loss only at log steps."""
    for name in HOST_COPIES:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            if SyncCensus.last is not None:
                SyncCensus.last.record(f"Tensor.{__name}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_synchronize = torch.cuda.synchronize

    def synchronize(*args, **kwargs):
        if SyncCensus.last is not None:
            SyncCensus.last.record("torch.cuda.synchronize")
        return real_synchronize(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(ran.cli.app, "DivergenceGuard", lambda: DivergenceGuard(every_step=False))
    monkeypatch.setattr(sys, "stderr", TTY())
    census = json.dumps([{"class_path": f"{__name__}.SyncCensus"}])
    args = cifar_fit(cifar10_dir, run_root, "census", *extra, "--trainer.callbacks", census, steps=STEPS)
    assert main([*args, "--trainer.log_every_n_steps", str(LOG_EVERY)]) == 0
    result = SyncCensus.last
    SyncCensus.last = None
    assert result is not None and result.steps == STEPS
    return result


def assert_reads_only_at_log_steps(census: SyncCensus) -> None:
    log_steps = {s for s in range(1, STEPS + 1) if s % LOG_EVERY == 0}
    per_step = [read for read in census.reads if read[0] not in log_steps]
    lines = "\n".join(f"  step {step}: {what} from {where}" for step, what, where in per_step)
    assert not per_step, f"host reads in training steps that log nothing:\n{lines}"
    # The census sees reads: the log steps have theirs (the loss shown and logged, the guard's check).
    assert {step for step, _, _ in census.reads} == log_steps


@pytest.mark.slow
def test_a_training_step_reads_nothing_on_the_host_between_log_steps(cifar10_dir, run_root, monkeypatch):
    assert_reads_only_at_log_steps(census_of_a_fit(cifar10_dir, run_root, monkeypatch))


@pytest.mark.slow
def test_the_static_buffer_step_reads_nothing_on_the_host_either(cifar10_dir, run_root, monkeypatch):
    """`model.cuda_graph`'s step, run without capture on the CPU (its refusal there lifted)."""
    monkeypatch.setattr(ran.cli.app, "check_cuda_graph", lambda hp, trainer: None)
    monkeypatch.setattr(ran.train.module, "check_cuda_graph", lambda hp, trainer: None)
    census = census_of_a_fit(cifar10_dir, run_root, monkeypatch, "--model.cuda_graph", "true")
    assert_reads_only_at_log_steps(census)


def test_the_census_names_a_read_and_its_caller():
    """The divergence guard's CPU mode reads every loss: one read, named by the line in ran that makes it."""
    census = SyncCensus()
    SyncCensus.last = None
    trainer = SimpleNamespace(global_step=3, log_every_n_steps=50, optimizers=[])
    with census:
        census.step = 3
        DivergenceGuard(every_step=True).on_train_batch_end(trainer, None, torch.tensor(2.0), None, 2)
        census.step = None
    assert [read[:2] for read in census.reads] == [(3, "aten::_local_scalar_dense")]
    assert (
        census.reads[0][2].startswith("ran/train/callbacks.py:")
        and "on_train_batch_end" in census.reads[0][2]
    )


@pytest.mark.parametrize("top_k", [1, 5])
def test_the_training_accuracy_is_torchmetrics_accuracy(top_k):
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    ours, reference = TopKAccuracy(top_k), MulticlassAccuracy(10, top_k=top_k, average="micro")
    for part in (slice(0, 40), slice(40, 64)):
        ours.update(logits[part], labels[part])
        reference.update(logits[part], labels[part])
    assert ours.compute().item() == pytest.approx(reference.compute().item())


def test_the_training_accuracy_reads_nothing_on_the_host():
    census = SyncCensus()
    SyncCensus.last = None
    metric = TopKAccuracy(5)
    with census:
        census.step = 1
        metric.update(torch.randn(16, 10), torch.randint(0, 10, (16,)))
        census.step = None
    assert census.reads == []
