"""Callbacks the `ran` command adds to every run: RNG state in checkpoints, validation at the last step, the
newest training state in `last.ckpt`, a graceful stop on SIGTERM/SIGINT, a stop on a non-finite loss, a
step-counting progress bar, and predictions written to disk."""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io import TorchCheckpointIO
from pytorch_lightning.callbacks import BasePredictionWriter, Checkpoint, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ran.train.rundir import UnreadableCheckpoint, checkpoint_problem, write_atomically

__all__ = [
    "AtomicCheckpointIO",
    "DivergenceGuard",
    "GracefulStop",
    "LastCheckpoint",
    "PredictionWriter",
    "RunInterrupted",
    "TrainingDiverged",
    "RNGStateCallback",
    "StepProgressBar",
    "ValidateAtMaxSteps",
    "collect_rng_states",
    "set_rng_states",
]


def collect_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and python RNG states, as tensors and numbers
    only (so checkpoints stay loadable with `torch.load(weights_only=True)`)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64)},
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_from_ranks(mine: Any) -> list[Any]:
    """Every process's ``mine``, in rank order (all_gather_object under DDP; ``[mine]`` in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered
    return [mine]


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states saved by `collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate((states["python"]["version"], tuple(states["python"]["state"].tolist()), None))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class RNGStateCallback(pl.Callback):
    """Saves every process's RNG states in the checkpoint and restores them on resume.

    Lightning restores the model, optimizer, scheduler and loop counters but not the random number
    generators, so without this a resumed run would redraw the augmentation and dropout of a fresh seed. Each
    rank keeps its own stream: the states are gathered from all ranks (checkpoints are saved collectively on
    every rank) and rank r restores entry r. If the number of processes changed, rank r takes entry r modulo
    the saved count.
    """

    key = "rng_states"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.key] = gather_from_ranks(collect_rng_states())

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(self.key)
        if not saved:
            rank_zero_warn("the checkpoint holds no RNG states: random streams restart from the seed")
            return
        if len(saved) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {len(saved)} processes, this run has "
                f"{trainer.world_size}: rank r restores entry r modulo {len(saved)}"
            )
        set_rng_states(saved[trainer.global_rank % len(saved)])


class ValidateAtMaxSteps(pl.Callback):
    """Validates the final weights when `trainer.max_steps` ends training in the middle of an epoch.

    The paper's schedules stop at an iteration count (160k on CIFAR is 227.3 epochs of 704 steps), and
    Lightning validates only at epoch ends, so the last, most converged steps would never be validated nor be
    candidates for the best checkpoint. Requesting a stop at the last step makes Lightning validate before it
    stops, as it does for early stopping.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class PredictionWriter(BasePredictionWriter):
    """Writes `ran predict` outputs to `<output_dir>/predictions.pt` (one file per rank when distributed):
    class probabilities (N, num_classes) in the order of the prediction dataloader's samples on that rank."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        probs = torch.cat([p.cpu() for p in batches]) if batches else torch.empty(0, pl_module.num_classes)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.pt"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"probs": probs, "classes": pl_module.class_names()}, self.output_dir / name)


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, also showing the optimizer step out of `trainer.max_steps` (the paper's
    schedules count iterations) and the training loss. Refreshes every batch on a terminal and every
    `log_refresh_rate` batches when the output goes to a file (a SLURM log), so logs show progress without a
    line per step.

    The loss shown is that of the newest log step (every `trainer.log_every_n_steps`): reading it on the host
    makes the host wait for the GPU, which after every step would keep the GPU idle while the host queues the
    next one.
    """

    def __init__(self, log_refresh_rate: int = 100) -> None:
        super().__init__(refresh_rate=1 if sys.stderr.isatty() else log_refresh_rate)
        self.loss: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.loss = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.training:
            if self.loss is not None:
                metrics["train/loss"] = self.loss
            if trainer.max_steps > 0:
                metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics


# --- faults: divergence, signals, the newest state on disk ------------------------------------------------


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


