"""What a suite costs under a budget: runs, iterations, images, and (with `--measure`) compute hours from
training-step times measured on this machine with `ran.bench`."""

from __future__ import annotations

import statistics
from typing import Any

from experiments.launch import make_jobs, resources
from experiments.suites import Suite


def merged_config(job) -> dict[str, Any]:
    from ran.cli import load_config, merge_configs

    cfg = load_config(job.run.config)
    budget = job.suite.budget_config(job.budget)
    return merge_configs(cfg, load_config(budget)) if budget.is_file() else cfg


def plan(suite: Suite, budget: str, seeds: list[int], measure: bool = False, steps: int = 6) -> str:
    """A markdown table: per run, its network, iterations, global batch, devices and, with `measure`, the
    measured step time on one device of this machine and the device-hours of all its seeds."""
    import torch

    from ran.bench import pick_device, train_step_times
    from ran.registry import create_model

    device = pick_device("auto")
    rows, total_hours, timings = [], 0.0, {}
    header = ["run", "network", "iterations", "global batch", "devices", "seeds"]
    if measure:
        header += [f"step ms ({device.type}, per device)", "device-hours"]
    for job in make_jobs(suite, budget, seeds[:1], job_root(), None):
        cfg = merged_config(job)
        model, data, trainer = cfg.get("model", {}), cfg.get("data", {}).get("init_args", {}), cfg.get("trainer", {})
        res = resources(job)
        batch = int(data.get("batch_size", 64))
        devices = res["devices"] * res["nodes"]
        iterations = int(trainer.get("max_steps", 0))
        row = [job.run.name, model.get("arch", "?"), f"{iterations:,}", str(batch * devices), str(devices),
               str(len(seeds))]
        if measure:
            kwargs = {k: v for k, v in model.items() if k in ("attention", "learning", "mask") and v}
            kwargs.update(model.get("model_kwargs") or {})
            net = create_model(model["arch"], **kwargs)
            size = int(data.get("image_size", net.default_input_size))
            key = (model["arch"], repr(sorted(kwargs.items())), batch, size)
            if key not in timings:
                blocks, _ = train_step_times(model["arch"], batch_size=batch, input_size=size,
                                             num_classes=net.num_classes, device=device,
                                             model_kwargs=model.get("model_kwargs"), warmup=2, blocks=steps // 2,
                                             steps_per_block=2,
                                             precision=str(trainer.get("precision", "32")).replace("-true", ""))
                timings[key] = statistics.median(blocks)
            hours = timings[key] * iterations * devices * len(seeds) / 3600
            total_hours += hours
            row += [f"{1e3 * timings[key]:.0f}", f"{hours:,.1f}"]
        rows.append(row)
    lines = [f"{suite.name} under budget '{budget}': {len(rows)} runs x {len(seeds)} seed(s)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if measure:
        lines += ["", f"total: {total_hours:,.1f} device-hours ({device.type}: "
                      f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'this CPU'}; "
                      "step times measured here with synthetic batches, data loading excluded)"]
    return "\n".join(lines)


def job_root():
    from pathlib import Path
    return Path("runs")
