"""Launching a suite's runs on SLURM: a job per run and seed, a job array over the seeds of each run, or N
single-device runs packed into one GPU job (`--pack N`). The scripts run `ran fit` and `ran test` as the local
launcher does (`experiments.launch`); a job pre-empted or at its time limit saves, requeues and resumes.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experiments.launch import ARRAY_SEED, Job, ran_executable, shell_line, shell_quote
from experiments.suites import Suite

__all__ = ["SLURM_DEFAULTS", "SlurmOptions", "packed_sbatch_script", "run_slurm", "sbatch_script"]


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
    # `--ckpt_path auto`: a first start, a requeued job (its hpc_ckpt_*.ckpt) and a restart after a crashed
    # rank all run the same command, each from the run's newest checkpoint.
    lines += [
        "# Since SLURM 22.05 srun does not pass --cpus-per-task on to its tasks: without this line, each",
        "# rank and its DataLoader workers may share one core.",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
        *restart_loop(f"{srun} {shell_line(job.fit_args(), ran)}"),
        f"{srun} --ntasks=1 --nodes=1 {shell_line(job.test_args(), ran)} --trainer.devices 1 "
        "--trainer.num_nodes 1 --trainer.strategy auto",
    ]
    return "\n".join(lines) + "\n"


def restart_loop(command: str, indent: str = "") -> list[str]:
    """Shell lines that run `command` (a fit with `--ckpt_path auto`) and, when a crash ended it (a rank
    killed by a signal: exit 128 + N, other than SIGTERM's 143 and SIGINT's 130, which are stops someone
    asked for), run it again from the run's newest checkpoint, up to $RAN_RESTARTS (default 2) times. A
    fit that failed by itself (exit 1 or 2: bad config, data or a divergence) is not restarted."""
    return [
        f"{indent}restarts=${{RAN_RESTARTS:-2}}",
        f"{indent}until {command}; do",
        f"{indent}  status=$?",
        f'{indent}  if [ "$status" -lt 128 ] || [ "$status" -eq 130 ] || [ "$status" -eq 143 ] '
        f'|| [ "$restarts" -le 0 ]; then exit "$status"; fi',
        f"{indent}  restarts=$((restarts - 1))",
        f'{indent}  echo "$(date): the fit crashed (exit $status); restarting it from its newest checkpoint '
        f'($restarts left)"',
        f"{indent}done",
    ]


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
        lines += [
            f"mkdir -p {shell_quote(str(job.run_dir.parent))}",
            "(",
            "  trap 'stopped=1' TERM  # the run saves and exits; its test waits for the requeued job",
            f"  echo {shlex.quote('$ ' + shell_line(job.fit_args(), ran))}",
            f"  {shell_line(job.fit_args(), ran)} || exit $?",
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
