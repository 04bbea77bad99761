"""`ImageThroughput`: images/s and, where the device's peak is known, FLOPs/s and model FLOPs utilisation of
training, validation and test, timed without making the host wait for the GPU after every step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import Throughput, get_available_flops, measure_flops
from pytorch_lightning.utilities import rank_zero_only

from ran.nn.registry import create_model
from ran.train.module import network_of

__all__ = ["THROUGHPUT_WINDOW", "ImageThroughput", "batch_images", "network_flops"]

# Log intervals over which ImageThroughput averages its training rates.
THROUGHPUT_WINDOW = 2

# The arithmetic a Lightning precision computes in, for the device's peak FLOPs.
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def batch_images(batch: Any) -> int:
    """The number of images in an (images, labels) batch, or in a batch of images alone."""
    return (batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]


def network_flops(hparams: Any, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs per image of the network `hparams` describe, counted by Lightning's `measure_flops` on a copy
    built on the meta device (no memory, no arithmetic): 'train' is forward and backward, 'eval' forward."""
    net = network_of(hparams)
    choices = {k: net[k] for k in ("attention", "learning", "mask") if net[k]}
    with torch.device("meta"):
        model = create_model(net["arch"], num_classes=net["num_classes"], **choices, **net["model_kwargs"])
        images = torch.zeros(1, *input_shape[1:])
    train = measure_flops(model.train(), lambda: model(images), lambda logits: logits.sum())
    return {"train": train, "eval": measure_flops(model.eval(), lambda: model(images))}


class _Clock:
    """Images and batches counted on the host, and the time read only when asked (`Throughput`'s totals)."""

    def __init__(self, throughput: Throughput, flops_per_image: int | None, device: torch.device) -> None:
        self.throughput, self.flops_per_image, self.device = throughput, flops_per_image, device
        self.start = self.paused = 0.0
        self.batches = self.images = self.images_since = 0

    def restart(self) -> None:
        """Start counting now: nothing done yet."""
        self.start, self.paused = self.now(), 0.0
        self.throughput.update(time=0.0, batches=0, samples=0, flops=0 if self.flops_per_image else None)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued work is part of the time
        return time.perf_counter()

    def count(self, batch: Any) -> None:
        images = batch_images(batch)
        self.batches += 1
        self.images += images
        self.images_since += images

    def read(self) -> dict[str, float]:
        """Update the throughput with the totals so far (one device synchronisation) and compute its rates."""
        flops = None if self.flops_per_image is None else self.flops_per_image * self.images_since
        elapsed = self.now() - self.start - self.paused
        self.throughput.update(time=elapsed, batches=self.batches, samples=self.images, flops=flops)
        self.images_since = 0
        return self.throughput.compute()


class ImageThroughput(pl.Callback):
    """Images/s of training (`train/device/samples_per_sec` and `batches_per_sec`), and, on a device whose
    peak FLOPs Lightning knows (recent NVIDIA GPUs), `train/device/flops_per_sec` and `train/device/mfu`, from
    the network's FLOPs per image (:func:`network_flops`, from the module's `example_input_array`; not counted
    where no peak is known, as on CPUs: counting takes a few seconds). Validation and test get the same
    figures over each whole loop, at its end (`validate/...`, `test/...`).

    Lightning's ThroughputMonitor, which this replaces, synchronises a GPU after every batch to time it: the
    host can then not queue the next step while the GPU runs this one. Here batches are counted on the host
    and the clock is read (the device synchronised) only at the steps whose figures are logged (every
    `trainer.log_every_n_steps`), so the training rates are over the last `THROUGHPUT_WINDOW` log intervals;
    validation inside a fit is not counted as training time.
    """

    def __init__(self) -> None:
        self.flops_per_image: dict[str, int] = {}
        self.available_flops: int | None = None
        self.clocks: dict[str, _Clock] = {}
        self._validation_started = 0.0
        self._logged_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dtype = COMPUTE_DTYPES.get(str(trainer.precision), torch.float32)
        self.available_flops = get_available_flops(trainer.strategy.root_device, dtype)
        example = pl_module.example_input_array
        if self.available_flops and not self.flops_per_image and isinstance(example, torch.Tensor):
            self.flops_per_image = network_flops(pl_module.hparams, example.shape)

    def _clock(self, trainer: pl.Trainer, stage: str, kind: str, window: int) -> _Clock:
        throughput = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, window_size=window
        )
        clock = _Clock(throughput, self.flops_per_image.get(kind), trainer.strategy.root_device)
        clock.restart()
        self.clocks[stage] = clock
        return clock

    def _log(self, trainer: pl.Trainer, stage: str) -> None:
        metrics = self.clocks[stage].read()
        for logger in trainer.loggers:
            logger.log_metrics({f"{stage}/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    # --- training -------------------------------------------------------------------------------------------

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock(trainer, "train", "train", THROUGHPUT_WINDOW + 1)
        self._logged_step = trainer.global_step

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clocks["train"].count(batch)
        step = trainer.global_step  # counts optimizer steps: the same for the micro-batches of one
        if step != self._logged_step and step % max(1, trainer.log_every_n_steps) == 0:
            self._logged_step = step
            self._log(trainer, "train")

    # --- evaluation: one figure per loop --------------------------------------------------------------------

    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._clock(trainer, "validate", "eval", 2)
        if "train" in self.clocks and trainer.state.fn == "fit":
            self._validation_started = time.perf_counter()

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if not trainer.sanity_checking:
            self.clocks["validate"].count(batch)

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._log(trainer, "validate")
        if "train" in self.clocks and trainer.state.fn == "fit":
            self.clocks["train"].paused += time.perf_counter() - self._validation_started

    @rank_zero_only
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock(trainer, "test", "eval", 2)

    @rank_zero_only
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self.clocks["test"].count(batch)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, "test")
