"""A run's config files: YAML with `__base__` chains (the config that `ran fit` resolves from them is
`ran.cli.resolve`'s).

Config inheritance: a YAML config may name the configs it extends in a top-level `__base__` key (one path or
a list, relative to the file that names them). The bases are resolved recursively and merged in order, then
the file itself is merged on top: mappings merge key by key; any other value (scalars, lists) replaces the
base's; a mapping whose `class_path` differs from the base's replaces it whole (its `init_args` belong to
another class). The merged YAML is what LightningCLI parses, so `--print_config` shows it, unknown keys are
errors, and later `-c` files and command-line flags override it as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "__base__"

__all__ = ["BASE_KEY", "ConfigError", "load_config", "merge_configs", "resolve_config_args"]


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
