"""The experiment suites: configs, smoke runs, launchers and the report."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import datagen
import pytest
import yaml

import experiments.suites
from experiments.__main__ import main as experiments_main
from experiments.launch import command_list, make_jobs, ran_executable, run_local, visible_gpus
from experiments.report import collect, markdown_table, report
from experiments.sbatch import SlurmOptions, run_slurm, sbatch_script
from experiments.suites import BUDGETS, SUITES_DIR, SuiteError, _parse, load_suite, suite_names
from ran.cli.main import main as ran_main
from ran.train.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
ALL_RUNS = [(s, r.name) for s in suite_names() for r in load_suite(s).runs]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Commands name configs relative to the working directory, as a user in the checkout types them."""
    monkeypatch.chdir(REPO)


def test_the_paper_tables_are_suites():
    assert set(suite_names()) == {
        "activation",
        "arl_vs_nal",
        "mask_structure",
        "label_noise",
        "cifar",
        "imagenet",
        "attention_family",
    }
    assert load_suite("table3").name == "arl_vs_nal"
    assert [r.factors["depth"] for r in load_suite("table3").runs] == [56, 56, 92, 92, 128, 128, 164, 164]
    assert load_suite("table3").run("attention164_nal").paper == {"test/err1": 7.18}
    noise = load_suite("label_noise")
    assert sorted({r.factors["noise"] for r in noise.runs}) == [10, 30, 50, 70]
    assert len(load_suite("attention_family").runs) == 8
    with pytest.raises(SuiteError, match="known suites: activation"):
        load_suite("table9")


@pytest.mark.parametrize("suite,run", ALL_RUNS)
def test_run_config_states_its_factors(suite, run):
    """Each run, as the launcher starts it, sets what its factors say, and the launcher tags its W&B run with
    the suite and the factors of suite.yaml (the run configs do not repeat them)."""
    spec = load_suite(suite)
    job = make_jobs(spec, "paper", [0], Path("runs"), [run])[0]
    assert "run" not in yaml.safe_load(job.run.config.read_text())
    cfg = job.resolved_config().config
    factors = job.run.factors
    assert cfg["run"]["group"] == suite
    assert cfg["run"]["tags"] == [suite] + [f"{k}={v}" for k, v in factors.items()]
    model = cfg["model"]
    for key in ("learning", "attention", "mask"):
        if key in factors:
            assert model[key] == factors[key]
    if "depth" in factors:
        assert model["arch"].startswith(f"attention{factors['depth']}")
    if "noise" in factors:
        assert cfg["data"]["init_args"]["clean_label_ratio"] == pytest.approx(1 - factors["noise"] / 100)
    if "dataset" in factors:
        assert cfg["data"]["class_path"].endswith(factors["dataset"].upper() + "DataModule")


def test_a_suite_key_that_nothing_reads_is_refused(tmp_path, monkeypatch):
    (tmp_path / "odd").mkdir()
    spec = yaml.safe_load((experiments.suites.SUITES_DIR / "mask_structure" / "suite.yaml").read_text())
    (tmp_path / "odd" / "suite.yaml").write_text(yaml.safe_dump({**spec, "dataset": "cifar10"}))
    monkeypatch.setattr(experiments.suites, "SUITES_DIR", tmp_path)
    with pytest.raises(SuiteError, match="unknown key dataset in suite.yaml"):
        load_suite("odd")
    (tmp_path / "odd" / "suite.yaml").write_text(yaml.safe_dump({**spec, "slurm": {"hours": 3}}))
    with pytest.raises(SuiteError, match="unknown key slurm.hours"):
        load_suite("odd")


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datagen.make_cifar10(root, n_train_per_batch=20, n_test=20)
    datagen.make_cifar100(root, n_train=200, n_test=40)
    datagen.make_imagefolder(root / "imagenet" / "train", n_per_class=4, size=40)
    datagen.make_imagefolder(root / "imagenet" / "val", n_per_class=2, size=40)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("suite,run", ALL_RUNS)
def test_every_run_config_trains_a_smoke_step(suite, run, fake_data, tmp_path):
    spec = load_suite(suite)
    data_dir = fake_data / "imagenet" if spec.budget_family == "imagenet" else fake_data
    job = make_jobs(
        spec,
        "smoke",
        [0],
        tmp_path,
        [run],
        [
            "--data.init_args.data_dir",
            str(data_dir),
            "--trainer.max_steps",
            "1",
            "--trainer.val_check_interval",
            "1",
            "--trainer.limit_val_batches",
            "1",
        ],
    )[0]
    assert ran_main(job.fit_args()) == 0
    results = json.loads((job.run_dir / "results.json").read_text())
    assert results["fit"]["status"] == "finished" and results["fit"]["global_step"] == 1
    assert (job.run_dir / "checkpoints" / "best.ckpt").is_file()


