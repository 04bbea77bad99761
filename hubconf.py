"""torch.hub entry points: every registered network (`ran.list_models()`), with or without trained weights.

    model = torch.hub.load("ran-developers/ran", "attention56_cifar", pretrained=True)   # published weights
    model = torch.hub.load("ran-developers/ran", "attention92_cifar", num_classes=100)   # untrained
    torch.hub.list("ran-developers/ran"), torch.hub.help("ran-developers/ran", "attention56_cifar")

`pretrained` is `ran.create_model`'s: True (the network's published weights, read from the repository
torch.hub downloaded), a published entry (`ran.list_pretrained()`), a folder made by `ran export`, its URL,
or 'hf-hub:owner/name'. Keyword arguments override the network's (or the weights') arguments.
"""

from __future__ import annotations

import ran as _ran

dependencies = ["torch", "safetensors", "huggingface_hub"]


def _entrypoint(name: str):
    def entrypoint(pretrained=False, **kwargs):
        return _ran.create_model(name, pretrained=pretrained or None, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{_ran.model_entrypoint(name).__doc__}\n\npretrained: True for the published weights "
        "(ran.list_pretrained()), a folder of exported weights, its URL or 'hf-hub:owner/name'."
    )
    return entrypoint


globals().update({name: _entrypoint(name) for name in _ran.list_models()})
