"""`results.json` in every run directory: the run's final metrics, readable without W&B or a network.

    {"fit":  {"status": "running" | "finished" | "interrupted" | "failed", "global_step": 2000,
              "max_steps": 2000, "epoch": 2, "metrics": {"val/acc1": 0.61, ...},
              "best_model_path": ".../checkpoints/best.ckpt", "best_model_score": 0.62},
     "test": {"metrics": {"test/acc1": 0.60, "test/err1": 39.9, ...}, "ckpt_path": ".../best.ckpt"}}

The fit section is rewritten after every validation, so a run that dies still tells how far it got.
`python -m experiments report` reads these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

RESULTS_FILE = "results.json"


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = value.item()
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def update_results(run_dir: str | Path, section: str, values: dict[str, Any]) -> Path:
    """Merge `values` into `section` of `<run_dir>/results.json`, atomically."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[section] = {**data.get(section, {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


class ResultsWriter(pl.Callback):
    """Writes the run's metrics to `<run_dir>/results.json` at the end of fit, validation and test (rank
    0)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def _fit(self, trainer: pl.Trainer, status: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        update_results(
            self.run_dir,
            "fit",
            {
                "status": status,
                "global_step": trainer.global_step,
                "max_steps": trainer.max_steps,
                "epoch": trainer.current_epoch,
                "metrics": _scalars(trainer.callback_metrics),
                "best_model_path": getattr(ckpt, "best_model_path", None) or None,
                "best_model_score": None if score is None else float(score),
            },
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._fit(trainer, "running")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        self._fit(trainer, "finished" if done or not trainer.interrupted else "interrupted")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            update_results(
                self.run_dir,
                "test",
                {"metrics": _scalars(trainer.callback_metrics), "ckpt_path": trainer.ckpt_path},
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A run that failed before it wrote anything (bad data path, say) leaves no directory behind, so
        # that the
        # corrected command is not refused as an existing run.
        if trainer.state.fn == "fit" and self.run_dir.is_dir():
            self._fit(trainer, "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")
