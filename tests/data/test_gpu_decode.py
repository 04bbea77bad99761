"""decode=cuda on a CUDA GPU (skipped without one): nvJPEG's batch against the CPU decode with the same boxes
and flips, the PIL fallback for what nvJPEG rejects, and a short fit that decodes on the GPU."""

from __future__ import annotations

import io

import datagen
import pytest
import torch
from conftest import TINY_MODEL_KWARGS
from PIL import Image

from datamodules import ImageNetDataModule
from datamodules.decoding import collate_encoded, decode_batch, encoded_from_bytes, encoded_train_params
from datamodules.imagenet import imagenet_train_transform

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="decode=cuda needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning", "ignore::UserWarning"),
]
MEAN, STD = ImageNetDataModule.MEAN, ImageNetDataModule.STD


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return datagen.make_imagenet_tree(tmp_path_factory.mktemp("tree"), n_train_per_class=8, size=80)


def test_nvjpeg_batch_matches_the_cpu_decode_with_the_same_draws(tree):
    from torchvision.io import decode_jpeg

    files = sorted((tree / "train").rglob("*.JPEG"))
    samples, expected = [], []
    reference = imagenet_train_transform(64, MEAN, STD)
    for seed, path in enumerate(files):
        encoded = encoded_from_bytes(path.read_bytes())
        torch.manual_seed(seed)
        samples.append((encoded_train_params()(encoded), 0))
        torch.manual_seed(seed)
        expected.append(reference(decode_jpeg(encoded.data)))
    images, labels = decode_batch(collate_encoded(samples), "cuda", 64, 72, MEAN, STD)
    assert images.device.type == "cuda" and labels.device.type == "cuda" and images.shape == (24, 3, 64, 64)
    difference = (images.cpu() - torch.stack(expected)).abs()
    assert difference.mean() < 0.05  # nvJPEG's IDCT against libjpeg-turbo's: a few levels at most


def test_what_nvjpeg_rejects_is_decoded_by_pil_on_cuda(tree):
    cmyk, png = io.BytesIO(), io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    jpeg = next((tree / "train").rglob("*.JPEG")).read_bytes()
    batch = [((encoded_from_bytes(data), None, False), 0) for data in (cmyk.getvalue(), png.getvalue(), jpeg)]
    images, _ = decode_batch(collate_encoded(batch), "cuda", 16, 18, (0, 0, 0), (1, 1, 1))
    assert images.shape == (3, 3, 16, 16) and images.device.type == "cuda"
    assert torch.allclose(images[1, 0].cpu(), torch.full((16, 16), 200 / 255))


def test_a_fit_decodes_its_batches_on_the_gpu(tree, tmp_path):
    import pytorch_lightning as pl

    from ran.train.module import ImageClassifier

    shards = datagen.make_imagenet_shards(tree, tmp_path / "shards")
    dm = ImageNetDataModule(
        str(shards), format="litdata", decode="cuda", batch_size=8, num_workers=2, image_size=32, eval_size=32
    )
    module = ImageClassifier(arch="attention56_cifar", num_classes=3, model_kwargs=TINY_MODEL_KWARGS)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
