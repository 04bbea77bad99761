"""Cluster faults lose no work and never pass for results: last.ckpt, signals, divergence, checkpoints of
another network or run, corrupt checkpoints, the recipe on resume, argument abbreviations, `validate`'s own
figures, and the report's reading of results.json. Tiny network, fake CIFAR-10, CPU, a few steps each."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fits import callbacks, cifar_fit, load_ckpt

from experiments.report import seed_state
from ran.cli.app import ConfigError
from ran.cli.main import main
from ran.cli.runs import check_writable
from ran.train.callbacks import AtomicCheckpointIO, DivergenceGuard, TrainingDiverged
from ran.train.rundir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_last_ckpt_is_the_newest_state_every_n_steps_and_at_the_end(cifar10_dir, run_root, tmp_path, caplog):
    run = run_root / "newest"
    probe = callbacks(("LastStepAt", {"step": 5, "run_dir": str(run), "out_dir": str(tmp_path)}))
    args = cifar_fit(cifar10_dir, run_root, "newest", "--run.checkpoint_every_n_steps", "4", steps=6)
    saver = logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector")
    saver.addHandler(caplog.handler)  # Lightning's logger does not propagate to pytest's
    try:
        assert main([*args, "--trainer.callbacks", probe]) == 0
    finally:
        saver.removeHandler(caplog.handler)
    assert "weights_only" not in caplog.text  # each save says what it keeps: no line in the log for it
    assert json.loads((tmp_path / "last_step.json").read_text())["step"] == 4  # saved at step 4, not at 0
    assert load_ckpt(run / "checkpoints/last.ckpt")["global_step"] == 6  # the final weights
    assert (run / "checkpoints/best.ckpt").is_file()
    assert results(run)["fit"]["status"] == "finished"


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_the_step_exits_non_zero_and_the_run_resumes(
    signame, code, cifar10_dir, run_root, capsys
):
    run = run_root / "signalled"
    args = cifar_fit(cifar10_dir, run_root, "signalled", steps=6)
    sigint = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in a background job
    assert (
        main([*args, "--trainer.callbacks", callbacks(("SignalAt", {"step": 3, "signum": signame}))]) == code
    )
    err = capsys.readouterr().err
    assert f"stopped by {signame}" in err and "--ckpt_path last" in err
    assert load_ckpt(run / "checkpoints/last.ckpt")["global_step"] == 3
    assert results(run)["fit"]["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is sigint  # handlers restored

    test = ["test", *args[1:], "--ckpt_path", "best"]
    assert main(test) == 2  # the fit did not finish: no test result that would pass for one
    assert "did not finish (status 'interrupted'" in capsys.readouterr().err
    assert "test" not in results(run)
    assert seed_state(run, "test/err1") == ("interrupted (step 3/6)", None)

    assert main([*args, "--ckpt_path", "last"]) == 0
    assert results(run)["fit"]["status"] == "finished"
    assert load_ckpt(run / "checkpoints/last.ckpt")["global_step"] == 6


def test_a_non_finite_loss_stops_the_run_as_diverged(cifar10_dir, run_root, capsys):
    run = run_root / "nan"
    args = cifar_fit(cifar10_dir, run_root, "nan", "--run.checkpoint_every_n_steps", "1", steps=6)
    assert main([*args, "--trainer.callbacks", callbacks(("PoisonAt", {"step": 2}))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ran fit: error: training diverged at step 3: the training loss is nan")
    assert "Traceback" not in "\n".join(err)
    fit = results(run)["fit"]
    assert fit["status"] == "diverged" and "diverged at step 3" in fit["error"]
    # the checkpoints hold the last finite weights (step 2), never the NaN ones
    assert load_ckpt(run / "checkpoints/last.ckpt")["global_step"] == 2
    for path in (run / "checkpoints").glob("*.ckpt"):
        weights = {k: v for k, v in load_ckpt(path)["state_dict"].items() if k.startswith("net.")}
        assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    assert seed_state(run, "test/err1") == ("diverged (step 3/6)", None)


def test_a_checkpoint_of_another_network_is_refused(cifar10_dir, run_root, capsys):
    assert main(cifar_fit(cifar10_dir, run_root, "a56", steps=2)) == 0
    ckpt = run_root / "a56" / "checkpoints" / "last.ckpt"
    test = cifar_fit(cifar10_dir, run_root, "a92", config="cifar10/attention92.yaml")
    assert main(["test", *test[1:], "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "holds attention56_cifar with 10 classes" in err and "builds attention92_cifar" in err
    assert not (run_root / "a92" / "results.json").exists()


def test_ckpt_path_never_overwrites_another_runs_files(cifar10_dir, run_root, capsys):
    for name in ("one", "two"):
        assert main(cifar_fit(cifar10_dir, run_root, name, steps=2)) == 0
    before = {p: p.read_bytes() for p in (run_root / "two").rglob("*") if p.is_file()}
    other = str(run_root / "one" / "checkpoints" / "last.ckpt")
    assert main([*cifar_fit(cifar10_dir, run_root, "two", steps=4), "--ckpt_path", other]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (run_root / "two").rglob("*") if p.is_file()} == before


def test_a_start_without_checkpoint_does_not_block_the_rerun(cifar10_dir, run_root):
    run = run_root / "killed"
    run.mkdir(parents=True)  # as left by a kill -9 before the first checkpoint
    (run / "config.yaml").write_text("model: {arch: attention56_cifar}\n")
    (run / "results.json").write_text('{"fit": {"status": "running"}}')
    assert main(cifar_fit(cifar10_dir, run_root, "killed", steps=2)) == 0
    assert results(run)["fit"]["status"] == "finished"


def test_a_resume_takes_the_recipe_of_the_config(cifar10_dir, run_root, tmp_path):
    cosine = ["--model.schedule", "cosine", "--model.lr", "0.1"]
    assert main(cifar_fit(cifar10_dir, run_root, "extend", *cosine, steps=4)) == 0
    probe = callbacks(("FirstStepLR", {"out_dir": str(tmp_path)}))
    longer = cifar_fit(cifar10_dir, run_root, "extend", *cosine, "--trainer.callbacks", probe, steps=8)
    with pytest.warns(UserWarning, match="total_steps 4 -> 8"):
        assert main([*longer, "--ckpt_path", "last"]) == 0
    record = json.loads((tmp_path / "first_step_lr.json").read_text())
    assert record["global_step"] == 4
    # lr 0.1 scaled to batch 16 (0.025), cosine at step 4 of 8: not 0, the end of the old schedule
    assert record["lr"] == pytest.approx(0.025 * 0.5)


def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_readable(cifar10_dir, run_root, capsys):
    run = run_root / "torn"
    assert main(cifar_fit(cifar10_dir, run_root, "torn", steps=2)) == 0
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a kill in the middle of a non-atomic save
    with pytest.warns(UserWarning, match=f"skipping {last}"):
        assert main([*cifar_fit(cifar10_dir, run_root, "torn", steps=4), "--ckpt_path", "last"]) == 0
    assert load_ckpt(last)["global_step"] == 4
    last.write_bytes(last.read_bytes()[:1000])
    assert main([*cifar_fit(cifar10_dir, run_root, "torn", steps=6), "--ckpt_path", str(last)]) == 2
    assert f"--ckpt_path {last}: not a readable checkpoint" in capsys.readouterr().err
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"")
    assert main([*cifar_fit(cifar10_dir, run_root, "torn", steps=6), "--ckpt_path", "last"]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err


def test_an_interrupted_save_leaves_the_old_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "blob": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--run.over", "true"], "run.over"),  # no abbreviation of --run.overwrite
        (["--model.learnin", "arl"], "model.learnin"),
        (["--model.lr", "-0.1"], "model.lr must be positive, got -0.1"),
        (["--model.label_smoothing", "1"], "model.label_smoothing must be in [0, 1), got 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(flags, message, cifar10_dir, run_root, capsys):
    assert main([*cifar_fit(cifar10_dir, run_root, "bad", steps=2), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run_root / "bad").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_root_is_a_one_line_error(cifar10_dir, tmp_path, capsys):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    assert main(cifar_fit(cifar10_dir, root, "x", steps=2)) == 2
    assert "choose another --run.root" in capsys.readouterr().err


def test_a_read_only_run_root_check(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(
        ConfigError, match=f"{tmp_path} is not a writable directory; choose another --run.root"
    ):
        check_writable(tmp_path / "runs" / "x")
    (tmp_path / "file").write_text("")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="is not a writable directory"):
        check_writable(tmp_path / "file" / "x")


def test_validate_reports_and_records_its_own_figures(cifar10_dir, run_root, capsys):
    run = run_root / "val"
    args = cifar_fit(cifar10_dir, run_root, "val", steps=2)
    assert main(args) == 0
    capsys.readouterr()
    assert main(["validate", *args[1:], "--ckpt_path", "best"]) == 0
    out = capsys.readouterr().out
    assert "val/acc1" in out and "acc1_best" not in out  # never the best restored from the fit
    validate = results(run)["validate"]
    assert set(validate["metrics"]) >= {"val/acc1", "val/loss"} and "val/acc1_best" not in validate["metrics"]
    assert validate["ckpt_path"].endswith("best.ckpt")


def test_the_report_names_unreadable_results_and_goes_on(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    for text, why in (("", "empty file"), ("{", "not valid JSON"), ('["a list"]', "expected a JSON object")):
        (run / "results.json").write_text(text)
        with pytest.warns(UserWarning, match=f"{run / 'results.json'}: {why}"):
            assert seed_state(run, "test/err1") == ("unreadable", None)
    RunDir(run).update_results("fit", {"status": "finished", "global_step": 6, "max_steps": 6})
    RunDir(run).update_results("test", {"metrics": {"test/err1": 12.5}})
    assert seed_state(run, "test/err1") == ("done", 12.5)
    assert seed_state(tmp_path / "seed1", "test/err1") == ("missing", None)


def test_a_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: [attention56_cifar\n")
    assert main(["fit", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"cannot parse {bad}" in err and "line 2" in err and "<unicode string>" not in err
    assert len(err.strip().splitlines()) == 1


def test_on_a_gpu_the_guard_reads_the_loss_only_at_log_steps_checkpoints_and_the_end():
    """The deferred check (what a CUDA loss gets; forced here on CPU tensors): no host read per step, yet the
    first bad step and its loss are named at the next read, and a checkpoint after it is refused."""
    guard = DivergenceGuard(every_step=False)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50, optimizers=[])
    for step, loss in [(1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.5)]:
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)  # no raise
    with pytest.raises(TrainingDiverged, match="diverged at step 2: the training loss is nan"):
        guard.on_save_checkpoint(trainer, torch.nn.Linear(1, 1), {})
    with pytest.raises(TrainingDiverged, match="at step 2"):
        guard.on_train_end(trainer, None)
    trainer.global_step = 50
    with pytest.raises(TrainingDiverged, match="at step 2"):  # a log step reads it too
        guard.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 50)

    guard.on_train_start(trainer, None)  # a new fit starts clean
    for step in (1, 50):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, torch.tensor(1.0), None, step)
    guard.on_save_checkpoint(trainer, torch.nn.Linear(1, 1), {})
    guard.on_train_end(trainer, None)


def test_cuda_graph_compile_with_ddp_is_refused_before_training(cifar10_dir, run_root, capsys):
    args = cifar_fit(cifar10_dir, run_root, "cg", "--model.compile", "true", "--model.compile_mode")
    args += ["reduce-overhead", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ran fit: error: model.compile_mode reduce-overhead captures CUDA graphs")
    assert "use --model.compile_mode max-autotune-no-cudagraphs or default" in err
    assert not (run_root / "cg" / "checkpoints").exists()
