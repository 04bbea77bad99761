"""Mean absolute response of each stage's output, naive attention learning (NAL, H = M * T) against attention
residual learning (ARL, H = (1 + M) * T): Wang et al., CVPR 2017, Sec. 4.1 and its figure on Attention-164,
whose response collapses after stage 2 with NAL and holds with ARL."""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import wandb
from torch import nn

from experiments.analysis.networks import NetworkSpec, evaluation, resolve_network, unwrap
from experiments.analysis.tracking import active_wandb_run
from ran.tools.markdown import markdown_lines
from ran.tools.pictures import response_chart

__all__ = ["RESPONSE_TITLE", "ResponseTable", "compare_responses", "stage_responses"]

RESPONSE_TITLE = "Mean absolute response of each stage's output"


def stage_responses(
    net: nn.Module, images: torch.Tensor, *, bn_stats: str = "running", batch_size: int = 64
) -> OrderedDict[str, float]:
    """Mean absolute value of the output of the stem and of every stage (stage1..stage4) over `images`.

    The measure of the paper's figure on response (Sec. 4.1). `images` is the normalised float network input
    (see `datamodules.normalize_batch`). Runs in eval mode without gradients, in chunks of `batch_size`; with
    `bn_stats='batch'` BatchNorm uses each chunk's statistics instead of its running ones (an untrained
    network's running statistics are 0 and 1, so in eval mode its BatchNorm layers are identities).
    """
    net = unwrap(net)
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
        with evaluation(net, bn_stats):
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
        rows = []
        for stage in self.stages:
            values = [self.value(label, stage) for label in labels]
            ratios = [v / values[0] if values[0] else math.nan for v in values[1:]]
            rows.append(
                [
                    stage,
                    *(f"{v:.4g}" if not math.isnan(v) else "-" for v in values),
                    *(f"{r:.3g}" if not math.isnan(r) else "-" for r in ratios),
                ]
            )
        return "\n".join(markdown_lines(header, rows))

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

    def save(self, out_dir: str | os.PathLike, title: str = RESPONSE_TITLE) -> list[Path]:
        """Write `responses.md` (title, notes, table), `responses.csv` and `responses.png` into `out_dir`; log
        the chart and table to the active W&B run, if any. Returns the written paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "responses.md"
        notes = "".join(f"- {note}\n" for note in self.notes)
        md.write_text(f"# {title}\n\n{notes}\n{self.to_markdown()}\n")
        csv_path = self.write_csv(out / "responses.csv")
        chart = response_chart(self.responses, title)
        png = out / "responses.png"
        chart.save(png)
        run = active_wandb_run()
        if run is not None:
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

    `networks` maps a label to a `NetworkSpec`: a module, a checkpoint path, or `(model name, kwargs)` for a
    network at initialisation, e.g. `{"ARL": ("attention164_cifar", {"learning": "arl"}),
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
    size = f"{images.shape[0]} images of {images.shape[-2]}x{images.shape[-1]}"
    table = ResponseTable(responses, [size, bn_note])
    if out_dir is not None:
        table.save(out_dir)
    return table
