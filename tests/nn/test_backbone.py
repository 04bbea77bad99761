"""The networks as backbones (timm's interface): `forward_features` gives the last feature maps before
pooling, `forward_head` pools and classifies them, and the two compose to `forward`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODEL_KWARGS

import ran


@pytest.mark.parametrize(
    "name,size,maps",
    [
        ("attention56_cifar", 32, (64, 8, 8)),  # stride 4: the stem keeps 32x32, stages 2 and 3 halve it
        ("attention92_cifar", 48, (64, 12, 12)),
        ("attention56", 224, (64, 7, 7)),  # stride 32: stem 4, then 1, 2, 2 and the final units' 2
        ("attention_next56", 256, (64, 8, 8)),
    ],
)
def test_forward_features_are_the_last_maps_and_forward_head_classifies_them(name, size, maps):
    kwargs = {**TINY_MODEL_KWARGS, **({"groups": 4} if name == "attention_next56" else {})}
    model = ran.create_model(name, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, *maps) and model.num_features == maps[0]
        assert model.feature_stride == size // maps[1]
        torch.testing.assert_close(model.forward_head(features), model(x))
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean((2, 3)))
    assert model.get_classifier() is model.fc


def test_a_head_of_ones_own_trains_the_backbone():
    model = ran.create_model("attention56_cifar", **TINY_MODEL_KWARGS)
    head = torch.nn.Conv2d(model.num_features, 3, 1)  # e.g. a dense-prediction head on the maps
    head(model.forward_features(torch.randn(2, 3, 32, 32))).mean().backward()
    assert model.stem.weight.grad is not None and model.fc.weight.grad is None


def test_a_network_copies_and_pickles_with_its_config(tmp_path):
    """deepcopy (EMA, SWA) and whole-module pickling keep the hub config and the registry name."""
    model = ran.create_model("attention56_cifar", **TINY_MODEL_KWARGS)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (twin, loaded):
        assert other.network_config() == model.network_config() and other.arch == "attention56_cifar"
