"""The project's pictures: the soft-mask grid and the stage-response chart, drawn with matplotlib (Agg).

- :func:`mask_grid`: every Attention Module's soft mask M(x) over a few input images (rows images, columns
  modules), as the paper illustrates its masks (Wang et al., CVPR 2017, Fig. 1), on one colour scale shared by
  all modules with its colour bar, so that grids of different modules, steps and runs can be compared.
- :func:`response_chart`: grouped bars of the mean absolute response of each stage's output (Sec. 4.1, the
  figure comparing naive attention learning with attention residual learning).
- :func:`report_chart`: a suite's measured figures beside the paper's, per factor (the tables of Sec. 4).
- :func:`curve_chart`: a metric over training, one line per run (e.g. validation top-1 per epoch).

All return PIL images (for `wandb.Image` and for PNG files); figures are drawn on their own Agg canvas, so
no pyplot state and no display is involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "MASK_COLORMAP",
    "curve_chart",
    "heat_map",
    "mask_grid",
    "mask_range",
    "report_chart",
    "response_chart",
    "unnormalize",
]

MASK_COLORMAP = "jet"
CELL_INCHES = 1.25
DPI = 100


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised network input (B, C, H, W) back to displayable float images in [0, 1]: x * std + mean, the
    inverse of `datamodules.normalize_batch`."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std_t + mean_t).clamp(0.0, 1.0)


def mask_range(masks: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """The colour range shared by every module of a grid: [0, 1] when every mask lies in it (sigmoid masks:
    mixed and spatial attention, CBAM, SE), so grids of different steps and runs share one scale; otherwise
    (attention='channel', L2-normalised) the minimum and maximum over all modules."""
    low = min(float(m.min()) for m in masks.values())
    high = max(float(m.max()) for m in masks.values())
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, high if high > low else low + 1.0


def heat_map(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W): a spatial mask (B, C, h, w) averaged over its channels and bilinearly up-sampled to `size`;
    a channel-only mask (B, C, 1, 1) as its C gates laid out row by row in a near-square tile (no image
    position to show them at)."""
    if mask.shape[-2:] == (1, 1):
        gates = mask.float().flatten(1)
        side = math.ceil(math.sqrt(gates.shape[1]))
        tile = torch.full((gates.shape[0], side * side), float("nan"))
        tile[:, : gates.shape[1]] = gates
        return tile.view(-1, side, side)
    heat = mask.float().mean(dim=1, keepdim=True)
    return F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[:, 0]


