"""A run's config: its YAML files with their `__base__` chains, and the config that `ran fit` resolves.

Config inheritance: a YAML config may name the configs it extends in a top-level `__base__` key (one path or
a list, relative to the file that names them). The bases are resolved recursively and merged in order, then
the file itself is merged on top: mappings merge key by key; any other value (scalars, lists) replaces the
base's; a mapping whose `class_path` differs from the base's replaces it whole (its `init_args` belong to
another class). The merged YAML is what LightningCLI parses, so `--print_config` shows it, unknown keys are
errors, and later `-c` files and command-line flags override it as usual.

Resolution (`resolve_config`): the `ran fit` arguments (`-c` files, then `--key value` overrides) parsed by
the parser of `ran fit` itself, LightningCLI's jsonargparse parser of `ran.cli.RanCLI`, without instantiating
the model, the data or the trainer. Defaults, types, `--data.batch_size` for `--data.init_args.batch_size` and
values such as `--trainer.devices [0,1]` therefore mean what they mean to the job. `experiments plan` and
`experiments run` read their networks and SLURM resources from it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning.cli import LightningArgumentParser

BASE_KEY = "__base__"

__all__ = [
    "BASE_KEY",
    "ConfigError",
    "ResolvedConfig",
    "device_count",
    "load_config",
    "merge_configs",
    "resolve_config",
    "resolve_config_args",
]


class ConfigError(ValueError):
    """A problem with the user's configuration or run directory, reported without a traceback."""


# --- config inheritance ------------------------------------------------------------------------------------


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged onto `base` (see the module docstring for the rules); neither is modified."""
    if "class_path" in base and "class_path" in override and base["class_path"] != override["class_path"]:
        return dict(override)
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config and resolve its `__base__` chain into one mapping."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as stream:  # a stream, so that the error names the file, not "<unicode string>"
            data = yaml.safe_load(stream) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} {base!r} not found (looked for {base_path.resolve()})")
        merged = merge_configs(merged, load_config(base_path, (*_chain, path)))
    return merge_configs(merged, data)


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace every `-c/--config FILE` whose file uses `__base__` by the merged YAML (LightningCLI's
    `--config` accepts a YAML string as well as a path)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            flag, value, i = arg, argv[i + 1], i + 2
        elif arg.startswith("--config="):
            flag, value, i = "--config", arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).is_file() and _has_base(Path(value)):
            value = yaml.safe_dump(load_config(value), sort_keys=False)
        out += [flag, value]
    return out


def _has_base(path: Path) -> bool:
    """Whether the config file names bases; a ConfigError naming the file and line for a YAML syntax error
    (LightningCLI would show the file as "<unicode string>")."""
    try:
        with open(path) as stream:
            data = yaml.safe_load(stream)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}".replace("\n", " ")) from None
    return isinstance(data, dict) and BASE_KEY in data


# --- the resolved config -----------------------------------------------------------------------------------


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
    """The parser of `ran`, built by LightningCLI's own `setup_parser` for `ran.cli.RanCLI` and handed back
    before it parses anything (LightningCLI builds its parser only inside `__init__`, which goes on to
    instantiate and run)."""
    from ran.cli import RanCLI  # deferred: ran.cli imports this module for the config inheritance

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
