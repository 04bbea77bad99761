"""The W&B record of a run, read back from W&B's offline files: fit and test are two runs of one group
(`job_type` fit/test), testing leaves the fit's record alone, the config logged carries the run's provenance,
and loggers given with --trainer.logger get ran's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import offline_record
from fits import cifar_fit
from pytorch_lightning.loggers import Logger

from experiments.launch import make_jobs
from experiments.suites import load_suite, suite_names
from ran.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::datamodules.errors.DatasetSizeWarning")


def test_fit_then_test_are_two_runs_of_one_group_and_the_fit_keeps_its_config(
    cifar10_dir, run_root, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    provenance = (
        "--run.suite",
        "arl_vs_nal",
        "--run.budget",
        "smoke",
        "--run.factors",
        '{"learning":"nal","depth":56}',
    )
    fit = cifar_fit(
        cifar10_dir, run_root, "rec", *provenance, "--seed_everything", "7", steps=2, logger="wandb"
    )
    assert main(fit) == 0
    run = run_root / "rec"
    fit_id = (run / "wandb_run_id").read_text().strip()

    # The test runs with another group and device count on the command line: a record of its own.
    test = ["test", *fit[1:], "--ckpt_path", "best", "--run.group", "elsewhere"]
    assert main(test) == 0
    test_id = (run / "wandb_run_id_test").read_text().strip()
    assert test_id != fit_id

    fitted, tested = offline_record(run, fit_id), offline_record(run, test_id)
    assert (fitted["run"].job_type, fitted["run"].display_name, fitted["run"].run_group) == (
        "fit",
        "rec",
        "cifar10",
    )
    assert (tested["run"].job_type, tested["run"].display_name, tested["run"].run_group) == (
        "test",
        "rec-test",
        "elsewhere",
    )
    # The fit's W&B config is the fit's resolved config (beside `meta` and the run facts the module logs,
    # such as trainer/effective_batch_size), untouched by the test's command line.
    config = fitted["config"]
    assert {
        k: v for k, v in config.items() if k not in ("meta", "_wandb") and "/" not in k
    } == yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["group"] == "cifar10" and config["run"]["suite"] == "arl_vs_nal"
    assert config["run"]["budget"] == "smoke" and config["run"]["factors"] == {"learning": "nal", "depth": 56}
    meta = config["meta"]
    assert meta["stage"] == "fit" and meta["seed"] == 7
    assert meta["config_files"] == [fit[2]]
    assert len(meta["git"]["commit"]) == 40 and isinstance(meta["git"]["dirty"], bool)
    assert set(meta["versions"]) >= {"torch", "pytorch_lightning", "torchmetrics", "wandb", "ran"}
    assert all(meta["versions"][k] for k in ("torch", "pytorch_lightning", "torchmetrics", "wandb"))
    assert tested["config"]["meta"]["stage"] == "test" and tested["config"]["meta"]["fit_wandb_id"] == fit_id
    assert tested["config"]["run"]["group"] == "elsewhere"
    assert "train/loss" in fitted["history_keys"] and "test/acc1" in tested["history_keys"]
    assert not any(k.startswith("test/acc") for k in fitted["history_keys"])


class KeysLogger(Logger):
    """A user's own logger: writes the metric keys it was given to `out`, one a line."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)

    @property
    def name(self) -> str:
        return "keys"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with open(self.out, "a") as f:
            f.writelines(f"{key}\n" for key in metrics)


def test_trainer_logger_gets_ran_settings_and_extra_loggers_are_kept(cifar10_dir, run_root, monkeypatch):
    """--run.logger csv plus a user's WandbLogger (with an option ran does not set) and a logger of the user's
    own: all three log, the WandbLogger with ran's id, name, group and entity."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    keys = run_root.parent / "keys.txt"
    extra = (
        "--trainer.logger",
        "WandbLogger",
        "--trainer.logger.notes",
        "a user's note",
        "--trainer.logger+=test_wandb_record.KeysLogger",
        "--trainer.logger.out",
        str(keys),
        "--run.entity",
        "my-team",
    )
    assert main(cifar_fit(cifar10_dir, run_root, "mixed", *extra, steps=2, logger="csv")) == 0
    run = run_root / "mixed"
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    assert "train/loss" in keys.read_text().split()
    run_id = (run / "wandb_run_id").read_text().strip()
    record = offline_record(run, run_id)["run"]
    assert (record.display_name, record.run_group, record.job_type, record.entity) == (
        "mixed",
        "cifar10",
        "fit",
        "my-team",
    )
    assert record.notes == "a user's note"


def test_trainer_logger_false_turns_logging_off(cifar10_dir, run_root):
    assert main(cifar_fit(cifar10_dir, run_root, "quiet", "--trainer.logger", "false", steps=1)) == 0
    assert not (run_root / "quiet" / "csv").exists()


# --- budgets and the launcher -------------------------------------------------------------------------------

# The logger each budget chooses by itself (docs/experiments.md): the small budgets write CSV files.
BUDGET_LOGGERS = {"paper": "wandb", "cpu-mini": "csv", "smoke": "csv"}


@pytest.mark.parametrize("budget", sorted(BUDGET_LOGGERS))
def test_every_budget_logs_to_wandb_on_request_with_suite_budget_and_factors(budget, tmp_path):
    for name in suite_names():
        suite = load_suite(name)
        run = suite.runs[0]
        default, asked = (
            make_jobs(suite, budget, [0], tmp_path, [run.name], extra)[0].resolved_config().config["run"]
            for extra in ([], ["--run.logger", "wandb"])
        )
        assert default["logger"] == BUDGET_LOGGERS[budget], (name, budget)
        assert asked["logger"] == "wandb", (name, budget)
        assert (asked["suite"], asked["budget"], asked["factors"]) == (suite.name, budget, run.factors)
        assert asked["group"] == suite.name
