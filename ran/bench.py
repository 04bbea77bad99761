"""`python -m ran.bench`: how close to the machine's arithmetic limit a model trains and infers.

In one process it measures: forward multiply-adds per image (torch's FlopCounterMode); training images/s
through the real LightningModule and Trainer (forward, backward and the module's own SGD step) and
inference images/s, each the median of several timed blocks after warm-up; peak memory; the machine's fp32
and bf16 matrix-multiply throughput (a large GEMM in the same process, the best of torch.mm and, on a CPU,
oneDNN's); and model-FLOP utilisation

    MFU = 3 x forward FLOPs x training images/s / GEMM FLOP/s of the matching precision.

`--data` measures the data pipeline alone (CIFAR: in-memory uint8 batches plus on-device augmentation;
ImageNet: the JPEG tree through worker processes), in images/s.

Human-readable lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from ran.allocator import keep_freed_memory
from ran.registry import create_model, list_models
from ran.summary import count_macs

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_blocks(
    step: Callable[[], Any], *, warmup: int, blocks: int, steps_per_block: int, device: torch.device
) -> list[float]:
    """Seconds per step of each timed block, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps_per_block):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps_per_block)
    return times


def gemm_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> dict[str, float]:
    """FLOP/s of an n x n x n matrix multiply in `dtype` (median of `reps` timed products), by each library
    torch has for it, and the best of them.

    `mm` is torch.mm (MKL or OpenBLAS on a CPU, cuBLAS on a GPU). On a CPU the convolutions run in oneDNN,
    whose GEMM can be much faster than the BLAS's (on AMD processors MKL's fp32 GEMM reaches about half of
    oneDNN's), so the same product is also timed as a 1x1 convolution over an n-channel (n/32 x 32)
    channels_last image: oneDNN's GEMM. Model-FLOP utilisation is taken against the best, the machine's
    real limit.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = timed_blocks(lambda: torch.mm(a, b), warmup=3, blocks=reps, steps_per_block=1, device=device)
    result = {"mm": 2 * n**3 / statistics.median(times)}
    if device.type == "cpu":
        conv = torch.nn.Conv2d(n, n, 1, bias=False).to(
            device=device, dtype=dtype, memory_format=torch.channels_last
        )
        x = torch.randn(1, n, max(1, n // 32), 32, device=device, dtype=dtype).to(
            memory_format=torch.channels_last
        )
        with torch.no_grad():
            times = timed_blocks(lambda: conv(x), warmup=3, blocks=reps, steps_per_block=1, device=device)
        result["onednn"] = 2 * n * n * x.shape[2] * x.shape[3] / statistics.median(times)
    result["best"] = max(result.values())
    return result


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory allocated by torch (CUDA), or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: torch.device, precision: str):
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def measure_inference(
    net: torch.nn.Module, x: torch.Tensor, precision: str, *, warmup: int, blocks: int, steps_per_block: int
) -> list[float]:
    net.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(x.device, precision):
            net(x)

    times = timed_blocks(step, warmup=warmup, blocks=blocks, steps_per_block=steps_per_block, device=x.device)
    net.train()
    return times


class _StepTimer:
    """A Lightning callback that records the wall time of every training step, optimizer step included."""

    def __new__(cls, device: torch.device):
        import pytorch_lightning as pl

        class StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                synchronize(device)
                self.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module) -> None:
                synchronize(device)
                self.starts.append(time.perf_counter())

        return StepTimer()


def _repeat_batch(
    batch: tuple[torch.Tensor, torch.Tensor], n: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(n):
        yield batch


def timed_fit(
    module: Any,
    device: torch.device,
    precision: str,
    limits: dict[str, int],
    callbacks: tuple = (),
    **fit_kwargs: Any,
):
    """Fit `module` on one device with nothing but a step timer (no logger, checkpoint, progress bar or
    validation); returns the timer, whose `starts` hold every step's start and the end of training."""
    import pytorch_lightning as pl

    timer = _StepTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, *callbacks],
        **limits,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, **fit_kwargs)
    return timer