def _display(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] from uint8 or [0, 1] float images (B, 1 or 3, H, W)."""
    images = images.detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images[:, :3].permute(0, 2, 3, 1).numpy()


def _to_image(figure: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def mask_grid(images: torch.Tensor, masks: Mapping[str, torch.Tensor], title: str = "") -> Image.Image:
    """One picture of every module's soft mask: rows are the images, the first column the input, then one
    column per Attention Module with its heat map (:func:`heat_map`) over the image, all on the colour range
    of :func:`mask_range` with one colour bar. `images` are uint8 or [0, 1] floats (see :func:`unnormalize`),
    `masks` what `ResidualAttentionNet.soft_masks` returns for them."""
    if not masks:
        raise ValueError(
            "mask_grid needs at least one soft mask; a network without Attention Modules has none"
        )
    shown = _display(images)
    rows, height, width = shown.shape[:3]
    low, high = mask_range(masks)
    norm = Normalize(low, high)
    columns = 1 + len(masks)
    figure = Figure(figsize=(columns * CELL_INCHES + 1.0, rows * CELL_INCHES + 0.9), dpi=DPI)
    axes = figure.subplots(rows, columns, squeeze=False)
    heat = {name: heat_map(mask.detach().cpu(), (height, width)).numpy() for name, mask in masks.items()}
    mappable = None
    for row in range(rows):
        axes[row, 0].imshow(shown[row])
        for col, (name, maps) in enumerate(heat.items(), start=1):
            channel_only = masks[name].shape[-2:] == (1, 1)
            if not channel_only:
                axes[row, col].imshow(shown[row])
            mappable = axes[row, col].imshow(
                maps[row],
                cmap=MASK_COLORMAP,
                norm=norm,
                alpha=1.0 if channel_only else 0.6,
                extent=(0, width, height, 0),
                interpolation="nearest",
            )
    axes[0, 0].set_title("input", fontsize=8)
    for col, (name, mask) in enumerate(masks.items(), start=1):
        kind = "channel gates" if mask.shape[-2:] == (1, 1) else f"mean of {mask.shape[1]} ch"
        axes[0, col].set_title(f"{name.removeprefix('stages.')}\n{kind}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(mappable, ax=axes, fraction=0.03, pad=0.02, label="soft mask M(x)")
    if title:
        figure.suptitle(title, fontsize=9)
    return _to_image(figure)


def response_chart(
    responses: Mapping[str, Mapping[str, float]],
    title: str = "Mean absolute response of each stage's output",
    log_scale: bool | None = None,
) -> Image.Image:
    """Grouped bars: one group per stage, one colour per network (`responses[label][stage]`; a missing or NaN
    value leaves its bar out). The y axis is logarithmic when the positive values span more than two decades
    (`log_scale=None`)."""
    labels = list(responses)
    stages = list(dict.fromkeys(stage for r in responses.values() for stage in r))
    values = [v for r in responses.values() for v in r.values() if math.isfinite(v)]
    positive = [v for v in values if v > 0]
    if log_scale is None:
        log_scale = bool(positive) and max(positive) / min(positive) > 100
    figure = Figure(figsize=(7.6, 4.4), dpi=DPI)
    ax = figure.subplots()
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        heights = [responses[label].get(stage, math.nan) for stage in stages]
        bars = ax.bar(
            np.arange(len(stages)) + (i - (len(labels) - 1) / 2) * width, heights, width, label=label
        )
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("mean |output|")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _to_image(figure)


def report_chart(
    groups: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]],
    ylabel: str,
    title: str = "",
    xlabel: str = "",
) -> Image.Image:
    """A suite's report as grouped bars: one group per row of its table (`groups[row][series] = (measured
    mean, spread over seeds, paper figure)`, None where there is none); for each series a solid bar of the
    measured figure, with the spread as an error bar, beside a hatched bar of the paper's figure in the same
    colour. A measured bar is labelled with its value, one without a result (missing, unfinished, failed)
    with "no result"; a paper figure that is missing leaves its bar out."""
    rows = list(groups)
    series = list(dict.fromkeys(name for g in groups.values() for name in g))
    colours = [f"C{i % 10}" for i in range(len(series))]
    figure = Figure(figsize=(max(6.4, 1.2 + 0.55 * len(rows) * max(len(series), 1)), 4.6), dpi=DPI)
    ax = figure.subplots()
    width = 0.8 / max(2 * len(series), 1)
    x = np.arange(len(rows))
    for i, (name, colour) in enumerate(zip(series, colours)):
        values = [groups[row].get(name, (None, None, None)) for row in rows]
        offset = (2 * i - len(series) + 0.5) * width
        measured = [math.nan if v[0] is None else v[0] for v in values]
        spread = [0.0 if v[1] is None else v[1] for v in values]
        paper = [math.nan if v[2] is None else v[2] for v in values]
        bars = ax.bar(
            x + offset, measured, width, yerr=spread, color=colour, capsize=2, label=f"{name} measured"
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        for position, value in zip(x + offset, measured):
            if math.isnan(value):
                ax.text(
                    position, 0, " no result", rotation=90, ha="center", va="bottom", fontsize=7, color=colour
                )
        ax.bar(x + offset + width, paper, width, color=colour, alpha=0.35, hatch="//", label=f"{name} paper")
    ax.set_xticks(x, rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=7, ncols=2 if len(series) > 2 else 1)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _to_image(figure)


def curve_chart(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    higher_is_better: bool = True,
) -> Image.Image:
    """One line with markers per run (`curves[label]` = its (x, y) points), each run's best point labelled
    with its value."""
    figure = Figure(figsize=(6.4, 4.2), dpi=DPI)
    ax = figure.subplots()
    for i, (label, points) in enumerate(curves.items()):
        if not points:
            continue
        x, y = zip(*points)
        colour = f"C{i % 10}"
        ax.plot(x, y, marker="o", markersize=3, color=colour, label=label)
        best = (max if higher_is_better else min)(range(len(y)), key=y.__getitem__)
        ax.annotate(
            f"{y[best]:.2f}",
            (x[best], y[best]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
            color=colour,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return _to_image(figure)
