"""Trained weights as files, and where they come from.

A set of weights is one folder in the layout of huggingface_hub's `PyTorchModelHubMixin`:

    model.safetensors   the network's state dict (safetensors: no pickle, nothing runs on load)
    config.json         what rebuilds the network and what the weights were trained and measured on
    README.md           a model card written from config.json (by `save_pretrained` and `ran export`)

config.json:

    {"format": 1,
     "arch": "attention56_cifar",              the registry name (`ran.list_models()`)
     "num_classes": 10,
     "model_kwargs": {"stem": "cifar", ...},    every other argument of `ResidualAttentionNet`
     "input_size": [3, 32, 32], "mean": [...], "std": [...], "dataset": "CIFAR-10",
     "metrics": {"test/acc1": 0.8686, ...},     the run's test figures for these weights
     "provenance": {"run": ..., "global_step": ..., "recipe": {...}, "exported": ..., ...}}

The keys after `model_kwargs` are the weights' facts, `model.pretrained_cfg` on a loaded network. A source of
weights (`pretrained=` of `ran.create_model`, `ran.load_pretrained`, `ResidualAttentionNet.from_pretrained`,
the torch.hub entry points) is a folder, the URL of one, `hf-hub:owner/name[@revision]` (a Hugging Face Hub
repository), or a published entry of this repository (`weights/<entry>/`; True: the network's default entry),
read from a checkout where there is one and downloaded from GitHub otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_WEIGHTS",
    "WEIGHTS_FILE",
    "PretrainedWeightsError",
    "WeightsDownloadError",
    "list_pretrained",
    "hub_source",
    "load",
    "locate",
    "write_folder",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1
HF_PREFIX = "hf-hub:"

GITHUB_REPO = "ran-developers/ran"
REPO_URL = f"https://github.com/{GITHUB_REPO}"
PAPER_URL = "https://arxiv.org/abs/1704.06904"
# The published entries in a checkout (a source tree or torch.hub's copy of the repository), and on GitHub.
CHECKOUT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
WEIGHTS_URL = f"https://raw.githubusercontent.com/{GITHUB_REPO}/main/weights"
# The published entry that `pretrained=True` loads, by network. Entries never change once published: new
# weights get a new entry (so a downloaded copy is never stale).
DEFAULT_WEIGHTS: dict[str, str] = {"attention56_cifar": "attention56_cifar.cifar10_cpu_reference"}

# The weights' facts in config.json, besides the network (`model.pretrained_cfg`).
FACT_KEYS = ("input_size", "mean", "std", "crop_pct", "dataset", "metrics", "provenance")


class PretrainedWeightsError(ValueError):
    """Weights that cannot be found or read, or that do not fit the network asked for."""


class WeightsDownloadError(PretrainedWeightsError, ConnectionError):
    """Weights that could not be downloaded (no network, unknown URL or repository)."""


def weights_url() -> str:
    """The folder URL of the published entries: `RAN_WEIGHTS_URL` (a mirror) or this repository on GitHub."""
    return os.environ.get("RAN_WEIGHTS_URL", WEIGHTS_URL).rstrip("/")


def list_pretrained() -> list[str]:
    """The published entries: the defaults of `DEFAULT_WEIGHTS` and every folder of a checkout's weights/."""
    found = {p.parent.name for p in CHECKOUT_WEIGHTS.glob(f"*/{CONFIG_FILE}")}
    return sorted(found | set(DEFAULT_WEIGHTS.values()))


# --- where weights come from --------------------------------------------------------------------------------

# huggingface_hub's download options, as `from_pretrained` takes them.
HUB_OPTIONS = ("revision", "cache_dir", "token", "force_download", "local_files_only")


def hub_source(name: str | os.PathLike) -> str:
    """A source as huggingface_hub's `from_pretrained` reads its argument: a Path or an existing folder, a
    URL, a published entry, or else a Hub repository id ('owner/name')."""
    text = os.fspath(name)
    if (
        isinstance(name, Path)
        or Path(text).expanduser().exists()
        or text.startswith(("http://", "https://", HF_PREFIX))
    ):
        return text
    return text if text in list_pretrained() else HF_PREFIX + text


