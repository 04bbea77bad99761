"""`python -m experiments responses|masks`: the analyses from the command line.

    python -m experiments responses --model attention164_cifar --compare learning=arl,nal
    python -m experiments responses --run-dir runs/a164-arl --run-dir runs/a164-nal
    python -m experiments responses --ckpt ARL=runs/a164_arl/checkpoints/best.ckpt \\
        --ckpt NAL=runs/a164_nal/checkpoints/best.ckpt --data-dir data --dataset cifar10
    python -m experiments masks --run-dir runs/cifar10-attention92 --num-images 8
    python -m experiments masks --ckpt runs/a92/checkpoints/best.ckpt --data-dir data

With --run-dir the network is the run's checkpoints/best.ckpt, the images come from the dataset of its
config.yaml, the files go to `<run>/analysis/` and the pictures and tables are attached to the run's W&B run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from datamodules import CorruptImageError, DatasetLayoutError
from experiments.analysis.images import (
    DATAMODULES,
    DATASETS,
    AnalysisImages,
    load_analysis_images,
)
from experiments.analysis.masks import save_mask_pictures
from experiments.analysis.networks import (
    BN_STATS,
    CHECKPOINT_FIX,
    NetworkSpec,
    RunDirectory,
    infer_dataset,
    load_checkpoint_network,
    resolve_network,
)
from experiments.analysis.responses import compare_responses
from experiments.analysis.tracking import attached_wandb_run
from ran.nn.registry import list_models

__all__ = ["AnalysisError", "main"]


class AnalysisError(Exception):
    """A user error on the command line, reported without a traceback."""


def _parse_value(text: str) -> Any:
    """A Python literal (number, tuple, list, bool, None) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise AnalysisError(f"{what} must look like KEY=VALUE, got {text!r}")
    return key, value


def _checkpoint_entry(text: str) -> tuple[str, Path]:
    """`LABEL=PATH` or `PATH` (then the label is '<run>/<stem>' for runs/<run>/checkpoints/<stem>.ckpt, else
    the file's stem)."""
    label, sep, path = text.partition("=")
    if not sep or "/" in label or os.sep in label:
        label, path = "", text
    path = Path(path).expanduser()
    if not label:
        label = f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem
    if not path.is_file():
        directory = " (it is a directory)" if path.is_dir() else ""
        raise AnalysisError(f"checkpoint not found: {path}{directory}. {CHECKPOINT_FIX}")
    return label, path


