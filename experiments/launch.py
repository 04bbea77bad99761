"""Launching a suite's runs: locally (one after another or N at a time), on SLURM (`experiments.sbatch`: a
job per run and seed, or a job array over the seeds of each run), or as a plain list of commands for any other
scheduler.

Every run is `ran fit --ckpt_path auto` on its config plus the budget overlay (started, or resumed from its
newest checkpoint: one command for a first start and every restart), then `ran test` of its best checkpoint.
Its directory is `<root>/<suite>/<budget>/<run>/seed<S>`; its W&B group is the suite, its tags the suite and
its factors (from suite.yaml), and the suite, budget and factors are config keys (`run.suite`, `run.budget`,
`run.factors`), so a dashboard groups, filters and compares the runs. Its resolved config (devices, nodes,
network) comes from `ran.cli.resolve.resolve_config`, the parser that runs the job.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from experiments.suites import Run, Suite
from ran.cli.resolve import ResolvedConfig, resolve_config
from ran.train.lock import RunLock, RunLocked
from ran.train.rundir import RunDir

# A SLURM job array's seed: the script's runs read it from SLURM_ARRAY_TASK_ID.
ARRAY_SEED = "${SLURM_ARRAY_TASK_ID}"


@dataclass(frozen=True)
class Job:
    """One run of a suite with one seed (or `ARRAY_SEED`, a job array's), under one budget."""

    suite: Suite
    run: Run
    budget: str
    seed: int | str
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
            "--run.group",
            self.suite.name,
            "--run.tags",
            "[" + ",".join(self.suite.tags(self.run)) + "]",
            "--run.suite",
            self.suite.name,
            "--run.budget",
            self.budget,
            "--run.factors",
            json.dumps(self.run.factors, separators=(",", ":")),
            *self.extra,
        ]

    def resolved_config(self) -> ResolvedConfig:
        """The config its `ran fit` runs with (run config, budget, overrides), as that command parses it."""
        return resolve_config(self.fit_args()[1:])

    def fit_args(self) -> list[str]:
        """`ran fit` of the run: resumed from its newest checkpoint where it has one, else started
        (`--ckpt_path auto`), so that the same command serves a first start and every restart."""
        return ["fit", *self.config_args(), "--ckpt_path", "auto"]

    def test_args(self) -> list[str]:
        return ["test", *self.config_args(), "--ckpt_path", "best"]

    def overwrites(self) -> bool:
        """Whether its runs start afresh (`-- --run.overwrite true`), a diverged one included."""
        extra = list(self.extra)
        return any(a == "--run.overwrite" and extra[i + 1 : i + 2] == ["true"] for i, a in enumerate(extra))

    def state(self) -> str:
        """'done' (fit finished and tested), 'fitted' (fit finished, not tested), 'resumable' (has a
        checkpoint), 'diverged' (its fit diverged: resuming would diverge again) or 'new' (nothing to keep,
        including a directory left by a start that failed before its first checkpoint)."""
        run_dir = RunDir(self.run_dir)
        status = run_dir.fit_status()
        if status == "finished":
            return "done" if "test" in run_dir.read_results() else "fitted"
        if status == "diverged":
            return "diverged"
        return "resumable" if run_dir.holds_run() else "new"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter, portable commands)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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


def shell_quote(arg: str) -> str:
    """`arg` quoted for the shell, except a job array's seed, which the shell expands."""
    return f'"{ARRAY_SEED}"'.join(shlex.quote(part) if part else "" for part in arg.split(ARRAY_SEED))


def shell_line(args: list[str], ran: str = "ran") -> str:
    return " ".join(shell_quote(arg) for arg in [ran, *args])


# --- plain list ---------------------------------------------------------------------------------------------


def command_list(jobs: list[Job]) -> list[str]:
    """One shell line per run: fit, then test of the best checkpoint (runnable by any scheduler)."""
    return [f"{shell_line(job.fit_args())} && {shell_line(job.test_args())}" for job in jobs]


