"""Restarts that are not a SLURM requeue: `--ckpt_path auto`, the run directory's lock, torchrun's elastic
restart of a group whose rank was killed, and W&B sweep trials as an agent starts them. Tiny network, fake
CIFAR-10, CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, wandb_records
from fits import callbacks, cifar_fit, load_ckpt

from ran.cli.main import main
from ran.cli.runs import SameCheckpointOnEveryRank
from ran.train.config import ConfigError
from ran.train.lock import LOCK_FILE, RunLock
from ran.train.rundir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")

TESTS = Path(__file__).resolve().parents[1]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def subprocess_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- --ckpt_path auto -----------------------------------------------------------------------------------


def test_ckpt_path_auto_starts_a_fit_then_resumes_it(cifar10_dir, run_root, tmp_path):
    probe = callbacks(("ResumeProbe", {"out_dir": str(tmp_path)}))
    auto = ("--ckpt_path", "auto", "--trainer.callbacks", probe)
    assert main(cifar_fit(cifar10_dir, run_root, "auto", *auto, steps=3)) == 0  # nothing yet: a fresh start
    assert json.loads((tmp_path / "resume_rank0.json").read_text())["global_step"] == 0
    assert main(cifar_fit(cifar10_dir, run_root, "auto", *auto, steps=5)) == 0  # the same command resumes
    assert json.loads((tmp_path / "resume_rank0.json").read_text())["global_step"] == 3
    assert load_ckpt(run_root / "auto" / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert results(run_root / "auto")["fit"]["status"] == "finished"


def test_ckpt_path_auto_keeps_the_checks_and_loses_nothing(cifar10_dir, run_root, capsys):
    torn = run_root / "torn"
    (torn / "checkpoints").mkdir(parents=True)
    (torn / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    assert main(cifar_fit(cifar10_dir, run_root, "torn", "--ckpt_path", "auto")) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no readable checkpoint in" in err and "Traceback" not in err
    assert (torn / "checkpoints" / "last.ckpt").read_bytes().endswith(b"full disk")  # not started afresh

    assert main(cifar_fit(cifar10_dir, run_root, "a92", config="cifar10/attention92.yaml", steps=1)) == 0
    assert main(cifar_fit(cifar10_dir, run_root, "a92", "--ckpt_path", "auto", steps=2)) == 2
    assert "holds attention92_cifar" in capsys.readouterr().err  # the config builds another network

    RunDir(run_root / "a92").update_results("fit", {"status": "diverged"})
    args = cifar_fit(cifar10_dir, run_root, "a92", "--ckpt_path", "auto", config="cifar10/attention92.yaml")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "does not resume it" in err and "--run.overwrite true" in err
    assert main([*args, "--run.overwrite", "true"]) == 0  # auto with overwrite: afresh, as asked
    assert results(run_root / "a92")["fit"]["status"] == "finished"
    test = ["test", *cifar_fit(cifar10_dir, run_root, "a92")[1:], "--ckpt_path", "auto"]
    assert main(test) == 2
    assert "--ckpt_path auto resumes or starts a fit" in capsys.readouterr().err


def test_resuming_a_finished_fit_has_nothing_to_train(cifar10_dir, run_root, capsys):
    assert main(cifar_fit(cifar10_dir, run_root, "done", steps=2)) == 0
    run = run_root / "done"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    capsys.readouterr()
    assert main(cifar_fit(cifar10_dir, run_root, "done", "--ckpt_path", "auto", steps=2)) == 0
    assert "finished already at step 2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before


# --- the lock ---------------------------------------------------------------------------------------------


def test_a_run_in_use_is_refused_in_one_line_and_left_alone(cifar10_dir, run_root, capsys):
    run = run_root / "busy"
    with RunLock(run, "ran fit"):
        for stage in ("fit", "test"):
            args = cifar_fit(
                cifar10_dir, run_root, "busy", "--ckpt_path", "auto" if stage == "fit" else "best"
            )
            assert main([stage, *args[1:]]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1
            assert err[0].startswith(
                f"ran {stage}: error: run directory {run} is in use by pid {os.getpid()}"
            )
            assert f"on {socket.gethostname()} (ran fit, since" in err[0]
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    assert main(cifar_fit(cifar10_dir, run_root, "busy", steps=1)) == 0  # free again once released


def test_the_lock_of_a_killed_run_is_taken_over(cifar10_dir, run_root):
    run = run_root / "killed"
    run.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"pid": gone.pid, "host": socket.gethostname(), "command": "ran fit", "since": "yesterday"}
    (run / LOCK_FILE).write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=f"taking over .*{LOCK_FILE} from pid {gone.pid} .*no longer runs"):
        assert main(cifar_fit(cifar10_dir, run_root, "killed", steps=1)) == 0
    assert (run / LOCK_FILE).read_text() == ""  # released at the end


def test_the_ranks_must_agree_on_the_checkpoint(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(
        dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, None])
    )
    trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match="the ranks resolved different checkpoints"):
        SameCheckpointOnEveryRank("runs/x/checkpoints/last.ckpt").setup(trainer, None, "fit")
    SameCheckpointOnEveryRank(None).setup(trainer, None, "fit")  # [None, None]: the same choice


# --- exact resume of what results.json reports ----------------------------------------------------------


@pytest.mark.slow
def test_a_crash_after_a_validation_step_resumes_with_that_validation(cifar10_dir, run_root, tmp_path):
    """A periodic save at a step that validates waits for the validation's end: the resumed run knows that
    validation's best (its best.ckpt candidate, val/acc1_best) and reports the figures of the uninterrupted
    run, the epoch's training accuracy over all its batches included."""
    common = ["--trainer.deterministic", "true", "--run.checkpoint_every_n_steps", "2"]
    common += ["--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", "4"]
    common += ["--ckpt_path", "auto"]
    assert main(cifar_fit(cifar10_dir, run_root, "whole", *common, steps=8)) == 0
    crashed = cifar_fit(cifar10_dir, run_root, "crashed", *common, steps=8)
    with pytest.raises(RuntimeError, match="crashed after step 5"):  # stands for a kill -9: nothing saved
        main([*crashed, "--trainer.callbacks", callbacks(("CrashAt", {"step": 5}))])
    assert load_ckpt(run_root / "crashed" / "checkpoints" / "last.ckpt")["global_step"] == 4
    probe = callbacks(("ResumeProbe", {"out_dir": str(tmp_path)}))
    assert main([*crashed, "--trainer.callbacks", probe]) == 0
    resumed = json.loads((tmp_path / "resume_rank0.json").read_text())
    step4 = results(run_root / "whole")["fit"]["history"][0]
    assert step4["step"] == 4
    assert resumed["global_step"] == 4 and resumed["best_model_score"] == step4["metrics"]["val/acc1"]
    assert resumed["val_acc1_best"] == step4["metrics"]["val/acc1_best"]
    whole, crashed = results(run_root / "whole")["fit"], results(run_root / "crashed")["fit"]
    for key in ("status", "global_step", "metrics", "history", "best_model_score"):
        assert crashed[key] == whole[key], key
    assert_same_weights(weights(run_root / "crashed"), weights(run_root / "whole"))


