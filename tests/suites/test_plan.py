"""`python -m experiments plan`: runs, iterations, images, training FLOPs and measured device-hours per
suite."""

from __future__ import annotations

import pytest

import experiments.plan
from experiments.__main__ import main as experiments_main
from experiments.plan import measure_steps, plan, run_costs
from experiments.suites import load_suite, suite_names
from ran.nn.registry import create_model
from ran.tools.measure import count_macs

QUARTER = {"stage_widths": [16, 32, 64], "stem_width": 8, "final_width": 64}  # the cifar cpu-mini overlay


@pytest.fixture
def fake_macs(monkeypatch):
    """Counting the ImageNet networks' FLOPs takes seconds each: where only the recipe is under test, a
    stand-in gives each network a multiply-add count of one per weight-carrying parameter."""
    monkeypatch.setattr(
        experiments.plan, "count_macs", lambda net, size: sum(p.numel() for p in net.parameters())
    )


def test_costs_follow_the_merged_config_and_count_the_networks_flops():
    costs = {c.run: c for c in run_costs(load_suite("table4"), "cpu-mini", seeds=3)}
    assert sorted(costs) == ["attention56_hourglass", "attention56_local"]
    for mask, cost in (("hourglass", costs["attention56_hourglass"]), ("local", costs["attention56_local"])):
        assert (cost.arch, cost.iterations, cost.batch, cost.devices, cost.seeds) == (
            "attention56_cifar",
            1500,
            64,
            1,
            3,
        )
        assert (cost.image_size, cost.num_classes, cost.channels_last, cost.precision) == (32, 10, True, "32")
        assert cost.net_kwargs == {"attention": None, "learning": None, "mask": mask, **QUARTER}
        net = create_model("attention56_cifar", **cost.net_kwargs)
        assert cost.macs == count_macs(net, 32)
        assert cost.images == 1500 * 64 * 3
        assert cost.train_flop == 6 * cost.macs * cost.images
        assert cost.device_hours is None
    # The two masks are different networks, so their costs differ.
    assert costs["attention56_hourglass"].macs != costs["attention56_local"].macs


def test_imagenet_paper_budget_is_eight_devices_at_224(fake_macs):
    costs = run_costs(load_suite("table7"), "paper")
    assert sorted(c.arch for c in costs) == ["attention56", "attention92", "attention_next56"]
    for c in costs:
        assert (c.iterations, c.batch, c.devices, c.image_size, c.num_classes) == (530_000, 32, 8, 224, 1000)
        assert c.images == 530_000 * 256


def test_cifar100_runs_have_a_hundred_classes(fake_macs):
    classes = {c.run: c.num_classes for c in run_costs(load_suite("table6"), "smoke")}
    assert classes["attention92_cifar100"] == 100 and classes["attention92_cifar10"] == 10


def test_measure_times_each_network_once_on_this_device(monkeypatch):
    calls = []
    real = experiments.plan.train_step_times

    def spy(arch, **kwargs):
        calls.append((arch, kwargs["model_kwargs"]["mask"], kwargs["channels_last"], kwargs["batch_size"]))
        return real(arch, **kwargs)

    monkeypatch.setattr(experiments.plan, "train_step_times", spy)
    costs = run_costs(load_suite("table4"), "cpu-mini")
    twice = costs + run_costs(load_suite("table4"), "cpu-mini")
    measure_steps(twice, steps=2)
    assert sorted(calls) == [
        ("attention56_cifar", "hourglass", True, 64),
        ("attention56_cifar", "local", True, 64),
    ]
    for c in twice:
        assert 0 < c.step_s < 60
        assert c.device_hours == pytest.approx(c.step_s * 1500 / 3600)


def test_plan_table_has_a_row_per_run_and_totals(fake_macs):
    text = plan(load_suite("table3"), "paper", seeds=[0, 1])
    assert text.splitlines()[0] == "arl_vs_nal under budget 'paper': 8 runs x 2 seed(s)"
    rows = [line for line in text.splitlines() if line.startswith("| attention")]
    assert len(rows) == 8
    assert "| attention164_nal | attention164_cifar | 160,000 | 64 | 1 | 2 | 20,480,000 |" in text
    assert text.splitlines()[-1].startswith("total: ") and "PFLOP of training" in text


def test_plan_cli_all_suites_and_several_budgets(fake_macs, capsys):
    assert experiments_main(["plan", "all", "--budget", "paper", "smoke"]) == 0
    out = capsys.readouterr().out
    for name in suite_names():
        assert f"| {name}" in out
    assert "| arl_vs_nal (table3) | paper | 8 | 160,000 | 81,920,000 |" in out
    assert "| imagenet (table7) | smoke | 3 | 3 |" in out
    assert experiments_main(["plan", "table4", "--budget", "cpu-mini", "paper"]) == 0
    out = capsys.readouterr().out
    assert "under budget 'cpu-mini'" in out and "under budget 'paper'" in out


def test_plan_of_an_unknown_suite_exits_nonzero(capsys):
    assert experiments_main(["plan", "table99"]) == 2
    assert "table99" in capsys.readouterr().err


def test_overrides_after_the_double_dash_change_what_is_planned(fake_macs):
    costs = run_costs(
        load_suite("table4"),
        "paper",
        extra=[
            "--trainer.precision",
            "bf16-mixed",
            "--model.channels_last=true",
            "--data.batch_size",
            "128",
            "--trainer.devices",
            "2",
        ],
    )
    for c in costs:
        assert (c.precision, c.channels_last, c.batch, c.devices) == ("bf16-mixed", True, 128, 2)
        assert c.images == 160_000 * 256


def test_unreadable_overrides_name_the_fix(capsys):
    """Overrides are read by the parser of `ran fit` itself, so its messages name the problem."""
    assert experiments_main(["plan", "table4", "--", "--trainer.precision"]) == 2
    assert "argument --trainer.precision: expected one argument" in capsys.readouterr().err
    assert experiments_main(["plan", "table4", "--", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: bf16" in err
    assert err.startswith("python -m experiments: error: ran fit -c experiments/suites/mask_structure/")


@pytest.mark.slow
def test_the_docs_cost_table_is_what_plan_all_computes():
    from pathlib import Path

    from experiments.plan import plan_all

    page = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    table = page.split("<!-- costs:start -->")[1].split("<!-- costs:end -->")[0].strip().splitlines()
    computed = plan_all(["paper", "cpu-mini"]).splitlines()

    def first_six(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")][:6]

    assert [first_six(line) for line in table] == [first_six(line) for line in computed]
    assert all(len(line.strip("|").split("|")) == 7 for line in table)  # and the measured column is there
