"""The chaos drill: a suite launched locally, killed at random moments and launched again each time, must end
as if it had never been interrupted.

    python -m experiments.drill --data-dir ../shared/data                     # 20 kills of a smoke suite
    python -m experiments.drill --data-dir DATA --kills 5 --seeds 0 --root /tmp/drill

It runs the suite (default: Table 4's, smoke budget, seeds 0 and 1, `--parallel 2`, deterministic, 240
steps with a checkpoint every 16 and a validation every 80) once without interruption, then again under
fire: it starts the same `python -m experiments run` command, waits a random time (a quarter of the time
within its first 15 s, else up to a tenth of the uninterrupted suite's time after its runs began writing
files), and kills it, until `--kills` kills have landed, each time one of

- SIGTERM to the launcher (a scheduler's stop, Ctrl-C): the launcher stops its runs, which save and exit;
- kill -9 of every launcher and run process, earlier orphans included (a node crash, an OOM kill);
- kill -9 of the launcher alone: its runs go on as orphans, holding their runs' locks, and the next launcher
  waits for them rather than train their runs a second time.

Then it starts the command once more and lets it finish, and checks every run: finished, tested, and its
results.json figures and its final and best weights bit-identical to the uninterrupted suite's. It prints one
line per kill and per run and exits 0 only if every run is identical.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.launch import make_jobs
from experiments.suites import BUDGETS, load_suite
from ran.train.lock import LOCK_FILE
from ran.train.rundir import RunDir


def drill_overrides(steps: int) -> list[str]:
    """What the drill adds to the budget: `steps` steps (enough that kills land in training, validation and
    saving, not only in start-ups), three validations, a checkpoint every 1/15 of the run (so at validation
    steps too), deterministic kernels."""
    return [
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(max(1, steps // 3)),
        "--run.checkpoint_every_n_steps",
        str(max(2, steps // 15)),
        "--trainer.deterministic",
        "true",
    ]


KILLS = ("SIGTERM to the launcher", "kill -9 of every launcher and run", "kill -9 of the launcher alone")
KILL_WEIGHTS = (2, 2, 1)  # orphans left by the third kind finish their stage, which would end the suite early
FIT_KEYS = ("status", "global_step", "max_steps", "epoch", "metrics", "history", "best_model_score", "error")

__all__ = ["compare_runs", "drill", "main"]


def _launch_command(args: argparse.Namespace, root: Path) -> list[str]:
    command = [sys.executable, "-m", "experiments", "run", args.suite, "--budget", args.budget]
    command += ["--root", str(root), "--parallel", str(args.parallel), "--seeds", *map(str, args.seeds)]
    command += ["--data-dir", str(args.data_dir)]
    return [*command, "--", *drill_overrides(args.steps), *args.overrides]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:  # the launcher leads its own process group: its runs are that group
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_write(root: Path) -> float:
    """The newest modification time of a file that a run wrote under `root` (its config, checkpoints,
    results, logger files; not the launcher's lock records and logs), 0 when there is none."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE and p.suffix != ".log"]
    times = []
    for path in files:
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:  # replaced or removed meanwhile
            pass
    return max(times, default=0.0)


def _wait_for_work(launcher: subprocess.Popen, root: Path, since: float, timeout: float) -> bool:
    """Wait until a run under `root` writes a file after `since` (its training has begun: a config, a
    checkpoint, results), or the launcher ends; False if neither happened within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if launcher.poll() is not None or _last_write(root) > since:
            return True
        time.sleep(0.5)
    return False


def _weights(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a)


def compare_runs(reference: Path, drilled: Path) -> list[str]:
    """What differs between two run directories of the same run: the fit's figures in results.json, the test
    metrics, the final (last.ckpt) and best (best.ckpt) weights; [] when nothing does."""
    ref, got = RunDir(reference), RunDir(drilled)
    ref_results, got_results = ref.read_results(), got.read_results()
    problems = []
    if got.fit_status() != "finished":
        problems.append(f"fit status {got.fit_status()!r}")
    for key in FIT_KEYS:
        if ref_results.get("fit", {}).get(key) != got_results.get("fit", {}).get(key):
            problems.append(f"results.json fit.{key}")
    if "test" not in got_results:
        problems.append("not tested")
    elif ref_results.get("test", {}).get("metrics") != got_results["test"].get("metrics"):
        problems.append("results.json test.metrics")
    for name in ("last.ckpt", "best.ckpt"):
        if not _same_weights(_weights(ref.checkpoints / name), _weights(got.checkpoints / name)):
            problems.append(f"{name} weights")
    return problems


def _say(text: str) -> None:
    print(text, flush=True)


def fit_starts(log: Path) -> tuple[int, list[str]]:
    """How often a run's log shows its fit started, and the checkpoints the fits that resumed started from."""
    starts, resumed, stage = 0, [], None
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else ():
        if line.startswith("$ ran "):
            stage = line.split()[2]
            starts += stage == "fit"
        elif stage == "fit" and line.startswith("Restoring states from the checkpoint path at "):
            resumed.append(Path(line.rsplit(" ", 1)[-1]).name)
    return starts, resumed


def drill(args: argparse.Namespace, say=_say) -> bool:
    """Run the drill (see the module docstring); True when every run ended identical."""
    rng = random.Random(args.seed)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    suite = load_suite(args.suite)
    jobs = {job.name: job for job in make_jobs(suite, args.budget, args.seeds, root / "drill")}
    names = sorted(jobs)

    start = time.time()
    reference = _start(_launch_command(args, root / "reference"), root / "reference.log")
    if reference.wait() != 0:
        say(f"[drill] the uninterrupted suite failed (exit {reference.returncode}; see {root}/reference.log)")
        return False
    took = time.time() - start
    say(f"[drill] reference: {len(names)} runs without interruption in {took:.0f} s")

    command = _launch_command(args, root / "drill")
    groups: list[int] = []  # the process groups of killed launchers, whose orphans may still run
    counts = dict.fromkeys(KILLS, 0)
    attempt = 0
    while sum(counts.values()) < args.kills:
        attempt += 1
        started = time.time()
        launcher = _start(command, root / "drill.log")
        groups.append(launcher.pid)
        how = rng.choices(KILLS, weights=KILL_WEIGHTS)[0]
        # A quarter of the kills land while the launcher and its runs start; the others once a run has begun
        # writing (training, validating, saving or testing), a random time later.
        if rng.random() < 0.25:
            wait, phase = rng.uniform(args.min_wait, 15.0), "while starting"
        else:
            _wait_for_work(launcher, root / "drill", started, timeout=took)
            extra = rng.uniform(0.0, args.max_wait_share * took)
            wait, phase = time.time() - started + extra, f"{extra:.0f} s after its runs began writing"
        try:
            code = launcher.wait(timeout=max(0.0, wait - (time.time() - started)))
        except subprocess.TimeoutExpired:
            code = None
        done = sum(jobs[n].state() == "done" for n in names)
        if code is not None:  # it finished first: nothing was left to kill
            say(f"[drill] launch {attempt} ended by itself (exit {code}) after less than {wait:.0f} s")
            if code != 0:
                say(f"[drill] the launcher failed by itself (exit {code}; see {root}/drill.log)")
                return False
            if done == len(names):
                say(
                    f"[drill] the suite finished after {sum(counts.values())} of {args.kills} kills: raise "
                    "--steps or lower --max-wait-share"
                )
                return False
            continue
        if how == KILLS[0]:
            launcher.send_signal(signal.SIGTERM)
            try:
                code = launcher.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                code = launcher.wait()
        elif how == KILLS[1]:  # a node crash: the orphans of earlier launchers die too
            for pgid in groups:
                if _group_alive(pgid):
                    os.killpg(pgid, signal.SIGKILL)
            code = launcher.wait()
        else:
            launcher.kill()
            code = launcher.wait()
        counts[how] += 1
        kill = sum(counts.values())
        progress = f"runs done {done}/{len(names)}"
        say(f"[kill {kill:2d}/{args.kills}] at {wait:5.1f} s ({phase}), {how}: exit {code}; {progress}")

    start = time.time()
    final = _start(command, root / "drill.log")
    code = final.wait()
    while any(_group_alive(pgid) for pgid in groups):  # orphans of the last killed launchers
        time.sleep(1)
    say(f"[final] launch {attempt + 1} ran to the end in {time.time() - start:.0f} s: exit {code}")

    identical = 0
    for name in names:
        problems = compare_runs(root / "reference" / name, jobs[name].run_dir)
        identical += not problems
        verdict = "identical (fit and test figures, last and best weights)" if not problems else problems
        starts, resumed = fit_starts(jobs[name].run_dir.with_suffix(".log"))
        froms = f" ({', '.join(resumed)})" if resumed else ""
        say(f"[check] {name}: {verdict}; fit started {starts} times, {len(resumed)} of them resumed{froms}")
    kinds = ", ".join(f"{n} {how}" for how, n in counts.items())
    say(
        f"[drill] {args.kills} kills ({kinds}) in {attempt + 1} launches: {identical} of {len(names)} runs "
        "finished, tested and identical to the uninterrupted suite"
    )
    return code == 0 and identical == len(names)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.drill",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` are passed to every run, after the drill's own: "
        + " ".join(drill_overrides(240)),
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the suite's dataset folder")
    parser.add_argument("--suite", default="mask_structure", help="a suite (default: Table 4's, 2 runs)")
    parser.add_argument("--budget", default="smoke", choices=BUDGETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=240, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="the drill's own: kill times and kinds")
    parser.add_argument("--min-wait", type=float, default=2.0, help="seconds before a kill, at least")
    parser.add_argument(
        "--max-wait-share",
        type=float,
        default=0.1,
        help="a kill's time after a launch's runs began working, at most, as a share of the uninterrupted "
        "suite's time",
    )
    parser.add_argument("--root", type=Path, default=Path("runs/drill"), help="its two suites' roots")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args: Any = _parser().parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    return 0 if drill(args) else 1


if __name__ == "__main__":
    sys.exit(main())
