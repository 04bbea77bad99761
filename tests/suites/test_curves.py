"""A fit's validation history in results.json and `python -m experiments curves`, which draws it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fits import cifar_fit
from PIL import Image

from experiments.__main__ import main as experiments_main
from ran.cli.main import main
from ran.train.results import ResultsWriter
from ran.train.rundir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


def test_every_validation_of_a_fit_is_kept_and_drawn(cifar10_dir, run_root, capsys):
    run = run_root / "curve"
    # 160 training images in batches of 16: an epoch is 10 steps, so validations at steps 10, 20 and 25
    assert main(cifar_fit(cifar10_dir, run_root, "curve", steps=25)) == 0
    fit = json.loads((run / "results.json").read_text())["fit"]
    assert [(h["step"], h["epochs"]) for h in fit["history"]] == [(10, 1.0), (20, 2.0), (25, 2.5)]
    for entry in fit["history"]:
        assert set(entry["metrics"]) >= {"val/acc1", "val/loss"}
        assert all(key.startswith("val/") for key in entry["metrics"])
    assert fit["history"][-1]["metrics"]["val/acc1"] == fit["metrics"]["val/acc1"]
    capsys.readouterr()

    out = run_root / "curve.png"
    assert experiments_main(["curves", "--run-dir", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    acc = [100 * h["metrics"]["val/acc1"] for h in fit["history"]]
    assert f"| curve | 2.5 | 25 | {acc[-1]:.2f} |" in printed
    assert Image.open(out).size[0] > 300

    assert experiments_main(["curves", "--run-dir", str(run), "--metric", "val/loss"]) == 0
    assert (run / "analysis" / "curve_val_loss.png").is_file()


def test_curves_name_what_is_missing(tmp_path, capsys):
    RunDir(tmp_path / "old").update_results("fit", {"status": "finished"})
    assert experiments_main(["curves", "--run-dir", str(tmp_path / "old")]) == 2
    assert "has no validation history" in capsys.readouterr().err
    assert experiments_main(["curves", "--run-dir", str(tmp_path / "none")]) == 2
    assert "has no fit in results.json" in capsys.readouterr().err
    history = [{"step": 4, "epochs": 1.0, "metrics": {"val/acc1": 0.5}}]
    RunDir(tmp_path / "new").update_results("fit", {"history": history})
    assert experiments_main(["curves", "--run-dir", str(tmp_path / "new"), "--metric", "val/acc5"]) == 2
    assert "never logged val/acc5; its validations logged val/acc1" in capsys.readouterr().err


def test_a_resumed_fit_replaces_the_validations_it_trains_again(tmp_path):
    """A run that died after validating at steps 10 and 20 and resumed from its step-15 checkpoint: its next
    validation (step 20) replaces the old one, and the one at step 10 stays."""
    writer = ResultsWriter(tmp_path)
    old = [{"step": s, "epochs": s / 10, "metrics": {"val/acc1": -1.0}} for s in (10, 20)]
    writer.run_dir.update_results("fit", {"history": old})
    trainer = SimpleNamespace(
        global_step=20,
        num_training_batches=10,
        accumulate_grad_batches=1,
        current_epoch=1,
        callback_metrics={"val/acc1": torch.tensor(0.75), "train/loss": torch.tensor(1.0)},
    )
    assert writer._history(trainer) == [
        old[0],
        {"step": 20, "epochs": 2.0, "metrics": {"val/acc1": 0.75}},
    ]
    trainer.num_training_batches = float("inf")  # an iterable dataset of unknown length
    assert writer._history(trainer)[-1]["epochs"] == 2


def test_the_history_survives_a_corrupt_results_file(tmp_path):
    writer = ResultsWriter(tmp_path)
    Path(tmp_path / "results.json").write_text("{")
    trainer = SimpleNamespace(
        global_step=5,
        num_training_batches=10,
        accumulate_grad_batches=2,
        current_epoch=0,
        callback_metrics={"val/acc1": 0.5},
    )
    assert writer._history(trainer) == [{"step": 5, "epochs": 1.0, "metrics": {"val/acc1": 0.5}}]
