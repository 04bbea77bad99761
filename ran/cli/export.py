"""`ran export`: a training checkpoint as trained weights to use and share (`ran.nn.pretrained`).

    ran export --ckpt-path runs/NAME/checkpoints/best.ckpt --out weights/NAME

writes the plain network (no optimizer or training state) as model.safetensors, and config.json with its
registry name and arguments, the dataset's mean/std and input size, the run's test figures for that
checkpoint (results.json) and its provenance (run, step, recipe, data settings, versions); then reloads the
folder and checks its logits equal the checkpoint's. `ran.load_pretrained(OUT)` rebuilds the network.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

import ran
from datamodules import ImageDataModule, ImageNetDataModule
from datamodules.imagenet import EVAL_CROP_RATIO
from ran.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE, check_state
from ran.nn.registry import create_model, load_pretrained
from ran.train.module import NETWORK_KEYS, network_of
from ran.train.rundir import RunDir, UnreadableResults, checkpoint_problem

__all__ = ["ExportError", "export", "export_main"]

# Datamodule settings that say where and how fast data was read, not what the network learnt from.
_LOCAL_DATA_KEYS = ("data_dir", "download", "check_md5", "num_workers", "pin_memory", "persistent_workers")
_TRAINER_KEYS = ("max_steps", "precision", "accelerator", "devices", "num_nodes", "accumulate_grad_batches")


class ExportError(ValueError):
    """A checkpoint or output folder `ran export` cannot use; nothing has been written."""


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's entries (`net.`) of an ImageClassifier state dict, without torch.compile's
    `_orig_mod.`."""
    return {k[len("net.") :].replace("_orig_mod.", ""): v for k, v in state.items() if k.startswith("net.")}


def _datamodule_class(path: str) -> type[ImageDataModule]:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
        raise ExportError(f"{path!r} is not a datamodule class (e.g. datamodules.CIFAR10DataModule)")
    return cls


def _test_metrics(run: RunDir | None, ckpt: Path) -> dict[str, float]:
    """The test figures results.json holds for `ckpt` ({} when its test was of another checkpoint or none)."""
    if run is None:
        return {}
    try:
        test = run.read_results().get("test", {})
    except UnreadableResults as err:
        raise ExportError(f"{err}: fix or remove it to export without test figures") from None
    tested = Path(test.get("ckpt_path") or "")
    # Run directories move (another machine, another root): the checkpoint counts by its place in the run.
    if tested.parts[-2:] != ckpt.parts[-2:]:
        return {}
    return {k: float(v) for k, v in test.get("metrics", {}).items()}


def facts(
    ckpt: Path, saved: dict[str, Any], model: torch.nn.Module, datamodule: str | None
) -> dict[str, Any]:
    """The facts (`ran.nn.pretrained.FACT_KEYS`) of the weights `model` of checkpoint `ckpt` (loaded as
    `saved`); `datamodule`: the datamodule class where the checkpoint and its run do not name it."""
    ckpt = ckpt.resolve()
    run = RunDir(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None
    config = run.read_config() if run is not None else {}
    data_hp = dict(saved.get("datamodule_hyper_parameters") or {})
    class_path = datamodule or data_hp.get("_class_path") or (config.get("data") or {}).get("class_path")
    if not class_path:
        raise ExportError(
            f"{ckpt} names no datamodule (and no config.yaml beside it does): pass --datamodule, e.g. "
            "datamodules.CIFAR10DataModule, for the mean/std the network was trained with"
        )
    data = _datamodule_class(class_path)
    hp = saved["hyper_parameters"]
    if data.NUM_CLASSES is not None and data.NUM_CLASSES != hp["num_classes"]:
        raise ExportError(f"{class_path} has {data.NUM_CLASSES} classes, the checkpoint {hp['num_classes']}")
    size = data_hp.get("eval_size") or model.default_input_size
    out: dict[str, Any] = {
        "input_size": [3, size, size],
        "mean": list(data.MEAN),
        "std": list(data.STD),
        "dataset": data.DATASET_NAME,
    }
    if issubclass(data, ImageNetDataModule):
        out["crop_pct"] = EVAL_CROP_RATIO
    metrics = _test_metrics(run, ckpt)
    if metrics:
        out["metrics"] = metrics
    try:
        fit = run.read_results().get("fit", {}) if run is not None else {}
    except UnreadableResults:
        fit = {}
    best = fit.get("best_model_path")
    out["provenance"] = {
        "run": run.name if run is not None else None,
        "checkpoint": "/".join(ckpt.parts[-2:]) if run is not None else ckpt.name,
        "global_step": saved.get("global_step"),
        "epoch": saved.get("epoch"),
        "fit_status": fit.get("status"),
        "best_val_acc1": fit.get("best_model_score") if best and Path(best).name == ckpt.name else None,
        "seed": config.get("seed_everything"),
        "recipe": {k: v for k, v in hp.items() if k not in NETWORK_KEYS and not k.startswith("_")},
        "data": {k: v for k, v in data_hp.items() if not k.startswith("_") and k not in _LOCAL_DATA_KEYS},
        "trainer": {k: v for k, v in (config.get("trainer") or {}).items() if k in _TRAINER_KEYS},
        "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {
            "ran": ran.__version__,
            "torch": torch.__version__.split("+")[0],
            "pytorch_lightning": saved.get("pytorch-lightning_version") or pl.__version__,
        },
    }
    return out


