"""The paper's tables as suites (`experiments.suites`): every run config states its factors and trains a smoke
step; suite keys and budgets are checked."""

from __future__ import annotations

import json
from pathlib import Path

import datagen
import pytest
import yaml

import experiments.suites
from experiments.__main__ import main as experiments_main
from experiments.launch import make_jobs
from experiments.suites import BUDGETS, SuiteError, load_suite, suite_names
from ran.cli.main import main as ran_main

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