class RunInterrupted(Exception):
    """The run was stopped by a signal after saving its state; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def _non_finite_weights(module: torch.nn.Module) -> list[str]:
    """Names of the module's parameters and floating-point buffers that hold a NaN or an infinity (metric
    states such as a MaxMetric's initial -inf are not weights and are not looked at). One read on the host
    for all of them, not one per tensor."""
    tensors = [
        (n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()
    ]
    if not tensors:
        return []
    finite = torch.stack([t.detach().isfinite().all().to(tensors[0][1].device) for _, t in tensors]).tolist()
    return [name for (name, _), ok in zip(tensors, finite) if not ok]


class DivergenceGuard(pl.Callback):
    """Stops training at the first non-finite loss, and refuses to checkpoint non-finite weights.

    The loss is checked after every optimizer step, before any other callback of that step can save the
    weights it produced (so it must come first in the callback list); the weights are checked whenever a
    checkpoint is about to be written. Either raises `TrainingDiverged` with the step and the likely fix,
    which ends the run with status "diverged".

    Reading a loss on the host makes the host wait for the device, which on a GPU would serialise every step.
    There (`every_step` None and the loss not on the CPU, or `every_step=False`) each step only records on the
    device whether its loss was finite, with the first bad step and its loss; the record is read every
    `trainer.log_every_n_steps` steps, before every checkpoint and at the end of training, so the run still
    stops with the first bad step named and no checkpoint is written after it.
    """

    def __init__(self, every_step: bool | None = None) -> None:
        self.every_step = every_step
        self._first_bad: torch.Tensor | None = (
            None  # [step, loss] of the first non-finite loss; step -1: none
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_bad = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float().reshape(())
        every_step = self.every_step if self.every_step is not None else loss.device.type == "cpu"
        if every_step:
            if not bool(torch.isfinite(loss)):
                raise TrainingDiverged(self._message(trainer, trainer.global_step, loss.item()))
            return
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        record = torch.stack([torch.full_like(loss, trainer.global_step), loss])
        first = (self._first_bad[0] < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(first, record, self._first_bad)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        """Raise for a non-finite loss recorded on the device (one read of two numbers)."""
        if self._first_bad is None:
            return
        step, loss = self._first_bad.tolist()
        if step >= 0:
            raise TrainingDiverged(self._message(trainer, int(step), loss))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check(trainer)
        network = getattr(pl_module, "net", pl_module)
        bad = _non_finite_weights(network)
        if bad:
            raise TrainingDiverged(
                self._message(
                    trainer,
                    trainer.global_step,
                    what=f"{len(bad)} weight tensors are not finite (first: {bad[0]})",
                )
            )

    @staticmethod
    def _message(trainer: pl.Trainer, step: int, loss: float | None = None, what: str = "") -> str:
        what = what or f"the training loss is {loss}"
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        lr = f" (learning rate {lrs[0]:.3g})" if lrs and math.isfinite(lrs[0]) else ""
        return (
            f"training diverged at step {step}: {what}{lr}; no checkpoint of these weights "
            "was saved. Lower --model.lr, add --model.warmup_steps, or train in fp32 (--trainer.precision 32)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but every save is atomic on any filesystem and an unreadable file is
    named when loaded.

    Lightning writes through fsspec, whose local "transaction" stages the file in TMPDIR and moves it into
    place: on a cluster with node-local /tmp that move is a copy, and a kill during it leaves last.ckpt and
    best.ckpt truncated. Here the file is written beside its target, fsynced and renamed over it
    (`ran.train.rundir.write_atomically`), so a kill leaves the old checkpoint or the new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception:
            # The whole-file CRC check runs only when loading failed, to name what is wrong with the file.
            problem = checkpoint_problem(Path(path))
            if problem is None:
                raise
            raise UnreadableCheckpoint(f"cannot load checkpoint {path}: {problem}") from None


class LastCheckpoint(Checkpoint):
    """Keeps `checkpoints/last.ckpt` the newest training state: every `every_n_steps` optimizer steps, after
    every validation, at the end of training and when a signal stops the run (`GracefulStop`).

    A `Checkpoint`, so that Lightning runs it after the best-checkpoint ModelCheckpoint (it moves checkpoint
    callbacks to the end, in their given order): the state saved after a validation holds that validation's
    best score, which a resume from it must know.

    Lightning's ModelCheckpoint with `save_last=True` rewrites last.ckpt only when it also saves a top-k
    checkpoint, so a resumed run repeated the steps since the last improvement and a finished run's final
    weights were saved nowhere. `trainer.save_checkpoint` is collective; the file is written by rank 0 through
    the trainer's checkpoint IO (atomic in `ran`).
    """

    def __init__(self, path: str | Path, every_n_steps: int = 1000) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.saved_step = -1

    def save(self, trainer: pl.Trainer, again: bool = False) -> None:
        if again or trainer.global_step != self.saved_step:
            # The whole training state (weights_only=False, said so Lightning does not log that it chose it).
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            if not _validates_after_this_batch(trainer):  # else saved at the validation's end
                self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Saved again even at the step of the last validation: a save inside validation precedes Lightning's
        # count of logged steps for that step, so a run extended from it would log one step behind.
        self.save(trainer, again=True)


def _validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch. A state saved before that
    validation would skip it on resume (Lightning takes a checkpoint of a batch's end as past the batch's
    validation), and with it the validation's best.ckpt candidate and results."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val
    except (AttributeError, TypeError):  # another Lightning's loop: save as before
        return False


class GracefulStop(pl.Callback):
    """SIGTERM (what schedulers send at pre-emption or the time limit) and SIGINT (Ctrl-C) stop training at
    the next step boundary, with the state of that step saved in last.ckpt; a second signal stops at once.

    Lightning notices SIGTERM itself and raises `SIGTERMException` (a SystemExit) once the step is complete
    (after its learning-rate update); SIGINT is routed the same way instead of a KeyboardInterrupt that could
    land inside the optimizer step. The CLI turns the stop into exit code 128 + signal (143, 130). SIGUSR1
    (SLURM's pre-emption warning) stays Lightning's: save hpc_ckpt and requeue.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, last: LastCheckpoint | None) -> None:
        self.last = last
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning registers its SIGTERM handler after `setup` and calls the one it finds (this) as well.
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in self.SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum
        rank_zero_info(
            f"\nReceived {signal.Signals(signum).name}: stopping after this step, saving last.ckpt"
        )
        if self._trainer is not None:
            # The flag Lightning's own SIGTERM handler sets; its loops then stop at the next step boundary.
            self._trainer._signal_connector.received_sigterm = True

    def restore_handlers(self) -> None:
        """Put back the handlers found at setup. Lightning's own teardown re-installs the SIGTERM handler it
        found (this one) after the callbacks' hooks, so the CLI calls this once more when the run is over."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.restore_handlers()  # Lightning calls no teardown hook after an exception
        if isinstance(exception, SIGTERMException) and self.signum is None:
            self.signum = signal.SIGTERM
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.last is not None:
            self.last.save(trainer)
