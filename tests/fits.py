"""`ran fit` arguments for tiny networks on the tests' fake data, and what reads a run's files back: shared by
the tests that run the command (tests/cli, tests/train, tests/suites)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import CONFIGS, TINY_MODEL_FLAG


def cifar_fit(
    data_dir: Path,
    run_root: Path,
    name: str,
    *extra: str,
    config: str = "cifar10/attention56.yaml",
    steps: int = 6,
    logger: str = "csv",
) -> list[str]:
    """`ran fit` arguments for a tiny network on fake CIFAR: 160 training images (10 steps of 16), 40 for
    validation."""
    return [
        "fit",
        "-c",
        str(CONFIGS / config),
        "--data.data_dir",
        str(data_dir),
        "--data.val_size",
        "40",
        "--data.batch_size",
        "16",
        "--model.model_kwargs",
        TINY_MODEL_FLAG,
        "--trainer.max_steps",
        str(steps),
        "--trainer.accelerator",
        "cpu",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_model_summary",
        "false",
        "--run.root",
        str(run_root),
        "--run.name",
        name,
        "--run.logger",
        logger,
        *extra,
    ]


def callbacks(*probes: tuple[str, dict]) -> str:
    """A `--trainer.callbacks` value: (class name in probes.py, init_args) pairs."""
    return json.dumps(
        [{"class_path": f"probes.{name}", "init_args": init_args} for name, init_args in probes]
    )


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