# --- torchrun's elastic restarts --------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_rank_was_killed_and_it_ends_as_if_uninterrupted(
    cifar10_dir, run_root, tmp_path
):
    """`torchrun --max-restarts 2 ... ran fit ... --ckpt_path auto` on 2 gloo processes: rank 1 is killed
    (SIGKILL) after step 3; torchrun restarts the group with the same command, which resumes from the step-2
    checkpoint, finishes, and ends with the weights and figures of an uninterrupted run."""

    def torchrun(name: str, *extra: str) -> subprocess.CompletedProcess:
        args = cifar_fit(cifar10_dir, run_root, name, *extra, steps=8)  # 5 steps an epoch: mid-epoch resume
        args += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.deterministic", "true"]
        args += ["--run.checkpoint_every_n_steps", "2", "--ckpt_path", "auto"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        launcher += ["--max-restarts", "2", "--monitor-interval", "0.5"]
        return subprocess.run(
            [*launcher, "-m", "ran.cli", *args],
            env=subprocess_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),  # see docs/cluster.md, Restarts
            capture_output=True,
            text=True,
            timeout=900,
        )

    whole = torchrun("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    probe = callbacks(("CrashAt", {"step": 3, "rank": 1}), ("ResumeProbe", {"out_dir": str(tmp_path)}))
    killed = torchrun("killed", "--trainer.callbacks", probe)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "Signals.SIGKILL" in killed.stderr or "exitcode: -9" in killed.stderr  # torchrun saw rank 1 die
    for rank in (0, 1):  # the restarted group started at the step-2 checkpoint, on both ranks
        assert json.loads((tmp_path / f"resume_rank{rank}.json").read_text())["global_step"] == 2
    run, reference = run_root / "killed", run_root / "whole"
    assert results(run)["fit"]["status"] == "finished"
    assert_same_weights(weights(run), weights(reference))
    for key in ("global_step", "metrics", "history", "best_model_score"):
        assert results(run)["fit"][key] == results(reference)["fit"][key], key


# --- W&B sweeps -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_agent_runs_each_trial_in_its_own_directory_under_its_own_id(cifar10_dir, run_root, tmp_path):
    """The shipped sweep's command, expanded and started as `wandb agent` does it (wandb_agent.py,
    `_command_run`: WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH and WANDB_DIR set, the trial's values
    as `--key=value`), offline, for two trials: each finishes in its own directory under the agent's id."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib import config_util

    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "arl_vs_nal_lr.yaml").read_text())
    assert set(sweep["parameters"]) == {"model.learning", "model.lr"}
    # The test's size: tiny network and data, 2 steps (after the sweep's own arguments, before the trial's).
    small = cifar_fit(cifar10_dir, run_root, "unused", steps=2)[3:]
    small = small[: small.index("--run.name")]
    trials = {"trial0aa": {"model.learning": "arl", "model.lr": 0.05}, "trial1bb": {"model.learning": "nal"}}
    trials["trial1bb"]["model.lr"] = 0.2
    for run_id, values in trials.items():
        command = {"args": {key: {"value": value} for key, value in values.items()}}
        param_path = tmp_path / "wandb" / "sweep-swp123" / f"config-{run_id}.yaml"
        param_path.parent.mkdir(parents=True, exist_ok=True)
        config_util.save_config_file_from_dict(str(param_path), command["args"])
        macros = {
            "env": ["/usr/bin/env"],
            "interpreter": [sys.executable],
            **create_sweep_command_args(command),
        }
        argv = []
        for part in sweep["command"]:
            if part == "${args}":
                argv += small
            argv += macros[part[2:-1]] if part.startswith("${") else [part]
        env = subprocess_env(
            WANDB_MODE="offline",
            WANDB_SWEEP_ID="swp123",
            WANDB_RUN_ID=run_id,
            WANDB_SWEEP_PARAM_PATH=str(param_path),
            WANDB_DIR=str(tmp_path),
        )
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for run_id, values in trials.items():
        run = run_root / f"sweep-a56-lr-{run_id}"
        assert results(run)["fit"]["status"] == "finished"
        assert (run / "wandb_run_id").read_text().strip() == run_id
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["lr"] == values["model.lr"]
        assert config["model"]["learning"] == values["model.learning"]
        (offline,) = (run / "wandb").glob("offline-run-*")
        assert offline.name.endswith(run_id)
        records = wandb_records(offline / f"run-{run_id}.wandb")
        runs = [r.run for r in records if r.HasField("run")]
        assert runs and runs[0].run_id == run_id and runs[0].sweep_id == "swp123"
        assert runs[0].display_name == f"sweep-a56-lr-{run_id}"