def train_step_times(
    arch: str,
    *,
    batch_size: int,
    input_size: int,
    num_classes: int,
    device: torch.device,
    precision: str = "32",
    channels_last: bool = False,
    compile: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    warmup: int = 3,
    blocks: int = 5,
    steps_per_block: int = 3,
    callbacks: tuple = (),
) -> tuple[list[float], Any]:
    """Seconds per training step, per timed block, of the real LightningModule under a real Trainer.

    The batch is made once on the device and fed again every step, so this is the network's step time
    with Lightning's own overhead, and no data loading. Returns the block times and the trained module.
    """
    from ran.module import ImageClassifier

    options = {"channels_last": channels_last, "compile": compile}
    module = ImageClassifier(
        arch=arch,
        num_classes=num_classes,
        milestones=(10**9,),
        model_kwargs=model_kwargs,
        **{k: v for k, v in options.items() if v},
    )
    steps = warmup + blocks * steps_per_block
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    loader = torch.utils.data.DataLoader(list(_repeat_batch((x, y), steps)), batch_size=None)
    timer = timed_fit(module, device, precision, {"max_steps": steps}, callbacks, train_dataloaders=loader)
    step_times = [b - a for a, b in zip(timer.starts, timer.starts[1:])][warmup:]
    block_times = [
        sum(step_times[i : i + steps_per_block]) / steps_per_block
        for i in range(0, len(step_times) - steps_per_block + 1, steps_per_block)
    ]
    return block_times, module


