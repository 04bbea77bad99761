"""The paper's tables as suites of runs.

A suite is a folder `experiments/suites/<name>/`: `suite.yaml` states the table (title, the paper's table
number, the metric, which factors make its rows and columns) and, for every run, its factors and the
published figure; beside it, one config per run (`<run>.yaml`), a small file that extends a model config of
`experiments/configs/` and overrides only what the run changes. Any run starts alone with
`ran fit -c experiments/suites/<suite>/<run>.yaml`. The factors are written once, in `suite.yaml`: the
launcher gives each run the suite as its W&B group and the suite and factors as its tags (`Suite.tags`). An
optional `slurm:` mapping (`time`, `cpus_per_task`) overrides the SLURM launcher's defaults for the suite. An
optional `contrast: [a, b]` names two values of the column factor whose difference the report weighs against
the seed spread (e.g. `[arl, nal]`: NAL minus ARL per depth).

A budget is an overlay config given after the run's (`experiments/budgets/<family>/<budget>.yaml`):
`paper` is the paper's recipe as the run configs state it, `cpu-mini` a reduced budget for a 2-core CPU,
`smoke` a few steps for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
SUITES_DIR = ROOT / "suites"
BUDGETS_DIR = ROOT / "budgets"
BUDGETS = ("paper", "cpu-mini", "smoke")
SUITE_KEYS = {
    "title",
    "paper_ref",
    "aliases",
    "budget_family",
    "metric",
    "metric_label",
    "rows",
    "columns",
    "note",
    "contrast",
    "slurm",
    "runs",
}
SLURM_KEYS = {"time", "cpus_per_task"}


class SuiteError(ValueError):
    """An unknown suite, run or budget, or a malformed suite file."""


@dataclass(frozen=True)
class Run:
    name: str
    config: Path
    factors: dict[str, Any]
    paper: dict[str, float] = field(default_factory=dict)  # metric -> published value


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    paper_ref: str
    metrics: tuple[str, ...]
    metric_label: str
    rows: str
    columns: str | None
    budget_family: str
    runs: tuple[Run, ...]
    aliases: tuple[str, ...] = ()
    note: str = ""
    slurm: dict[str, Any] = field(default_factory=dict)  # SLURM defaults for this suite: time, cpus_per_task
    contrast: tuple[str, str] | None = None  # two column values (baseline first) the report compares

    def budget_config(self, budget: str) -> Path:
        if budget not in BUDGETS:
            raise SuiteError(f"unknown budget {budget!r}; valid budgets: {', '.join(BUDGETS)}")
        return BUDGETS_DIR / self.budget_family / f"{budget}.yaml"

    def tags(self, run: Run) -> list[str]:
        """The W&B tags of a run: the suite's name and `factor=value` for each of its factors."""
        return [self.name, *(f"{key}={value}" for key, value in run.factors.items())]

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise SuiteError(
            f"suite {self.name!r} has no run {name!r}; its runs: {', '.join(r.name for r in self.runs)}"
        )


def suite_names() -> list[str]:
    return sorted(p.parent.name for p in SUITES_DIR.glob("*/suite.yaml"))


def load_suite(name: str) -> Suite:
    """The suite called `name` or one of its aliases (e.g. 'table3')."""
    for candidate in suite_names():
        spec = yaml.safe_load((SUITES_DIR / candidate / "suite.yaml").read_text())
        if name == candidate or name in (spec.get("aliases") or []):
            return _parse(candidate, spec)
    known = [f"{n} ({', '.join(a)})" if (a := _aliases(n)) else n for n in suite_names()]
    raise SuiteError(f"unknown suite {name!r}; known suites: {', '.join(known)}")


def _aliases(name: str) -> list[str]:
    return yaml.safe_load((SUITES_DIR / name / "suite.yaml").read_text()).get("aliases") or []


def _parse(name: str, spec: dict[str, Any]) -> Suite:
    for keys, known, where in ((spec, SUITE_KEYS, ""), (spec.get("slurm") or {}, SLURM_KEYS, "slurm.")):
        if unknown := sorted(set(keys) - known):
            raise SuiteError(
                f"suite {name!r}: unknown key {where}{unknown[0]} in suite.yaml; known keys: "
                f"{', '.join(where + k for k in sorted(known))}"
            )
    metrics = spec["metric"] if isinstance(spec["metric"], list) else [spec["metric"]]
    runs = []
    for run_name, entry in spec["runs"].items():
        config = SUITES_DIR / name / f"{run_name}.yaml"
        if not config.is_file():
            raise SuiteError(f"suite {name!r}: run {run_name!r} has no config file {config}")
        paper = entry.get("paper")
        if paper is not None and not isinstance(paper, dict):
            paper = {metrics[0]: paper}
        runs.append(Run(run_name, config, dict(entry.get("factors") or {}), dict(paper or {})))
    contrast = spec.get("contrast")
    if contrast is not None:
        values = {str(r.factors.get(spec.get("columns") or "")) for r in runs}
        if not spec.get("columns") or len(contrast) != 2 or not {str(v) for v in contrast} <= values:
            raise SuiteError(
                f"suite {name!r}: contrast must name two values of its column factor "
                f"{spec.get('columns')!r} ({', '.join(sorted(values))}); got {contrast!r}"
            )
        contrast = (str(contrast[0]), str(contrast[1]))
    return Suite(
        name=name,
        title=spec["title"],
        paper_ref=str(spec.get("paper_ref", "")),
        metrics=tuple(metrics),
        metric_label=spec.get("metric_label", metrics[0]),
        rows=spec["rows"],
        columns=spec.get("columns"),
        budget_family=spec["budget_family"],
        runs=tuple(runs),
        aliases=tuple(spec.get("aliases") or ()),
        note=spec.get("note", ""),
        slurm=dict(spec.get("slurm") or {}),
        contrast=contrast,
    )
