"""Stand-in `ran` executables for the launcher tests: scripts that behave as `ran fit` and `ran test` do
towards a launcher (arguments, run directory, results.json, exit codes) without training."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from ran.train.rundir import RunDir


def fake_ran(tmp_path: Path) -> Path:
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


def finished_run(
    root: Path, suite: str, budget: str, run: str, seed: int, err1: float | None, step: int = 100
) -> None:
    """Write what `ran fit` and `ran test` leave in a finished run's results.json (err1 None: a fit still
    running at `step`), in the launcher's layout `<root>/<suite>/<budget>/<run>/seed<S>`."""
    run_dir = root / suite / budget / run / f"seed{seed}"
    RunDir(run_dir).update_results(
        "fit",
        {"status": "finished" if err1 is not None else "running", "global_step": step, "max_steps": 100},
    )
    if err1 is not None:
        RunDir(run_dir).update_results("test", {"metrics": {"test/err1": err1, "test/acc1": 1 - err1 / 100}})
