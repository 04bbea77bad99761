"""The report (`experiments.report`): the paper's table from the runs' results, the contrast against the seed
spread, the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from standins import finished_run

from experiments.__main__ import main as experiments_main
from experiments.report import collect, markdown_table, report
from experiments.suites import SUITES_DIR, SuiteError, _parse, load_suite
from ran.train.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Commands name configs relative to the working directory, as a user in the checkout types them."""
    monkeypatch.chdir(REPO)


def test_report_builds_the_papers_table_with_missing_runs(tmp_path):
    suite = load_suite("table3")
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", 0, 30.0)
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", 1, 32.0)
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_nal", 0, 35.5)
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention164_nal", 0, None, step=40)
    text, md, csv_path = report(suite, "cpu-mini", tmp_path)
    table = text.split("Contrast")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["56"] == "| 56 | 31.00 ± 1.41 (n=2) | 5.52 | +25.48 | 35.50 | 5.89 | +29.61 |"
    assert rows["92"] == "| 92 | missing | 4.99 | - | missing | 5.35 | - |"
    assert "unfinished (step 40/100)" in rows["164"]
    assert rows["164"].startswith("| 164 | missing | 4.31 | - | unfinished")
    assert md.read_text() == text
    csv_rows = csv_path.read_text().splitlines()
    assert csv_rows[0] == "suite,budget,run,depth,learning,metric,status,seeds,n,mean,std,paper,diff"
    assert (
        "arl_vs_nal,cpu-mini,attention56_arl,56,arl,test/err1,done,0 1,2,31.0000,1.4142,5.52,25.4800"
        in csv_rows
    )


def test_report_weighs_the_suites_contrast_against_the_seed_spread(tmp_path):
    for seed, (arl, nal) in enumerate([(30.0, 35.0), (32.0, 36.0), (31.0, 37.0)]):
        finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_arl", seed, arl)  # sd 1.0
        finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention56_nal", seed, nal)  # sd 1.0
    for seed, (arl, nal) in enumerate([(40.0, 39.0), (44.0, 45.0)]):
        finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention92_arl", seed, arl)  # sd 2.83
        finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention92_nal", seed, nal)  # sd 4.24
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_arl", 0, 40.0)
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_nal", 0, 50.0)
    finished_run(tmp_path, "arl_vs_nal", "cpu-mini", "attention128_nal", 1, None, step=40)  # still running
    text, _, _ = report(load_suite("table3"), "cpu-mini", tmp_path)
    contrast = text.split("Contrast nal − arl")[1]
    rows = {line.split(" | ")[0].strip("| "): line for line in contrast.splitlines() if line.startswith("| ")}
    header = "| depth | nal − arl measured | sd arl + sd nal | exceeds the spread | nal − arl paper |"
    assert rows["depth"] == header
    assert rows["56"] == "| 56 | +5.00 | 2.00 | yes | +0.37 |"  # 5 > 1 + 1
    assert rows["92"] == "| 92 | +0.00 | 7.07 | no | +0.36 |"
    assert rows["128"] == "| 128 | +10.00 | - | - [partial] | +1.13 |"  # one seed: no spread to weigh
    assert rows["164"] == "| 164 | - | - | - | +2.87 |"
    assert "Contrast" not in report(load_suite("table4"), "cpu-mini", tmp_path)[0]  # a suite without one


def test_suite_contrast_must_name_two_column_values():
    spec = yaml.safe_load((SUITES_DIR / "arl_vs_nal" / "suite.yaml").read_text())
    assert _parse("arl_vs_nal", spec).contrast == ("arl", "nal")
    with pytest.raises(SuiteError, match="contrast must name two values of its column factor 'learning'"):
        _parse("arl_vs_nal", {**spec, "contrast": ["arl", "ral"]})


def test_report_cli_prints_and_writes(tmp_path, capsys):
    finished_run(tmp_path, "mask_structure", "smoke", "attention56_local", 0, 50.0)
    assert (
        experiments_main(
            ["report", "table4", "--budget", "smoke", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| local | 50.00 | 6.48 | +43.52 |" in out and "| hourglass | missing | 5.52 | - |" in out
    assert (tmp_path / "out" / "mask_structure-smoke.csv").is_file()


def test_multi_metric_suite_reports_both_metrics(tmp_path):
    run_dir = tmp_path / "imagenet" / "paper" / "attention92" / "seed0"
    RunDir(run_dir).update_results("test", {"metrics": {"test/err1": 20.0, "test/err5": 5.0}})
    cells = collect(load_suite("imagenet"), "paper", tmp_path)
    text = markdown_table(load_suite("imagenet"), "paper", cells)
    assert "| attention92 | 20.00 | 19.50 | +0.50 | 5.00 | 4.80 | +0.20 |" in text
