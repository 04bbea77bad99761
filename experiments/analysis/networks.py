"""The networks the analyses look at: a module, a checkpoint, a registered model name or a run directory, and
the evaluation mode they are measured in."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ran.nn.registry import create_model, list_models
from ran.train.module import ImageClassifier
from ran.train.rundir import RunDir

__all__ = [
    "BN_STATS",
    "NetworkSpec",
    "RunDirectory",
    "evaluation",
    "infer_dataset",
    "load_checkpoint_network",
    "resolve_network",
    "unwrap",
]

BN_STATS = ("running", "batch")
CHECKPOINT_FIX = (
    "Fix: pass the .ckpt file of a run, e.g. runs/<run name>/checkpoints/best.ckpt or last.ckpt "
    "(written by `ran fit`)"
)

NetworkSpec = nn.Module | str | os.PathLike | tuple
"""A network for the analyses: a module (a ResidualAttentionNet or an ImageClassifier), a checkpoint path, a
registered model name, or `(name, kwargs)` for `ran.create_model(name, **kwargs)` at initialisation."""


def unwrap(net: nn.Module) -> nn.Module:
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
        raise FileNotFoundError(f"checkpoint not found: {path}. {CHECKPOINT_FIX}")
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
        return unwrap(spec)
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
    net = unwrap(net)
    if getattr(net, "stem_stride", 1) > 1:
        return "imagenet"
    return "cifar100" if getattr(net, "num_classes", 10) == 100 else "cifar10"


@dataclass(frozen=True)
class RunDirectory(RunDir):
    """A run directory of `ran fit` (`runs/<name>`) that the analyses read: its best checkpoint (required)
    and the config it ran with."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "path", self.path.expanduser())
        if not self.checkpoint.is_file():
            raise FileNotFoundError(
                f"run directory without a best checkpoint: {self.checkpoint} not found. Fix: pass the "
                "directory of a run `ran fit` trained (runs/<run name>), or its checkpoint with --ckpt"
            )

    @property
    def checkpoint(self) -> Path:
        return self.best_ckpt

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config `ran fit` wrote (`config.yaml`); empty when absent."""
        return self.read_config()

    @property
    def data(self) -> tuple[str | None, str | None]:
        """(datamodule class name, data_dir) of the config, e.g. ('CIFAR10DataModule', 'data')."""
        data = self.config.get("data") or {}
        class_path = data.get("class_path")
        return (class_path.rsplit(".", 1)[-1] if class_path else None), (data.get("init_args") or {}).get(
            "data_dir"
        )


@contextlib.contextmanager
def evaluation(net: nn.Module, bn_stats: str = "running") -> Iterator[None]:
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