def _network(hp: dict[str, Any]) -> dict[str, Any]:
    """create_model's arguments for the network of ImageClassifier hyperparameters `hp`, as it builds it (a
    run started from trained weights, `model_kwargs.pretrained`, is built from them again, then loaded with
    the checkpoint's)."""
    net = network_of(hp)
    switches = {k: net[k] for k in ("attention", "learning", "mask")}
    return {"name": net["arch"], "num_classes": net["num_classes"], **switches, **net["model_kwargs"]}


def export(ckpt: Path, out: Path, datamodule: str | None = None) -> torch.nn.Module:
    """Write the trained weights of checkpoint `ckpt` into the new folder `out` (see the module docstring);
    returns the network as reloaded from `out`. ExportError (nothing written) on a bad checkpoint or `out`."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ExportError(f"--ckpt-path {ckpt}: {problem}; give a checkpoint file of a run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder: choose a new folder")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved.get("hyper_parameters"), dict) or "arch" not in saved["hyper_parameters"]:
        raise ExportError(f"{ckpt} is not a checkpoint of `ran fit` (no hyper_parameters.arch)")
    model = create_model(**_network(saved["hyper_parameters"]))
    state = _strip(saved["state_dict"])
    check_state(model, state, str(ckpt))
    model.load_state_dict(state)
    model.pretrained_cfg = facts(ckpt, saved, model, datamodule)
    model.eval()

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        reloaded = load_pretrained(tmp)
        x = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if not torch.equal(reloaded(x), model(x)):
                raise ExportError(f"the weights written to {tmp} give other logits than {ckpt}")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reloaded.pretrained_cfg["source"] = str(out)
    return reloaded


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ran export",
        description="A checkpoint's network as trained weights: model.safetensors and config.json in a new "
        "folder (load it with ran.load_pretrained(OUT)).",
    )
    parser.add_argument("--ckpt-path", required=True, type=Path, help="a checkpoint of `ran fit`")
    parser.add_argument("--out", required=True, type=Path, help="the new folder of the weights")
    parser.add_argument(
        "--datamodule",
        help="the datamodule class the network was trained with, where the checkpoint does not say "
        "(e.g. datamodules.CIFAR10DataModule)",
    )
    args = parser.parse_args(argv)
    try:
        model = export(args.ckpt_path, args.out, args.datamodule)
    except ValueError as err:  # ExportError, PretrainedWeightsError, a network this ran does not know
        print(f"ran export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the folder cannot be written (permissions, a full disk)
        print(f"ran export: error: cannot write {args.out}: {err}", file=sys.stderr)
        return 1
    acc1 = model.pretrained_cfg.get("metrics", {}).get("test/acc1")
    figure = f"test top-1 {100 * acc1:.2f}%" if acc1 is not None else "no test figures in results.json"
    size = (args.out / WEIGHTS_FILE).stat().st_size / 1e6
    params = sum(p.numel() for p in model.parameters())
    print(
        f"exported {model.arch} ({params / 1e6:.2f}M parameters, {figure}) to {args.out}: "
        f"{WEIGHTS_FILE} ({size:.1f} MB), {CONFIG_FILE}, README.md"
    )
    if acc1 is None:
        print(
            "ran export: warning: no test figures for this checkpoint; run `ran test -c CONFIG --ckpt_path "
            "best` (or the checkpoint's path) first, then export again",
            file=sys.stderr,
        )
    return 0
