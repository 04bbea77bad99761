"""`SoftMaskMonitor`: every Attention Module's soft mask M(x) over fixed validation images, logged while
training, so a run's dashboard shows where its attention goes (as in Wang et al., CVPR 2017, Fig. 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ran.tools.pictures import mask_grid, unnormalize

__all__ = ["SoftMaskMonitor"]


class SoftMaskMonitor(pl.Callback):
    """Logs the grid of every Attention Module's soft mask (`ran.tools.pictures.mask_grid`: rows images,
    columns
    modules, one colour scale and its colour bar) over the first `num_images` validation images.

    When: at the first validation, then every `every_n_validations` validations (sanity checks do not count;
    the count is saved in checkpoints, so a resumed run keeps the rhythm), and at test. Where: to every
    attached `WandbLogger` as `masks/val` or `masks/test` at the trainer's global step; without one, as
    `<run_dir>/masks/<stage>_step<global step>.png`.

    The images are taken once, in order, through the datamodule's public `val_dataloader` and its
    `on_after_batch_transfer` hook (which normalises CIFAR's uint8 batches), and shown un-normalised with the
    datamodule's `mean` and `std`. Runs on global rank zero only, in eval mode without gradients, restoring
    the network's mode and the CPU random state, so training is unchanged. Networks without soft masks
    (mask='none', pre-activation ResNets) and datamodules without a validation split or without `mean`/`std`
    are skipped with one info line.
    """

    def __init__(self, run_dir: str | Path, num_images: int = 8, every_n_validations: int = 10) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.run_dir = Path(run_dir)
        self.num_images = num_images
        self.every_n_validations = every_n_validations
        self.validations = 0
        self.images: torch.Tensor | None = None  # the fixed normalised network input, on the CPU
        self.skipped = False

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict.get("validations", 0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations == 0:
            self.log_masks(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_masks(trainer, pl_module, "test")

    def log_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Draw the grid of the network's soft masks now and log it as `masks/<stage>`."""
        if self.skipped or not trainer.is_global_zero:
            return
        masks = self._soft_masks(trainer, pl_module)
        if masks is None:
            return
        step, datamodule = trainer.global_step, trainer.datamodule
        title = f"soft masks, {stage} images, step {step}"
        picture = mask_grid(unnormalize(self.images, datamodule.MEAN, datamodule.STD), masks, title)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for logger in wandb_loggers:
            logger.log_image(f"masks/{stage}", [picture], step=step, caption=[title])
        if not wandb_loggers:
            folder = self.run_dir / "masks"
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{stage}_step{step:07d}.png")

    def _soft_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, torch.Tensor] | None:
        """The network's soft masks over the fixed images, or None (and skipped from now on) when there is
        nothing to show."""
        net = getattr(pl_module, "net", pl_module)
        datamodule = trainer.datamodule
        if not hasattr(net, "soft_masks"):
            return self._skip("the network has no soft_masks")
        if not (hasattr(datamodule, "MEAN") and hasattr(datamodule, "STD")):
            return self._skip("no datamodule with the mean and std to show its images")
        if self.images is None:
            self.images = self._take_images(datamodule, pl_module.device)
        if self.images is None:
            return self._skip("the datamodule has no validation images")
        parameter = next(net.parameters())
        training = net.training
        net.eval()
        try:
            with torch.no_grad():
                masks = net.soft_masks(self.images.to(parameter.device, parameter.dtype))
        finally:
            net.train(training)
        return masks or self._skip("the network has no Attention Module with a mask")

    def _skip(self, reason: str) -> None:
        rank_zero_info(f"SoftMaskMonitor: {reason}; no soft-mask pictures are logged")
        self.skipped = True

    def _take_images(self, datamodule: pl.LightningDataModule, device: torch.device) -> torch.Tensor | None:
        """The first `num_images` validation images as normalised network input on the CPU, or None. Sets up
        the validation split if this run has not (e.g. `ran test`); the DataLoader's seed draw is undone."""
        if getattr(datamodule, "val_dataset", None) is None:
            datamodule.setup("validate")
        taken: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=[]):
            for images, labels in datamodule.val_dataloader():
                images, _ = datamodule.on_after_batch_transfer((images.to(device), labels.to(device)), 0)
                taken.append(images.float().cpu())
                if sum(len(t) for t in taken) >= self.num_images:
                    break
        return torch.cat(taken)[: self.num_images] if taken else None
