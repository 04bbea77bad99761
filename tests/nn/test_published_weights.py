"""The published weights of this repository (`weights/<entry>/`, docs/weights.md): every default entry is
there, small, loads by name and carries its figures and provenance; on the real CIFAR-10 (../shared/data)
each CIFAR-10 entry reaches the test top-1 its config.json records."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED_DATA

import ran
from datamodules import CIFAR10DataModule, normalize_batch
from ran.nn.pretrained import CONFIG_FILE, DEFAULT_WEIGHTS, WEIGHTS_FILE

WEIGHTS = REPO / "weights"
CIFAR10_ENTRIES = [
    arch
    for arch, entry in DEFAULT_WEIGHTS.items()
    if not (WEIGHTS / entry / CONFIG_FILE).is_file()
    or json.loads((WEIGHTS / entry / CONFIG_FILE).read_text()).get("dataset") == "CIFAR-10"
]


@pytest.mark.parametrize("arch", sorted(DEFAULT_WEIGHTS))
def test_every_default_entry_is_in_the_repository_and_loads_by_name(arch):
    folder = WEIGHTS / DEFAULT_WEIGHTS[arch]
    assert (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file(), (
        f"{folder} is missing: `ran export --ckpt-path RUN/checkpoints/best.ckpt --out {folder}`"
    )
    model = ran.create_model(arch, pretrained=True)
    tensors = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert (folder / WEIGHTS_FILE).stat().st_size <= tensors + 2**16  # the network alone, no training state
    config = model.pretrained_cfg
    assert config["source"] == str(folder) and model.arch == arch
    assert 0 < config["metrics"]["test/acc1"] <= 1 and config["provenance"]["fit_status"] == "finished"
    assert len(config["mean"]) == len(config["std"]) == config["input_size"][0]


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CIFAR10_ENTRIES))
def test_published_weights_reach_their_recorded_test_accuracy_on_real_cifar10(arch):
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA / 'cifar-10-batches-py'}")
    assert (WEIGHTS / DEFAULT_WEIGHTS[arch] / WEIGHTS_FILE).is_file(), f"{DEFAULT_WEIGHTS[arch]} is missing"
    model = ran.create_model(arch, pretrained=True).to(memory_format=torch.channels_last)
    config = model.pretrained_cfg
    data = CIFAR10DataModule(str(SHARED_DATA), batch_size=500)
    data.setup("test")
    correct = total = 0
    with torch.inference_mode():
        for images, labels in data.test_dataloader():
            x = normalize_batch(images, config["mean"], config["std"]).contiguous(
                memory_format=torch.channels_last
            )
            predicted = model(x).argmax(1)
            correct += int((predicted == labels).sum())
            total += labels.numel()
    assert total == 10_000
    # The recorded figure is `ran test`'s (batches of 64): other kernels may flip a few borderline images,
    # never more than 10 of 10,000.
    assert abs(correct / total - config["metrics"]["test/acc1"]) <= 0.001
