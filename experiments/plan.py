"""What a suite costs under a budget: runs, iterations, images, training FLOPs and (with `--measure`)
device-hours from training-step times measured on this machine's device (`ran.tools.measure`)."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.launch import make_jobs
from experiments.suites import Suite, load_suite, suite_names
from ran.nn.registry import create_model
from ran.tools.markdown import markdown_lines
from ran.tools.measure import count_macs, pick_device, train_step_times


@dataclass
class RunCost:
    """One run of a suite under a budget: its network, recipe and (once measured) its step time."""

    run: str
    arch: str
    net_kwargs: dict[str, Any]
    num_classes: int
    image_size: int
    batch: int  # per device
    devices: int  # devices x nodes
    iterations: int
    seeds: int
    precision: str
    channels_last: bool
    macs: int  # forward multiply-adds per image at image_size
    step_s: float | None = field(default=None)  # one training step on one device

    @property
    def images(self) -> int:
        """Training images over all seeds."""
        return self.iterations * self.batch * self.devices * self.seeds

    @property
    def train_flop(self) -> float:
        """Training FLOPs over all seeds: 3 x forward (forward, then backward at twice the forward), 2 FLOPs
        per multiply-add."""
        return 6.0 * self.macs * self.images

    @property
    def device_hours(self) -> float | None:
        if self.step_s is None:
            return None
        return self.step_s * self.iterations * self.devices * self.seeds / 3600

    @property
    def measure_key(self) -> tuple:
        return (
            self.arch,
            repr(sorted(self.net_kwargs.items())),
            self.num_classes,
            self.image_size,
            self.batch,
            self.precision,
            self.channels_last,
        )


def run_costs(
    suite: Suite, budget: str, seeds: int = 1, macs_cache: dict | None = None, extra: list[str] | None = None
) -> list[RunCost]:
    """Every run of `suite` under `budget`, with its recipe and network from the config its `ran fit` resolves
    (`ran.cli.resolve`) and its forward multiply-adds counted by torch's FlopCounterMode
    (`ran.tools.measure.count_macs`)."""
    macs_cache = {} if macs_cache is None else macs_cache
    costs = []
    for job in make_jobs(suite, budget, [0], Path("runs"), None, extra):
        cfg = job.resolved_config()
        arch, net_kwargs = cfg.model["arch"], cfg.network_kwargs
        key = (arch, repr(sorted(net_kwargs.items())), cfg.num_classes, cfg.data.get("image_size"))
        if key not in macs_cache:
            net = create_model(arch, num_classes=cfg.num_classes, **net_kwargs)
            size = int(cfg.data.get("image_size") or net.default_input_size)
            macs_cache[key] = (size, net.num_classes, count_macs(net, size))
        size, num_classes, macs = macs_cache[key]
        costs.append(
            RunCost(
                run=job.run.name,
                arch=arch,
                net_kwargs=net_kwargs,
                num_classes=num_classes,
                image_size=size,
                batch=int(cfg.data["batch_size"]),
                devices=cfg.devices * cfg.nodes,
                iterations=int(cfg.trainer["max_steps"]),
                seeds=seeds,
                precision=str(cfg.trainer["precision"]).replace("-true", ""),
                channels_last=bool(cfg.model["channels_last"]),
                macs=macs,
            )
        )
    return costs


def measure_steps(costs: list[RunCost], steps: int = 6, cache: dict | None = None) -> None:
    """Fill each run's `step_s`: the median training-step time of its network, recipe and per-device batch on
    this machine's device, through the real module and Trainer (`ran.tools.measure.train_step_times`,
    synthetic batches, no data loading). Runs that share a network and recipe are measured once."""
    device = pick_device("auto")
    cache = {} if cache is None else cache
    for cost in costs:
        if cost.measure_key not in cache:
            blocks, _ = train_step_times(
                cost.arch,
                batch_size=cost.batch,
                input_size=cost.image_size,
                num_classes=cost.num_classes,
                device=device,
                model_kwargs=cost.net_kwargs,
                precision=cost.precision,
                channels_last=cost.channels_last,
                warmup=2,
                blocks=max(1, steps // 2),
                steps_per_block=2,
            )
            cache[cost.measure_key] = statistics.median(blocks)
            print(
                f"measured {cost.run} ({cost.arch}, batch {cost.batch}, {cost.image_size}px, {cost.precision}"
                f"{', channels_last' if cost.channels_last else ''}): "
                f"{1e3 * cache[cost.measure_key]:,.0f} ms/step",
                file=sys.stderr,
                flush=True,
            )
        cost.step_s = cache[cost.measure_key]


def device_label() -> str:
    device = pick_device("auto")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"this CPU, {torch.get_num_threads()} threads"


def _pflop(flop: float) -> str:
    p = flop / 1e15
    return f"{p:,.0f}" if p >= 100 else f"{p:.1f}" if p >= 1 else f"{p:.2g}"


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:,.2f}" if hours < 1 else f"{hours:,.1f}"


def plan(
    suite: Suite,
    budget: str,
    seeds: list[int],
    measure: bool = False,
    steps: int = 6,
    extra: list[str] | None = None,
) -> str:
    """A markdown table: per run, its network, iterations, global batch, devices, images, training PFLOP
    and, with `measure`, the step time on one device of this machine and the device-hours of all its seeds."""
    costs = run_costs(suite, budget, seeds=len(seeds), extra=extra)
    if measure:
        measure_steps(costs, steps)
    header = ["run", "network", "iterations", "global batch", "devices", "seeds", "images", "train PFLOP"]
    if measure:
        header += ["step ms (one device)", "device-hours"]
    rows = []
    for c in costs:
        row = [
            c.run,
            c.arch,
            f"{c.iterations:,}",
            str(c.batch * c.devices),
            str(c.devices),
            str(c.seeds),
            f"{c.images:,}",
            _pflop(c.train_flop),
        ]
        if measure:
            row += [f"{1e3 * c.step_s:,.0f}", _hours(c.device_hours)]
        rows.append(row)
    lines = [
        f"{suite.name} under budget '{budget}': {len(costs)} runs x {len(seeds)} seed(s)",
        "",
        *markdown_lines(header, rows),
    ]
    total = f"total: {_pflop(sum(c.train_flop for c in costs))} PFLOP of training"
    if measure:
        total += (
            f", {_hours(sum(c.device_hours for c in costs))} device-hours ({device_label()}; step times "
            "measured with synthetic batches, data loading and validation excluded)"
        )
    return "\n".join(lines + ["", total])


def plan_all(
    budgets: list[str],
    seeds: int = 1,
    measure: bool = False,
    steps: int = 6,
    suites: list[str] | None = None,
    extra: list[str] | None = None,
) -> str:
    """One markdown table over every suite and budget: runs, iterations per run, images, training PFLOP
    and, with `measure`, device-hours on this machine (each network and recipe measured once)."""
    macs_cache: dict = {}
    step_cache: dict = {}
    header = ["suite", "budget", "runs", "iterations per run", "images", "train PFLOP"]
    if measure:
        header += ["device-hours"]
    rows = []
    for name in suites or suite_names():
        suite = load_suite(name)
        for budget in budgets:
            costs = run_costs(suite, budget, seeds=seeds, macs_cache=macs_cache, extra=extra)
            iterations = sorted({c.iterations for c in costs})
            row = [
                name + (f" ({', '.join(suite.aliases)})" if suite.aliases else ""),
                budget,
                f"{len(costs)} x {seeds}" if seeds > 1 else str(len(costs)),
                " / ".join(f"{i:,}" for i in iterations),
                f"{sum(c.images for c in costs):,}",
                _pflop(sum(c.train_flop for c in costs)),
            ]
            if measure:
                measure_steps(costs, steps, step_cache)
                row.append(_hours(sum(c.device_hours for c in costs)))
            rows.append(row)
    lines = markdown_lines(header, rows)
    if measure:
        lines += [
            "",
            f"device-hours on {device_label()}: each network's training step measured with its budget's "
            "per-device batch, precision and memory format, synthetic batches; data loading and "
            "validation excluded",
        ]
    return "\n".join(lines)
