"""Launching a suite's runs: locally (one after another or N at a time), on SLURM (a job per run and seed,
or a job array over the seeds of each run), or as a plain list of commands for any other scheduler.

Every run is `ran fit` on its config plus the budget overlay, then `ran test` of its best checkpoint. Its
directory is `<root>/<suite>/<budget>/<run>/seed<S>`; its W&B group is the suite, its tags the suite
and its factors (from suite.yaml), and the suite, budget and factors are config keys (`run.suite`,
`run.budget`, `run.factors`), so a dashboard groups, filters and compares the runs. Its resolved config
(devices, nodes, network) comes from `ran.config.resolve_config`, the parser that runs the job.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experiments.suites import Run, Suite
from ran.config import ResolvedConfig, resolve_config
from ran.rundir import RunDir

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

    def fit_args(self, resume: bool = False) -> list[str]:
        return ["fit", *self.config_args(), *(["--ckpt_path", "last"] if resume else [])]

    def test_args(self) -> list[str]:
        return ["test", *self.config_args(), "--ckpt_path", "best"]

    def state(self) -> str:
        """'done' (fit finished and tested), 'resumable' (has a checkpoint), 'diverged' (its fit diverged:
        resuming would diverge again) or 'new' (nothing to keep, including a directory left by a start that
        failed before its first checkpoint)."""
        run_dir = RunDir(self.run_dir)
        status = run_dir.fit_status()
        if status == "finished" and "test" in run_dir.read_results():
            return "done"
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
) -> dict[str, int]:
    """Run the jobs here, `parallel` at a time. A run that finished is skipped, one with a last checkpoint
    is resumed; each run's output goes to `<run dir>.log`. Returns each job's exit status by name.

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

    def one(job: Job) -> None:
        state = job.state()
        if state == "done":
            log(f"[skip] {job.name}: finished already")
            statuses[job.name] = 0
            return
        if state == "diverged":
            log(
                f"[fail] {job.name}: its fit diverged (see {RunDir(job.run_dir).results_file}); change the "
                "recipe (e.g. -- --model.lr ...) and start it afresh with -- --run.overwrite true"
            )
            statuses[job.name] = 1
            return
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = job.run_dir.with_suffix(".log")
        start = time.time()
        slot = slots.get()
        job_env = env
        if job.name in single_device:
            job_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
        try:
            status = run_job(job, state, log_path, job_env)
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

    def run_job(job: Job, state: str, log_path: Path, env: dict[str, str]) -> int:
        """`ran fit` (resumed where there is a checkpoint), then `ran test` if it succeeded."""
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


# Per dataset family, the time limit of one job and the CPUs of each task (one task per device). The time
# limit bounds a job, not a run: SIGUSR1 90 s before it makes Lightning save and requeue, and the requeued job
# resumes. 24 h and 72 h are common limits of GPU partitions (a longer --time is refused at submission where
# the partition's MaxTime is lower; `sinfo -o "%P %l"` lists them). CPUs: CIFAR lives in memory and is
# augmented on the batch (no DataLoader workers by default), so 8 CPUs serve the main process's threads;
# ImageNet decodes and crops JPEGs in its DataLoader workers (8 per task in the config), so 16 CPUs leave
# them a core each and the main process its own. These are defaults, not measurements: a suite overrides
# them in its suite.yaml (`slurm: {time: ..., cpus_per_task: ...}`) and the command line overrides both.
SLURM_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar": {"time": "24:00:00", "cpus_per_task": 8},
    "imagenet": {"time": "72:00:00", "cpus_per_task": 16},
}


