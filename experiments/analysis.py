"""The paper's two analyses of trained (or freshly initialised) Residual Attention Networks.

1. Mean absolute response of each stage's output, naive attention learning (NAL, H = M * T) against attention
   residual learning (ARL, H = (1 + M) * T): Wang et al., CVPR 2017, Sec. 4.1 and its figure on Attention-164,
   whose response collapses after stage 2 with NAL and holds with ARL. :func:`stage_responses`,
   :func:`compare_responses`, :class:`ResponseTable` (markdown, CSV, PNG chart).
2. Soft-mask pictures: each Attention Module's mask M(x) as a heat map over the input images, as the paper
   illustrates its masks. :func:`save_mask_pictures`.

Command line (also dispatched by `python -m experiments`):

    python -m experiments responses --model attention164_cifar --compare learning=arl,nal
    python -m experiments responses --ckpt ARL=runs/a164_arl/checkpoints/best.ckpt \\
        --ckpt NAL=runs/a164_nal/checkpoints/best.ckpt --data-dir data --dataset cifar10
    python -m experiments masks --ckpt runs/a92/checkpoints/best.ckpt --data-dir data --num-images 8

Pictures are drawn with PIL only (no plotting library).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from datamodules import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    CorruptImageError,
    DatasetLayoutError,
    ImageNetDataModule,
    normalize_batch,
)
from ran.registry import create_model, list_models

__all__ = [
    "AnalysisImages",
    "DATASETS",
    "ResponseTable",
    "compare_responses",
    "draw_response_chart",
    "infer_dataset",
    "jet_colormap",
    "load_analysis_images",
    "load_checkpoint_network",
    "main",
    "mask_grid_size",
    "resolve_network",
    "save_mask_pictures",
    "stage_responses",
]

DATASETS = ("cifar10", "cifar100", "imagenet")
NORMALISATION = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
BN_STATS = ("running", "batch")

NetworkSpec = nn.Module | str | os.PathLike | tuple
"""A network for :func:`compare_responses`: a module (a ResidualAttentionNet or an ImageClassifier), a
checkpoint path, a registered model name, or `(name, kwargs)` for `ran.create_model(name, **kwargs)` at
initialisation."""


# --- networks -----------------------------------------------------------------------------------------------


def _unwrap(net: nn.Module) -> nn.Module:
    """The ResidualAttentionNet inside an ImageClassifier (its `.net`), or `net` itself."""
    inner = getattr(net, "net", None)
    net = inner if isinstance(inner, nn.Module) else net
    if not (hasattr(net, "stem") and isinstance(getattr(net, "stages", None), nn.Sequential)):
        raise TypeError(
            f"expected a ResidualAttentionNet (with .stem and .stages) or an ImageClassifier, "
            f"got {type(net).__name__}"
        )
    return net


def load_checkpoint_network(path: str | os.PathLike) -> nn.Module:
    """The network of an `ImageClassifier` Lightning checkpoint (`ran fit` writes them), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}. Fix: pass the .ckpt file of a run, e.g. "
            "runs/<run name>/checkpoints/best.ckpt or last.ckpt (written by `ran fit`)"
        )
    from ran.module import ImageClassifier

    try:
        module = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    except Exception as exc:  # not a Lightning checkpoint, another LightningModule's, damaged file, ...
        raise ValueError(
            f"could not load {path} as an ImageClassifier checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return module.net.eval()


def resolve_network(spec: NetworkSpec, seed: int = 0) -> nn.Module:
    """Turn a :data:`NetworkSpec` into a network. New networks are built under `torch.manual_seed(seed)`
    without touching the global RNG, so that e.g. learning='arl' and 'nal' (same parameters) get equal
    weights."""
    if isinstance(spec, nn.Module):
        return _unwrap(spec)
    if isinstance(spec, tuple):
        name, kwargs = spec
    elif isinstance(spec, str) and spec in list_models():
        name, kwargs = spec, {}
    else:
        return load_checkpoint_network(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **dict(kwargs))


def infer_dataset(net: nn.Module) -> str:
    """The dataset a network is laid out for: 'imagenet' for the ImageNet stem, else 'cifar100' for 100
    classes, else 'cifar10'."""
    net = _unwrap(net)
    if getattr(net, "stem_stride", 1) > 1:
        return "imagenet"
    return "cifar100" if getattr(net, "num_classes", 10) == 100 else "cifar10"


@contextlib.contextmanager
def _evaluation(net: nn.Module, bn_stats: str = "running") -> Iterator[None]:
    """Eval mode without gradients; with bn_stats='batch' BatchNorm normalises with each batch's statistics
    (as in a training step) while its running statistics stay untouched. Restores every mode afterwards."""
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    modes = {m: m.training for m in net.modules()}
    saved = []
    net.eval()
    if bn_stats == "batch":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
                saved.append((m, m.momentum, tracked))
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
                m.train()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        for m, training in modes.items():
            m.training = training


# --- 1. stage responses (Sec. 4.1, the figure on response) --------------------------------------------------


def stage_responses(
    net: nn.Module, images: torch.Tensor, *, bn_stats: str = "running", batch_size: int = 64
) -> OrderedDict[str, float]:
    """Mean absolute value of the output of the stem and of every stage (stage1..stage4) over `images`.

    The measure of the paper's figure on response (Sec. 4.1). `images` is the normalised float network input
    (see `datamodules.normalize_batch`). Runs in eval mode without gradients, in chunks of `batch_size`; with
    `bn_stats='batch'` BatchNorm uses each chunk's statistics instead of its running ones (an untrained
    network's running statistics are 0 and 1, so in eval mode its BatchNorm layers are identities).
    """
    net = _unwrap(net)
    if not images.is_floating_point():
        raise TypeError(
            "images must be the normalised float network input; convert uint8 images with "
            "datamodules.normalize_batch(images, mean, std)"
        )
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    blocks = OrderedDict([("stem", net.stem), *net.stages.named_children()])
    sums = OrderedDict((name, 0.0) for name in blocks)
    counts = OrderedDict((name, 0) for name in blocks)

    def record(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            sums[name] += output.detach().abs().sum(dtype=torch.float64).item()
            counts[name] += output.numel()

        return hook

    handles = [block.register_forward_hook(record(name)) for name, block in blocks.items()]
    device = next(net.parameters()).device
    try:
        with _evaluation(net, bn_stats):
            for chunk in images.split(batch_size):
                net(chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return OrderedDict((name, sums[name] / counts[name]) for name in blocks)


@dataclass
class ResponseTable:
    """Mean absolute stage responses, `responses[label][stage]`, and notes on how they were measured."""

    responses: OrderedDict[str, OrderedDict[str, float]]
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return list(self.responses)

    @property
    def stages(self) -> list[str]:
        """Every network's stages in order (a pre-activation ResNet has no stage4: its cell stays empty)."""
        return list(OrderedDict.fromkeys(stage for r in self.responses.values() for stage in r))

    def value(self, label: str, stage: str) -> float:
        return self.responses[label].get(stage, math.nan)

    def to_markdown(self) -> str:
        """Rows are stages, columns the networks, then each network's ratio to the first one."""
        labels, first = self.labels, self.labels[0]
        header = ["stage", *labels, *(f"{label} / {first}" for label in labels[1:])]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for stage in self.stages:
            values = [self.value(label, stage) for label in labels]
            ratios = [v / values[0] if values[0] else math.nan for v in values[1:]]
            cells = [
                stage,
                *(f"{v:.4g}" if not math.isnan(v) else "-" for v in values),
                *(f"{r:.3g}" if not math.isnan(r) else "-" for r in ratios),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per stage: `stage,<label 1>,<label 2>,...` with the full-precision values ('nan' where a
        network has no such stage)."""
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["stage", *self.labels])
            for stage in self.stages:
                writer.writerow([stage, *(repr(self.value(label, stage)) for label in self.labels)])
        return path

    def save(
        self, out_dir: str | os.PathLike, title: str = "Mean absolute response of each stage's output"
    ) -> list[Path]:
        """Write `responses.md` (title, notes, table), `responses.csv` and `responses.png` into `out_dir`; log
        the chart and table to the active W&B run, if any. Returns the written paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "responses.md"
        notes = "".join(f"- {note}\n" for note in self.notes)
        md.write_text(f"# {title}\n\n{notes}\n{self.to_markdown()}\n")
        csv_path = self.write_csv(out / "responses.csv")
        chart = draw_response_chart(self, title)
        png = out / "responses.png"
        chart.save(png)
        run = _active_wandb_run()
        if run is not None:
            import wandb

            rows = [[stage, *(self.value(label, stage) for label in self.labels)] for stage in self.stages]
            run.log(
                {
                    "responses/chart": wandb.Image(chart, caption=title),
                    "responses/table": wandb.Table(columns=["stage", *self.labels], data=rows),
                }
            )
        return [md, csv_path, png]


def compare_responses(
    networks: Mapping[str, NetworkSpec],
    images: torch.Tensor,
    *,
    seed: int = 0,
    bn_stats: str = "running",
    batch_size: int = 64,
    out_dir: str | os.PathLike | None = None,
) -> ResponseTable:
    """:func:`stage_responses` of several networks, e.g. NAL against ARL (Sec. 4.1 and its figure).

    `networks` maps a label to a :data:`NetworkSpec`: a module, a checkpoint path, or `(model name, kwargs)`
    for a network at initialisation, e.g. `{"ARL": ("attention164_cifar", {"learning": "arl"}),
    "NAL": ("attention164_cifar", {"learning": "nal"})}`. Networks are built (with `seed`) or loaded one at a
    time. With `out_dir`, the table is also written there (see :meth:`ResponseTable.save`).
    """
    if not networks:
        raise ValueError("compare_responses needs at least one network")
    responses = OrderedDict()
    for label, spec in networks.items():
        responses[label] = stage_responses(
            resolve_network(spec, seed), images, bn_stats=bn_stats, batch_size=batch_size
        )
    bn_note = (
        "BatchNorm: running statistics (eval mode)"
        if bn_stats == "running"
        else "BatchNorm: batch statistics (as in a training step; running statistics untouched)"
    )
    table = ResponseTable(
        responses, [f"{images.shape[0]} images of {images.shape[-2]}x{images.shape[-1]}", bn_note]
    )
    if out_dir is not None:
        table.save(out_dir)
    return table


# --- drawing with PIL ---------------------------------------------------------------------------------------

PALETTE = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def draw_response_chart(
    table: ResponseTable,
    title: str = "Mean absolute response of each stage's output",
    log_scale: bool | None = None,
    size: tuple[int, int] = (760, 440),
) -> Image.Image:
    """Grouped bars of the responses, one group per stage and one colour per network (PIL only).

    The y axis is logarithmic when the positive values span more than two decades (`log_scale=None`).
    """
    values = [v for r in table.responses.values() for v in r.values() if math.isfinite(v)]
    positive = [v for v in values if v > 0]
    if not positive:
        log_scale = False
    elif log_scale is None:
        log_scale = max(positive) / min(positive) > 100
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    legend_width = max((_text_size(draw, label, font)[0] for label in table.labels), default=0) + 36
    left, top, right, bottom = 70, 44, size[0] - legend_width - 10, size[1] - 40

    if log_scale:
        low = math.floor(math.log10(min(positive)))
        high = max(math.ceil(math.log10(max(positive))), low + 1)
        step = max(1, math.ceil((high - low) / 8))
        ticks = [(10.0**k, f"1e{k}") for k in range(low, high + 1, step)]

        def y_of(v: float) -> float:
            v = min(max(v, 10.0**low), 10.0**high)
            return bottom - (math.log10(v) - low) / (high - low) * (bottom - top)
    else:
        high_value = max(values + [0.0]) or 1.0
        step_value = _nice_step(high_value)
        high_value = step_value * math.ceil(high_value / step_value)
        ticks = [(k * step_value, f"{k * step_value:g}") for k in range(round(high_value / step_value) + 1)]

        def y_of(v: float) -> float:
            return bottom - max(v, 0.0) / high_value * (bottom - top)

    draw.text((left, 6), title, fill="black", font=font)
    draw.text((8, top - 18), "mean |output|" + (" (log scale)" if log_scale else ""), fill="black", font=font)
    for value, text in ticks:
        y = y_of(value)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        width, height = _text_size(draw, text, font)
        draw.text((left - 6 - width, y - height / 2 - 2), text, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)

    stages, labels = table.stages, table.labels
    group = (right - left) / max(len(stages), 1)
    bar = group * 0.8 / max(len(labels), 1)
    for s, stage in enumerate(stages):
        x0 = left + s * group + group * 0.1
        for i, label in enumerate(labels):
            value = table.value(label, stage)
            if not math.isfinite(value):
                continue
            colour = PALETTE[i % len(PALETTE)]
            xa, xb = x0 + i * bar, x0 + (i + 1) * bar - 2
            draw.rectangle([xa, y_of(value), xb, bottom], fill=colour)
            text = f"{value:.3g}"
            width, height = _text_size(draw, text, font)
            if width <= bar:
                draw.text(((xa + xb - width) / 2, y_of(value) - height - 4), text, fill="black", font=font)
        width, _ = _text_size(draw, stage, font)
        draw.text((left + s * group + (group - width) / 2, bottom + 8), stage, fill="black", font=font)
    for i, label in enumerate(labels):
        y = top + 4 + 18 * i
        draw.rectangle([right + 14, y, right + 26, y + 12], fill=PALETTE[i % len(PALETTE)])
        draw.text((right + 32, y), label, fill="black", font=font)
    return image


def jet_colormap() -> torch.Tensor:
    """A 256 x 3 uint8 jet-like lookup table: dark blue (0) through cyan, yellow to dark red (255)."""
    x = torch.linspace(0.0, 1.0, 256)
    rgb = [(1.5 - (4.0 * x - centre).abs()).clamp(0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return (torch.stack(rgb, dim=1) * 255.0).round().to(torch.uint8)


# --- 2. soft-mask pictures ----------------------------------------------------------------------------------

GRID_PAD = 2
LINE_HEIGHT = 14
HEADER_HEIGHT = 3 * LINE_HEIGHT
MIN_CELL = 96


def _cell_scale(height: int, width: int) -> int:
    """Integer magnification so that an image cell is at least MIN_CELL pixels wide (3 for CIFAR's 32x32)."""
    return max(1, math.ceil(MIN_CELL / max(height, width)))


def mask_grid_size(num_images: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a mask picture for `num_images` images of `height` x `width`: a header,
    then one row per image of three cells (input | heat map | overlay) magnified by an integer factor."""
    scale = _cell_scale(height, width)
    cell_w, cell_h = width * scale, height * scale
    return 3 * cell_w + 4 * GRID_PAD, HEADER_HEIGHT + num_images * cell_h + (num_images + 1) * GRID_PAD


def _heat_maps(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) in [0, 1]: the mask averaged over channels, bilinearly up-sampled to `size`, min-max
    normalised per image (a constant map gives zeros)."""
    heat = mask.float().mean(dim=1, keepdim=True)
    heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    span = heat.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (heat - low) / span.clamp_min(1e-12), torch.zeros_like(heat))


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """A (3, H, W) uint8 tensor as a PIL image magnified `scale` times (nearest neighbour)."""
    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def _mask_grid(name: str, mask: torch.Tensor, images: torch.Tensor) -> Image.Image:
    """The picture of one module's mask: rows of input | heat map | overlay, or input | channel bars for a
    channel-only mask of shape (B, C, 1, 1)."""
    n, _, height, width = images.shape
    scale = _cell_scale(height, width)
    cell_w, cell_h = width * scale, height * scale
    grid = Image.new("RGB", mask_grid_size(n, height, width), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    channel_only = mask.shape[-2:] == (1, 1)
    channels = f"{mask.shape[1]} channel" + ("s" if mask.shape[1] > 1 else "")
    kind = "one bar per channel" if channel_only else f"mean of {channels}, min-max per image"
    draw.text((GRID_PAD, 1), f"{name}  M{tuple(mask.shape)}", fill="black", font=font)
    draw.text((GRID_PAD, LINE_HEIGHT + 1), kind, fill="black", font=font)
    columns = ("input", "channel gates") if channel_only else ("input", "soft mask", "overlay")
    for c, text in enumerate(columns):
        draw.text((GRID_PAD + c * (cell_w + GRID_PAD), 2 * LINE_HEIGHT + 1), text, fill="black", font=font)
    lut = jet_colormap()
    if channel_only:
        gates = mask.float().flatten(1)
        if gates.min() < 0 or gates.max() > 1:  # not a sigmoid gate: min-max per image
            low = gates.amin(1, keepdim=True)
            gates = (gates - low) / (gates.amax(1, keepdim=True) - low).clamp_min(1e-12)
    else:
        heat = _heat_maps(mask, (height, width))
        colours = lut[(heat * 255).round().long()].permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        overlay = ((images.float() + colours.float()) / 2).round().to(torch.uint8)
    for row in range(n):
        y = HEADER_HEIGHT + GRID_PAD + row * (cell_h + GRID_PAD)
        grid.paste(_to_pil(images[row], scale), (GRID_PAD, y))
        if channel_only:
            x0, panel = 2 * GRID_PAD + cell_w, 2 * cell_w + GRID_PAD
            bins = gates[row]
            if bins.numel() > panel:  # more channels than pixels: average neighbouring channels
                bins = F.adaptive_avg_pool1d(bins.view(1, 1, -1), panel).flatten()
            bar = panel / bins.numel()
            for k, value in enumerate(bins.tolist()):
                top = min(y + cell_h - value * cell_h, y + cell_h - 1)
                colour = tuple(lut[round(value * 255)].tolist())
                gap = 1 if bar > 3 else 0
                draw.rectangle([x0 + k * bar, top, x0 + (k + 1) * bar - gap, y + cell_h - 1], fill=colour)
        else:
            grid.paste(_to_pil(colours[row], scale), (2 * GRID_PAD + cell_w, y))
            grid.paste(_to_pil(overlay[row], scale), (3 * GRID_PAD + 2 * cell_w, y))
    return grid


def _active_wandb_run() -> Any:
    """The active W&B run or None. W&B is not imported here: without an import there is no run."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def save_mask_pictures(
    net: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | os.PathLike,
    max_images: int = 8,
) -> list[Path]:
    """One PNG per Attention Module showing its soft mask M(x) on up to `max_images` images, as the paper
    illustrates its masks.

    Rows are images: input | heat map (the mask averaged over channels, bilinearly up-sampled to the image
    size, normalised per image to [0, 1], coloured with :func:`jet_colormap`) | the heat map blended over the
    input. Channel-only masks (B, C, 1, 1) get input | one bar per channel instead. Files are
    `<out_dir>/<NN>_<module name>.png` in network order; with an active W&B run they are also logged as
    `masks/<module name>`. Returns the written paths (none for a network without soft masks).
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise TypeError(
            f"images_uint8 must be a uint8 (B, C, H, W) tensor, got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    net = _unwrap(net)
    images = images_uint8[:max_images].cpu()
    device = next(net.parameters()).device
    with _evaluation(net):
        masks = net.soft_masks(normalize_batch(images, mean, std).to(device))
    shown = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, pictures = [], {}
    for index, (name, mask) in enumerate(masks.items()):
        pictures[name] = picture = _mask_grid(name, mask.cpu(), shown)
        written.append(out / f"{index:02d}_{name}.png")
        picture.save(written[-1])
    run = _active_wandb_run()
    if run is not None and pictures:
        import wandb

        run.log(
            {
                f"masks/{name}": wandb.Image(picture, caption=f"{name} {tuple(masks[name].shape)}")
                for name, picture in pictures.items()
            }
        )
    return written


# --- images for the analyses --------------------------------------------------------------------------------


@dataclass
class AnalysisImages:
    """uint8 images (B, 3, H, W), their dataset's normalisation and a sentence on where they come from."""

    images: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def normalised(self) -> torch.Tensor:
        return normalize_batch(self.images, self.mean, self.std)


def load_analysis_images(
    dataset: str, data_dir: str | os.PathLike | None, num_images: int, *, image_size: int = 32, seed: int = 0
) -> AnalysisImages:
    """The first `num_images` CIFAR test images, `num_images` ImageNet `val/` images spread evenly over the
    classes (resized and centre-cropped to `image_size`), or, without `data_dir`, uniform random images of
    `image_size` (seeded) normalised with `dataset`'s statistics."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid choices: {', '.join(DATASETS)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    mean, std = NORMALISATION[dataset]
    if data_dir is None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(
            0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=generator
        )
        return AnalysisImages(
            images,
            mean,
            std,
            f"{num_images} random uniform {image_size}x{image_size} "
            f"images (seed {seed}; no --data-dir given), normalised with {dataset} "
            "statistics",
        )
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(_missing_data_dir(data_dir, dataset))
    if dataset == "imagenet":
        from torchvision.transforms import v2

        from datamodules.imagenet import eval_resize_size

        dm = ImageNetDataModule(str(data_dir), num_workers=0, pin_memory=False, eval_size=image_size)
        dm.setup("test")
        tree = dm.test_dataset
        tree.transform = v2.Compose(
            [
                v2.Resize(eval_resize_size(image_size), antialias=True),
                v2.CenterCrop(image_size),
                v2.PILToTensor(),
            ]
        )
        count = min(num_images, len(tree))
        indices = torch.linspace(0, len(tree) - 1, count).round().long().tolist()
        images = torch.stack([tree[i][0] for i in indices])
        return AnalysisImages(
            images,
            mean,
            std,
            f"{count} ImageNet images of {data_dir / 'val'} spread over "
            f"its {len(dm.classes)} classes, centre-cropped to {image_size}x{image_size}",
        )
    module = CIFAR10DataModule if dataset == "cifar10" else CIFAR100DataModule
    if not (data_dir / module.base_folder).is_dir() and data_dir.name == module.base_folder:
        data_dir = data_dir.parent  # the dataset folder itself was given
    dm = module(data_dir=str(data_dir))
    dm.setup("test")
    images = dm.test_dataset.images[:num_images]
    return AnalysisImages(
        images,
        mean,
        std,
        f"the first {images.shape[0]} {module.dataset_name} test images of {dm.dataset_dir}",
    )


def _missing_data_dir(data_dir: Path, dataset: str | None) -> str:
    layouts = {
        "cifar10": "cifar-10-batches-py/",
        "cifar100": "cifar-100-python/",
        "imagenet": "train/ and val/",
    }
    layout = (
        f"{layouts[dataset]} ({dataset})"
        if dataset
        else ", ".join(f"{layout} ({name})" for name, layout in layouts.items() if name != "imagenet")
        + f" or {layouts['imagenet']} (imagenet)"
    )
    return (
        f"data directory not found: {data_dir}. Fix: pass --data-dir the folder that contains {layout}, "
        "or leave --data-dir out to use random images"
    )


# --- command line -------------------------------------------------------------------------------------------


class AnalysisError(Exception):
    """A user error on the command line, reported without a traceback."""


def _parse_value(text: str) -> Any:
    """A Python literal (number, tuple, list, bool, None) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise AnalysisError(f"{what} must look like KEY=VALUE, got {text!r}")
    return key, value


def _checkpoint_entry(text: str) -> tuple[str, Path]:
    """`LABEL=PATH` or `PATH` (then the label is '<run>/<stem>' for runs/<run>/checkpoints/<stem>.ckpt, else
    the file's stem)."""
    label, sep, path = text.partition("=")
    if not sep or "/" in label or os.sep in label:
        label, path = "", text
    path = Path(path).expanduser()
    if not label:
        label = f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem
    if not path.is_file():
        raise AnalysisError(
            f"checkpoint not found: {path}"
            + (" (it is a directory)" if path.is_dir() else "")
            + ". Fix: pass the .ckpt file of a run, e.g. "
            "runs/<run name>/checkpoints/best.ckpt or last.ckpt (written by `ran fit`)"
        )
    return label, path


def _model_specs(args: argparse.Namespace) -> OrderedDict[str, NetworkSpec]:
    """Networks at initialisation from --model, --model-arg and --compare."""
    if args.model not in list_models():
        raise AnalysisError(f"unknown model {args.model!r}; known models: {', '.join(list_models())}")
    kwargs = dict(_split_assignment(a, "--model-arg") for a in args.model_arg)
    kwargs = {key: _parse_value(value) for key, value in kwargs.items()}
    if not getattr(args, "compare", None):
        return OrderedDict([(args.model, (args.model, kwargs))])
    key, values = _split_assignment(args.compare, "--compare")
    return OrderedDict(
        (f"{key}={value}", (args.model, {**kwargs, key: _parse_value(value)})) for value in values.split(",")
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="The paper's analyses: stage responses, NAL vs ARL (Sec. 4.1), and soft-mask pictures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def data_options(p: argparse.ArgumentParser, num_images: int) -> None:
        p.add_argument(
            "--data-dir",
            help="folder containing cifar-10-batches-py/, cifar-100-python/ or "
            "train/ and val/ (imagenet); random images when left out",
        )
        p.add_argument(
            "--dataset",
            choices=DATASETS,
            help="default: from the network (ImageNet stem -> imagenet, 100 classes -> cifar100, "
            "else cifar10)",
        )
        p.add_argument("--num-images", type=int, default=num_images, help=f"default {num_images}")
        p.add_argument("--seed", type=int, default=0, help="seeds initialisation and random images")
        p.add_argument(
            "--model-arg",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="with --model: a model argument, e.g. stage_widths=(16,32,64) (repeatable)",
        )

    responses = sub.add_parser("responses", help="mean absolute response of each stage's output (Sec. 4.1)")
    responses.add_argument(
        "--ckpt",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a checkpoint to compare, labelled (repeatable)",
    )
    responses.add_argument("--model", help="a registered model at initialisation, e.g. attention164_cifar")
    responses.add_argument(
        "--compare", metavar="KEY=V1,V2", help="with --model: one network per value, e.g. learning=arl,nal"
    )
    responses.add_argument(
        "--bn-stats",
        choices=("auto", *BN_STATS),
        default="auto",
        help="BatchNorm statistics: running (eval mode) or batch; auto: running with "
        "checkpoints, batch when every network is at initialisation",
    )
    responses.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    responses.add_argument(
        "--out",
        type=Path,
        default=Path("runs/analysis/responses"),
        help="folder for responses.md, .csv and .png",
    )
    data_options(responses, 64)

    masks = sub.add_parser("masks", help="one picture of the soft mask per Attention Module")
    source = masks.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="the checkpoint")
    source.add_argument("--model", help="or a registered model at initialisation")
    masks.add_argument("--out", type=Path, default=Path("runs/analysis/masks"), help="folder for the PNGs")
    data_options(masks, 8)
    return parser


def _check_data_dir(args: argparse.Namespace) -> None:
    """Fail before any network is built or loaded if --data-dir names no folder."""
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise AnalysisError(_missing_data_dir(Path(args.data_dir).expanduser(), args.dataset))


def _images_for(net: nn.Module, args: argparse.Namespace) -> AnalysisImages:
    """--dataset (default: the network's) images: CIFAR's 32x32, else the network's input size."""
    dataset = args.dataset or infer_dataset(net)
    size = max(getattr(net, "default_input_size", 32), getattr(net, "min_input_size", 1))
    if args.data_dir is not None and dataset != "imagenet":
        size = 32
    return load_analysis_images(dataset, args.data_dir, args.num_images, image_size=size, seed=args.seed)


def _responses(args: argparse.Namespace) -> int:
    specs: OrderedDict[str, NetworkSpec] = OrderedDict()
    for text in args.ckpt:
        label, path = _checkpoint_entry(text)
        if label in specs:
            raise AnalysisError(f"two checkpoints are labelled {label!r}: give each one as LABEL=PATH")
        specs[label] = path
    if args.compare and not args.model:
        raise AnalysisError("--compare needs --model")
    if args.model:
        models = _model_specs(args)
        if set(models) & set(specs):
            raise AnalysisError(f"labels used twice: {', '.join(sorted(set(models) & set(specs)))}")
        specs.update(models)
    if not specs:
        raise AnalysisError("nothing to measure: give --ckpt LABEL=PATH (repeatable) and/or --model NAME")
    _check_data_dir(args)
    first_label = next(iter(specs))
    specs[first_label] = resolve_network(specs[first_label], args.seed)  # loaded once, to choose the images
    data = _images_for(specs[first_label], args)
    bn_stats = args.bn_stats if args.bn_stats != "auto" else ("running" if args.ckpt else "batch")
    table = compare_responses(
        specs, data.normalised(), seed=args.seed, bn_stats=bn_stats, batch_size=args.batch_size
    )
    table.notes.insert(0, f"images: {data.source}")
    if args.model:
        table.notes.append(
            f"{args.model} at initialisation (seed {args.seed}; every variant gets the same weights)"
        )
        if bn_stats == "running":
            table.notes.append(
                "an untrained network's running statistics are 0 and 1: BatchNorm is the "
                "identity and responses grow with depth (--bn-stats batch normalises as in "
                "training)"
            )
    paths = table.save(args.out)
    print("\n".join(table.notes))
    print()
    print(table.to_markdown())
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    return 0


def _masks(args: argparse.Namespace) -> int:
    if args.ckpt:
        _, path = _checkpoint_entry(args.ckpt)
        _check_data_dir(args)
        net = load_checkpoint_network(path)
    else:
        (spec,) = _model_specs(args).values()
        _check_data_dir(args)
        net = resolve_network(spec, args.seed)
    data = _images_for(net, args)
    paths = save_mask_pictures(net, data.images, data.mean, data.std, args.out, max_images=args.num_images)
    if not paths:
        raise AnalysisError(
            "this network has no soft masks (no Attention Modules, or mask='none'): nothing to draw"
        )
    print(f"images: {data.source}")
    if args.model:
        print(f"{args.model} at initialisation (seed {args.seed})")
    print(f"{len(paths)} mask pictures (rows: input | soft mask | overlay) in {args.out}:")
    print("\n".join(f"  {p.name}" for p in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`responses ...` or `masks ...` (see the module docstring); returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _responses(args) if args.command == "responses" else _masks(args)
    except (AnalysisError, FileNotFoundError, ValueError, DatasetLayoutError, CorruptImageError) as err:
        print(f"python -m experiments {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
