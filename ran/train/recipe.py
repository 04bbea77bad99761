"""The training recipe's parts that are not the module itself: the learning-rate schedule, the global batch
that scales the learning rate, and the checks of a recipe and a compile mode (see `ran.train.module`).

The schedule (Sec. 4.1 CIFAR, Sec. 4.2 ImageNet): the learning rate divided by 10 at fixed ITERATIONS; cosine
and linear decay over `trainer.max_steps` are the alternatives for a compressed schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl

__all__ = [
    "CUDA_GRAPH_MODES",
    "CompileMode",
    "LRFactor",
    "Schedule",
    "check_compile_mode",
    "check_cuda_graph",
    "check_recipe",
    "effective_batch_size",
]

# torch.compile's modes; the first two also capture CUDA graphs (one launch for a whole compiled graph).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
Schedule = Literal["step", "cosine", "linear"]
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class LRFactor:
    """The multiplier of the base learning rate at optimizer step `step` (0-based), for `LambdaLR`.

    'step': multiplied by `gamma` at each of `milestones` (iterations), as in the paper; 'cosine': half a
    cosine from 1 to 0 over `total_steps`; 'linear': a straight line from 1 to 0 over `total_steps`, the
    budget-aware schedule of Li, Yumer and Ramanan (ICLR 2020, "Budgeted Training"), who find it as good as or
    better than the others when the iterations are few. Each is preceded by `warmup_steps` of linear warm-up
    (0 in the paper), and the decay spans the steps after the warm-up. A dataclass rather than a closure, so
    `LambdaLR.state_dict()` saves it and a resumed run gets it back.
    """

    schedule: Schedule = "step"
    milestones: tuple[int, ...] = (64_000, 96_000)
    gamma: float = 0.1
    total_steps: int = 160_000
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "step":
            return warmup * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.schedule == "linear":
            return warmup * (1.0 - progress)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_batch_size(trainer: pl.Trainer) -> int | None:
    """Images per optimizer step over all processes: per-device batch x devices x nodes x accumulation.

    None when the datamodule does not state its `batch_size`.
    """
    per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    if per_device is None:
        return None
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def check_compile_mode(hp: Any, world_size: int) -> None:
    """A ValueError for a CUDA-graph compile mode in a multi-process run, which this project does not run."""
    mode = hp.get("compile_mode") or "default"
    if hp.get("compile") and mode in CUDA_GRAPH_MODES and world_size > 1:
        raise ValueError(
            f"model.compile_mode {mode} captures CUDA graphs, which ran does not combine with DDP "
            f"({world_size} processes): use --model.compile_mode max-autotune-no-cudagraphs or default"
        )


def check_cuda_graph(hp: Any, trainer: pl.Trainer) -> None:
    """A ValueError naming the conflict and the fix for a `model.cuda_graph` run that cannot be captured."""
    if not hp.get("cuda_graph"):
        return
    device = trainer.strategy.root_device.type
    what = "model.cuda_graph captures the training step as a CUDA graph"
    if device != "cuda":
        raise ValueError(f"{what}, which needs a CUDA device (this run trains on {device}): leave it out")
    if trainer.world_size > 1:
        raise ValueError(
            f"{what}, which ran does not combine with DDP ({trainer.world_size} processes): leave it out, "
            "or use --model.compile true"
        )
    if trainer.precision not in ("32-true", "bf16-mixed"):
        raise ValueError(
            f"{what} in precision 32-true or bf16-mixed, not {trainer.precision} (whose gradient scaler "
            "reads the GPU on the host every step): use --trainer.precision bf16-mixed"
        )
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        raise ValueError(
            f"{what} with one update per batch: leave out --trainer.accumulate_grad_batches and "
            "--trainer.gradient_clip_val, or model.cuda_graph"
        )
    if hp.get("compile") and (hp.get("compile_mode") or "default") in CUDA_GRAPH_MODES:
        raise ValueError(
            f"{what} already; a compile_mode that captures its own cannot run inside it: use "
            "--model.compile_mode default (or max-autotune-no-cudagraphs) with it"
        )


def check_recipe(hp: Any) -> None:
    """A ValueError naming the setting and its valid range for a recipe that cannot train."""
    if not hp.lr > 0:
        raise ValueError(f"model.lr must be positive, got {hp.lr}")
    if not 0 <= hp.momentum < 1:
        raise ValueError(f"model.momentum must be in [0, 1), got {hp.momentum}")
    if hp.weight_decay < 0:
        raise ValueError(f"model.weight_decay must be >= 0, got {hp.weight_decay}")
    if not 0 <= hp.label_smoothing < 1:
        raise ValueError(f"model.label_smoothing must be in [0, 1), got {hp.label_smoothing}")
    if not 0 < hp.gamma <= 1:
        raise ValueError(f"model.gamma must be in (0, 1], got {hp.gamma}")
    if hp.warmup_steps < 0 or hp.base_batch_size < 1:
        raise ValueError("model.warmup_steps must be >= 0 and model.base_batch_size >= 1")
    if list(hp.milestones) != sorted(hp.milestones) or any(m < 0 for m in hp.milestones):
        raise ValueError(f"model.milestones must be increasing step counts, got {list(hp.milestones)}")
