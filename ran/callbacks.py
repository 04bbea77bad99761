"""Callbacks the `ran` command adds to every run: RNG state in checkpoints, validation at the last step, a
step-counting progress bar, and predictions written to disk."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_warn

__all__ = [
    "PredictionWriter",
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
        mine = collect_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        checkpoint[self.key] = gathered

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
    schedules count iterations). Refreshes every batch on a terminal and every `log_refresh_rate` batches
    when the output goes to a file (a SLURM log), so logs show progress without a line per step."""

    def __init__(self, log_refresh_rate: int = 100) -> None:
        super().__init__(refresh_rate=1 if sys.stderr.isatty() else log_refresh_rate)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.max_steps > 0 and trainer.training:
            metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics
