"""A registry of model variants, in the manner of timm: `register_model`, `create_model`, `list_models`, and
trained weights by name, folder or URL: `create_model(name, pretrained=...)`, `load_pretrained`."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

import ran.nn.pretrained as weights

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function's name; the networks it builds carry that name as `arch`."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")

    @functools.wraps(fn)
    def build(**kwargs: Any) -> nn.Module:
        model = fn(**kwargs)
        model.arch = fn.__name__
        return model

    _MODELS[fn.__name__] = build
    return build


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds `name`; a ValueError listing the known names if there is none."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, pretrained: Any = None, **kwargs) -> nn.Module:
    """Build the registered model `name`; keyword arguments override the variant's defaults, e.g.
    `create_model("attention92_cifar", num_classes=100, attention="channel", learning="nal")`. An argument
    given as None is left out, so the variant's default applies (callers pass unset switches as they are);
    each value is checked where the network defines it.

    `pretrained`: trained weights of `name` (`ran.nn.pretrained`): True for its published default, a
    published entry (`ran.list_pretrained()`), a folder made by `ran export` or `save_pretrained`, its URL or
    'hf-hub:owner/name'. The network is then built as the weights' config.json says, loaded (names and shapes
    checked) and returned in eval mode; keyword arguments override config.json's, and another `num_classes`
    keeps every weight but a freshly initialised classifier (for fine-tuning). False or None: no weights."""
    if pretrained is None or pretrained is False:
        return model_entrypoint(name)(**{k: v for k, v in kwargs.items() if v is not None})
    model_entrypoint(name)  # an unknown name fails before any download
    return weights.load(pretrained, _builder, arch=name, overrides=kwargs)


def load_pretrained(source: Any, **kwargs) -> nn.Module:
    """The network of trained weights `source` (a published entry, a folder, its URL or 'hf-hub:owner/name'),
    rebuilt from its config.json alone, loaded and in eval mode; keyword arguments as `create_model`'s."""
    return weights.load(source, _builder, overrides=kwargs)


def _builder(arch: str | None) -> Callable[..., nn.Module]:
    if arch is None:
        raise weights.PretrainedWeightsError(
            "these weights name no registered model (config.json 'arch' is null): load them with "
            "ran.ResidualAttentionNet.from_pretrained(...)"
        )
    return model_entrypoint(arch)
