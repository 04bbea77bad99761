"""`ran export` (`ran.cli.export`): a run's checkpoint as trained weights whose logits equal the checkpoint's,
with the datamodule's facts, the run's test figures and provenance; bad checkpoints and output folders are one
line and exit 2, and leave nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, TINY_MODEL_FLAG, TINY_MODEL_KWARGS

import ran
from datamodules import CIFAR10DataModule
from ran.cli.main import main
from ran.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE
from ran.train.module import ImageClassifier
from ran.train.rundir import RunDir

TEST_METRICS = {"test/acc1": 0.625, "test/acc5": 0.9, "test/loss": 1.25}


def make_run(root: Path, name: str = "tiny", *, channels_last: bool = False, moved: bool = True) -> Path:
    """A run directory as `ran fit` and `ran test` leave it (tiny network, trained-looking weights), its
    test recorded for checkpoints/best.ckpt (under another root when `moved`, as after a copy); returns
    best.ckpt."""
    torch.manual_seed(0)
    module = ImageClassifier(
        "attention56_cifar", model_kwargs=dict(TINY_MODEL_KWARGS), channels_last=channels_last
    )
    with torch.no_grad():
        module.train()(torch.randn(8, 3, 32, 32))
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = RunDir(root / name)
    run.checkpoints.mkdir(parents=True)
    data = {"_class_path": "datamodules.CIFAR10DataModule", "data_dir": "/data", "batch_size": 16, "seed": 0}
    saved = {
        "epoch": 1,
        "global_step": 12,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": data,
    }
    torch.save(saved, run.best_ckpt)
    run.config_file().write_text(yaml.safe_dump({"seed_everything": 3, "trainer": {"max_steps": 12}}))
    tested = (Path("/elsewhere") / name if moved else run.path) / "checkpoints" / "best.ckpt"
    run.update_results("fit", {"status": "finished", "best_model_path": str(tested), "best_model_score": 0.5})
    run.update_results("test", {"metrics": TEST_METRICS, "ckpt_path": str(tested)})
    return run.best_ckpt


def checkpoint_logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        return module(x)


def exported_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ran.load_pretrained(folder)(x)


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_export_gives_the_checkpoints_logits_and_its_facts(tmp_path, capsys):
    ckpt = make_run(tmp_path / "runs")
    out = tmp_path / "weights" / "tiny.v1"
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(out)]) == 0
    assert "exported attention56_cifar (0.08M parameters, test top-1 62.50%)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    assert not list(out.parent.glob(".*tmp*")), "the temporary folder is left behind"
    assert torch.equal(exported_logits(out, X), checkpoint_logits(ckpt, X))

    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["arch"] == "attention56_cifar" and config["num_classes"] == 10
    assert config["model_kwargs"]["stage_widths"] == [16, 32, 64]
    assert config["mean"] == list(CIFAR10DataModule.MEAN) and config["std"] == list(CIFAR10DataModule.STD)
    assert (
        config["input_size"] == [3, 32, 32] and config["dataset"] == "CIFAR-10" and "crop_pct" not in config
    )
    assert config["metrics"] == TEST_METRICS  # the run was moved: its checkpoint counts by its place in it
    prov = config["provenance"]
    assert (prov["run"], prov["checkpoint"], prov["global_step"], prov["epoch"]) == (
        "tiny",
        "checkpoints/best.ckpt",
        12,
        1,
    )
    assert prov["fit_status"] == "finished" and prov["best_val_acc1"] == 0.5 and prov["seed"] == 3
    assert (
        prov["recipe"]["lr"] == 0.1 and "arch" not in prov["recipe"] and prov["trainer"] == {"max_steps": 12}
    )
    assert prov["data"] == {"batch_size": 16, "seed": 0}  # where the data lay is no fact of the weights
    assert "| test/acc1 | 0.625 |" in (out / "README.md").read_text()


def test_a_channels_last_run_exports_the_same_network(tmp_path):
    ckpt = make_run(tmp_path / "runs", channels_last=True)
    out = tmp_path / "w"
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(out)]) == 0
    # the checkpoint's module runs channels_last, the export the standard layout: other kernels, same network
    torch.testing.assert_close(exported_logits(out, X), checkpoint_logits(ckpt, X), rtol=1e-5, atol=1e-5)


def test_a_compiled_modules_prefix_is_dropped(tmp_path):
    ckpt = make_run(tmp_path / "runs")
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"] = {k.replace("net.", "net._orig_mod.", 1): v for k, v in saved["state_dict"].items()}
    torch.save(saved, ckpt)
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(tmp_path / "w")]) == 0
    module = ran.create_model("attention56_cifar", **TINY_MODEL_KWARGS)
    module.load_state_dict(
        {k.replace("net._orig_mod.", ""): v for k, v in saved["state_dict"].items() if "net." in k}
    )
    with torch.no_grad():
        assert torch.equal(exported_logits(tmp_path / "w", X), module.eval()(X))


def test_test_figures_of_another_checkpoint_are_not_exported(tmp_path, capsys):
    ckpt = make_run(tmp_path / "runs")
    RunDir(ckpt.parents[1]).update_results("test", {"ckpt_path": str(ckpt.with_name("last.ckpt"))})
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(tmp_path / "w")]) == 0
    captured = capsys.readouterr()
    assert "no test figures in results.json" in captured.out and "run `ran test" in captured.err
    assert "metrics" not in json.loads((tmp_path / "w" / CONFIG_FILE).read_text())


def test_the_datamodule_comes_from_the_run_or_the_command_line(tmp_path, capsys):
    ckpt = make_run(tmp_path / "runs")
    saved = torch.load(ckpt, weights_only=True)
    del saved["datamodule_hyper_parameters"]
    torch.save(saved, ckpt)
    args = ["export", "--ckpt-path", str(ckpt), "--out"]
    assert main([*args, str(tmp_path / "a")]) == 2
    assert "names no datamodule" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*args, str(tmp_path / "b"), "--datamodule", "datamodules.CIFAR100DataModule"]) == 2
    assert "has 100 classes, the checkpoint 10" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "c"), "--datamodule", "datamodules.CIFAR10DataModule"]) == 0
    RunDir(ckpt.parents[1]).config_file().write_text(
        yaml.safe_dump({"data": {"class_path": "datamodules.CIFAR10DataModule"}})
    )
    assert main([*args, str(tmp_path / "d")]) == 0


@pytest.mark.parametrize(
    "problem,words",
    [
        ("missing", "no such file"),
        ("truncated", "not a readable checkpoint"),
        ("not-ran", "is not a checkpoint of `ran fit`"),
        ("unknown-network", "unknown model 'attention57_cifar'"),
        ("out-not-empty", "exists and is not an empty folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, problem, words):
    ckpt = make_run(tmp_path / "runs")
    out = tmp_path / "w"
    if problem == "missing":
        ckpt = ckpt.with_name("nope.ckpt")
    elif problem == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    elif problem == "not-ran":
        torch.save({"state_dict": {}}, ckpt)
    elif problem == "unknown-network":
        saved = torch.load(ckpt, weights_only=True)
        saved["hyper_parameters"]["arch"] = "attention57_cifar"
        torch.save(saved, ckpt)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ran export: error:") and words in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] if out.exists() else True
    assert not list(tmp_path.glob(".*tmp*"))


def test_an_empty_out_folder_is_used(tmp_path):
    (tmp_path / "w").mkdir()
    assert (
        main(["export", "--ckpt-path", str(make_run(tmp_path / "runs")), "--out", str(tmp_path / "w")]) == 0
    )
    assert (tmp_path / "w" / WEIGHTS_FILE).is_file()


def test_a_run_started_from_trained_weights_exports_its_own(tmp_path):
    """`--model.model_kwargs "{pretrained: FOLDER}"` starts a run from trained weights (fine-tuning), the
    network as their config.json says; its export is that network with the run's weights."""
    start = ran.create_model("attention56_cifar", **TINY_MODEL_KWARGS)
    start.save_pretrained(tmp_path / "start")
    module = ImageClassifier(
        "attention56_cifar", num_classes=10, model_kwargs={"pretrained": str(tmp_path / "start")}
    )
    assert torch.equal(module.net.fc.weight, start.fc.weight)
    with torch.no_grad():
        module.net.fc.weight.add_(1.0)  # what the fine-tuning changed
    ckpt = make_run(tmp_path / "runs")
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"] = dict(module.hparams)
    saved["state_dict"] = module.state_dict()
    torch.save(saved, ckpt)
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(tmp_path / "w")]) == 0
    exported = ran.load_pretrained(tmp_path / "w")
    assert torch.equal(exported.fc.weight, module.net.fc.weight)
    assert exported.network_config() == json.loads(json.dumps(start.network_config()))  # no `pretrained`


