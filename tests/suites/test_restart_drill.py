"""Launchers that restart: two `experiments run` launchers on one root share the runs and never train one
twice at once, a run whose fit finished is only tested, SLURM scripts restart a crashed fit, and the chaos
drill (`experiments.drill`) on a small suite."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import threading
from pathlib import Path

import datagen
import pytest

from experiments.drill import main as drill_main
from experiments.launch import make_jobs, run_local
from experiments.sbatch import SlurmOptions, sbatch_script
from experiments.suites import load_suite
from ran.train.lock import HANDOFF_ENV
from ran.train.rundir import RunDir


def fake_ran(tmp_path: Path, seconds: float = 1.0) -> Path:
    """A stand-in `ran` that logs each call (with the lock fd it was handed) and its start and end times to
    `<root>/calls.txt`, works `seconds`, and writes results.json as the real one does."""
    script = tmp_path / "ran"
    script.write_text(f"""#!{sys.executable}
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
root = Path(args[args.index("--run.root") + 1])
run_dir = root / args[args.index("--run.name") + 1]
start = time.time()
time.sleep({seconds})
results = run_dir / "results.json"
data = json.loads(results.read_text()) if results.exists() else {{}}
if args[0] == "fit":
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("")
    data["fit"] = {{"status": "finished", "global_step": 3, "max_steps": 3}}
else:
    data["test"] = {{"metrics": {{"test/err1": 12.5}}}}
results.write_text(json.dumps(data))
line = [str(run_dir.relative_to(root)), args[0], str(start), str(time.time())]
with open(root / "calls.txt", "a") as f:
    f.write(" ".join(line + [os.environ.get("{HANDOFF_ENV}", "-"), args[-1]]) + "\\n")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_two_launchers_on_one_root_train_every_run_once(tmp_path, monkeypatch):
    fake = str(fake_ran(tmp_path))
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: fake)
    root = tmp_path / "runs"
    jobs = make_jobs(load_suite("mask_structure"), "smoke", [0, 1, 2], root)  # 6 runs
    logs: list[list[str]] = [[], []]
    statuses: list[dict] = [{}, {}]
    go = threading.Barrier(2)

    def launcher(i: int) -> None:
        go.wait()
        statuses[i] = run_local(jobs, parallel=2, log=logs[i].append, poll=0.2)

    threads = [threading.Thread(target=launcher, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(s.get(j.name) == 0 for s in statuses for j in jobs)  # both launchers end well
    calls = [line.split() for line in (root / "calls.txt").read_text().splitlines()]
    fits = sorted(name for name, stage, *_ in calls if stage == "fit")
    assert fits == sorted(j.name for j in jobs)  # every run trained once, by one launcher or the other
    assert sorted(name for name, stage, *_ in calls if stage == "test") == fits
    assert all(fd != "-" for *_, fd, _ in calls)  # each was handed its launcher's lock
    assert all(line[-1] == "auto" for line in calls if line[1] == "fit")  # --ckpt_path auto
    spans = {}
    for name, _, start, end, *_ in calls:  # a run's fit and test never overlap another's on the same run
        spans.setdefault(name, []).append((float(start), float(end)))
    for name, parts in spans.items():
        parts.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(parts, parts[1:])), name
    started = [line for log in logs for line in log if line.startswith("[run ] ran fit")]
    assert len(started) == len(jobs)
    assert all(j.state() == "done" for j in jobs)


def test_a_fitted_run_is_only_tested_and_a_busy_one_waited_for(tmp_path, monkeypatch):
    fake = str(fake_ran(tmp_path, seconds=0))
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: fake)
    root = tmp_path / "runs"
    job, other = make_jobs(load_suite("mask_structure"), "smoke", [0], root)
    RunDir(job.run_dir).update_results("fit", {"status": "finished", "global_step": 3, "max_steps": 3})
    assert job.state() == "fitted"
    code = f"import sys, time; sys.path.insert(0, {str(Path.cwd())!r}); from ran.train.lock import RunLock; "
    code += f"RunLock({str(other.run_dir)!r}, 'ran fit').acquire(); print('held', flush=True); time.sleep(2)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    messages: list[str] = []
    assert run_local([job, other], log=messages.append, poll=0.3) == {job.name: 0, other.name: 0}
    holder.wait()
    calls = [line.split()[:2] for line in (root / "calls.txt").read_text().splitlines()]
    assert calls[0] == [job.name, "test"]  # no fit for a finished fit
    assert calls[1:] == [[other.name, "fit"], [other.name, "test"]]  # trained once its holder had ended
    waits = [m for m in messages if m.startswith("[wait]")]
    assert len(waits) == 1 and f"in use by pid {holder.pid} on" in waits[0]


