"""`python -m ran.bench`: how close to the machine's arithmetic limit a model trains and infers.

In one process it measures: forward multiply-adds per image (torch's FlopCounterMode); training images/s
through the real LightningModule and Trainer (forward, backward and the module's own SGD step) and
inference images/s, each the median of several timed blocks after warm-up; peak memory; the machine's fp32
and bf16 matrix-multiply throughput (a large GEMM in the same process, the best of torch.mm and, on a CPU,
oneDNN's); and model-FLOP utilisation

    MFU = 3 x forward FLOPs x training images/s / GEMM FLOP/s of the matching precision.

`--data` measures the data pipeline alone, in images/s, through the datamodule's training batches (CIFAR:
in-memory uint8 batches plus on-device augmentation; ImageNet: the JPEG tree, or with `--format litdata` its
converted shards, through worker processes; `--decode cuda` decodes on the GPU).
The measurements themselves live in `ran.tools.measure`.

Human-readable lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, get_args

import torch

from datamodules import CIFAR10DataModule, DataSettingError, ImageNetDataModule
from datamodules.decoding import check_decode_device
from ran.nn.registry import create_model, list_models
from ran.tools.measure import (
    PRECISIONS,
    count_macs,
    data_throughput,
    epoch_time,
    gemm_flops,
    inference_times,
    peak_memory_mb,
    pick_device,
    profile_training,
    timing_classifier,
    train_step_times,
)
from ran.train.allocator import keep_freed_memory
from ran.train.graphed_step import WARMUP_STEPS
from ran.train.recipe import CompileMode


def step_settings(
    args: argparse.Namespace, device: torch.device, input_size: int, num_classes: int
) -> dict[str, Any]:
    """The arguments of `ran.tools.measure.train_step_times` that the command line sets."""
    return dict(
        batch_size=args.batch_size,
        input_size=input_size,
        num_classes=num_classes,
        device=device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
        model_kwargs=args.model_kwargs,
        # --cuda-graph: the capture after the warm-up steps is not timed either
        warmup=max(args.warmup, WARMUP_STEPS + 1) if args.cuda_graph else args.warmup,
        blocks=args.blocks,
        steps_per_block=args.steps_per_block,
    )


def profile_table(rows: list[dict[str, Any]], top: int, device: torch.device) -> str:
    """The profiled operators as a table, one line each."""
    lines = [
        f"top {top} operators by self {'device' if device.type == 'cuda' else 'CPU'} time, "
        "per training step:",
        f"{'operator':48s} {'ms':>9s} {'share':>7s} {'calls':>7s}",
    ]
    lines += [
        f"{r['op'][:48]:48s} {r['self_ms_per_step']:9.2f} {100 * r['share']:6.1f}% {r['calls_per_step']:7.0f}"
        for r in rows
    ]
    return "\n".join(lines)


def data_module(args: argparse.Namespace) -> CIFAR10DataModule | ImageNetDataModule:
    """The datamodule whose training pipeline `--data` times."""
    if not args.data_dir:
        folder = (
            "the folder holding cifar-10-batches-py"
            if args.data == "cifar10"
            else "a folder with train/ and val/"
        )
        raise SystemExit(f"ran.bench: --data {args.data} needs --data-dir ({folder})")
    if args.data == "cifar10":
        if (args.format, args.decode) != ("folder", "cpu"):
            raise SystemExit("ran.bench: --format and --decode apply to --data imagenet")
        return CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=0)
    try:
        check_decode_device(args.decode)
    except DataSettingError as err:
        raise SystemExit(f"ran.bench: {err}") from None
    return ImageNetDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.workers,
        format=args.format,
        decode=args.decode,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ran.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="attention92_cifar",
        choices=list_models(),
        metavar="NAME",
        help="a registered model (default attention92_cifar)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="32", choices=PRECISIONS)
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=get_args(CompileMode),
        metavar="MODE",
        help="torch.compile the network, in MODE (default: default; reduce-overhead and max-autotune also "
        "replay CUDA graphs)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="the whole training step (forward, backward, SGD) as one CUDA graph (model.cuda_graph)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--input-size", type=int, help="default: the model's own (32 CIFAR, 224 ImageNet)")
    p.add_argument("--num-classes", type=int, help="default: the model's own")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help='other model arguments, e.g. \'{"stage_widths": [16, 32, 64], "mask": "cbam"}\'',
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks; the median is reported")
    p.add_argument("--steps-per-block", type=int, default=3)
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data", choices=("cifar10", "imagenet"), help="measure the data pipeline alone")
    p.add_argument(
        "--data-dir",
        help="with --data or --epoch: the dataset's folder (CIFAR: the folder holding cifar-10-batches-py)",
    )
    p.add_argument("--data-images", type=int, default=20_000, help="with --data: images to time")
    p.add_argument("--workers", type=int, default=2, help="with --data imagenet: loader worker processes")
    p.add_argument(
        "--format",
        default="folder",
        choices=("folder", "litdata"),
        help="with --data imagenet: the JPEG tree, or its shards (litdata: --data-dir SHARDS)",
    )
    p.add_argument(
        "--decode",
        default="cpu",
        choices=("cpu", "cuda"),
        help="with --data imagenet: where JPEGs are decoded",
    )
    p.add_argument(
        "--epoch",
        action="store_true",
        help="also train one whole epoch of the real CIFAR-10 in --data-dir through the datamodule and "
        "compare it with the pure network step time",
    )
    p.add_argument(
        "--val-size", type=int, default=5000, help="with --epoch: images held out (the recipe's 5,000)"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile three training steps with torch.profiler and print the top N operators",
    )
    p.add_argument(
        "--packed",
        type=int,
        default=1,
        metavar="N",
        help="train N copies at once on the device, in N processes (as `python -m experiments run --parallel "
        "N` packs runs onto one GPU), and report their total images/s; on a CPU each gets cores / N threads",
    )
    p.add_argument(
        "--train-only", action="store_true", help="measure training alone (no GEMM, inference or MFU)"
    )
    return p.parse_args(argv)


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def packed(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """`args.packed` copies of this command's training measurement (`--train-only`), started together in
    their own processes; each copy's images/s is its median block while the others run beside it."""
    child = [*without_option(argv, "--packed"), "--train-only"]
    if args.threads is None and pick_device(args.device).type == "cpu":
        child += ["--threads", str(max(1, (os.cpu_count() or 1) // args.packed))]
    command = [sys.executable, "-m", "ran.bench", *child]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(args.packed)
    ]
    results = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"ran.bench --packed: copy {i} failed (exit {proc.returncode}): {last}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    each = [r["train_img_s"] for r in results]
    result = {
        **{k: v for k, v in results[0].items() if not k.startswith("train_")},
        "packed": args.packed,
        "train_img_s_each": [round(v, 1) for v in each],
        "train_img_s_total": sum(each),
    }
    print(
        f"{args.packed} copies at once: {sum(each):.1f} images/s in total "
        f"({', '.join(f'{v:.1f}' for v in each)} each)"
    )
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.packed < 1:
        raise SystemExit(f"ran.bench: --packed must be at least 1, got {args.packed}")
    if args.packed > 1:
        if args.data:
            raise SystemExit("ran.bench: --packed measures training: leave out --data")
        return packed(args, argv)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(
            f"ran.bench: --cuda-graph captures CUDA graphs, which {device} has not: use --device cuda"
        )
    result: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
    }
    if args.data:
        result["data"] = args.data
        result.update(data_throughput(data_module(args), device, args.data_images))
        result["data_workers"] = args.workers if args.data == "imagenet" else 0
        what = args.data
        if args.data == "imagenet":
            result.update(data_format=args.format, data_decode=args.decode)
            what += f", {args.format}, {args.decode} decode"
        print(
            f"data pipeline ({what}): {result['data_img_s']:.0f} images/s "
            f"over {result['data_images']} images at batch {args.batch_size}"
        )
        print(json.dumps(result))
        return result

    net = create_model(args.model, **{"num_classes": args.num_classes, **args.model_kwargs})
    size = args.input_size or net.default_input_size
    macs = count_macs(net, size)
    result.update(
        model=args.model,
        model_kwargs=args.model_kwargs,
        input_size=size,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
        fwd_macs=macs,
        fwd_gflops=2 * macs / 1e9,
    )
    print(f"{args.model}: {macs / 1e9:.3f} G multiply-adds per {size}x{size} image forward")

    gemm = {}
    for key, dtype in () if args.train_only else (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        by_library = gemm_flops(dtype, device, args.gemm_size)
        gemm[key] = by_library.pop("best")
        result[f"gemm_{key}_gflops"] = gemm[key] / 1e9
        result.update({f"gemm_{key}_{lib}_gflops": v / 1e9 for lib, v in by_library.items()})
        print(
            f"GEMM {args.gemm_size}^3 {key}: {gemm[key] / 1e9:.1f} GFLOP/s ("
            + ", ".join(f"{lib} {v / 1e9:.1f}" for lib, v in by_library.items())
            + ")"
        )

    settings = step_settings(args, device, size, net.num_classes)
    blocks, module = train_step_times(args.model, **settings)
    train_img_s = args.batch_size / statistics.median(blocks)
    peak = peak_memory_mb(device)
    key = "bf16" if args.precision == "bf16-mixed" else "fp32" if args.precision == "32" else "fp16"
    ref = gemm.get(key)
    result.update(
        train_img_s=train_img_s,
        train_step_ms=1e3 * statistics.median(blocks),
        train_step_ms_blocks=[round(1e3 * b, 2) for b in blocks],
        peak_memory_mb=peak,
    )
    line = f"train: {train_img_s:.1f} images/s ({1e3 * statistics.median(blocks):.1f} ms/step)"
    if ref:
        mfu = 3 * 2 * macs * train_img_s / ref
        result[f"mfu_train_{key}"] = mfu
        line += f", MFU {100 * mfu:.1f}% of {key} GEMM"
    print(line)
    if args.train_only:
        print(json.dumps(result))
        return result

    net = module.net  # the trained module's network, in the module's memory format
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    times = inference_times(
        net.to(device),
        x,
        args.precision,
        warmup=args.warmup,
        blocks=args.blocks,
        steps_per_block=args.steps_per_block,
    )
    result["infer_img_s"] = args.batch_size / statistics.median(times)
    if ref:
        result[f"mfu_infer_{key}"] = 2 * macs * result["infer_img_s"] / ref
    print(
        f"inference: {result['infer_img_s']:.1f} images/s; peak memory {peak:.0f} MB "
        f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})"
    )
    if args.profile:
        rows, counts = profile_training(args.model, top=args.profile, **settings)
        result.update({name: round(value, 1) for name, value in counts.items()})
        print(", ".join(f"{name.replace('_', ' ')}: {value:.0f}" for name, value in counts.items()))
        result["profile"] = [
            {**r, "self_ms_per_step": round(r["self_ms_per_step"], 3), "share": round(r["share"], 4)}
            for r in rows
        ]
        print(profile_table(rows, args.profile, device))
    if args.epoch:
        if not args.data_dir:
            raise SystemExit("ran.bench: --epoch needs --data-dir (the folder holding cifar-10-batches-py)")
        dm = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=args.val_size)
        module = timing_classifier(
            args.model,
            dm.num_classes,
            model_kwargs=args.model_kwargs,
            channels_last=args.channels_last,
            compile=args.compile,
            cuda_graph=args.cuda_graph,
        )
        result.update(epoch_time(module, dm, device, args.precision))
        # The pure step is timed again after the epoch and the faster of the two is the reference: a process's
        # step time drifts by up to 10% between phases, and the faster one gives the stricter ratio.
        again, _ = train_step_times(args.model, **settings)
        step_s = min(statistics.median(blocks), statistics.median(again))
        result["epoch_pure_step_ms"] = 1e3 * step_s
        result["epoch_over_pure_steps"] = result["epoch_s"] / (result["epoch_steps"] * step_s)
        print(
            f"epoch: {result['epoch_images']} images in {result['epoch_s']:.1f} s "
            f"({result['epoch_img_s']:.1f} "
            f"images/s), {result['epoch_over_pure_steps']:.3f}x the pure network step time"
        )
    print(json.dumps(result))
    return result
