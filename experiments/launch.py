"""Launching a suite's runs: locally (one after another or N at a time), on SLURM (one job per run), or as a
plain list of commands for any other scheduler.

Every run is `ran fit` on its config plus the budget overlay, then `ran test` of its best checkpoint. Its
directory is `<root>/<suite>/<budget>/<run>/seed<S>`; its W&B group is the suite and its tags the suite
and its factors (from the run config), so a dashboard groups and compares the runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.suites import Run, Suite, SuiteError
from ran.rundir import RESULTS_FILE


@dataclass(frozen=True)
class Job:
    """One run of a suite with one seed, under one budget."""

    suite: Suite
    run: Run
    budget: str
    seed: int
    root: Path
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.suite.name}/{self.budget}/{self.run.name}/seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def label(self) -> str:
        return f"{self.run.name}-seed{self.seed}"

    def config_args(self) -> list[str]:
        args = ["-c", _shown(self.run.config)]
        budget = self.suite.budget_config(self.budget)
        if budget.is_file():
            args += ["-c", _shown(budget)]
        return args + [
            "--seed_everything",
            str(self.seed),
            "--run.root",
            str(self.root),
            "--run.name",
            self.name,
            *self.extra,
        ]

    def fit_args(self, resume: bool = False) -> list[str]:
        return ["fit", *self.config_args(), *(["--ckpt_path", "last"] if resume else [])]

    def test_args(self) -> list[str]:
        return ["test", *self.config_args(), "--ckpt_path", "best"]

    def state(self) -> str:
        """'done' (tested), 'resumable' (has a last checkpoint), 'stale' (a directory without one) or
        'new'."""
        if (self.run_dir / RESULTS_FILE).is_file() and "test" in _read_json(self.run_dir / RESULTS_FILE):
            return "done"
        if (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "resumable"
        return "stale" if self.run_dir.exists() else "new"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter, portable commands)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def make_jobs(
    suite: Suite,
    budget: str,
    seeds: list[int],
    root: Path,
    runs: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[Job]:
    selected = [suite.run(r) for r in runs] if runs else list(suite.runs)
    return [Job(suite, run, budget, seed, root, tuple(extra or ())) for run in selected for seed in seeds]


def ran_executable() -> str:
    """The `ran` console script of this interpreter's environment (falls back to `ran` on PATH)."""
    beside = Path(sys.executable).parent / "ran"
    return str(beside) if beside.is_file() else "ran"


def shell_line(args: list[str]) -> str:
    return shlex.join(["ran", *args])


# --- plain list ---------------------------------------------------------------------------------------------


def command_list(jobs: list[Job]) -> list[str]:
    """One shell line per run: fit, then test of the best checkpoint (runnable by any scheduler)."""
    return [f"{shell_line(job.fit_args())} && {shell_line(job.test_args())}" for job in jobs]


# --- local --------------------------------------------------------------------------------------------------


def run_local(jobs: list[Job], parallel: int = 1, threads: int | None = None, log=print) -> dict[str, int]:
    """Run the jobs here, `parallel` at a time. A run that finished is skipped, one with a last checkpoint
    is resumed; each run's output goes to `<run dir>.log`. Returns each job's exit status by name."""
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    statuses: dict[str, int] = {}
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def one(job: Job) -> None:
        state = job.state()
        if state == "done":
            log(f"[skip] {job.name}: finished already")
            statuses[job.name] = 0
            return
        if state == "stale":
            log(
                f"[fail] {job.name}: {job.run_dir} exists without a checkpoint; "
                "remove it or pick another --root"
            )
            statuses[job.name] = 2
            return
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = job.run_dir.with_suffix(".log")
        start = time.time()
        with open(log_path, "a") as out:
            status = 0
            for args in (job.fit_args(resume=state == "resumable"), job.test_args()):
                if stopping.is_set():
                    status = 130
                    break
                log(f"[run ] {shell_line(args)}")
                out.write(f"$ {shell_line(args)}\n")
                out.flush()
                proc = subprocess.Popen(
                    [ran_executable(), *args], stdout=out, stderr=subprocess.STDOUT, env=env
                )
                running.add(proc)
                status = proc.wait()
                running.discard(proc)
                if status:
                    break
        verb = "done" if status == 0 else f"fail (exit {status}; see {log_path})"
        log(f"[{'done' if status == 0 else 'fail'}] {job.name} in {time.time() - start:.0f} s: {verb}")
        statuses[job.name] = status

    def stop(signum=None, frame=None) -> None:
        """Interrupted (Ctrl-C or SIGTERM): end the running `ran` processes too; each keeps its last
        checkpoint
        and a later launch resumes it."""
        stopping.set()
        for proc in list(running):
            proc.send_signal(signal.SIGINT)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        for _ in pool.map(one, jobs):
            pass
    except KeyboardInterrupt:
        stopping.set()
        for proc in list(running):
            proc.send_signal(signal.SIGINT)
        for proc in list(running):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return statuses


