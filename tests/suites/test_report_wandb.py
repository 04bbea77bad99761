"""The suite report as a chart beside its markdown and CSV, and as a W&B table and chart (read back from W&B's
offline files)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import offline_record
from PIL import Image
from standins import finished_run

from experiments.__main__ import main as experiments_main
from experiments.report import chart, collect
from experiments.suites import load_suite
from ran.tools.pictures import report_chart


def test_report_chart_draws_measured_beside_paper():
    picture = report_chart(
        {"56": {"arl": (10.0, 1.0, 5.5), "nal": (12.0, None, 5.9)}, "92": {"arl": (None, None, 5.0)}},
        ylabel="top-1 error (%)",
    )
    assert picture.size[0] >= 500 and picture.mode == "RGB"
    assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_chart_differs_with_the_measured_figures(tmp_path):
    suite = load_suite("table4")
    empty = np.asarray(chart(suite, "smoke", collect(suite, "smoke", tmp_path)))
    finished_run(tmp_path, "mask_structure", "smoke", "attention56_local", 0, 50.0)
    measured = np.asarray(chart(suite, "smoke", collect(suite, "smoke", tmp_path)))
    assert empty.shape != measured.shape or (empty != measured).any()


def test_report_writes_a_png_and_logs_table_and_chart_to_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    finished_run(tmp_path, "mask_structure", "smoke", "attention56_local", 0, 50.0)
    finished_run(tmp_path, "mask_structure", "smoke", "attention56_local", 1, 52.0)
    out = tmp_path / "out"
    args = ["report", "table4", "--budget", "smoke", "--root", str(tmp_path), "--out", str(out), "--wandb"]
    assert experiments_main(args) == 0
    assert "logged to W&B" in capsys.readouterr().out
    picture = out / "mask_structure-smoke.png"
    assert Image.open(picture).size[0] >= 500

    run_id = (out / "mask_structure-smoke.wandb_id").read_text().strip()
    record = offline_record(out, run_id)
    run = record["run"]
    assert (run.job_type, run.run_group, run.display_name) == (
        "report",
        "mask_structure",
        "mask_structure-smoke-report",
    )
    assert record["config"]["suite"] == "mask_structure" and record["config"]["budget"] == "smoke"
    assert {"report/table/_type", "report/chart/_type"} <= record["history_keys"]
    files = record["files"][0].parent / "files"
    tables = list(files.rglob("report/table_*.table.json"))
    assert tables, f"no table among {sorted(p.name for p in files.rglob('*'))}"
    table = json.loads(tables[0].read_text())
    local = next(row for row in table["data"] if row[2] == "attention56_local")
    assert dict(zip(table["columns"], local))["mean"] == 51.0
    assert list(files.rglob("report/chart_*.png"))

    # A second report adds to the same W&B run (a second later: W&B names its offline folders by the second).
    time.sleep(1.1)
    assert experiments_main(args) == 0
    assert (out / "mask_structure-smoke.wandb_id").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_report_logs_the_suites_contrast_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for seed, (arl, nal) in enumerate([(30.0, 35.0), (32.0, 37.0)]):
        finished_run(tmp_path, "arl_vs_nal", "smoke", "attention56_arl", seed, arl)
        finished_run(tmp_path, "arl_vs_nal", "smoke", "attention56_nal", seed, nal)
    out = tmp_path / "out"
    args = ["report", "table3", "--budget", "smoke", "--root", str(tmp_path), "--out", str(out), "--wandb"]
    assert experiments_main(args) == 0
    record = offline_record(out, (out / "arl_vs_nal-smoke.wandb_id").read_text().strip())
    files = record["files"][0].parent / "files"
    table = json.loads(next(files.rglob("report/contrast_*.table.json")).read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows["56"]["diff"] == 5.0 and rows["56"]["seed_spread"] == pytest.approx(2 * 2**0.5)
    assert rows["56"]["exceeds_spread"] is True and rows["56"]["paper_diff"] == pytest.approx(0.37)
    assert rows["92"]["diff"] is None and rows["92"]["paper_diff"] == pytest.approx(0.36)


def test_report_without_wandb_opens_no_run(tmp_path):
    out = tmp_path / "out"
    assert (
        experiments_main(
            ["report", "table4", "--budget", "smoke", "--root", str(tmp_path), "--out", str(out)]
        )
        == 0
    )
    assert (out / "mask_structure-smoke.png").is_file()
    assert not (out / "wandb").exists() and not list(Path(out).glob("*.wandb_id"))
