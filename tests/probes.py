"""Callbacks that tests put into `ran` runs (through `--trainer.callbacks`) to record what happens inside
them, or to provoke an event. Recorders write one JSON file per rank into `out_dir`, readable after a
subprocess exits.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch


class ResumeProbe(pl.Callback):
    """Records, when training starts: the step, the learning rate, a momentum buffer and the torch RNG
    state."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        first = next(pl_module.parameters())
        momentum = optimizer.state.get(first, {}).get("momentum_buffer")
        best = getattr(trainer.checkpoint_callback, "best_model_score", None)
        val_best = pl_module.val_acc1_best
        record = {
            "global_step": trainer.global_step,
            "lr": optimizer.param_groups[0]["lr"],
            "momentum_buffer_sum": None if momentum is None else float(momentum.double().sum()),
            "torch_rng_sum": int(torch.get_rng_state().long().sum()),
            "best_model_score": None if best is None else float(best),
            "val_acc1_best": float(val_best.compute()) if val_best.update_called else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"resume_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SyncProbe(pl.Callback):
    """Counts, on each rank, the validation images it scored and those it got right (its own forward pass on
    the batches it saw), and records the `val/acc1` the module logged at the end of validation."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.correct = self.total = 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.correct = self.total = 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, y = batch
        self.correct += int((pl_module(x).argmax(1) == y).sum())
        self.total += int(y.numel())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "correct": self.correct,
            "total": self.total,
            "logged_val_acc1": float(trainer.callback_metrics["val/acc1"]),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"sync_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PreemptAt(pl.Callback):
    """Sends this process SLURM's pre-emption signal (SIGUSR1) once the given optimizer step is done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class SignalAt(pl.Callback):
    """Sends this process `signum` (a number or a name such as "SIGTERM") once the given optimizer step is
    done, as a scheduler or Ctrl-C would."""

    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step = step
        self.signum = getattr(signal, signum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class CrashAt(pl.Callback):
    """Ends the process at once after the given optimizer step, saving nothing: with `rank`, only on that
    global rank and only on the first start of a torchrun group (TORCHELASTIC_RESTART_COUNT 0), by SIGKILL
    (a kill -9); without, by raising (in-process runs, where a kill would end the test)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        if self.rank is None:
            raise RuntimeError(f"crashed after step {self.step}")
        if trainer.global_rank == self.rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAt(pl.Callback):
    """Fills the network's first weight with NaN before the given optimizer step, as a diverging recipe
    would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class LastStepAt(pl.Callback):
    """Records, at the end of the given optimizer step, the global step saved in checkpoints/last.ckpt."""

    def __init__(self, step: int, run_dir: str, out_dir: str) -> None:
        self.step, self.run_dir, self.out_dir = step, Path(run_dir), Path(out_dir)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            ckpt = torch.load(
                self.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
            )
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "last_step.json").write_text(json.dumps({"step": ckpt["global_step"]}))


class FirstStepLR(pl.Callback):
    """Records the step and the learning rate at which the first training batch of this process runs."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int):
        if not self.done:
            self.done = True
            record = {"global_step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "first_step_lr.json").write_text(json.dumps(record))
