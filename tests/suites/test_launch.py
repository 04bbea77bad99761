"""Launching a suite's runs locally or as a list (`experiments.launch`): commands, run slots over the GPUs,
skipping and resuming, interruptions."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
from standins import fake_ran

from experiments.__main__ import main as experiments_main
from experiments.launch import command_list, make_jobs, run_local, visible_gpus
from experiments.suites import load_suite
from ran.train.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Commands name configs relative to the working directory, as a user in the checkout types them."""
    monkeypatch.chdir(REPO)


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


def test_local_launcher_deals_its_run_slots_out_over_the_gpus(tmp_path, monkeypatch):
    fake = str(fake_ran(tmp_path))
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
    fake = str(fake_ran(tmp_path))  # written once: rewriting it while a parallel run executes it fails
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