def locate(source: Any, arch: str | None = None, **hub_kwargs: Any) -> tuple[Path, Path, str]:
    """The local files (config.json, model.safetensors) of `source`, downloaded where it is remote, and a
    description of it for messages. `hub_kwargs` go to huggingface_hub's `hf_hub_download` (revision,
    cache_dir, token, force_download, local_files_only)."""
    if source is True:
        if arch not in DEFAULT_WEIGHTS:
            raise PretrainedWeightsError(
                f"no published weights for {arch!r} (published: {', '.join(list_pretrained())}); pass "
                "pretrained= a folder of exported weights, its URL or 'hf-hub:owner/name'"
            )
        source = DEFAULT_WEIGHTS[arch]
    if not isinstance(source, (str, os.PathLike)):
        raise PretrainedWeightsError(
            f"pretrained must be True, a folder, a URL or 'hf-hub:owner/name', got {source!r}"
        )
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        return _from_hub(text[len(HF_PREFIX) :], **hub_kwargs)
    if text.startswith(("http://", "https://")):
        return _download(text)
    path = Path(text).expanduser()
    if not path.exists() and text in list_pretrained():
        entry = CHECKOUT_WEIGHTS / text
        if (entry / CONFIG_FILE).is_file():
            return _folder(entry)
        return _download(f"{weights_url()}/{text}")
    return _folder(path)


def _folder(path: Path) -> tuple[Path, Path, str]:
    if not path.is_dir():
        known = ", ".join(list_pretrained())
        raise PretrainedWeightsError(
            f"no folder of weights at {path}: pass a folder made by `ran export` or `save_pretrained`, its "
            f"URL, 'hf-hub:owner/name' or a published entry ({known})"
        )
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise PretrainedWeightsError(
            f"{path} has no {' and no '.join(missing)}: not a folder of exported weights (make one with "
            "`ran export` or `model.save_pretrained`)"
        )
    return path / CONFIG_FILE, path / WEIGHTS_FILE, str(path)


def _download(url: str) -> tuple[Path, Path, str]:
    """The folder at `url` (or the folder of a file URL in it), fetched once into torch.hub's cache."""
    base = url.rstrip("/")
    if base.rsplit("/", 1)[-1] in (CONFIG_FILE, WEIGHTS_FILE):
        base = base.rsplit("/", 1)[0]
    name = base.rsplit("/", 1)[-1] or "weights"
    cache = Path(torch.hub.get_dir()) / "ran" / f"{name}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (cache / file).is_file():
            try:
                torch.hub.download_url_to_file(f"{base}/{file}", str(cache / file), progress=False)
            except HTTPError as err:
                raise WeightsDownloadError(
                    f"cannot download {base}/{file} (HTTP {err.code} {err.reason}): check the URL (a folder "
                    f"of weights holds {CONFIG_FILE} and {WEIGHTS_FILE})"
                ) from None
            except (OSError, ValueError) as err:  # URLError (no network, refused), timeouts, a bad URL
                raise WeightsDownloadError(
                    f"cannot download {base}/{file} ({getattr(err, 'reason', None) or err}): without a "
                    "network, copy the folder of weights onto this machine and pass its path as pretrained"
                ) from None
    return cache / CONFIG_FILE, cache / WEIGHTS_FILE, base


