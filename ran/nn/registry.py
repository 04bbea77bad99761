"""A registry of model variants, in the manner of timm: `register_model`, `create_model`, `list_models`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function's name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds `name`; a ValueError listing the known names if there is none."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`; keyword arguments override the variant's defaults, e.g.
    `create_model("attention92_cifar", num_classes=100, attention="channel", learning="nal")`. An argument
    given as None is left out, so the variant's default applies (callers pass unset switches as they are);
    each value is checked where the network defines it."""
    return model_entrypoint(name)(**{k: v for k, v in kwargs.items() if v is not None})
