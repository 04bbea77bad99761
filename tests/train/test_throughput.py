"""FLOPs and throughput: the module's `example_input_array` gives Lightning's summary real FLOPs, and the CLI
logs images/s and FLOPs/s through Lightning's ThroughputMonitor."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY_MODEL_KWARGS
from pytorch_lightning.callbacks import throughput_monitor
from pytorch_lightning.utilities.model_summary import ModelSummary
from test_cli import cifar_fit

import ran.train.throughput
from ran.cli.main import main
from ran.tools.summary import count_macs
from ran.train.module import ImageClassifier
from ran.train.throughput import network_flops

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


def tiny_classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(
        "attention56_cifar", num_classes=10, model_kwargs=dict(TINY_MODEL_KWARGS), **kwargs
    )


def test_the_summary_counts_the_networks_flops():
    module = tiny_classifier()
    assert tuple(module.example_input_array.shape) == (1, 3, 32, 32)
    forward = 2 * count_macs(module.net, 32)
    assert forward > 0 and ModelSummary(module).total_flops == forward
    assert tiny_classifier(compile=True).example_input_array is None


def test_example_input_follows_the_datamodules_image_size():
    class Data:
        image_size = 48

    class Trainer:
        datamodule = Data()

    module = tiny_classifier()
    module._trainer = Trainer()
    assert tuple(module.example_input_array.shape) == (1, 3, 48, 48)


def test_training_flops_are_forward_and_backward():
    module = tiny_classifier()
    flops = network_flops(module.hparams, (1, 3, 32, 32))
    assert flops["eval"] == 2 * count_macs(module.net, 32)
    assert 2.5 < flops["train"] / flops["eval"] < 3.5  # backward costs about twice the forward


def test_throughput_reaches_the_logger(cifar10_dir, run_root, monkeypatch):
    """Images/s, and with a known peak (here a pretended 1 TFLOP/s CPU) FLOPs/s and MFU."""
    monkeypatch.setattr(ran.train.throughput, "THROUGHPUT_WINDOW", 3)
    monkeypatch.setattr(throughput_monitor, "get_available_flops", lambda device, dtype: 10**12)
    assert main(cifar_fit(cifar10_dir, run_root, "speed", steps=5)) == 0
    with open(run_root / "speed" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/samples_per_sec")]
    assert rows, "no images/s logged"
    per_image = network_flops(tiny_classifier().hparams, (1, 3, 32, 32))["train"]
    for row in rows:
        images_per_s, flops_per_s = (
            float(row["train/device/samples_per_sec"]),
            float(row["train/device/flops_per_sec"]),
        )
        assert images_per_s > 0
        # Both rates over the same window of batches of 16 images: their ratio is the FLOPs of one image.
        assert flops_per_s / images_per_s == pytest.approx(per_image, rel=1e-6)
        assert float(row["train/device/mfu"]) == pytest.approx(flops_per_s / 10**12, rel=1e-6)


def test_without_a_known_peak_only_images_per_second_are_logged(cifar10_dir, run_root, monkeypatch):
    """On a CPU the FLOPs are not counted (it would cost seconds at every start)."""
    monkeypatch.setattr(ran.train.throughput, "THROUGHPUT_WINDOW", 3)
    counted = []
    monkeypatch.setattr(ran.train.throughput, "network_flops", lambda *args: counted.append(args) or {})
    assert main(cifar_fit(cifar10_dir, run_root, "cpu", steps=5)) == 0
    with open(run_root / "cpu" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/device/samples_per_sec") for r in rows) and not counted
    assert not any(r.get("train/device/flops_per_sec") for r in rows)
