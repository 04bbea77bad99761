"""Shared fixtures: W&B without an account, a run root under tmp_path, tiny-network arguments, fake datasets,
and a reader for W&B's offline run files."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The networks of the tests: an Attention-56 with stage widths 16/32/64 (76K parameters).
TINY_MODEL_KWARGS = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
TINY_MODEL_FLAG = "{stage_widths: [16, 32, 64], stem_width: 8, final_width: 64}"

os.environ["WANDB_SILENT"] = "true"  # no W&B banners in test output


@pytest.fixture
def _wandb_torn_down() -> Iterator[None]:
    """Each test ends with wandb.teardown(): W&B reads its settings once per process (at its first
    `wandb.init`), so a test that logs offline after one that ran disabled then writes its files, whatever the
    tests' order. The active run is finished first: teardown alone leaves its console hooks on stdout, which
    then write into the torn-down service and fail every later test that prints. Set up before monkeypatch,
    so torn down after it: a test's stand-in `wandb.run` is gone by then."""
    yield
    if "wandb" in sys.modules:
        wandb = sys.modules["wandb"]
        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()


@pytest.fixture(autouse=True)
def _wandb_disabled_by_default(_wandb_torn_down: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the W&B servers: W&B is disabled unless a test sets WANDB_MODE=offline itself."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """The folder holding the test's run directories."""
    return tmp_path / "runs"


@pytest.fixture
def tiny_model_kwargs() -> dict:
    return dict(TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake CIFAR-10 in the official layout: 5 x 40 training images, 40 test images."""
    import datagen

    root = tmp_path_factory.mktemp("cifar10")
    datagen.make_cifar10(root, n_train_per_batch=40, n_test=40)
    return root


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only fake CIFAR-10 for the datamodule tests: 5 x 100 training images (50 per class), 100 test
    images."""
    import datagen

    root = tmp_path_factory.mktemp("cifar10")
    datagen.make_cifar10(root, n_train_per_batch=100, n_test=100)
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only fake CIFAR-100 for the datamodule tests: 500 training images (5 per class), 200 test
    images."""
    import datagen

    root = tmp_path_factory.mktemp("cifar100")
    datagen.make_cifar100(root, n_train=500, n_test=200)
    return root


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake CIFAR-100 in the official layout: 300 training images, 100 test images."""
    import datagen

    root = tmp_path_factory.mktemp("cifar100")
    datagen.make_cifar100(root, n_train=300, n_test=100)
    return root


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake ImageNet tree: train/ and val/ with 3 class folders of 64x64 JPEGs."""
    import datagen

    root = tmp_path_factory.mktemp("imagenet")
    datagen.make_imagenet_tree(root, n_train_per_class=8, n_val_per_class=4)
    return root


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (`run-<id>.wandb`): a ':W&B' header, then LevelDB-log blocks of
    32 KiB holding records split in chunks (4-byte CRC, 2-byte length, 1-byte type: full, first, middle,
    last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a W&B run file once its writer (the wandb-core process, which may still be flushing
    after `wandb.finish` returns) has written the closing `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_record(run_dir: Path, run_id: str) -> dict:
    """The run record, config and history of the offline W&B runs with id `run_id` under `run_dir/wandb`."""
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline W&B run {run_id} in {run_dir / 'wandb'}"
    records = [r for f in files for r in finished_records(f)]
    updates = [r.config for r in records if r.HasField("config")]
    updates += [r.run.config for r in records if r.HasField("run")]  # wandb.init(config=...)
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for c in updates for u in c.update}
    history_keys = {
        i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item
    }
    runs = [r.run for r in records if r.HasField("run")]
    return {"files": files, "config": config, "history_keys": history_keys, "run": runs[0]}
