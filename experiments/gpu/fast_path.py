"""`python -m experiments.gpu.fast_path`: the GPU fast path measured in one call, within about 10 minutes.

The table of training speeds (`python -m ran.bench`, bf16-mixed, channels_last): eager, the torch.compile
modes and `model.cuda_graph` (the whole step as one CUDA graph), for attention92_cifar at batch 64 and 256,
attention452_cifar and the 224-pixel attention56; then the 50-step comparison of the captured step with
eager (`tests/train/test_graphed_step.py`). Each case runs in its own process under a timeout; results are
appended to `<out>/fast_path.jsonl` as they come, so a case that times out or a budget that runs out leaves
the others; the markdown table is `<out>/fast_path.md`. On an offline GPU machine with the kit of
`../shared/gpu` copied to `.gpu` (see its README):

    source .gpu/setup.sh && python3 -m experiments.gpu.fast_path --out $OUT

`--device cpu --cases eager --tiny` runs the same on a CPU with tiny networks, in a minute (the tests do).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["CASES", "Case", "main", "table"]

REPO = Path(__file__).resolve().parents[2]
TINY = {"stage_widths": [16, 32, 64], "stem_width": 8, "final_width": 64}


@dataclass(frozen=True)
class Case:
    """One `ran.bench` measurement: a network at a batch size in one mode of the fast path."""

    model: str
    batch: int
    mode: str  # eager | cuda_graph | compile:<mode> | cuda_graph+compile:<mode>
    timeout: int = 120
    extra: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.model} bs{self.batch} {self.mode}"

    def flags(self, batch: int | None = None) -> list[str]:
        """`ran.bench`'s flags for the case (at another `batch`, for a check of this script)."""
        flags = ["--model", self.model, "--batch-size", str(batch or self.batch)]
        flags += ["--precision", "bf16-mixed", "--channels-last", *self.extra]
        if self.mode.startswith("cuda_graph"):
            flags.append("--cuda-graph")
        if "compile:" in self.mode:
            flags += ["--compile", self.mode.split("compile:")[1]]
        return flags


# In order of what matters most, so that a budget that runs out cuts the least important.
CASES = (
    Case("attention92_cifar", 64, "eager"),
    Case("attention92_cifar", 64, "cuda_graph"),
    Case("attention92_cifar", 256, "eager"),
    Case("attention92_cifar", 256, "cuda_graph"),
    Case("attention452_cifar", 64, "eager"),
    Case("attention452_cifar", 64, "cuda_graph"),
    Case("attention56", 64, "eager"),
    Case("attention56", 64, "cuda_graph"),
    Case("attention92_cifar", 64, "compile:default", timeout=300),
    Case("attention92_cifar", 64, "cuda_graph+compile:default", timeout=240),
    Case("attention92_cifar", 64, "compile:reduce-overhead", timeout=240),
    Case("attention92_cifar", 256, "cuda_graph+compile:default", timeout=240),
    Case("attention92_cifar", 64, "compile:max-autotune-no-cudagraphs", timeout=300),
)


