"""Measuring a network and its data: multiply-adds, training and inference step times, the machine's GEMM
peak, peak memory and data-pipeline throughput.

The commands `ran summary`, `python -m ran.bench` and `python -m experiments plan --measure` print what these
functions measure. Training is timed through the real `ImageClassifier` under a real Trainer (forward,
backward and the module's own SGD step, with Lightning's overhead); data through the datamodules' own
`train_batches`, the path a training step's batches take.
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.flop_counter import FlopCounterMode

from ran.train.module import ImageClassifier

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Forward multiply-adds for one image, from torch's FlopCounterMode (one multiply-add = 2 FLOPs)."""
    x = torch.zeros(1, in_chans, input_size, input_size)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA where present, else the CPU; any other name as torch spells it (`cpu`, `cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
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


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of a Lightning `precision` (none for "32")."""
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def inference_times(
    net: torch.nn.Module, x: torch.Tensor, precision: str, *, warmup: int, blocks: int, steps_per_block: int
) -> list[float]:
    """Seconds per inference forward of the batch `x` (eval mode, inference_mode), per timed block."""
    net.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(x.device, precision):
            net(x)

    times = timed_blocks(step, warmup=warmup, blocks=blocks, steps_per_block=steps_per_block, device=x.device)
    net.train()
    return times


class StepTimer(pl.Callback):
    """Records the wall time at the start of every training step and at the end of training, the device
    synchronised first, so consecutive `starts` bound each step, optimizer step included."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())


class ProfilerStep(pl.Callback):
    """Advances a torch.profiler schedule after every training step."""

    def __init__(self, profiler: profile) -> None:
        self.profiler = profiler

    def on_train_batch_end(self, *_: Any) -> None:
        self.profiler.step()


def timing_classifier(
    arch: str,
    num_classes: int,
    *,
    model_kwargs: dict[str, Any] | None = None,
    channels_last: bool = False,
    compile: str | None = None,
    cuda_graph: bool = False,
) -> ImageClassifier:
    """The training module with the recipe's optimizer and a learning rate that never drops while timed;
    `compile`: None, or the torch.compile mode of the network; `cuda_graph`: the step as one CUDA graph."""
    return ImageClassifier(
        arch=arch,
        num_classes=num_classes,
        milestones=(10**9,),
        model_kwargs=model_kwargs,
        channels_last=channels_last,
        compile=compile is not None,
        compile_mode=compile or "default",
        cuda_graph=cuda_graph,
    )


def timed_fit(
    module: pl.LightningModule,
    device: torch.device,
    precision: str,
    limits: dict[str, int],
    callbacks: tuple[pl.Callback, ...] = (),
    **fit_kwargs: Any,
) -> StepTimer:
    """Fit `module` on one device with nothing but a step timer (no logger, checkpoint, progress bar or
    validation); returns the timer, whose `starts` hold every step's start and the end of training."""
    timer = StepTimer(device)
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
    compile: str | None = None,
    cuda_graph: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    warmup: int = 3,
    blocks: int = 5,
    steps_per_block: int = 3,
    callbacks: tuple[pl.Callback, ...] = (),
) -> tuple[list[float], ImageClassifier]:
    """Seconds per training step, per timed block, of the real LightningModule under a real Trainer.

    The batch is made once on the device and fed again every step, so this is the network's step time
    with Lightning's own overhead, and no data loading. Returns the block times and the trained module.
    """
    module = timing_classifier(
        arch,
        num_classes,
        model_kwargs=model_kwargs,
        channels_last=channels_last,
        compile=compile,
        cuda_graph=cuda_graph,
    )
    steps = warmup + blocks * steps_per_block
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    loader = torch.utils.data.DataLoader([(x, y)] * steps, batch_size=None)
    timer = timed_fit(module, device, precision, {"max_steps": steps}, callbacks, train_dataloaders=loader)
    step_times = [b - a for a, b in zip(timer.starts, timer.starts[1:])][warmup:]
    block_times = [
        sum(step_times[i : i + steps_per_block]) / steps_per_block
        for i in range(0, len(step_times) - steps_per_block + 1, steps_per_block)
    ]
    return block_times, module


# The host calls that start work on a CUDA device: a kernel each, or a whole captured CUDA graph.
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)


def profile_training(
    arch: str, *, top: int, steps: int = 3, warmup: int = 3, **settings: Any
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """torch.profiler over `steps` training steps of `train_step_times` (`settings` are its arguments; its
    blocks are replaced) after `warmup` untimed ones: the `top` operators by self time (device time on CUDA,
    CPU time otherwise), each a dict of op, self ms per step, share of all self time and calls per step; and
    the host's work per step: `aten_calls_per_step` (every ATen operator call, nested ones included) and, on
    CUDA, `launches_per_step` (kernel launches, a CUDA graph's replay counting as one)."""
    device = settings["device"]
    cuda = device.type == "cuda"
    prof = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
        schedule=schedule(wait=warmup, warmup=1, active=steps),
    )
    with prof:
        profiled = {
            "warmup": warmup + 1,
            "blocks": 1,
            "steps_per_block": steps,
            "callbacks": (ProfilerStep(prof),),
        }
        train_step_times(arch, **{**settings, **profiled})
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
        for e in events[:top]
    ]
    counts = {"aten_calls_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / steps}
    if cuda:
        counts["launches_per_step"] = sum(e.count for e in events if e.key in LAUNCH_CALLS) / steps
    return rows, counts


def epoch_time(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, device: torch.device, precision: str
) -> dict[str, Any]:
    """One training epoch of `datamodule` through the Trainer, timed from the first step's start to the last
    step's end: seconds, steps, images and images/s."""
    datamodule.setup("fit")
    steps = len(datamodule.train_dataloader())
    timer = timed_fit(module, device, precision, {"max_epochs": 1}, datamodule=datamodule)
    epoch_s = timer.starts[-1] - timer.starts[0]
    images = len(datamodule.train_dataset)
    return {"epoch_s": epoch_s, "epoch_steps": steps, "epoch_images": images, "epoch_img_s": images / epoch_s}


class TrainBatches(Protocol):
    """A datamodule that yields its training batches on a device as a training step receives them."""

    def setup(self, stage: str) -> None: ...

    def train_batches(self, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


def data_throughput(datamodule: TrainBatches, device: torch.device, images: int) -> dict[str, float]:
    """Images/s of the data pipeline alone: the datamodule's `train_batches` on `device` (loading plus the
    augmentation a training step gets), timed after the first batch (which pays for worker start-up) until
    `images` images or the end of the epoch."""
    datamodule.setup("fit")
    counted, start = 0, None
    for batch in datamodule.train_batches(device):
        synchronize(device)
        if start is None:
            start = time.perf_counter()
            continue
        counted += batch[0].shape[0]
        if counted >= images:
            break
    if start is None or counted == 0:
        raise ValueError("data_throughput: the training split holds a single batch; time a larger one")
    return {"data_img_s": counted / (time.perf_counter() - start), "data_images": counted}
