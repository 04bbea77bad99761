"""FLOPs and throughput: the module's `example_input_array` gives Lightning's summary real FLOPs, and the CLI
logs images/s and FLOPs/s through Lightning's ThroughputMonitor."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODEL_KWARGS
from fits import cifar_fit
from pytorch_lightning.utilities.model_summary import ModelSummary

import ran.train.throughput
from ran.cli.main import main
from ran.tools.summary import count_macs
from ran.train.module import ImageClassifier
from ran.train.throughput import ImageThroughput, network_flops

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
    monkeypatch.setattr(ran.train.throughput, "get_available_flops", lambda device, dtype: 10**12)
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


class RecordingLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, metrics))


def test_on_a_gpu_the_clock_is_read_only_at_log_steps(monkeypatch):
    """The device is synchronised at the start, at every log step and around validation, not per step."""
    synchronised: list[int] = []
    trainer = SimpleNamespace(
        global_step=0,
        log_every_n_steps=5,
        world_size=1,
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        strategy=SimpleNamespace(root_device=torch.device("cuda")),
        loggers=[RecordingLogger()],
    )
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: synchronised.append(trainer.global_step)
    )
    monitor = ImageThroughput()
    monitor.on_train_start(trainer, None)
    batch = (torch.zeros(16, 3, 2, 2), torch.zeros(16))
    for step in range(1, 21):
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, None, None, batch, step - 1)
        if step == 10:
            monitor.on_validation_start(trainer, None)
            monitor.on_validation_batch_end(trainer, None, None, batch, 0)
            monitor.on_validation_end(trainer, None)
    assert synchronised == [0, 5, 10, 10, 10, 15, 20]  # start, log steps, validation's start and end
    logged = {step: metrics for step, metrics in trainer.loggers[0].rows}
    assert sorted(logged) == [5, 10, 15, 20]
    assert logged[20]["train/samples"] == 320 and logged[20]["train/batches"] == 20
    assert logged[15]["train/device/samples_per_sec"] > 0  # over the last THROUGHPUT_WINDOW intervals
    assert logged[10]["validate/samples"] == 16  # the validation's own figures, at its end
