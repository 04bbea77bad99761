"""`ResultsWriter`: what a run records in its `results.json` (the file itself is `ran.train.rundir.RunDir`'s).

The fit section is rewritten after every validation, so a run that dies still tells how far it got, and its
`history` gains that validation's figures (a curve of the whole fit: `python -m experiments curves`); its
status ends as "finished" only when training reached `max_steps` (or its epochs) without a fault:
"interrupted" after a signal, "diverged" after a non-finite loss, "failed" after any other error.
`validate` and `test` record their own figures under their own keys, with the checkpoint they evaluated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ran.train.callbacks import TrainingDiverged
from ran.train.rundir import RunDir, UnreadableResults

__all__ = ["ResultsWriter"]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = value.item()
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def fault_status(exception: BaseException) -> str:
    """The fit status a run ends with after `exception`."""
    if isinstance(exception, TrainingDiverged):
        return "diverged"
    if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
        return "interrupted"
    return "failed"


class ResultsWriter(pl.Callback):
    """Writes the run's status and metrics to `<run_dir>/results.json` (rank 0): the fit section after every
    validation and at the end or fault of the fit, the validate and test sections at their ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = RunDir(Path(run_dir))

    def _fit(
        self, trainer: pl.Trainer, status: str, error: str | None = None, with_history: bool = False
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        values = {
            "status": status,
            "global_step": trainer.global_step,
            "max_steps": trainer.max_steps,
            "epoch": trainer.current_epoch,
            "metrics": _scalars(trainer.callback_metrics),
            "best_model_path": getattr(ckpt, "best_model_path", None) or None,
            "best_model_score": None if score is None else float(score),
            "error": error,
        }
        if with_history:
            values["history"] = self._history(trainer)
        self.run_dir.update_results("fit", values)

    def _history(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """The fit's validations so far, this one last: its step, epochs trained (a fraction where it ran
        mid-epoch) and val/ figures. Entries at or after this step, left by a run that died after them and
        resumed from an earlier checkpoint, are replaced."""
        try:
            history = self.run_dir.read_results().get("fit", {}).get("history", [])
        except UnreadableResults:
            history = []
        step = trainer.global_step
        batches = trainer.num_training_batches
        if 0 < batches < math.inf:
            epochs = round(step / math.ceil(batches / max(1, trainer.accumulate_grad_batches)), 3)
        else:
            epochs = trainer.current_epoch + 1
        metrics = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("val/")}
        entry = {"step": step, "epochs": epochs, "metrics": metrics}
        return [h for h in history if h.get("step", -1) < step] + [entry]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._fit(trainer, "running", with_history=True)
        elif trainer.state.fn == "validate" and trainer.is_global_zero:
            metrics = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("val/")}
            self.run_dir.update_results("validate", {"metrics": metrics, "ckpt_path": trainer.ckpt_path})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        self._fit(trainer, "finished" if done or not trainer.interrupted else "interrupted")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.run_dir.update_results(
                "test", {"metrics": _scalars(trainer.callback_metrics), "ckpt_path": trainer.ckpt_path}
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Only a fit that got as far as saving its config: a start that failed before leaves no results.json
        # (its run directory, made for the lock, then holds nothing and is removed again).
        if trainer.state.fn == "fit" and self.run_dir.config_file("fit").is_file():
            lines = str(exception).strip().splitlines()
            self._fit(
                trainer, fault_status(exception), error=lines[-1] if lines else type(exception).__name__
            )
