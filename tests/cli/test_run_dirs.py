"""A run that fails before training leaves no run directory, so the corrected command is not refused."""

from __future__ import annotations

import datagen

from ran.cli.main import main

TINY = ["--model.model_kwargs", '{"stage_widths": [16, 32, 64], "stem_width": 8, "final_width": 64}']


def test_failed_start_leaves_nothing_that_blocks_the_retry(tmp_path, capsys):
    args = [
        "fit",
        "-c",
        "experiments/configs/cifar10/attention56.yaml",
        "--run.root",
        str(tmp_path / "runs"),
        "--run.name",
        "retry",
        "--run.logger",
        "csv",
        "--data.download",
        "false",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--data.val_size",
        "20",
        *TINY,
    ]
    assert main([*args, "--data.data_dir", str(tmp_path / "nowhere")]) != 0
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "retry").exists()
    datagen.make_cifar10(tmp_path / "data", n_train_per_batch=20, n_test=20)
    assert main([*args, "--data.data_dir", str(tmp_path / "data")]) == 0
    assert (tmp_path / "runs" / "retry" / "results.json").is_file()