def profile_training(
    args: argparse.Namespace, device: torch.device, input_size: int, num_classes: int, steps: int = 3
) -> tuple[str, list[dict[str, Any]]]:
    """torch.profiler over `steps` training steps of the real module (after warm-up): the table of the top
    `args.profile` operators by self time, and the same rows as dicts (op, self ms per step, share)."""
    import pytorch_lightning as pl
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    prof = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
        schedule=schedule(wait=args.warmup, warmup=1, active=steps),
    )

    class ProfilerStep(pl.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            prof.step()

    with prof:
        bench_steps(
            args,
            device,
            input_size,
            num_classes,
            warmup=args.warmup + 1,
            blocks=1,
            steps_per_block=steps,
            callbacks=(ProfilerStep(),),
        )
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [
        {
            "op": e.key,
            "self_ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[: args.profile]
    ]
    lines = [
        f"top {args.profile} operators by self {'device' if cuda else 'CPU'} time, per training step:",
        f"{'operator':48s} {'ms':>9s} {'share':>7s} {'calls':>7s}",
    ]
    lines += [
        f"{r['op'][:48]:48s} {r['self_ms_per_step']:9.2f} {100 * r['share']:6.1f}% {r['calls_per_step']:7.0f}"
        for r in rows
    ]
    return "\n".join(lines), rows


def bench_steps(
    args: argparse.Namespace, device: torch.device, input_size: int, num_classes: int, **override: Any
) -> tuple[list[float], Any]:
    """`train_step_times` with the benchmark's command-line settings (`override` replaces any of them)."""
    settings = dict(
        batch_size=args.batch_size,
        input_size=input_size,
        num_classes=num_classes,
        device=device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        model_kwargs=args.model_kwargs,
        warmup=args.warmup,
        blocks=args.blocks,
        steps_per_block=args.steps_per_block,
    )
    return train_step_times(args.model, **{**settings, **override})


def measure_epoch(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One training epoch of the real CIFAR-10 (`--data-dir`) through the CIFAR datamodule and the Trainer,
    timed from the first step's start to the last step's end (the caller compares it with the pure network
    step time, a batch already on the device, times the number of steps)."""
    from datamodules import CIFAR10DataModule
    from ran.module import ImageClassifier

    dm = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=args.val_size)
    dm.setup("fit")
    steps = len(dm.train_dataloader())
    module = ImageClassifier(
        arch=args.model,
        num_classes=10,
        milestones=(10**9,),
        model_kwargs=args.model_kwargs,
        **{k: v for k, v in (("channels_last", args.channels_last), ("compile", args.compile)) if v},
    )
    timer = timed_fit(module, device, args.precision, {"max_epochs": 1}, datamodule=dm)
    epoch_s = timer.starts[-1] - timer.starts[0]
    images = len(dm.train_dataset)
    return {"epoch_s": epoch_s, "epoch_steps": steps, "epoch_images": images, "epoch_img_s": images / epoch_s}


def measure_data(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images/s of the data pipeline alone: loading plus the augmentation a training step gets."""
    import pytorch_lightning as pl

    from datamodules import CIFAR10DataModule, ImageNetDataModule, InMemoryImageDataset

    if args.data == "cifar10":
        if args.data_dir:
            dm = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=0)
            dm.setup("fit")
        else:  # synthetic: 50,000 random uint8 images in the same in-memory layout
            dm = CIFAR10DataModule(batch_size=args.batch_size, val_size=0)
            dm.train_dataset = InMemoryImageDataset(
                torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (50_000,))
            )
    else:
        if not args.data_dir:
            raise SystemExit("ran.bench: --data imagenet needs --data-dir (a folder with train/ and val/)")
        dm = ImageNetDataModule(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=args.workers)
        dm.setup("fit")
    trainer = pl.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False)
    dm.trainer = trainer
    trainer.training = True  # on_after_batch_transfer augments training batches
    loader = dm.train_dataloader()
    images, start, first = 0, None, True
    for batch in loader:
        batch = dm.on_after_batch_transfer(tuple(t.to(device, non_blocking=True) for t in batch), 0)
        synchronize(device)
        if first:  # the first batch pays for worker start-up
            start, first = time.perf_counter(), False
            continue
        images += batch[0].shape[0]
        if images >= args.data_images:
            break
    seconds = time.perf_counter() - start
    return {
        "data": args.data,
        "data_img_s": images / seconds,
        "data_images": images,
        "data_workers": args.workers if args.data == "imagenet" else 0,
    }


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
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
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
        "--data-dir", help="with --data: the dataset's folder (CIFAR default: synthetic in memory)"
    )
    p.add_argument("--data-images", type=int, default=20_000, help="with --data: images to time")
    p.add_argument("--workers", type=int, default=2, help="with --data imagenet: loader worker processes")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    result: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
    }
    if args.data:
        result.update(measure_data(args, device))
        print(
            f"data pipeline ({args.data}): {result['data_img_s']:.0f} images/s "
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
        fwd_macs=macs,
        fwd_gflops=2 * macs / 1e9,
    )
    print(f"{args.model}: {macs / 1e9:.3f} G multiply-adds per {size}x{size} image forward")

    gemm = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        by_library = gemm_flops(dtype, device, args.gemm_size)
        gemm[key] = by_library.pop("best")
        result[f"gemm_{key}_gflops"] = gemm[key] / 1e9
        result.update({f"gemm_{key}_{lib}_gflops": v / 1e9 for lib, v in by_library.items()})
        print(
            f"GEMM {args.gemm_size}^3 {key}: {gemm[key] / 1e9:.1f} GFLOP/s ("
            + ", ".join(f"{lib} {v / 1e9:.1f}" for lib, v in by_library.items())
            + ")"
        )

    blocks, module = bench_steps(args, device, size, net.num_classes)
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

    net = module.net  # the trained module's network, in the module's memory format
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    times = measure_inference(
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
        table, rows = profile_training(args, device, size, net.num_classes)
        result["profile"] = [
            {**r, "self_ms_per_step": round(r["self_ms_per_step"], 3), "share": round(r["share"], 4)}
            for r in rows
        ]
        print(table)
    if args.epoch:
        if not args.data_dir:
            raise SystemExit("ran.bench: --epoch needs --data-dir (the folder holding cifar-10-batches-py)")
        result.update(measure_epoch(args, device))
        # The pure step is timed again after the epoch and the faster of the two is the reference: a process's
        # step time drifts by up to 10% between phases, and the faster one gives the stricter ratio.
        again, _ = bench_steps(args, device, size, net.num_classes)
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


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1:])