def test_usage_names_export(capsys):
    assert main([]) == 2
    assert "ran export --ckpt-path CKPT --out DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_test_export_round_trip(cifar10_dir, run_root, tmp_path):
    """The whole path: `ran fit` and `ran test` of a tiny network on fake CIFAR-10, then `ran export`."""
    common = [
        "-c",
        str(CONFIGS / "cifar10/attention56.yaml"),
        "--data.data_dir",
        str(cifar10_dir),
        "--data.val_size",
        "40",
        "--data.batch_size",
        "16",
        "--model.model_kwargs",
        TINY_MODEL_FLAG,
        "--trainer.accelerator",
        "cpu",
        "--run.root",
        str(run_root),
        "--run.name",
        "tiny",
        "--run.logger",
        "none",
    ]
    assert main(["fit", *common, "--trainer.max_steps", "2", "--trainer.enable_model_summary", "false"]) == 0
    assert main(["test", *common, "--ckpt_path", "best"]) == 0
    ckpt = run_root / "tiny" / "checkpoints" / "best.ckpt"
    assert main(["export", "--ckpt-path", str(ckpt), "--out", str(tmp_path / "w")]) == 0
    assert torch.equal(exported_logits(tmp_path / "w", X), checkpoint_logits(ckpt, X))
    tested = RunDir(run_root / "tiny").read_results()["test"]["metrics"]["test/acc1"]
    assert ran.load_pretrained(tmp_path / "w").pretrained_cfg["metrics"]["test/acc1"] == tested