def test_a_diverged_run_is_started_afresh_only_when_asked(tmp_path, monkeypatch):
    fake = str(fake_ran(tmp_path, seconds=0))
    monkeypatch.setattr("experiments.launch.ran_executable", lambda: fake)
    (job,) = make_jobs(load_suite("mask_structure"), "smoke", [0], tmp_path / "runs", ["attention56_local"])
    RunDir(job.run_dir).update_results("fit", {"status": "diverged"})
    messages: list[str] = []
    assert run_local([job], log=messages.append) == {job.name: 1}
    assert any("diverged" in m and "--run.overwrite true" in m for m in messages)
    (again,) = make_jobs(
        load_suite("mask_structure"),
        "smoke",
        [0],
        tmp_path / "runs",
        ["attention56_local"],
        ["--run.overwrite", "true"],
    )
    assert run_local([again], log=lambda _: None) == {job.name: 0}
    assert again.state() == "done"


def test_a_slurm_job_restarts_a_crashed_fit_but_not_a_failed_one(tmp_path):
    """The script's fit loop, run by bash with a stand-in srun: a fit killed by a signal (exit 137) starts
    again with the same command; one that fails by itself (exit 2) ends the job."""
    job = make_jobs(load_suite("mask_structure"), "smoke", [0], tmp_path / "runs")[0]
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(job, SlurmOptions()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # records each call; the fit's exit codes come from the file `codes`
    srun.write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {tmp_path}/calls.txt\n'
        'for a in "$@"; do [ "$a" = fit ] && fit=1; done\n'
        '[ -z "${fit:-}" ] && exit 0\n'
        f"code=$(head -n1 {tmp_path}/codes); sed -i 1d {tmp_path}/codes; exit $code\n"
    )
    srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_CPUS_PER_TASK": "2"}

    def run(codes: str) -> tuple[int, list[str]]:
        (tmp_path / "codes").write_text(codes)
        (tmp_path / "calls.txt").write_text("")
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        return proc.returncode, (tmp_path / "calls.txt").read_text().splitlines()

    status, calls = run("137\n0\n")  # killed once, then done: a restart, then the test
    assert status == 0 and len(calls) == 3
    assert calls[0] == calls[1] and shlex.split(calls[0])[-2:] == ["--ckpt_path", "auto"]
    assert "test" in shlex.split(calls[2])
    status, calls = run("2\n")  # a bad config: no restart, no test
    assert status == 2 and len(calls) == 1
    status, calls = run("137\n137\n137\n")  # RAN_RESTARTS (2) restarts, then the job fails
    assert status == 137 and len(calls) == 3


@pytest.mark.slow
def test_the_drill_ends_with_every_run_as_if_never_interrupted(tmp_path, capsys):
    """The chaos drill, small: Table 4's two runs with two seeds each, 40 steps, three kills. Each kill lands
    within a tenth of the uninterrupted suite's time after a launch's runs begin writing, so three launches
    cannot finish the suite between them however fast the machine (with 0.4 an idle machine finished it
    after two kills)."""
    datagen.make_cifar10(tmp_path / "data", n_train_per_batch=40, n_test=40)
    argv = ["--data-dir", str(tmp_path / "data"), "--root", str(tmp_path / "drill"), "--kills", "3"]
    argv += ["--steps", "40", "--seed", "1", "--min-wait", "5", "--max-wait-share", "0.1"]
    assert drill_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[kill ") == 3 and out.count(": identical (") == 4
    assert "3 kills (" in out and "4 of 4 runs finished, tested and identical" in out