@dataclass(frozen=True)
class SlurmOptions:
    """The launcher's SLURM options; `time` and `cpus_per_task` left None take the suite's, then the dataset
    family's default (`SLURM_DEFAULTS`)."""

    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    setup: str = ""  # shell lines run before the job (module load, ...)
    array: bool = False  # one script per run, its seeds a job array
    pack: int = 1  # single-device runs per job, sharing its one GPU

    def site_lines(self) -> list[str]:
        """The #SBATCH lines of the options given for the site (partition, memory, account)."""
        return [
            f"#SBATCH --{key}={getattr(self, key)}"
            for key in ("partition", "mem", "account")
            if getattr(self, key)
        ]

    def start_lines(self, set_flags: str) -> list[str]:
        """A job's first shell lines: `set <flags> pipefail`, the working directory, the --setup lines."""
        return [
            f"set {set_flags} pipefail",
            f"cd {shlex.quote(str(Path.cwd()))}",
            *([self.setup] if self.setup else []),
        ]

    def resolved(self, suite: Suite, key: str) -> Any:
        """The option `key` for `suite`: the command line's, else the suite's, else its family's default."""
        given = getattr(self, key)
        if given is not None:
            return given
        return suite.slurm.get(key, SLURM_DEFAULTS[suite.budget_family][key])


def sbatch_script(job: Job, options: SlurmOptions, seeds: Sequence[int] = ()) -> str:
    """A batch script for `job`, or with `seeds` for `job.run` under each seed as a job array (the seed is the
    array index). One task per device on every node (Lightning's SLURM environment reads them) with the
    resources of the job's resolved config, the venv's own `ran`, the pre-emption signal 90 s before the time
    limit so that Lightning saves and requeues, the log appended to across requeues, one failed rank ending
    every rank, and the test of the best checkpoint after the fit."""
    config = job.resolved_config()  # the resources do not depend on the seed
    if seeds:
        job = replace(job, seed=ARRAY_SEED)
    devices, nodes = config.devices, config.nodes
    gpu = config.trainer["accelerator"] in ("gpu", "cuda", "auto")
    array_log = f"{job.root / job.name.replace(ARRAY_SEED, '%a')}.slurm-%A_%a.out"  # %a: the seed
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.suite.name}-{job.run.name if seeds else job.label}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={devices}",
        f"#SBATCH --cpus-per-task={options.resolved(job.suite, 'cpus_per_task')}",
        f"#SBATCH --time={options.resolved(job.suite, 'time')}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={array_log if seeds else f'{job.run_dir}.slurm-%j.out'}",
    ]
    if seeds:
        lines.append(f"#SBATCH --array={','.join(str(seed) for seed in seeds)}")
    if gpu:
        lines.append(f"#SBATCH --gres=gpu:{devices}")
    lines += options.site_lines()
    lines += options.start_lines("-euo")
    ran = ran_executable()
    srun = "srun --kill-on-bad-exit=1"
    # A requeued job finds its own hpc_ckpt_*.ckpt: `ran fit` resumes from it without --ckpt_path.
    lines += [
        "# Since SLURM 22.05 srun does not pass --cpus-per-task on to its tasks: without this line, each",
        "# rank and its DataLoader workers may share one core.",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
        f"if [ -f {shell_quote(str(job.run_dir / 'checkpoints' / 'last.ckpt'))} ]; "
        "then RESUME='--ckpt_path last'; else RESUME=''; fi",
        f"{srun} {shell_line(job.fit_args(), ran)} $RESUME",
        f"{srun} --ntasks=1 --nodes=1 {shell_line(job.test_args(), ran)} --trainer.devices 1 "
        "--trainer.num_nodes 1 --trainer.strategy auto",
    ]
    return "\n".join(lines) + "\n"


