"""`ImageThroughput`: Lightning's ThroughputMonitor for image batches, with the network's FLOPs per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import measure_flops
from pytorch_lightning.callbacks import ThroughputMonitor

from ran.nn.registry import create_model
from ran.train.module import network_of

__all__ = ["THROUGHPUT_WINDOW", "ImageThroughput", "batch_images", "network_flops"]

# Batches over which ImageThroughput averages its rates (Lightning's default, 100, leaves short runs without).
THROUGHPUT_WINDOW = 20


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


class ImageThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for image batches: images/s (`train/device/samples_per_sec`, and
    `validate/...`, `test/...`) over the last `THROUGHPUT_WINDOW` batches and, on a device whose peak FLOPs
    Lightning knows (recent NVIDIA GPUs), the FLOPs/s and model FLOPs utilisation (`train/device/mfu`). The
    FLOPs per batch are the network's FLOPs per image (:func:`network_flops`, from the module's
    `example_input_array`) times the batch's images, handed to the monitor as the module's `flops_per_batch`
    before each batch. They are not counted where no peak is known (CPUs): counting takes a few seconds."""

    def __init__(self) -> None:
        super().__init__(batch_size_fn=batch_images, window_size=THROUGHPUT_WINDOW)
        self.flops_per_image: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        example = pl_module.example_input_array
        if self.available_flops and not self.flops_per_image and isinstance(example, torch.Tensor):
            self.flops_per_image = network_flops(pl_module.hparams, example.shape)

    def _set_flops(self, pl_module: pl.LightningModule, batch: Any, kind: str) -> None:
        """Give the monitor the batch's FLOPs as `pl_module.flops_per_batch` (None: not counted)."""
        count = self.flops_per_image.get(kind)
        pl_module.flops_per_batch = None if count is None else count * batch_images(batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "train")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "eval")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "eval")
