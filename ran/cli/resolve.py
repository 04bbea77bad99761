"""The config that `ran fit` resolves: the `ran fit` arguments (`-c` files with their `__base__` chains, then
`--key value` overrides) parsed by the parser of `ran fit` itself, LightningCLI's jsonargparse parser of
`RanCLI`, without instantiating the model, the data or the trainer. Defaults, types, `--data.batch_size` for
`--data.init_args.batch_size` and values such as `--trainer.devices [0,1]` therefore mean what they mean to
the job. `experiments plan` and `experiments run` read their networks and SLURM resources from it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser

from ran.cli.app import RanCLI
from ran.train.config import ConfigError, resolve_config_args

__all__ = ["ResolvedConfig", "device_count", "resolve_config"]


def device_count(devices: Any) -> int:
    """How many devices per node a `trainer.devices` value asks for: N, a list of device indices, or a string
    of either ('4', '0,1'). 'auto' and -1 depend on the machine, so they have no count here."""
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    raise ConfigError(
        f"trainer.devices {devices!r} does not say how many devices a run uses: "
        "give a number or a list (e.g. --trainer.devices 4 or --trainer.devices [0,1])"
    )


@dataclass(frozen=True)
class ResolvedConfig:
    """A run's config as `ran fit` resolves it (`config`: every section, as `--print_config` shows it) and the
    network it builds."""

    config: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.config["model"]

    @property
    def data(self) -> dict[str, Any]:
        """The datamodule's arguments (`data.init_args`)."""
        return self.config["data"]["init_args"]

    @property
    def trainer(self) -> dict[str, Any]:
        return self.config["trainer"]

    @property
    def devices(self) -> int:
        """Devices per node (`trainer.devices`, counted)."""
        return device_count(self.trainer["devices"])

    @property
    def nodes(self) -> int:
        return int(self.trainer["num_nodes"])

    @property
    def num_classes(self) -> int | None:
        """The classes the datamodule gives the network (the CLI links `data.num_classes` to the model):
        `data.num_classes` where the config sets it, else the datamodule class's `NUM_CLASSES` (CIFAR's 10 or
        100, ILSVRC's 1000; an ImageNet tree of fewer classes counts them when the run starts)."""
        if self.data.get("num_classes") is not None:
            return int(self.data["num_classes"])
        module, _, name = self.config["data"]["class_path"].rpartition(".")
        return getattr(getattr(importlib.import_module(module), name), "NUM_CLASSES", None)

    @property
    def network_kwargs(self) -> dict[str, Any]:
        """What `ImageClassifier` gives `ran.create_model` besides the arch and `num_classes`: the switches
        (None where unset; `create_model` leaves those out) and `model_kwargs`."""
        kwargs = {key: self.model[key] for key in ("attention", "learning", "mask")}
        return {**kwargs, **(self.model.get("model_kwargs") or {})}


def resolve_config(args: Sequence[str]) -> ResolvedConfig:
    """The config that `ran fit ARGS` runs with (`-c` files with their `__base__` chains, then overrides),
    parsed by `ran fit`'s own parser; nothing is instantiated and no run directory is touched."""
    argv = ["fit", *resolve_config_args(args)]
    try:
        namespace = _fit_parser().parse_args(argv)
    except argparse.ArgumentError as err:
        files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
        raise ConfigError(f"ran fit -c {' -c '.join(files)} ...: {err}") from None
    config = namespace.fit.as_dict()
    config.pop("config", None)
    return ResolvedConfig(config)


@functools.cache
def _fit_parser() -> LightningArgumentParser:
    """The parser of `ran`, built by LightningCLI's own `setup_parser` for `RanCLI` and handed back
    before it parses anything (LightningCLI builds its parser only inside `__init__`, which goes on to
    instantiate and run)."""

    class ParserBuilt(Exception):
        pass

    class ParserOnly(RanCLI):
        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            return super().init_parser(exit_on_error=False, **kwargs)  # errors raise, for ConfigError

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            raise ParserBuilt(parser)

    try:
        ParserOnly(args=[])
    except ParserBuilt as built:
        return built.args[0]
    raise AssertionError("LightningCLI parsed without calling parse_arguments")
