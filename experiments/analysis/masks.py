"""Soft-mask pictures of a trained (or freshly initialised) network: every Attention Module's mask M(x) over a
few input images, as the paper illustrates its masks (Wang et al., CVPR 2017, Fig. 1), drawn by
`ran.tools.pictures.mask_grid` (the picture the training callback `ran.tools.mask_monitor.SoftMaskMonitor`
logs too)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import wandb
from torch import nn

from datamodules import normalize_batch
from experiments.analysis.networks import evaluation, unwrap
from experiments.analysis.tracking import active_wandb_run
from ran.tools.pictures import mask_grid

__all__ = ["MASKS_FILE", "save_mask_pictures"]

MASKS_FILE = "masks.png"


def save_mask_pictures(
    net: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | os.PathLike,
    max_images: int = 8,
    title: str = "",
) -> Path | None:
    """Write `<out_dir>/masks.png`, the grid of every Attention Module's soft mask over up to `max_images`
    images (rows images, columns modules; see `ran.tools.pictures.mask_grid`), and log it to the active W&B
    run as `masks/analysis`, if there is one. Returns the file, or None for a network without soft masks (no
    Attention Modules, or mask='none')."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise TypeError(
            f"images_uint8 must be a uint8 (B, C, H, W) tensor, got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    net = unwrap(net)
    images = images_uint8[:max_images].cpu()
    device = next(net.parameters()).device
    with evaluation(net):
        masks = net.soft_masks(normalize_batch(images, mean, std).to(device))
    if not masks:
        return None
    picture = mask_grid(images, masks, title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MASKS_FILE
    picture.save(path)
    run = active_wandb_run()
    if run is not None:
        run.log({"masks/analysis": wandb.Image(picture, caption=title or None)})
    return path
