"""`python -m experiments.gpu.fast_path`, the GPU measurement in one command, checked on a CPU: its cases'
flags, its table, its budget, and a run end to end with tiny networks (the cuda_graph case refused there)."""

from __future__ import annotations

import json

import pytest

from experiments.gpu.fast_path import CASES, Case, main, table


def test_the_cases_cover_the_issues_table():
    names = {case.name for case in CASES}
    for model, batch in [("attention92_cifar", 64), ("attention92_cifar", 256), ("attention452_cifar", 64)]:
        assert {f"{model} bs{batch} eager", f"{model} bs{batch} cuda_graph"} <= names
    assert {"attention56 bs64 eager", "attention56 bs64 cuda_graph"} <= names
    assert {"compile:default", "compile:reduce-overhead", "cuda_graph+compile:default"} <= {
        c.mode for c in CASES
    }
    flags = Case("attention92_cifar", 64, "cuda_graph+compile:default").flags()
    assert flags[-3:] == ["--cuda-graph", "--compile", "default"] and "bf16-mixed" in flags


def test_the_table_shows_the_speed_up_over_eager_and_the_failures():
    def ok(mode: str, img_s: float) -> dict:
        result = {"train_img_s": img_s, "train_step_ms": 64e3 / img_s, "peak_memory_mb": 900.0}
        return {"model": "m", "batch": 64, "mode": mode, "rc": 0, "result": {**result, "mfu_train_bf16": 0.1}}

    bad = {"model": "m", "batch": 64, "mode": "compile:default", "rc": None, "error": "timed out after 300 s"}
    text = table([ok("eager", 600.0), ok("cuda_graph", 4800.0), bad])
    assert "| m | 64 | cuda_graph | 4,800 | 13.33 | 10.0% | 900 | 8.00x |" in text
    assert "| m | 64 | compile:default | timed out after 300 s |" in text


def test_a_spent_budget_leaves_the_remaining_cases_out(tmp_path):
    args = [
        "--device",
        "cpu",
        "--no-exactness",
        "--budget",
        "0",
        "--cases",
        "bs64 eager",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 1
    records = [json.loads(line) for line in (tmp_path / "fast_path.jsonl").read_text().splitlines()]
    assert records and all(r["error"] == "not run: the budget was spent" for r in records)


@pytest.mark.slow
def test_it_runs_end_to_end_on_a_cpu_with_tiny_networks(tmp_path):
    cases = "attention92_cifar bs64 (eager|cuda_graph)$"
    args = ["--device", "cpu", "--tiny", "--no-exactness", "--cases", cases, "--gemm-size", "256"]
    assert main([*args, "--timeout-scale", "10", "--out", str(tmp_path)]) == 1  # cuda_graph: refused on a CPU
    eager, graphed = [json.loads(line) for line in (tmp_path / "fast_path.jsonl").read_text().splitlines()]
    assert eager["rc"] == 0 and eager["result"]["train_img_s"] > 0 and eager["batch"] == 8
    assert graphed["rc"] == 1 and "--cuda-graph captures CUDA graphs" in graphed["error"]
    text = (tmp_path / "fast_path.md").read_text()
    assert "| attention92_cifar | 8 | eager |" in text and "1.00x" in text