def run_case(case: Case, args: argparse.Namespace) -> dict:
    """The case's `ran.bench` JSON, or its failure: exit code and last line."""
    batch = 8 if args.tiny else case.batch
    command = [sys.executable, "-m", "ran.bench", *case.flags(batch), "--device", args.device]
    # Warm-up past the 3 steps before GraphedStep's capture (and cudagraph trees' recording), so that no
    # timed block holds a capture.
    command += ["--gemm-size", str(args.gemm_size), "--warmup", "6"]
    if args.tiny:
        command += ["--model-kwargs", json.dumps(TINY), "--blocks", "1", "--steps-per-block", "1"]
    else:
        command += ["--blocks", "5", "--steps-per-block", "6"]
    timeout = min(
        case.timeout * args.timeout_scale, max(10, int(args.budget - (time.monotonic() - args.started)))
    )
    record = {"case": case.name, "model": case.model, "batch": batch, "mode": case.mode}
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "rc": None, "error": f"timed out after {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("{"):
        return {**record, "rc": 0, "result": json.loads(lines[-1])}
    last = (done.stderr.strip().splitlines() or lines or ["no output"])[-1]
    return {**record, "rc": done.returncode, "error": last[:300]}


def exactness(args: argparse.Namespace, out: Path) -> str:
    """The 50-step comparison of the captured step with eager (on a CPU: of the static-buffer step, which the
    tests run anyway), its output saved to `<out>/exactness.log`."""
    test = "captured_step" if args.device.startswith("cuda") else "static_step_gives"
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-W", "ignore"]
    command += ["tests/train/test_graphed_step.py", "-k", test]
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=args.exactness_timeout
        )
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        text = f"timed out after {args.exactness_timeout} s\n{err.stdout or ''}"
    (out / "exactness.log").write_text(text)
    kept = [line for line in text.splitlines() if re.search(r"losses|difference|passed|failed|error", line)]
    return "\n".join(kept[-8:])


def table(records: list[dict]) -> str:
    """The markdown table: images/s, step time, bf16 MFU, peak memory and speed-up over the same network's
    eager figure at the same batch."""
    eager = {
        (r["model"], r["batch"]): r["result"]["train_img_s"]
        for r in records
        if r["mode"] == "eager" and r.get("rc") == 0
    }
    lines = [
        "| network | batch | mode | train images/s | ms/step | MFU (bf16) | peak MB | vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {r['model']} | {r['batch']} | {r['mode']} |"
        if r.get("rc") != 0:
            lines.append(f"{head} {r.get('error', 'not run')} | | | | |")
            continue
        res = r["result"]
        mfu = res.get("mfu_train_bf16")
        base = eager.get((r["model"], r["batch"]))
        mfu_text = "" if mfu is None else f"{100 * mfu:.1f}%"
        speedup = "" if not base else f"{res['train_img_s'] / base:.2f}x"
        lines.append(
            f"{head} {res['train_img_s']:,.0f} | {res['train_step_ms']:.2f} | {mfu_text} | "
            f"{res['peak_memory_mb']:,.0f} | {speedup} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.gpu.fast_path", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("fast_path_out"), help="folder for the results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", default=".", help="a regular expression: the cases whose name matches")
    p.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds for everything: a case that would start later is left out",
    )
    p.add_argument("--gemm-size", type=int, default=8192, help="the GEMM that MFU is taken against")
    p.add_argument("--exactness-timeout", type=int, default=180)
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every case's timeout (a slow CPU)"
    )
    p.add_argument("--no-exactness", action="store_true", help="leave out the 50-step comparison")
    p.add_argument("--tiny", action="store_true", help="tiny widths and few steps (a check of this script)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "fast_path.jsonl"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"fast path on {device}, torch {torch.__version__}", flush=True)
    summary = "" if args.no_exactness else exactness(args, args.out)
    if summary:
        print(f"50-step exactness:\n{summary}", flush=True)
    records = []
    for case in CASES:
        if not re.search(args.cases, case.name):
            continue
        if time.monotonic() - args.started > args.budget:
            record = {"case": case.name, "model": case.model, "batch": case.batch, "mode": case.mode}
            record.update(rc=None, error="not run: the budget was spent")
        else:
            record = run_case(case, args)
        record["device"] = device
        records.append(record)
        with jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = (
            f"{record['result']['train_img_s']:,.0f} images/s" if record.get("rc") == 0 else record["error"]
        )
        print(f"{case.name}: {shown} ({time.monotonic() - args.started:.0f} s)", flush=True)
    text = f"# Fast path on {device}, torch {torch.__version__}\n\n{table(records)}\n"
    if summary:
        text += f"\n50-step exactness:\n\n```\n{summary}\n```\n"
    (args.out / "fast_path.md").write_text(text)
    print(text, flush=True)
    return 0 if records and all(r.get("rc") == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