# --- local --------------------------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them: its list where it is set,
    else 0 .. torch.cuda.device_count() - 1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        names = [name.strip() for name in listed.split(",") if name.strip()]
        return [] if not names or names[0] == "-1" else names
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(
    jobs: list[Job],
    parallel: int = 1,
    threads: int | None = None,
    log=print,
    gpus: Sequence[str] | None = None,
    poll: float = 5.0,
) -> dict[str, int]:
    """Run the jobs here, `parallel` at a time. A run that finished is skipped, one with a checkpoint is
    resumed, one whose fit finished is only tested; each run's output goes to `<run dir>.log`. Returns each
    job's exit status by name.

    Each run is claimed by taking its lock (`ran.train.lock`) before anything is started for it, and the lock
    is handed to its `ran fit` and `ran test`: a run that another launcher (or a `ran` process left running
    by a killed one) holds is put back and tried again every `poll` seconds while the others go on, so two
    launchers on one root share the runs and never train one at once.

    With GPUs (`gpus`, default `visible_gpus()`) the `parallel` run slots are dealt out over them, slot k on
    GPU k mod len(gpus): `--parallel 4` on one GPU packs four single-device runs onto it (a CIFAR network at
    batch 64 leaves most of a large GPU idle), on four GPUs gives each run its own. A run that asks for
    several devices sees every GPU."""
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    gpus = list(visible_gpus() if gpus is None else gpus)
    if gpus:
        per_gpu = -(-parallel // len(gpus))
        where = f"{len(gpus)} GPU(s) ({', '.join(gpus)})"
        log(f"[gpus] {parallel} run(s) at a time on {where}: up to {per_gpu} a GPU")
    # Resolved here, one after another: the config parser changes the working directory while it reads files.
    single_device = set()
    for job in jobs if gpus else ():
        config = job.resolved_config()
        if config.devices * config.nodes == 1:
            single_device.add(job.name)
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(parallel):
        slots.put(slot)
    statuses: dict[str, int] = {}
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()
    pending = collections.deque(jobs)
    guard = threading.Lock()
    waiting: set[str] = set()

    def claim(job: Job) -> RunLock | None:
        """The run's lock, or None (said once per run) while another process holds it."""
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = RunLock(job.run_dir, "python -m experiments run", warn=lambda text: log(f"[warn] {text}"))
        try:
            return lock.acquire()
        except RunLocked as busy:
            if job.name not in waiting:
                waiting.add(job.name)
                holder = busy.holder or "another process"
                log(f"[wait] {job.name}: in use by {holder}; trying again every {poll:g} s")
            return None

    def worker() -> None:
        busy_in_a_row = 0
        while not stopping.is_set():
            with guard:
                if not pending:
                    return
                job = pending.popleft()
            lock = claim(job)
            if lock is None:
                with guard:
                    pending.append(job)
                    busy_in_a_row += 1
                    every_one_busy = busy_in_a_row >= len(pending)
                if every_one_busy:
                    stopping.wait(poll)
                    busy_in_a_row = 0
                continue
            busy_in_a_row = 0
            with lock:
                one(job, lock)

    def one(job: Job, lock: RunLock) -> None:
        state = job.state()  # read under the lock: another launcher may have finished it meanwhile
        if state == "done":
            log(f"[skip] {job.name}: finished already")
            statuses[job.name] = 0
            return
        if state == "diverged" and not job.overwrites():
            log(
                f"[fail] {job.name}: its fit diverged (see {RunDir(job.run_dir).results_file}); change the "
                "recipe (e.g. -- --model.lr ...) and start it afresh with -- --run.overwrite true"
            )
            statuses[job.name] = 1
            return
        log_path = job.run_dir.with_suffix(".log")
        start = time.time()
        slot = slots.get()
        job_env = env
        if job.name in single_device:
            job_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
        try:
            status = run_job(job, state, log_path, job_env, lock)
        finally:
            slots.put(slot)
        took = f"{job.name} in {time.time() - start:.0f} s"
        if status == 0:
            log(f"[done] {took}: done")
        elif stopping.is_set():
            log(f"[stop] {took}: interrupted (exit {status}); the same command resumes it from last.ckpt")
        else:
            log(f"[fail] {took}: fail (exit {status}; see {log_path})")
        statuses[job.name] = status

    def run_job(job: Job, state: str, log_path: Path, env: dict[str, str], lock: RunLock) -> int:
        """`ran fit` (resumed where there is a checkpoint; none when the fit finished), then `ran test` if
        it succeeded, each sharing the launcher's lock of the run."""
        handoff, fds = lock.handoff()
        with open(log_path, "a") as out:
            status = 0
            stages = [job.test_args()] if state == "fitted" else [job.fit_args(), job.test_args()]
            for args in stages:
                if stopping.is_set():
                    status = 130
                    break
                log(f"[run ] {shell_line(args)}")
                out.write(f"$ {shell_line(args)}\n")
                out.flush()
                proc = subprocess.Popen(
                    [ran_executable(), *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**env, **handoff},
                    pass_fds=fds,
                )
                running.add(proc)
                status = proc.wait()
                running.discard(proc)
                if status:
                    break
        return status

    def stop(signum=None, frame=None) -> None:
        """Interrupted (Ctrl-C or SIGTERM): end the running `ran` processes too; each keeps its last
        checkpoint and a later launch resumes it."""
        stopping.set()
        for proc in list(running):
            proc.send_signal(signal.SIGINT)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        for future in [pool.submit(worker) for _ in range(parallel)]:
            future.result()
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
        stopping.set()  # a worker waiting for a busy run stops waiting
        pool.shutdown(wait=True)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return statuses