def test_command_list_fits_then_tests_every_run_and_seed(tmp_path):
    jobs = make_jobs(
        load_suite("table3"), "paper", [0, 1], tmp_path, extra=["--trainer.precision", "bf16-mixed"]
    )
    lines = command_list(jobs)
    assert len(lines) == 16
    fit, test = lines[3].split(" && ")
    args = shlex.split(fit)
    assert args[:2] == ["ran", "fit"]
    assert "experiments/suites/arl_vs_nal/attention56_nal.yaml" in args
    assert args[args.index("--run.name") + 1] == "arl_vs_nal/paper/attention56_nal/seed1"
    assert args[args.index("--seed_everything") + 1] == "1"
    assert args[-4:] == ["--trainer.precision", "bf16-mixed", "--ckpt_path", "auto"]
    assert shlex.split(test)[-2:] == ["--ckpt_path", "best"]


def test_cli_list_launcher_prints_commands(capsys):
    assert (
        experiments_main(
            [
                "run",
                "table4",
                "--budget",
                "cpu-mini",
                "--launcher",
                "list",
                "--seeds",
                "3",
                "--data-dir",
                "/data",
                "--",
                "--trainer.max_steps",
                "10",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "experiments/budgets/cifar/cpu-mini.yaml" in lines[0]
    assert "--data.init_args.data_dir /data" in lines[0] and lines[0].split(" && ")[0].endswith(
        "--trainer.max_steps 10 --ckpt_path auto"
    )


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
    fake = str(_fake_ran(tmp_path))
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


def _fake_ran(tmp_path: Path) -> Path:
    """A stand-in `ran` that records its arguments and writes results.json as the real one does."""
    script = tmp_path / "ran"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
run_dir = Path(args[args.index("--run.root") + 1]) / args[args.index("--run.name") + 1]
run_dir.mkdir(parents=True, exist_ok=True)
with open(run_dir.parent / "calls.txt", "a") as f:
    f.write(" ".join(args) + "\\n")
with open(run_dir.parent / "gpus.txt", "a") as f:
    f.write(f"{{run_dir.name}} {{args[0]}} {{os.environ.get('CUDA_VISIBLE_DEVICES')}}\\n")
results = run_dir / "results.json"
data = json.loads(results.read_text()) if results.exists() else {{}}
if args[0] == "fit":
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("")
    data["fit"] = {{"status": "finished", "global_step": 3, "max_steps": 3}}
else:
    data["test"] = {{"metrics": {{"test/err1": 12.5}}}}
results.write_text(json.dumps(data))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_local_launcher_deals_its_run_slots_out_over_the_gpus(tmp_path, monkeypatch):
    fake = str(_fake_ran(tmp_path))
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    suite = load_suite("mask_structure")

    def gpus_seen(parallel: int, gpus: list[str], root: str) -> list[str]:
        jobs = make_jobs(suite, "smoke", [0, 1], tmp_path / root)
        assert run_local(jobs, parallel=parallel, gpus=gpus, log=lambda _: None) == {j.name: 0 for j in jobs}
        files = {job.run_dir.parent / "gpus.txt" for job in jobs}  # one per run, its seeds' lines
        lines = [line.split() for path in files for line in path.read_text().splitlines()]
        assert len(lines) == 2 * len(jobs)  # a fit and a test per job
        return [gpu for _, _, gpu in lines]

    assert set(gpus_seen(4, ["3"], "one")) == {"3"}  # four runs at a time packed onto one GPU
    assert set(gpus_seen(2, ["0", "1"], "two")) == {"0", "1"}  # two slots, one GPU each
    assert set(gpus_seen(2, [], "none")) == {"None"}  # no GPU: nothing pinned


@pytest.mark.parametrize(
    "listed,expected", [("2,3", ["2", "3"]), ("", []), ("-1", []), ("GPU-1a2b", ["GPU-1a2b"])]
)
def test_visible_gpus_follow_cuda_visible_devices(listed, expected, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert visible_gpus() == expected


def test_local_launcher_runs_skips_and_resumes(tmp_path, monkeypatch):
    fake = str(_fake_ran(tmp_path))  # written once: rewriting it while a parallel run executes it fails
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: fake)
    suite = load_suite("mask_structure")
    jobs = make_jobs(suite, "smoke", [0, 1], tmp_path / "runs")
    assert run_local(jobs, parallel=2, log=lambda _: None) == {j.name: 0 for j in jobs}
    assert all(j.state() == "done" for j in jobs)
    # a finished run is skipped; one with a checkpoint but no results is resumed (--ckpt_path auto)
    (jobs[0].run_dir / "results.json").unlink()
    calls = jobs[0].run_dir.parent / "calls.txt"
    calls.write_text("")
    assert run_local(jobs, log=lambda _: None) == {j.name: 0 for j in jobs}
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fit") and lines[0].endswith("--ckpt_path auto")
    # a directory left by a start that never reached a checkpoint is started again, the user's files kept
    stale = jobs[2].run_dir
    for p in sorted(stale.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (stale / "notes.txt").write_text("keep me")
    statuses = run_local(jobs, log=lambda _: None)
    assert statuses[jobs[2].name] == 0 and (stale / "notes.txt").read_text() == "keep me"
    assert jobs[2].state() == "done"
    # a diverged run is not resumed (it would diverge again): the launcher says what to change
    RunDir(jobs[3].run_dir).update_results("fit", {"status": "diverged"})
    messages: list[str] = []
    assert run_local(jobs, log=messages.append)[jobs[3].name] == 1
    assert any("diverged" in m and "--run.overwrite true" in m for m in messages)


def _finish(
    root: Path, suite: str, budget: str, run: str, seed: int, err1: float | None, step: int = 100
) -> None:
    run_dir = root / suite / budget / run / f"seed{seed}"
    RunDir(run_dir).update_results(
        "fit",
        {"status": "finished" if err1 is not None else "running", "global_step": step, "max_steps": 100},
    )
    if err1 is not None:
        RunDir(run_dir).update_results("test", {"metrics": {"test/err1": err1, "test/acc1": 1 - err1 / 100}})


def test_report_builds_the_papers_table_with_missing_runs(tmp_path):
    suite = load_suite("table3")
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", 0, 30.0)
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", 1, 32.0)
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_nal", 0, 35.5)
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention164_nal", 0, None, step=40)
    text, md, csv_path = report(suite, "cpu-mini", tmp_path)
    table = text.split("Contrast")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["56"] == "| 56 | 31.00 ± 1.41 (n=2) | 5.52 | +25.48 | 35.50 | 5.89 | +29.61 |"
    assert rows["92"] == "| 92 | missing | 4.99 | - | missing | 5.35 | - |"
    assert "unfinished (step 40/100)" in rows["164"]
    assert rows["164"].startswith("| 164 | missing | 4.31 | - | unfinished")
    assert md.read_text() == text
    csv_rows = csv_path.read_text().splitlines()
    assert csv_rows[0] == "suite,budget,run,depth,learning,metric,status,seeds,n,mean,std,paper,diff"
    assert (
        "arl_vs_nal,cpu-mini,attention56_arl,56,arl,test/err1,done,0 1,2,31.0000,1.4142,5.52,25.4800"
        in csv_rows
    )


def test_report_weighs_the_suites_contrast_against_the_seed_spread(tmp_path):
    for seed, (arl, nal) in enumerate([(30.0, 35.0), (32.0, 36.0), (31.0, 37.0)]):
        _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", seed, arl)  # sd 1.0
        _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_nal", seed, nal)  # sd 1.0
    for seed, (arl, nal) in enumerate([(40.0, 39.0), (44.0, 45.0)]):
        _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention92_arl", seed, arl)  # sd 2.83
        _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention92_nal", seed, nal)  # sd 4.24
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_arl", 0, 40.0)
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_nal", 0, 50.0)
    _finish(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_nal", 1, None, step=40)  # still running
    text, _, _ = report(load_suite("table3"), "cpu-mini", tmp_path)
    contrast = text.split("Contrast nal − arl")[1]
    rows = {line.split(" | ")[0].strip("| "): line for line in contrast.splitlines() if line.startswith("| ")}
    header = "| depth | nal − arl measured | sd arl + sd nal | exceeds the spread | nal − arl paper |"
    assert rows["depth"] == header
    assert rows["56"] == "| 56 | +5.00 | 2.00 | yes | +0.37 |"  # 5 > 1 + 1
    assert rows["92"] == "| 92 | +0.00 | 7.07 | no | +0.36 |"
    assert rows["128"] == "| 128 | +10.00 | - | - [partial] | +1.13 |"  # one seed: no spread to weigh
    assert rows["164"] == "| 164 | - | - | - | +2.87 |"
    assert "Contrast" not in report(load_suite("table4"), "cpu-mini", tmp_path)[0]  # a suite without one


def test_suite_contrast_must_name_two_column_values():
    spec = yaml.safe_load((SUITES_DIR / "arl_vs_nal" / "suite.yaml").read_text())
    assert _parse("arl_vs_nal", spec).contrast == ("arl", "nal")
    with pytest.raises(SuiteError, match="contrast must name two values of its column factor 'learning'"):
        _parse("arl_vs_nal", {**spec, "contrast": ["arl", "ral"]})


def test_report_cli_prints_and_writes(tmp_path, capsys):
    _finish(tmp_path, "mask_structure", "smoke", "attention56_local", 0, 50.0)
    assert (
        experiments_main(
            ["report", "table4", "--budget", "smoke", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| local | 50.00 | 6.48 | +43.52 |" in out and "| hourglass | missing | 5.52 | - |" in out
    assert (tmp_path / "out" / "mask_structure-smoke.csv").is_file()


def test_multi_metric_suite_reports_both_metrics(tmp_path):
    run_dir = tmp_path / "imagenet" / "paper" / "attention92" / "seed0"
    RunDir(run_dir).update_results("test", {"metrics": {"test/err1": 20.0, "test/err5": 5.0}})
    cells = collect(load_suite("imagenet"), "paper", tmp_path)
    text = markdown_table(load_suite("imagenet"), "paper", cells)
    assert "| attention92 | 20.00 | 19.50 | +0.50 | 5.00 | 4.80 | +0.20 |" in text


def test_unknown_suite_or_budget_exits_nonzero(capsys):
    assert experiments_main(["report", "table42"]) == 2
    assert "unknown suite 'table42'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiments_main(["run", "table3", "--budget", "huge"])
    assert set(BUDGETS) == {"paper", "cpu-mini", "smoke"}


def test_budgets_are_overlays_of_known_keys():
    for family in ("cifar", "imagenet"):
        for budget in BUDGETS:
            cfg = yaml.safe_load((REPO / "experiments" / "budgets" / family / f"{budget}.yaml").read_text())
            assert set(cfg) <= {"model", "trainer", "data", "run"}, (family, budget)


def stand_in_ran(tmp_path, monkeypatch, on_sigint: str = "pass") -> None:
    """Make the launcher start a stand-in `ran` that sleeps for a minute, and on SIGINT runs `on_sigint` and
    exits 130 (as `ran fit` does once it has saved last.ckpt)."""
    script = tmp_path / "ran"
    script.write_text(f"""#!{sys.executable}
import signal, sys, time
def bye(*_):
    {on_sigint}
    sys.exit(130)
signal.signal(signal.SIGINT, bye)
time.sleep(60)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: str(script))


def test_interrupting_the_local_launcher_ends_its_runs(tmp_path, monkeypatch):
    """SIGTERM to the launcher reaches the `ran` process it started, instead of leaving it running."""
    import signal
    import threading
    import time

    marker = tmp_path / "interrupted"
    stand_in_ran(tmp_path, monkeypatch, f"open({str(marker)!r}, 'w').write('yes')")
    jobs = make_jobs(load_suite("mask_structure"), "smoke", [0], tmp_path / "runs")
    threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_local(jobs, log=lambda _: None)
    assert time.time() - start < 30
    assert marker.read_text() == "yes"


def test_an_interrupted_suite_says_so_in_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    """SIGTERM to `python -m experiments run`: each run it stopped is logged as resumable (not as a failure),
    and the command ends with one line and exit 130, not a traceback."""
    import signal
    import threading

    stand_in_ran(tmp_path, monkeypatch)
    threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    argv = ["run", "mask_structure", "--budget", "smoke", "--root", str(tmp_path / "runs"), "--parallel", "2"]
    assert experiments_main(argv) == 130
    out, err = capsys.readouterr()
    stopped = [line for line in out.splitlines() if line.startswith("[stop]")]
    assert len(stopped) == 2 and all("the same command resumes it from last.ckpt" in line for line in stopped)
    assert "[fail]" not in out and "Traceback" not in err
    assert err.strip().splitlines() == [
        "experiments run: interrupted; the running runs saved last.ckpt, and the same command resumes the "
        "suite where it stopped"
    ]
