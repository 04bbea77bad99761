"""Launching a suite's runs on SLURM (`experiments.sbatch`): resources from the config, job arrays, packed
jobs and their pre-emption, valid bash."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from standins import fake_ran

from experiments.launch import make_jobs, ran_executable
from experiments.sbatch import SlurmOptions, run_slurm, sbatch_script
from experiments.suites import load_suite, suite_names

REPO = Path(__file__).resolve().parents[2]
ALL_RUNS = [(s, r.name) for s in suite_names() for r in load_suite(s).runs]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Commands name configs relative to the working directory, as a user in the checkout types them."""
    monkeypatch.chdir(REPO)


def test_slurm_scripts_take_resources_from_the_config(tmp_path):
    jobs = make_jobs(load_suite("imagenet"), "paper", [0], tmp_path, ["attention92"])
    script = sbatch_script(jobs[0], SlurmOptions(partition="gpu"))
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --cpus-per-task=16",  # the ImageNet default
        "#SBATCH --time=72:00:00",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
    ):
        assert line in script.splitlines()
    assert (
        f"srun --kill-on-bad-exit=1 {ran_executable()} fit -c experiments/suites/imagenet/attention92.yaml"
        in script
    )
    assert ran_executable().startswith("/")  # the venv's own console script
    assert "--ckpt_path best" in script
    written = run_slurm(jobs, SlurmOptions(), submit=False, log=lambda _: None)
    assert written == [tmp_path / "imagenet" / "paper" / "slurm" / "attention92-seed0.sbatch"]
    assert written[0].read_text().startswith("#!/bin/bash")
    cifar = sbatch_script(make_jobs(load_suite("table3"), "cpu-mini", [0], tmp_path)[0], SlurmOptions())
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --time=24:00:00", "#SBATCH --cpus-per-task=8"):
        assert line in cifar.splitlines()
    # The suite's own default (table6's suite.yaml), then the command line's.
    table6 = make_jobs(load_suite("table6"), "paper", [0], tmp_path)[0]
    assert "#SBATCH --time=48:00:00" in sbatch_script(table6, SlurmOptions()).splitlines()
    assert "#SBATCH --time=6:00:00" in sbatch_script(table6, SlurmOptions(time="6:00:00")).splitlines()
    # Overrides after `--` reach the resources as they reach the runs, read by the parser that runs the job.
    for overrides, nodes, tasks in (
        (["--trainer.devices", "4", "--trainer.num_nodes=2"], 2, 4),
        (["--trainer.devices", "[0,1]"], 1, 2),
        (["--trainer.devices=3"], 1, 3),
    ):
        wider = make_jobs(load_suite("imagenet"), "paper", [0], tmp_path, ["attention92"], overrides)
        script = sbatch_script(wider[0], SlurmOptions())
        for line in (
            f"#SBATCH --nodes={nodes}",
            f"#SBATCH --ntasks-per-node={tasks}",
            f"#SBATCH --gres=gpu:{tasks}",
        ):
            assert line in script.splitlines()
        assert shlex.join(overrides) in script


