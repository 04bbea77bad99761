"""Tables shaped like the paper's, from the runs' own directories.

Each run directory holds `results.json`, written by `ran` during and at the end of `fit` and of `test` (see
`ran.train.rundir` and `ran.train.results.ResultsWriter`). The report reads it for every run and seed of a
suite under a budget (no network needed), and writes a markdown and a CSV table with the measured figure (mean
and spread over seeds), the paper's figure beside it and the difference, the suite's contrast (e.g. NAL minus
ARL) against the seed spread, and a PNG chart of the same; with `--wandb` the table and chart also go to W&B,
as a run of job type "report" in the suite's group. Only a run whose fit finished and whose test ran counts:
one never started is "missing"; one still running or stopped is "unfinished (step s/n)"; "interrupted",
"diverged" and "failed" runs are shown as such, never with an error rate; a results.json that cannot be read
is "unreadable", with a warning naming it, and the rest of the report still prints."""

from __future__ import annotations

import csv
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb
from PIL import Image

from experiments.suites import Run, Suite
from ran.tools.markdown import markdown_lines
from ran.tools.pictures import report_chart
from ran.train.rundir import RunDir, UnreadableResults
from ran.train.tracking import new_wandb_id, wandb_mode


@dataclass
class Cell:
    """One run of the suite, over all its seeds, for one metric."""

    run: Run
    metric: str
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    status: str = "missing"  # 'done' (every seed tested), 'partial', 'unfinished (...)', 'missing'

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def paper(self) -> float | None:
        return self.run.paper.get(self.metric)

    @property
    def diff(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    def measured_text(self) -> str:
        if self.mean is None:
            return self.status
        text = f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")
        text += f" (n={len(self.values)})" if len(self.values) > 1 else ""
        return text if self.status == "done" else f"{text} [{self.status}]"


def seed_state(run_dir: Path, metric: str) -> tuple[str, float | None]:
    """One seed's state ('done', 'missing', 'unreadable', 'interrupted (step s/n)', ...) and its value, which
    is given only when the fit finished and the test recorded `metric`."""
    try:
        results = RunDir(run_dir).read_results()
    except UnreadableResults as err:
        warnings.warn(f"unreadable results: {err}", stacklevel=2)
        return "unreadable", None
    if not results:
        return ("unfinished (no results)" if run_dir.exists() else "missing"), None
    fit = results.get("fit", {})
    status = fit.get("status", "finished" if "test" in results else "running")
    value = results.get("test", {}).get("metrics", {}).get(metric)
    if status == "finished" and value is not None:
        return "done", float(value)
    step = f"step {fit.get('global_step')}/{fit.get('max_steps')}"
    if status in ("running", "finished"):
        return f"unfinished ({step})", None
    return f"{status} ({step})", None


def seeds_present(suite_dir: Path, run: Run) -> list[int]:
    return sorted(int(p.name[4:]) for p in (suite_dir / run.name).glob("seed*") if p.name[4:].isdigit())


def collect(suite: Suite, budget: str, root: Path, seeds: list[int] | None = None) -> list[Cell]:
    """Every (run, metric) cell of the suite, read from `<root>/<suite>/<budget>/<run>/seed<S>/`."""
    suite_dir = root / suite.name / budget
    cells = []
    for run in suite.runs:
        run_seeds = seeds if seeds is not None else seeds_present(suite_dir, run)
        for metric in suite.metrics:
            cell = Cell(run, metric)
            states = []
            for seed in run_seeds:
                state, value = seed_state(suite_dir / run.name / f"seed{seed}", metric)
                states.append(state)
                if value is not None:
                    cell.values.append(value)
                    cell.seeds.append(seed)
            if states and all(s == "done" for s in states):
                cell.status = "done"
            elif cell.values:
                cell.status = "partial"
            elif states:
                cell.status = (
                    next(s for s in states if s != "missing")
                    if any(s != "missing" for s in states)
                    else "missing"
                )
            cells.append(cell)
    return cells


CONTRAST_COLUMNS = ["row", "metric", "diff", "seed_spread", "exceeds_spread", "paper_diff", "complete"]


def contrasts(suite: Suite, cells: list[Cell]) -> list[list[Any]]:
    """The suite's `contrast` (two column values, baseline first; e.g. ARL vs NAL) per row and metric:
    [row factor value, metric, the second's mean minus the first's, the seed spread (the sum of their two
    standard deviations over seeds), whether the difference exceeds it, the paper's difference, whether every
    seed of both cells was tested (a partial contrast is marked so in the markdown)]. A difference
    exceeds the spread when it is larger than that sum, i.e. the two mean ± sd ranges do not overlap; where a
    cell has no figure or one seed, the missing entries are None. [] for a suite without a contrast."""
    if suite.contrast is None:
        return []
    first, second = suite.contrast
    index = _index(suite, cells)
    out = []
    for row in _rows(suite, cells):
        for metric in suite.metrics:
            a, b = index.get((row, first, metric)), index.get((row, second, metric))
            paper = b.paper - a.paper if a and b and a.paper is not None and b.paper is not None else None
            diff = spread = None
            if a and b and a.mean is not None and b.mean is not None:
                diff = b.mean - a.mean
                spread = a.std + b.std if a.std is not None and b.std is not None else None
            exceeds = None if diff is None or spread is None else abs(diff) > spread
            complete = bool(a and b and a.status == b.status == "done")
            out.append([row, metric, diff, spread, exceeds, paper, complete])
    return out


def contrast_table(suite: Suite, cells: list[Cell]) -> str:
    """:func:`contrasts` as markdown: a row per row factor value, four columns per metric. '' without one."""
    entries = contrasts(suite, cells)
    if not entries:
        return ""
    first, second = suite.contrast or ("", "")
    name = f"{second} − {first}"
    lines = [
        f"Contrast {name}: the difference of the means; it exceeds the seed spread when it is larger than "
        "the sum of the two standard deviations over seeds (the mean ± sd ranges do not overlap).",
        "",
    ]
    header = [suite.rows]
    for metric in suite.metrics:
        label = f" {metric}" if len(suite.metrics) > 1 else ""
        header += [
            f"{name}{label} measured",
            f"sd {first} + sd {second}",
            "exceeds the spread",
            f"{name}{label} paper",
        ]
    table: dict[str, list[str]] = {}
    for row, _, diff, spread, exceeds, paper, complete in entries:
        verdict = "-" if exceeds is None else ("yes" if exceeds else "no")
        verdict += "" if complete or diff is None else " [partial]"
        table.setdefault(row, [row]).extend(
            [_fmt(diff, signed=True), _fmt(spread), verdict, _fmt(paper, signed=True)]
        )
    return "\n".join(lines + markdown_lines(header, list(table.values()))) + "\n"


def _rows(suite: Suite, cells: list[Cell]) -> list[str]:
    """The row factor's values, in natural order (56 before 128)."""
    return sorted({str(c.run.factors.get(suite.rows)) for c in cells}, key=_natural)


def _index(suite: Suite, cells: list[Cell]) -> dict[tuple[str, str, str], Cell]:
    """The cells by (row factor value, column factor value or '', metric)."""
    return {
        (
            str(c.run.factors.get(suite.rows)),
            str(c.run.factors.get(suite.columns, "")) if suite.columns else "",
            c.metric,
        ): c
        for c in cells
    }


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown_table(suite: Suite, budget: str, cells: list[Cell]) -> str:
    """Rows are the suite's row factor; each column factor value (and each metric) gives measured, paper and
    difference columns."""
    columns = (
        sorted({str(c.run.factors.get(suite.columns, "")) for c in cells}, key=_natural)
        if suite.columns
        else [""]
    )
    rows = _rows(suite, cells)
    header = [suite.rows]
    for col in columns:
        for metric in suite.metrics:
            prefix = _series(suite, col, metric)
            header += [f"{prefix} measured".strip(), f"{prefix} paper".strip(), f"{prefix} diff".strip()]
    lines = [
        f"### {suite.title}",
        "",
        f"{suite.paper_ref}; {suite.metric_label}; budget `{budget}`"
        f"{'; ' + suite.note if suite.note else ''}",
        "",
    ]
    index = _index(suite, cells)
    table = []
    for row in rows:
        line = [row]
        for col in columns:
            for metric in suite.metrics:
                cell = index.get((row, col, metric))
                line += (
                    ["-", "-", "-"]
                    if cell is None
                    else [cell.measured_text(), _fmt(cell.paper), _fmt(cell.diff, signed=True)]
                )
        table.append(line)
    return "\n".join(lines + markdown_lines(header, table)) + "\n"


def _series(suite: Suite, column: str, metric: str) -> str:
    """The name of one column factor value and metric of the table ('' for a suite of one column)."""
    parts = (f"{suite.columns}={column}" if suite.columns else "", metric if len(suite.metrics) > 1 else "")
    return " ".join(x for x in parts if x)


def chart(suite: Suite, budget: str, cells: list[Cell]) -> Image.Image:
    """The report as a picture (:func:`ran.tools.pictures.report_chart`): per row factor value, each column's
    measured mean (its spread over seeds as an error bar) beside the paper's figure."""
    groups: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {}
    for cell in sorted(cells, key=lambda c: _natural(str(c.run.factors.get(suite.rows)))):
        column = str(cell.run.factors.get(suite.columns, "")) if suite.columns else ""
        series = _series(suite, column, cell.metric) or suite.metric_label
        groups.setdefault(str(cell.run.factors.get(suite.rows)), {})[series] = (
            cell.mean,
            cell.std,
            cell.paper,
        )
    return report_chart(
        groups,
        ylabel=suite.metric_label,
        title=f"{suite.title}\n{suite.paper_ref}; budget {budget}",
        xlabel=suite.rows,
    )


def _natural(value: str):
    return (0, float(value), "") if value.replace(".", "", 1).isdigit() else (1, 0.0, value)


def table_rows(suite: Suite, budget: str, cells: list[Cell]) -> tuple[list[str], list[list[Any]]]:
    """The report as one row per run and metric (the CSV file and the W&B table): header and rows."""
    factor_keys = sorted({k for c in cells for k in c.run.factors})
    header = [
        "suite",
        "budget",
        "run",
        *factor_keys,
        "metric",
        "status",
        "seeds",
        "n",
        "mean",
        "std",
        "paper",
    ]
    rows = [
        [
            suite.name,
            budget,
            c.run.name,
            *[c.run.factors.get(k, "") for k in factor_keys],
            c.metric,
            c.status,
            " ".join(map(str, c.seeds)),
            len(c.values),
            c.mean,
            c.std,
            c.paper,
            c.diff,
        ]
        for c in cells
    ]
    return [*header, "diff"], rows


def write_csv(path: Path, suite: Suite, budget: str, cells: list[Cell]) -> None:
    header, rows = table_rows(suite, budget, cells)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            *first, mean, std, paper, diff = row
            writer.writerow(
                [
                    *first,
                    "" if mean is None else f"{mean:.4f}",
                    "" if std is None else f"{std:.4f}",
                    "" if paper is None else paper,
                    "" if diff is None else f"{diff:.4f}",
                ]
            )


def log_to_wandb(
    suite: Suite, budget: str, cells: list[Cell], picture: Path, root: Path, out_dir: Path
) -> str:
    """Log the report to W&B as a run of job type 'report' in the suite's group (the group of its runs): the
    table as `report/table` (a wandb.Table of :func:`table_rows`), the chart as `report/chart` and the suite's
    contrast as `report/contrast` (:func:`contrasts`). One W&B run per suite and budget, its id kept in
    `<out>/<suite>-<budget>.wandb_id`, so a later report adds a step to the same run. Online or offline as
    `ran` decides (:func:`ran.train.tracking.wandb_mode`); project and entity are those of the suite's runs
    (`run.project`, `run.entity` of the first run directory's config.yaml).
    Returns the W&B run's id."""
    settings = next(
        (
            RunDir(d).read_config().get("run") or {}
            for d in sorted((root / suite.name / budget).glob("*/seed*"))
            if RunDir(d).config_file().is_file()
        ),
        {},
    )
    id_file = out_dir / f"{suite.name}-{budget}.wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else new_wandb_id()
    header, rows = table_rows(suite, budget, cells)
    run = wandb.init(
        id=run_id,
        resume="allow",
        dir=out_dir,
        mode=wandb_mode(),
        project=settings.get("project"),
        entity=settings.get("entity"),
        group=suite.name,
        job_type="report",
        name=f"{suite.name}-{budget}-report",
        tags=[suite.name, f"budget={budget}"],
        config={
            "suite": suite.name,
            "budget": budget,
            "metrics": list(suite.metrics),
            "paper_ref": suite.paper_ref,
        },
    )
    try:
        run.log(
            {
                "report/table": wandb.Table(columns=header, data=rows),
                "report/chart": wandb.Image(str(picture)),
                **(
                    {"report/contrast": wandb.Table(columns=CONTRAST_COLUMNS, data=contrast)}
                    if (contrast := contrasts(suite, cells))
                    else {}
                ),
            }
        )
    finally:
        run.finish()
    id_file.write_text(run_id + "\n")
    return run_id


def report(
    suite: Suite,
    budget: str,
    root: Path,
    out_dir: Path | None = None,
    seeds: list[int] | None = None,
    to_wandb: bool = False,
) -> tuple[str, Path, Path]:
    """Build the suite's tables; write `<out>/<suite>-<budget>.md`, `.csv` and the chart `.png` (see
    :func:`chart`), and with `to_wandb` log the table and chart to W&B (:func:`log_to_wandb`); return the
    markdown and the paths of the markdown and CSV files."""
    cells = collect(suite, budget, root, seeds)
    text = markdown_table(suite, budget, cells)
    contrast = contrast_table(suite, cells)
    text += f"\n{contrast}" if contrast else ""
    out_dir = out_dir or root / suite.name / budget
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / f"{suite.name}-{budget}.md", out_dir / f"{suite.name}-{budget}.csv"
    md.write_text(text)
    write_csv(csv_path, suite, budget, cells)
    picture = chart_path(md)
    chart(suite, budget, cells).save(picture)
    if to_wandb:
        log_to_wandb(suite, budget, cells, picture, root, out_dir)
    return text, md, csv_path


def chart_path(markdown: Path) -> Path:
    """Where the chart of a report lies: beside its markdown file, as `.png`."""
    return markdown.with_suffix(".png")
