"""Tests for `ran.train.module.ImageClassifier` and `ran.train.callbacks`, with plain Lightning Trainers and
tiny
networks."""

from __future__ import annotations

import csv
import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from datamodules import CIFAR10DataModule, ImageNetDataModule
from ran.train.callbacks import RNGStateCallback, collect_rng_states, set_rng_states
from ran.train.module import ImageClassifier
from ran.train.recipe import LRFactor, effective_batch_size

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


def tiny(num_classes: int = 10, **kwargs) -> ImageClassifier:
    model_kwargs = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
    return ImageClassifier("attention56_cifar", num_classes=num_classes, model_kwargs=model_kwargs, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


# --- learning-rate schedule ---------------------------------------------------------------------------------


def test_step_schedule_divides_by_ten_at_the_paper_iterations():
    factor = LRFactor("step", milestones=(64_000, 96_000), gamma=0.1, total_steps=160_000)
    assert [factor(s) for s in (0, 63_999, 64_000, 95_999, 96_000, 159_999)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    imagenet = LRFactor("step", milestones=(200_000, 400_000, 500_000), total_steps=530_000)
    assert imagenet(529_999) == pytest.approx(1e-3)


def test_cosine_schedule_and_warmup():
    cosine = LRFactor("cosine", total_steps=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    warm = LRFactor("step", milestones=(10,), warmup_steps=4, total_steps=20)
    assert [warm(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert warm(10) == pytest.approx(0.1)


def test_linear_schedule_decays_to_zero_after_the_warmup():
    linear = LRFactor("linear", warmup_steps=10, total_steps=110)
    assert [linear(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [linear(s) for s in (10, 35, 60, 85, 110, 200)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


# --- the module ---------------------------------------------------------------------------------------------


def test_label_smoothing_softens_the_training_loss_only():
    torch.manual_seed(0)
    model = tiny(label_smoothing=0.1).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    logits = model(x)
    smoothed = model.training_step((x, y), 0)
    plain = nn.functional.cross_entropy(logits, y)
    # (1 - eps) * CE + eps * mean over classes of -log p, as the smoothed target gives
    expected = 0.9 * plain - 0.1 * torch.log_softmax(logits, 1).mean(1).mean()
    torch.testing.assert_close(smoothed, expected)
    assert not torch.isclose(smoothed, plain)
    model._eval_step((x, y), "val")
    torch.testing.assert_close(model.val_loss.compute(), plain)


def test_builds_any_registered_network_with_its_ablation_switches():
    module = ImageClassifier(
        "attention56_cifar",
        num_classes=7,
        attention="channel",
        learning="nal",
        mask="local",
        model_kwargs={"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64},
    )
    attention = next(iter(module.net.attention_modules.values()))
    assert attention.learning == "nal"
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert module.hparams.arch == "attention56_cifar" and module.hparams.num_classes == 7


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'attention57'.*attention92_cifar"):
        ImageClassifier("attention57")


def test_metric_objects_are_separate_per_split_and_top5_needs_five_classes():
    module = tiny(num_classes=3)
    metrics = [
        module.train_acc1,
        module.val_acc1,
        module.test_acc1,
        module.train_acc5,
        module.val_acc5,
        module.test_acc5,
    ]
    assert len({id(m) for m in metrics}) == len(metrics)
    assert module.top_k == 3 and tiny(num_classes=10).top_k == 5


def test_sync_batchnorm_only_on_multi_process_cuda_runs():
    def converted(world_size: int, device: str, stages: tuple[str, ...] = ("fit",)) -> bool:
        module = tiny()
        module._trainer = SimpleNamespace(
            world_size=world_size, strategy=SimpleNamespace(root_device=torch.device(device))
        )
        for stage in stages:
            module.setup(stage)
        return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())

    assert converted(2, "cuda", ("fit", "test"))
    assert not converted(2, "cpu")
    assert not converted(1, "cuda")


def test_loss_falls_when_overfitting_a_few_batches(tmp_path, cifar10_dir):
    pl.seed_everything(0)
    data = CIFAR10DataModule(str(cifar10_dir), batch_size=16, val_size=40, augment=False)
    module = tiny(milestones=(1000,))  # lr 0.1 throughout
    t = trainer(tmp_path, overfit_batches=2, max_steps=60, limit_val_batches=0)
    t.fit(module, data)
    losses = [float(r["train/loss"]) for r in read_metrics(t.logger) if r.get("train/loss")]
    assert len(losses) == 60
    assert np.mean(losses[:5]) > 2.0  # chance level for 10 classes is ln 10 = 2.30
    assert np.mean(losses[-5:]) < 0.3, losses  # the 32 images (random pixels and labels) are memorised


def test_learning_rate_scales_with_the_global_batch(tmp_path, cifar10_dir):
    data = CIFAR10DataModule(str(cifar10_dir), batch_size=8, val_size=40)
    module = tiny(lr=0.1, base_batch_size=64, scale_lr=True, milestones=(3,))
    t = trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, limit_val_batches=0)
    t.fit(module, data)
    assert effective_batch_size(t) == 16
    rows = read_metrics(t.logger)
    first = {
        key: float(next(r[key] for r in rows if r.get(key)))
        for key in ("trainer/effective_batch_size", "trainer/lr_scaled")
    }
    assert first == {"trainer/effective_batch_size": 16.0, "trainer/lr_scaled": pytest.approx(0.025)}
    scheduler_lr = t.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert scheduler_lr == pytest.approx(0.1 * 16 / 64 * 0.1)  # past the milestone at step 3
    unscaled = tiny(lr=0.1, scale_lr=False)
    unscaled._trainer = t
    assert unscaled.scaled_lr() == 0.1


def test_validation_and_test_metrics(tmp_path, imagenet_dir):
    data = ImageNetDataModule(
        str(imagenet_dir), batch_size=4, num_workers=0, pin_memory=False, image_size=32, eval_size=32
    )
    module = ImageClassifier(
        "attention56",
        num_classes=data.num_classes,
        model_kwargs={"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64},
    )
    t = trainer(tmp_path, max_epochs=3)
    t.fit(module, data)
    t.test(module, data, verbose=False)
    rows = read_metrics(t.logger)
    val = [r for r in rows if r.get("val/acc1")]
    assert len(val) == 3
    for r in val:
        assert float(r["val/err1"]) == pytest.approx(100 * (1 - float(r["val/acc1"])), abs=1e-4)
    best = [float(r["val/acc1_best"]) for r in rows if r.get("val/acc1_best")]
    assert best[-1] == pytest.approx(max(float(r["val/acc1"]) for r in val))
    assert all(b2 >= b1 for b1, b2 in zip(best, best[1:]))
    test = next(r for r in rows if r.get("test/acc1"))
    assert "val/acc5" not in rows[0] and "test/acc5" not in rows[0]  # 3 classes: no top-5
    per_class = [
        float(next(r[f"test/acc1_class/{c}"] for r in rows if r.get(f"test/acc1_class/{c}")))
        for c in data.classes
    ]
    assert np.mean(per_class) == pytest.approx(float(test["test/acc1"]), abs=1e-6)  # 4 val images per class


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric MaxMetric was called before")
def test_best_validation_accuracy_survives_a_checkpoint():
    module = tiny()
    module.val_acc1_best.update(torch.tensor(0.75))
    state = module.state_dict()
    restored = tiny()
    restored.load_state_dict(state)
    assert float(restored.val_acc1_best.compute()) == 0.75


# --- RNG state in checkpoints -------------------------------------------------------------------------------


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    checkpoint: dict = {}
    fake_trainer = SimpleNamespace(world_size=1, global_rank=0)
    RNGStateCallback().on_save_checkpoint(fake_trainer, None, checkpoint)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    RNGStateCallback().on_load_checkpoint(fake_trainer, None, loaded)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_rng_states_of_other_ranks_are_kept_apart():
    torch.manual_seed(3)
    rank0 = collect_rng_states()
    torch.manual_seed(4)
    rank1 = collect_rng_states()
    checkpoint = {RNGStateCallback.key: [rank0, rank1]}
    RNGStateCallback().on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=1), None, checkpoint)
    drawn = torch.rand(2)
    set_rng_states(rank1)
    assert torch.equal(drawn, torch.rand(2))
