"""`ran.tools.mask_monitor.SoftMaskMonitor`: soft-mask grids at the first validation, every N validations and
at
test, as PNGs beside the run or as W&B media, without changing training. Tiny networks on fake CIFAR-10."""

from __future__ import annotations

import json
import logging

import pytest
import pytorch_lightning as pl
import torch
import wandb
from conftest import TINY_MODEL_KWARGS, wandb_records
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from datamodules import CIFAR10DataModule
from ran.tools.mask_monitor import SoftMaskMonitor
from ran.train.module import ImageClassifier

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.DatasetSizeWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(data_dir, tmp_path, *callbacks, logger=None, steps=6, **model_kwargs):
    """`steps` steps of a tiny network, two per epoch, a validation after each epoch; then the trainer."""
    pl.seed_everything(0)
    module = ImageClassifier(
        model_kwargs.pop("arch", "attention56_cifar"),
        num_classes=10,
        model_kwargs=TINY_MODEL_KWARGS,
        **model_kwargs,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=logger or False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=CIFAR10DataModule(str(data_dir), batch_size=16, val_size=20))
    return trainer


def test_pngs_at_the_first_validation_every_n_and_at_test_without_changing_training(cifar10_dir, tmp_path):
    monitor = SoftMaskMonitor(tmp_path / "run", num_images=3, every_n_validations=2)
    trainer = fit(cifar10_dir, tmp_path, monitor, logger=CSVLogger(tmp_path, name="csv"))
    # validations after steps 2, 4 and 6 (the sanity check does not count): the 1st and the 3rd are drawn
    assert monitor.state_dict() == {"validations": 3}
    trainer.test(trainer.lightning_module, datamodule=trainer.datamodule)
    names = sorted(p.name for p in (tmp_path / "run" / "masks").iterdir())
    assert names == ["test_step0000006.png", "val_step0000002.png", "val_step0000006.png"]
    with Image.open(tmp_path / "run" / "masks" / "val_step0000002.png") as picture:
        assert picture.mode == "RGB" and picture.width > picture.height  # 3 rows, input + 3 module columns
    assert monitor.images.shape == (3, 3, 32, 32) and monitor.images.dtype == torch.float32

    unwatched = fit(cifar10_dir, tmp_path / "unwatched")
    weights, reference = trainer.lightning_module.state_dict(), unwatched.lightning_module.state_dict()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)

    # `ran test` in a new process: the validation split is set up by the monitor, the same images are taken
    tester = SoftMaskMonitor(tmp_path / "tested", num_images=3)
    test_only = pl.Trainer(accelerator="cpu", logger=False, callbacks=[tester], enable_progress_bar=False)
    test_only.test(trainer.lightning_module, datamodule=CIFAR10DataModule(str(cifar10_dir), val_size=20))
    assert torch.equal(tester.images, monitor.images)
    assert [p.name for p in (tmp_path / "tested" / "masks").iterdir()] == ["test_step0000000.png"]


@pytest.mark.parametrize("model", [{"mask": "none"}, {"arch": "preact_resnet164_cifar"}])
def test_networks_without_soft_masks_are_skipped_with_one_line(cifar10_dir, tmp_path, caplog, model):
    monitor = SoftMaskMonitor(tmp_path / "run", every_n_validations=1)
    with caplog.at_level(logging.INFO):
        fit(cifar10_dir, tmp_path, monitor, steps=2, **model)
    assert [r.message for r in caplog.records if "SoftMaskMonitor" in r.message] == [
        "SoftMaskMonitor: the network has no Attention Module with a mask; no soft-mask pictures are logged"
    ]
    assert not (tmp_path / "run" / "masks").exists()


def history_row(record) -> dict:
    """One W&B history record as a dict; media are nested (`masks/val` -> `_type`, `filenames`, ...)."""
    row: dict = {}
    for item in record.history.item:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        target = row
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = json.loads(item.value_json)
    return row


def test_grids_are_wandb_media_of_the_offline_run(cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="test")
    trainer = fit(
        cifar10_dir, tmp_path, SoftMaskMonitor(tmp_path, num_images=2, every_n_validations=2), logger=logger
    )
    trainer.test(trainer.lightning_module, datamodule=trainer.datamodule)
    run_id = logger.experiment.id
    logger.experiment.finish()
    wandb.teardown()  # waits until W&B's service has written the run's offline files
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    history = [
        history_row(r) for r in wandb_records(run_dir / f"run-{run_id}.wandb") if r.HasField("history")
    ]
    logged = [
        (key, h["trainer/global_step"], h[key])
        for h in history
        for key in ("masks/val", "masks/test")
        if key in h
    ]
    assert [(key, step) for key, step, _ in logged] == [("masks/val", 2), ("masks/val", 6), ("masks/test", 6)]
    for _, _, media in logged:
        assert media["_type"] == "images/separated" and media["captions"][0].startswith("soft masks")
        (filename,) = media["filenames"]
        assert (run_dir / "files" / filename).is_file()
    assert not (tmp_path / "masks").exists()  # no PNGs beside the run when W&B takes them