def packed_sbatch_script(jobs: Sequence[Job], options: SlurmOptions, name: str) -> str:
    """A batch script that runs `jobs` (single-device runs) side by side on one node and one GPU, the job's
    CPUs split between them, each fit followed by the test of its best checkpoint and logged to
    `<run dir>.log`. Pre-emption: SLURM signals the script (USR1, 90 s before the time limit); it passes
    SIGTERM to every run, which saves its last.ckpt and stops, waits for them and requeues the job, whose
    runs resume from their checkpoints (a run whose fit had finished is only tested). The job fails if any of
    its runs fails."""
    configs = [job.resolved_config() for job in jobs]
    for job, config in zip(jobs, configs):
        if config.devices * config.nodes != 1:
            raise RuntimeError(
                f"--pack puts single-device runs side by side, but {job.name} uses {config.devices} "
                f"device(s) on {config.nodes} node(s): launch it without --pack"
            )
    first = jobs[0]
    gpu = configs[0].trainer["accelerator"] in ("gpu", "cuda", "auto")
    folder = first.root / first.suite.name / first.budget / "slurm"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={first.suite.name}-{name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={options.resolved(first.suite, 'cpus_per_task')}",
        f"#SBATCH --time={options.resolved(first.suite, 'time')}",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder / name}.slurm-%j.out",
    ]
    if gpu:
        lines.append("#SBATCH --gres=gpu:1")
    lines += options.site_lines()
    lines += options.start_lines("-uo")
    runs = len(jobs)
    lines += [
        f'threads=$(( ${{SLURM_CPUS_PER_TASK:-{runs}}} / {runs} )); [ "$threads" -ge 1 ] || threads=1',
        "export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads",
        "requeue() {",
        "  trap '' USR1",
        '  echo "$(date): pre-empted: every run saves its last.ckpt; the job requeues"',
        '  for pid in "${pids[@]}"; do kill -TERM "$pid"; pkill -TERM -P "$pid"; done',
        "  wait",
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap requeue USR1",
        "pids=()",
    ]
    ran = ran_executable()
    for job in jobs:
        last = shell_quote(str(job.run_dir / "checkpoints" / "last.ckpt"))
        lines += [
            f"mkdir -p {shell_quote(str(job.run_dir.parent))}",
            "(",
            "  trap 'stopped=1' TERM  # the run saves and exits; its test waits for the requeued job",
            f"  if [ -f {last} ]; then RESUME='--ckpt_path last'; else RESUME=''; fi",
            f"  printf '%s %s\\n' {shlex.quote('$ ' + shell_line(job.fit_args(), ran))} \"$RESUME\"",
            f"  {shell_line(job.fit_args(), ran)} $RESUME || exit $?",
            '  [ -z "${stopped:-}" ] || exit 143',
            f"  echo {shlex.quote('$ ' + shell_line(job.test_args(), ran))}",
            f"  {shell_line(job.test_args(), ran)}",
            f") >> {shell_quote(str(job.run_dir.with_suffix('.log')))} 2>&1 &",
            "pids+=($!)",
        ]
    lines += [
        "status=0",
        'for pid in "${pids[@]}"; do wait "$pid" || status=1; done',
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


def run_slurm(jobs: list[Job], options: SlurmOptions, submit: bool = True, log=print) -> list[Path]:
    """Write one sbatch script per job (with `options.array`: per run, its seeds a job array) under
    `<root>/<suite>/<budget>/slurm/` and, with `submit`, sbatch it. Finished runs are left out."""
    if submit and shutil.which("sbatch") is None:
        raise RuntimeError(
            "sbatch is not on PATH: run this on a SLURM login node, or pass --dry-run to only "
            "write the scripts"
        )
    todo = []
    for job in jobs:
        if job.state() == "done":
            log(f"[skip] {job.name}: finished already")
        else:
            todo.append(job)
    if options.pack < 1:
        raise RuntimeError(f"--pack must be at least 1, got {options.pack}")
    if options.pack > 1:
        if options.array:
            raise RuntimeError("--pack and --array cannot be combined: a packed job runs several runs itself")
        chunks = [todo[i : i + options.pack] for i in range(0, len(todo), options.pack)]
        scripts = []
        for chunk in chunks:
            name = f"pack-{chunk[0].label}-{len(chunk)}"
            scripts.append((chunk[0], f"{name}.sbatch", packed_sbatch_script(chunk, options, name)))
    elif options.array:
        runs: dict[tuple, list[Job]] = {}
        for job in todo:
            runs.setdefault((job.suite.name, job.budget, job.run.name), []).append(job)
        scripts = [
            (
                group[0],
                f"{group[0].run.name}.sbatch",
                sbatch_script(group[0], options, [j.seed for j in group]),
            )
            for group in runs.values()
        ]
    else:
        scripts = [(job, f"{job.label}.sbatch", sbatch_script(job, options)) for job in todo]
    paths = []
    for job, name, script in scripts:
        path = job.root / job.suite.name / job.budget / "slurm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        paths.append(path)
        if submit:
            out = subprocess.run(
                ["sbatch", str(path)], capture_output=True, text=True, check=True
            ).stdout.strip()
            log(f"[sbatch] {path}: {out}")
        else:
            log(f"[write] {path}")
    return paths