def _model_specs(args: argparse.Namespace) -> OrderedDict[str, NetworkSpec]:
    """Networks at initialisation from --model, --model-arg and --compare."""
    if args.model not in list_models():
        raise AnalysisError(f"unknown model {args.model!r}; known models: {', '.join(list_models())}")
    kwargs = dict(_split_assignment(a, "--model-arg") for a in args.model_arg)
    kwargs = {key: _parse_value(value) for key, value in kwargs.items()}
    if not getattr(args, "compare", None):
        return OrderedDict([(args.model, (args.model, kwargs))])
    key, values = _split_assignment(args.compare, "--compare")
    return OrderedDict(
        (f"{key}={value}", (args.model, {**kwargs, key: _parse_value(value)})) for value in values.split(",")
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="The paper's analyses: stage responses, NAL vs ARL (Sec. 4.1), and soft-mask pictures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, num_images: int, out: str) -> None:
        p.add_argument(
            "--data-dir",
            help="folder containing cifar-10-batches-py/, cifar-100-python/ or train/ and val/ (imagenet); "
            "default: the --run-dir config's, else random images",
        )
        p.add_argument(
            "--dataset",
            choices=DATASETS,
            help="default: the --run-dir config's, else from the network (ImageNet stem -> imagenet, "
            "100 classes -> cifar100, else cifar10)",
        )
        p.add_argument("--num-images", type=int, default=num_images, help=f"default {num_images}")
        p.add_argument("--seed", type=int, default=0, help="seeds initialisation and random images")
        p.add_argument(
            "--model-arg",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="with --model: a model argument, e.g. stage_widths=(16,32,64) (repeatable)",
        )
        p.add_argument("--out", type=Path, help=f"output folder (default: <run dir>/analysis/ or {out})")

    responses = sub.add_parser("responses", help="mean absolute response of each stage's output (Sec. 4.1)")
    responses.add_argument(
        "--ckpt",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a checkpoint, labelled (repeatable)",
    )
    responses.add_argument(
        "--run-dir",
        action="append",
        default=[],
        type=Path,
        help="a run directory: its best checkpoint, labelled by the run's name; the results are attached to "
        "its W&B run (repeatable)",
    )
    responses.add_argument("--model", help="a registered model at initialisation, e.g. attention164_cifar")
    responses.add_argument(
        "--compare", metavar="KEY=V1,V2", help="with --model: one network per value, e.g. learning=arl,nal"
    )
    responses.add_argument(
        "--bn-stats",
        choices=("auto", *BN_STATS),
        default="auto",
        help="BatchNorm statistics: running (eval mode) or batch; auto: running with checkpoints, batch "
        "when every network is at initialisation",
    )
    responses.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    common(responses, 64, "runs/analysis/responses")

    masks = sub.add_parser("masks", help="a grid of every Attention Module's soft mask over input images")
    source = masks.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a run directory (best checkpoint, config, W&B run)")
    source.add_argument("--ckpt", help="or a checkpoint")
    source.add_argument("--model", help="or a registered model at initialisation")
    common(masks, 8, "runs/analysis/masks")
    return parser


def _run_directories(args: argparse.Namespace) -> list[RunDirectory]:
    """The --run-dir runs; their config gives --dataset and --data-dir where those are not given."""
    given = args.run_dir if isinstance(args.run_dir, list) else [args.run_dir] if args.run_dir else []
    runs = [RunDirectory(path) for path in given]
    if runs:
        datamodule, data_dir = runs[0].data
        by_class = {module.__name__: name for name, module in DATAMODULES.items()}
        args.dataset = args.dataset or by_class.get(datamodule)
        args.data_dir = args.data_dir or data_dir
    return runs


def _check_data_dir(args: argparse.Namespace) -> None:
    """Fail before any network is built or loaded if --data-dir does not hold the dataset (the datamodule's
    own rule and message, as `ran fit` applies them) or, with no --dataset yet, names no folder."""
    if args.data_dir is None:
        return
    if args.dataset is not None:
        try:
            DATAMODULES[args.dataset].find_dataset(args.data_dir)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise AnalysisError(str(err)) from None
    elif not Path(args.data_dir).expanduser().is_dir():
        raise AnalysisError(
            f"--data-dir {args.data_dir} is not a folder. Fix: pass the folder of the dataset"
        )


def _images_for(net: nn.Module, args: argparse.Namespace) -> AnalysisImages:
    """--dataset (default: the network's) images: CIFAR's 32x32, else the network's input size."""
    dataset = args.dataset or infer_dataset(net)
    size = max(getattr(net, "default_input_size", 32), getattr(net, "min_input_size", 1))
    if args.data_dir is not None and dataset != "imagenet":
        size = 32
    return load_analysis_images(dataset, args.data_dir, args.num_images, image_size=size, seed=args.seed)


def _output(args: argparse.Namespace, runs: list[RunDirectory]) -> Path:
    return args.out or (runs[0].path / "analysis" if runs else Path("runs/analysis")) / args.command


def _responses(args: argparse.Namespace) -> int:
    specs: OrderedDict[str, NetworkSpec] = OrderedDict()
    runs = _run_directories(args)
    entries = [_checkpoint_entry(text) for text in args.ckpt] + [(run.name, run.checkpoint) for run in runs]
    for label, path in entries:
        if label in specs:
            raise AnalysisError(f"two checkpoints are labelled {label!r}: give each one as LABEL=PATH")
        specs[label] = path
    if args.compare and not args.model:
        raise AnalysisError("--compare needs --model")
    if args.model:
        models = _model_specs(args)
        if set(models) & set(specs):
            raise AnalysisError(f"labels used twice: {', '.join(sorted(set(models) & set(specs)))}")
        specs.update(models)
    if not specs:
        raise AnalysisError(
            "nothing to measure: give --ckpt LABEL=PATH, --run-dir DIR (both repeatable) and/or --model NAME"
        )
    _check_data_dir(args)
    first_label = next(iter(specs))
    specs[first_label] = resolve_network(specs[first_label], args.seed)  # loaded once, to choose the images
    data = _images_for(specs[first_label], args)
    bn_stats = args.bn_stats if args.bn_stats != "auto" else ("running" if entries else "batch")
    table = compare_responses(
        specs, data.normalised(), seed=args.seed, bn_stats=bn_stats, batch_size=args.batch_size
    )
    table.notes.insert(0, f"images: {data.source}")
    if args.model:
        table.notes.append(
            f"{args.model} at initialisation (seed {args.seed}; every variant gets the same weights)"
        )
        if bn_stats == "running":
            table.notes.append(
                "an untrained network's running statistics are 0 and 1: BatchNorm is the identity and "
                "responses grow with depth (--bn-stats batch normalises as in training)"
            )
    out = _output(args, runs)
    paths = table.save(out)
    for run in runs:
        with attached_wandb_run(run) as wandb_run:
            if wandb_run is not None:
                table.save(out)
                print(f"attached to the W&B run {wandb_run.id} of {run.path}")
    print("\n".join(table.notes))
    print()
    print(table.to_markdown())
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    return 0


def _masks(args: argparse.Namespace) -> int:
    runs = _run_directories(args)
    if runs or args.ckpt:
        path = runs[0].checkpoint if runs else _checkpoint_entry(args.ckpt)[1]
        _check_data_dir(args)
        net = load_checkpoint_network(path)
        title = f"{runs[0].name if runs else path}: soft masks"
    else:
        (spec,) = _model_specs(args).values()
        _check_data_dir(args)
        net = resolve_network(spec, args.seed)
        title = f"{args.model} at initialisation (seed {args.seed}): soft masks"
    data = _images_for(net, args)
    out = _output(args, runs)
    with attached_wandb_run(runs[0]) if runs else contextlib.nullcontext() as wandb_run:
        path = save_mask_pictures(net, data.images, data.mean, data.std, out, args.num_images, title)
        if path is None:
            raise AnalysisError(
                "this network has no soft masks (no Attention Modules, or mask='none'): nothing to draw"
            )
        if wandb_run is not None:
            print(f"attached to the W&B run {wandb_run.id} of {runs[0].path}")
    print(f"images: {data.source}")
    print(f"soft masks of every Attention Module (rows: images, columns: modules): {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`responses ...` or `masks ...` (see the module docstring); returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _responses(args) if args.command == "responses" else _masks(args)
    except (AnalysisError, FileNotFoundError, ValueError, DatasetLayoutError, CorruptImageError) as err:
        print(f"python -m experiments {args.command}: error: {err}", file=sys.stderr)
        return 2
