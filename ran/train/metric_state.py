"""`MetricStateCallback`: the metric accumulators a checkpoint carries, so that a resumed run reports what the
uninterrupted run reports.

Lightning saves the module's parameters and buffers, but torchmetrics keeps its accumulators out of the
state_dict, so a run resumed mid-epoch reported that epoch's `train/acc1` over the batches after the resume
only, and `val/acc1_best` forgot every validation before the resume. Each rank accumulates its own share of
the data, so the states are gathered from every rank (checkpoints are saved collectively on all ranks) and
rank r restores entry r, as `RNGStateCallback` does for the random streams.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import Metric

from ran.train.callbacks import gather_from_ranks

__all__ = ["MetricStateCallback"]


def _metrics(module: torch.nn.Module) -> dict[str, Metric]:
    return {name: m for name, m in module.named_modules() if isinstance(m, Metric)}


def _to(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().to(device or "cpu")
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


class MetricStateCallback(pl.Callback):
    """Saves every rank's torchmetrics states (and update counts) in the checkpoint; restores them on
    resume (see the module docstring)."""

    key = "metric_states"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        mine = {
            name: {"state": _to(m.metric_state, None), "updates": m._update_count}
            for name, m in _metrics(pl_module).items()
        }
        checkpoint[self.key] = gather_from_ranks(mine)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(self.key)
        if not saved:
            return
        if len(saved) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the metric states of {len(saved)} processes, this run has "
                f"{trainer.world_size}: this epoch's training metrics restart from the resume"
            )
            return
        entry = saved[trainer.global_rank]
        for name, metric in _metrics(pl_module).items():
            if name not in entry:
                continue
            for state, value in entry[name]["state"].items():
                setattr(metric, state, _to(value, metric.device))
            metric._update_count = entry[name]["updates"]
            metric._computed = None