def _from_hub(repo: str, **hub_kwargs: Any) -> tuple[Path, Path, str]:
    """The files of the Hugging Face Hub repository `repo` ('owner/name' or 'owner/name@revision')."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition("@")
    if revision:
        hub_kwargs["revision"] = revision
    paths = []
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths.append(Path(hf_hub_download(repo_id, file, **hub_kwargs)))
        except Exception as err:  # offline, unknown repository or file, bad token: huggingface_hub's errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsDownloadError(
                f"cannot download {file} of the Hugging Face Hub repository {repo_id!r} ({first}): without a "
                "network, pass the folder of a downloaded copy as pretrained"
            ) from None
    return paths[0], paths[1], f"{HF_PREFIX}{repo}"


# --- reading and loading ------------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """config.json, checked: a PretrainedWeightsError naming the file and the problem."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PretrainedWeightsError(f"{path}: not readable JSON ({err})") from None
    problem = None
    if not isinstance(config, dict):
        problem = "not a JSON object"
    elif not isinstance(config.get("format"), int) or config["format"] > FORMAT:
        problem = f"format {config.get('format')!r}; this ran reads format {FORMAT} (upgrade ran)"
    elif not (config.get("arch") is None or isinstance(config["arch"], str)):
        problem = "'arch' must be a registered model name"
    elif not isinstance(config.get("num_classes"), int) or not isinstance(config.get("model_kwargs"), dict):
        problem = "it needs 'num_classes' (an integer) and 'model_kwargs' (an object)"
    if problem:
        raise PretrainedWeightsError(f"{path}: {problem}")
    return config


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, skip: tuple = ()) -> None:
    """A PretrainedWeightsError when `state` does not have exactly the names and shapes of `model`'s state
    dict (names starting with one of `skip` are left out of the comparison)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} in the file, {tuple(v.shape)} in the network"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        f"{len(names)} {what} ({'; '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if names
    ]
    if parts:
        raise PretrainedWeightsError(
            f"the weights in {where} do not fit the network: {', '.join(parts)}; build it as config.json "
            "says (no argument that changes a layer's shape; num_classes may change)"
        )


def load(
    source: Any,
    builder: Callable[[str | None], Callable[..., nn.Module]],
    arch: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    **hub_kwargs: Any,
) -> nn.Module:
    """The network of `source`, rebuilt and loaded, in eval mode.

    `builder(config_arch)` gives the constructor: a registered variant (`ran.create_model`) or the network
    class (`from_pretrained`); it is called with config.json's `model_kwargs` and `num_classes` and then
    `overrides` (None values left out). With `arch`, the weights must be that network's. An overridden
    `num_classes` gets a freshly initialised classifier and every other weight (fine-tuning)."""
    config_file, weights_file, where = locate(source, arch, **hub_kwargs)
    config = read_config(config_file)
    if arch is not None and config["arch"] not in (None, arch):
        raise PretrainedWeightsError(
            f"{where} holds weights of {config['arch']}, not {arch}: use "
            f"ran.create_model({config['arch']!r}, pretrained=...) or ran.load_pretrained(...)"
        )
    kwargs = {**config["model_kwargs"], "num_classes": config["num_classes"]}
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    model = builder(config["arch"])(**kwargs)
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError) as err:
        raise PretrainedWeightsError(f"{weights_file}: not a readable safetensors file ({err})") from None
    head = tuple(f"{name}." for name, m in model.named_modules() if m is model.get_classifier())
    skip = head if model.num_classes != config["num_classes"] else ()
    check_state(model, state, where, skip)
    model.load_state_dict(
        {k: v for k, v in state.items() if not (skip and k.startswith(skip))}, strict=not skip
    )
    model.arch = model.arch or config["arch"]
    model.pretrained_cfg = {k: config[k] for k in FACT_KEYS if k in config} | {"source": where}
    return model.to(map_location).eval()


# --- writing ------------------------------------------------------------------------------------------------


def config_of(model: nn.Module) -> dict[str, Any]:
    """config.json of `model`: its network (`network_config()`) and its facts (`pretrained_cfg`)."""
    facts = {k: model.pretrained_cfg[k] for k in FACT_KEYS if model.pretrained_cfg.get(k) is not None}
    return {"format": FORMAT, **model.network_config(), **facts}


def write_folder(model: nn.Module, directory: Path) -> None:
    """model.safetensors and config.json of `model` in `directory` (tensors made contiguous: channels_last
    weights are stored in the standard layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    (directory / CONFIG_FILE).write_text(_json(config_of(model)) + "\n")
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the permissions the
    # umask gives config.json, so that others on a shared file system can read what they can list
    shutil.copymode(directory / CONFIG_FILE, directory / WEIGHTS_FILE)


def _json(value: Any, indent: int = 0) -> str:
    """JSON with one key a line and every list on one line (config.json is read by people too)."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad = " " * (indent + 1)
    items = [f"{pad}{json.dumps(k)}: {_json(v, indent + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


MODEL_CARD = """---
{{ card_data }}
---

# {{ arch }}{% if dataset %} on {{ dataset }}{% endif %}

A Residual Attention Network ([Wang et al., CVPR 2017]({{ paper_url }})) trained with [ran]({{ repo_url }}):
{{ num_classes }} classes, input {{ input_size }}
{%- if mean %}, normalised with mean {{ mean }} and std {{ std }}{% endif %}.
{% if metrics %}
| metric | value |
|---|---|
{% for key, value in metrics.items() %}| {{ key }} | {{ value }} |
{% endfor %}{% endif %}
```python
import ran

model = ran.load_pretrained("path/to/this/folder")  # or "hf-hub:owner/name", or the folder's URL
```
{% if provenance %}
Provenance:
{%- for key, value in provenance.items() if key not in ("recipe", "data", "trainer", "versions") %}
{{- " " }}{{ key }} {{ value }}{% if not loop.last %};{% endif %}
{%- endfor %}.
{% endif %}"""


def card_fields(model: nn.Module) -> dict[str, Any]:
    """The model card template's values for `model` (the paper's and repository's URLs come from the class's
    hub settings)."""
    return config_of(model)