def test_slurm_job_arrays_run_one_script_per_run_over_its_seeds(tmp_path):
    jobs = make_jobs(load_suite("table4"), "paper", [0, 1, 2], tmp_path)
    written = run_slurm(jobs, SlurmOptions(array=True), submit=False, log=lambda _: None)
    slurm = tmp_path / "mask_structure" / "paper" / "slurm"
    assert written == [slurm / "attention56_hourglass.sbatch", slurm / "attention56_local.sbatch"]
    script = written[0].read_text()
    assert "#SBATCH --array=0,1,2" in script.splitlines()
    run = tmp_path / "mask_structure" / "paper" / "attention56_hourglass"
    assert f"#SBATCH --output={run}/seed%a.slurm-%A_%a.out" in script.splitlines()
    # The shell expands the seed: run each array task's script lines with echo in place of srun.
    for seed in (0, 2):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(seed), "SLURM_CPUS_PER_TASK": "8"}
        fit = subprocess.run(
            ["bash", "-c", 'srun() { echo "$@"; }; cd() { :; }; ' + script],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.splitlines()[0]
        args = shlex.split(fit)
        assert args[args.index("--seed_everything") + 1] == str(seed)
        assert args[args.index("--run.name") + 1] == f"mask_structure/paper/attention56_hourglass/seed{seed}"


def test_every_suites_slurm_scripts_are_valid_bash(tmp_path):
    """The generated scripts of every suite (dry run) and the static ones pass `bash -n`."""
    scripts = list((REPO / "experiments" / "slurm").glob("*.sbatch"))
    for name in suite_names():
        one_seed = make_jobs(load_suite(name), "paper", [0], tmp_path)
        scripts += run_slurm(one_seed, SlurmOptions(), submit=False, log=lambda _: None)
        two_seeds = make_jobs(load_suite(name), "paper", [0, 1], tmp_path)
        scripts += run_slurm(two_seeds, SlurmOptions(array=True), submit=False, log=lambda _: None)
    assert len(scripts) == 2 + 2 * len(ALL_RUNS)
    for path in scripts:
        text = path.read_text()
        subprocess.run(["bash", "-n", str(path)], check=True)
        for line in ("#SBATCH --open-mode=append", "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK"):
            assert line in text.splitlines(), (path, line)
        assert "srun --kill-on-bad-exit=1 " in text and "--requeue" in text, path


def test_slurm_packs_single_device_runs_side_by_side_in_one_gpu_job(tmp_path, monkeypatch):
    fake = str(fake_ran(tmp_path))
    monkeypatch.setattr("experiments.sbatch.ran_executable", lambda: fake)
    jobs = make_jobs(load_suite("mask_structure"), "smoke", [0, 1, 2], tmp_path / "runs")  # 6 runs
    paths = run_slurm(jobs, SlurmOptions(pack=4), submit=False, log=lambda _: None)
    assert [p.name for p in paths] == [f"pack-{jobs[0].label}-4.sbatch", f"pack-{jobs[4].label}-2.sbatch"]
    script = paths[0].read_text().splitlines()
    for line in (
        "#SBATCH --ntasks=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --signal=B:USR1@90",
        "trap requeue USR1",
    ):
        assert line in script
    assert sum(line.startswith(f"  {fake} fit") for line in script) == 4
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_ID": "7"}
    for path in paths:
        subprocess.run(["bash", str(path)], env=env, check=True, timeout=120)
    assert all(job.state() == "done" for job in jobs)  # every fit and its test ran
    log = jobs[5].run_dir.with_suffix(".log").read_text()
    assert f"$ {fake} fit" in log and f"$ {fake} test" in log  # each run logs its commands

    with pytest.raises(RuntimeError, match="--pack and --array cannot be combined"):
        run_slurm(jobs, SlurmOptions(pack=2, array=True), submit=False, log=lambda _: None)
    ddp = make_jobs(
        load_suite("mask_structure"), "smoke", [3], tmp_path / "runs", extra=["--trainer.devices", "2"]
    )
    with pytest.raises(RuntimeError, match="uses 2 device.*launch it without --pack"):
        run_slurm(ddp, SlurmOptions(pack=2), submit=False, log=lambda _: None)


def test_a_pre_empted_packed_job_saves_every_run_and_requeues(tmp_path, monkeypatch):
    """USR1 (SLURM's warning before the time limit) to the script: each run gets SIGTERM, saves and stops,
    none is tested, and the job asks to be requeued."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    ran = tmp_path / "ran"
    ran.write_text(f"""#!{sys.executable}
import signal, sys, time
from pathlib import Path
args = sys.argv[1:]
run_dir = Path(args[args.index("--run.root") + 1]) / args[args.index("--run.name") + 1]
run_dir.mkdir(parents=True, exist_ok=True)
if args[0] == "test":
    (run_dir / "tested").write_text("")
    sys.exit(0)
def stop(*_):
    (run_dir / "saved").write_text("last.ckpt")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(run_dir / "started").write_text("")
time.sleep(60)
""")
    for path in (scontrol, ran):
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr("experiments.sbatch.ran_executable", lambda: str(ran))
    jobs = make_jobs(load_suite("mask_structure"), "smoke", [0], tmp_path / "runs")
    (path,) = run_slurm(jobs, SlurmOptions(pack=2), submit=False, log=lambda _: None)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    proc = subprocess.Popen(["bash", str(path)], env=env)
    deadline = time.time() + 60
    while not all((job.run_dir / "started").exists() for job in jobs):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 42\n"
    for job in jobs:
        assert (job.run_dir / "saved").exists() and not (job.run_dir / "tested").exists()


def test_slurm_without_sbatch_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="sbatch is not on PATH.*--dry-run"):
        run_slurm(make_jobs(load_suite("table4"), "paper", [0], tmp_path), SlurmOptions())
