"""`GraphedStep`: the whole training step (forward, loss, backward and the fused SGD update) replayed as one
CUDA graph, so that a step costs the GPU one launch instead of thousands (`model.cuda_graph`).

The CIFAR networks are small for a large GPU: eager PyTorch spends longer launching their ~3,000 kernels per
step than the GPU spends running them. A CUDA graph records the kernels of one step once and replays them on
new data (PyTorch's "whole network capture",
https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture). What that needs, and what this does:

- Static buffers: every replay reads the same input and label tensors, so each batch is copied into them;
  the logits and loss the replay writes are the graph's own tensors, overwritten by the next replay.
- A warm-up first: `warmup_steps` ordinary steps on a side stream (cuDNN's algorithm search, the momentum
  buffers, a compiled network's compilation all happen there, not in the capture).
- The learning rate as a device tensor that the captured fused SGD kernel reads, refilled from the
  optimizer's param group before every step: the schedule keeps working without recapture, and outside the
  step the param groups hold their numbers as ever (checkpoints, the learning-rate monitor).
- BatchNorm's running statistics and `num_batches_tracked` are updated in place by the replayed kernels.
- A batch of another size (the last, partial batch of an epoch) runs as an ordinary step, uncaptured.

Without capture (`capture=False`, as on a CPU) every step runs the same static-buffer code eagerly: the
tests check there that it computes exactly what the normal training step computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch import Tensor

__all__ = ["WARMUP_STEPS", "GraphedStep", "carry_step_count", "count_optimizer_step"]

StepOutput = tuple[Tensor, Tensor]  # (logits, loss), detached
WARMUP_STEPS = 3  # ordinary steps on full batches before the capture


class GraphedStep:
    """One training step on a batch, captured as a CUDA graph after `warmup_steps` full batches.

    Args:
        forward: images -> logits (the module's forward, compiled or not).
        loss_fn: (logits, labels) -> the training loss.
        optimizer: the torch optimizer (fused SGD); its `step()` is captured with the rest.
        capture: record and replay a CUDA graph (needs CUDA tensors); False runs the same static-buffer step
            eagerly every time.
        warmup_steps: ordinary steps on full batches before the capture.
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        capture: bool,
        warmup_steps: int = WARMUP_STEPS,
    ) -> None:
        self.forward, self.loss_fn, self.optimizer = forward, loss_fn, optimizer
        self.capture, self.warmup_steps = capture, warmup_steps
        self.static_x: Tensor | None = None
        self.static_y: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: StepOutput | None = None  # the graph's logits and loss
        self.warmed_up = 0
        self.lrs: list[Tensor] = []  # one 0-dim device tensor per param group, read by the SGD step
        self.stream: torch.cuda.Stream | None = None  # the warm-up's side stream

    def __call__(self, x: Tensor, y: Tensor) -> StepOutput:
        """Train on (x, y); returns the logits and the loss (with capture: the graph's own tensors, valid
        until the next step)."""
        self._fill_lrs()
        if self.static_x is None or x.shape[0] > self.static_x.shape[0]:
            self._allocate(x, y)  # the first batch, or one larger than it (the run began on a partial one)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            return self._eager_step(x, y)  # the last, partial batch of an epoch
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.graph is None and self.capture and self.warmed_up >= self.warmup_steps:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        self.warmed_up += 1
        with self._side_stream():
            return self._eager_step(self.static_x, self.static_y)

    # --- parts ---------------------------------------------------------------------------------------------

    def _step(self, x: Tensor, y: Tensor) -> StepOutput:
        """Forward, loss, backward and the update: the code that is captured. Autocast (Lightning's, for
        bf16-mixed) is re-entered without its weight-cast cache, which a graph must not keep."""
        device = x.device.type
        with torch.autocast(
            device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        ):
            logits = self.forward(x)
            loss = self.loss_fn(logits, y)
        loss.backward()
        with self._tensor_lrs():
            self.optimizer.step()
        return logits.detach(), loss.detach()

    def _eager_step(self, x: Tensor, y: Tensor) -> StepOutput:
        # After the capture the gradients are the graph's tensors: zeroed in place, not dropped, so that
        # `.grad` stays the gradient of the newest step whether the graph or an eager step made it.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        return self._step(x, y)

    def _capture(self) -> None:
        """Record one step as a CUDA graph (its kernels are recorded, not run: the caller replays it)."""
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's CUDA calls are checked, not a DataLoader's pin-memory thread's.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self._step(self.static_x, self.static_y)
        self.graph = graph

    def _allocate(self, x: Tensor, y: Tensor) -> None:
        self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.graph, self.outputs, self.warmed_up = None, None, 0

    def _fill_lrs(self) -> None:
        """Put each param group's learning rate (the schedule's number for this step) into the device tensor
        that the SGD step reads: a fill on the device, no read back."""
        groups = self.optimizer.param_groups
        if not self.lrs:
            self.lrs = [torch.zeros((), device=g["params"][0].device) for g in groups]
        for group, lr in zip(groups, self.lrs):
            lr.fill_(group["lr"])

    @contextlib.contextmanager
    def _tensor_lrs(self) -> Iterator[None]:
        """The optimizer reads the learning rates from the device tensors while it steps (or is recorded:
        the graph keeps reading them); the param groups hold their numbers again after it."""
        groups = self.optimizer.param_groups
        numbers = [group["lr"] for group in groups]
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, number in zip(groups, numbers):
                group["lr"] = number

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Warm-up steps before a capture run on a side stream, as the capture itself does."""
        if not self.capture:
            yield
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)


def count_optimizer_step(optimizer: LightningOptimizer) -> None:
    """Count a step that `GraphedStep` made for Lightning's loops, as `LightningOptimizer.step` does around an
    update (`trainer.global_step` counts these under manual optimization), without a second update."""
    optimizer._on_before_step()
    optimizer._on_after_step()


def carry_step_count(trainer: pl.Trainer) -> None:
    """Give both of Lightning's optimizer-step counts the larger of the two. `trainer.global_step` is the
    automatic optimization's count, or the manual one's under `cuda_graph`, and a checkpoint holds both: a run
    resumed with `cuda_graph` switched on or off continues at its step instead of at 0."""
    loop = trainer.fit_loop.epoch_loop
    counts = (
        loop.automatic_optimization.optim_progress.optimizer.step.total,
        loop.manual_optimization.optim_step_progress.total,
    )
    steps = max(count.completed for count in counts)
    for count in counts:
        count.ready = count.completed = steps