# --- SLURM --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time: str = "48:00:00"
    cpus_per_task: int = 8
    mem: str | None = None
    account: str | None = None
    setup: str = ""  # shell lines run before the job (module load, source venv, ...)


def overrides_config(args: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`ran` command-line overrides (`--trainer.precision bf16-mixed`, `--model.channels_last=true`,
    `--data.batch_size 128`) as a nested config to merge onto a run's, so that a SLURM script asks for the
    devices and a plan measures the recipe that the runs launched with the same overrides will have."""
    import yaml

    config: dict[str, Any] = {}
    items = list(args)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise SuiteError(f"cannot read the override {token!r}: give `--key value` or `--key=value` pairs")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not items or items[0].startswith("--"):
                raise SuiteError(f"the override --{key} has no value: give `--{key} VALUE`")
            value = items.pop(0)
        path = key.split(".")
        if path[0] == "data" and len(path) > 1 and path[1] not in ("init_args", "class_path"):
            path.insert(1, "init_args")
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    return config


def job_config(job: Job) -> dict[str, Any]:
    """The run's config, its budget's overlay, then the job's command-line overrides."""
    from ran.cli import load_config, merge_configs

    cfg = load_config(job.run.config)
    budget = job.suite.budget_config(job.budget)
    if budget.is_file():
        cfg = merge_configs(cfg, load_config(budget))
    return merge_configs(cfg, overrides_config(job.extra)) if job.extra else cfg


def resources(job: Job) -> dict[str, Any]:
    """Devices, nodes and accelerator of a job, from its merged config (run config, budget, overrides)."""
    trainer = job_config(job).get("trainer", {})
    devices = trainer.get("devices", 1)
    return {
        "devices": devices if isinstance(devices, int) else 1,
        "nodes": int(trainer.get("num_nodes", 1)),
        "accelerator": trainer.get("accelerator", "auto"),
    }


def sbatch_script(job: Job, options: SlurmOptions) -> str:
    """A batch script: one task per device on every node (Lightning's SLURM environment reads them), the
    pre-emption signal 90 s before the time limit so that Lightning saves and requeues the job, and the test
    of the best checkpoint after the fit."""
    res = resources(job)
    gpu = res["accelerator"] in ("gpu", "cuda", "auto")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.suite.name}-{job.label}",
        f"#SBATCH --nodes={res['nodes']}",
        f"#SBATCH --ntasks-per-node={res['devices']}",
        f"#SBATCH --cpus-per-task={options.cpus_per_task}",
        f"#SBATCH --time={options.time}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={job.run_dir}.slurm-%j.out",
    ]
    if gpu:
        lines.append(f"#SBATCH --gres=gpu:{res['devices']}")
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.mem:
        lines.append(f"#SBATCH --mem={options.mem}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    if options.setup:
        lines.append(options.setup)
    # A requeued job finds its own hpc_ckpt_*.ckpt: `ran fit` resumes from it without --ckpt_path.
    lines += [
        f"if [ -f {shlex.quote(str(job.run_dir / 'checkpoints' / 'last.ckpt'))} ]; "
        "then RESUME='--ckpt_path last';"
        " else RESUME=''; fi",
        f"srun {shell_line(job.fit_args())} $RESUME",
        f"srun --ntasks=1 --nodes=1 {shell_line(job.test_args())} --trainer.devices 1 --trainer.num_nodes 1 "
        "--trainer.strategy auto",
    ]
    return "\n".join(lines) + "\n"


def run_slurm(jobs: list[Job], options: SlurmOptions, submit: bool = True, log=print) -> list[Path]:
    """Write one sbatch script per job under `<root>/<suite>/<budget>/slurm/` and, with `submit`, sbatch
    it."""
    if submit and shutil.which("sbatch") is None:
        raise RuntimeError(
            "sbatch is not on PATH: run this on a SLURM login node, or pass --dry-run to only "
            "write the scripts"
        )
    paths = []
    for job in jobs:
        if job.state() == "done":
            log(f"[skip] {job.name}: finished already")
            continue
        path = job.root / job.suite.name / job.budget / "slurm" / f"{job.label}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sbatch_script(job, options))
        paths.append(path)
        if submit:
            out = subprocess.run(
                ["sbatch", str(path)], capture_output=True, text=True, check=True
            ).stdout.strip()
            log(f"[sbatch] {path}: {out}")
        else:
            log(f"[write] {path}")
    return paths
