"""`python -m experiments curves`: a metric over a fit, one line per run, as a PNG and a table.

    python -m experiments curves --run-dir runs/cifar10-attention56-cpu-reference
    python -m experiments curves --run-dir runs/a164-arl --run-dir runs/a164-nal --metric val/err1

The figures are each validation's, from the `history` that `ran fit` keeps in a run's results.json
(`ran.train.results.ResultsWriter`); accuracies are drawn in %. The PNG goes to `--out`, else to
`<first run>/analysis/curve_<metric>.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ran.tools.markdown import markdown_lines
from ran.train.rundir import RunDir, UnreadableResults

__all__ = ["CurveError", "curves", "fit_history"]


class CurveError(ValueError):
    """A run directory without the figures asked for."""


def fit_history(run_dir: Path, metric: str) -> list[tuple[float, int, float]]:
    """(epochs trained, step, value of `metric`) at each of the run's validations, in order."""
    try:
        fit = RunDir(run_dir).read_results().get("fit", {})
    except UnreadableResults as err:
        raise CurveError(str(err)) from None
    if not fit:
        raise CurveError(f"{run_dir} has no fit in results.json: give the directory of a `ran fit` run")
    history = fit.get("history")
    if not history:
        raise CurveError(
            f"{run_dir}/results.json has no validation history (the run validated nothing yet, or was "
            "trained before `ran fit` kept one)"
        )
    points = [(h["epochs"], h["step"], h["metrics"][metric]) for h in history if metric in h["metrics"]]
    if not points:
        known = sorted({key for h in history for key in h["metrics"]})
        raise CurveError(f"{run_dir} never logged {metric}; its validations logged {', '.join(known)}")
    return points


def curves(run_dirs: Sequence[Path], metric: str = "val/acc1", out: Path | None = None) -> tuple[str, Path]:
    """The table (markdown) of every run's `metric` per validation and the path of the PNG written."""
    from ran.tools.pictures import curve_chart  # deferred: matplotlib

    if not run_dirs:
        raise CurveError("give at least one --run-dir")
    percent = "acc" in metric
    scale = 100.0 if percent else 1.0
    histories = {Path(d).name: fit_history(Path(d), metric) for d in run_dirs}
    if len(histories) < len(run_dirs):
        raise CurveError("two run directories have the same name: give runs with different names")
    rows = [
        [name, f"{epochs:g}", str(step), f"{scale * value:.2f}"]
        for name, points in histories.items()
        for epochs, step, value in points
    ]
    unit = f"{metric} (%)" if percent else metric
    table = "\n".join(markdown_lines(["run", "epochs", "step", unit], rows))
    lines = {name: [(e, scale * v) for e, _, v in points] for name, points in histories.items()}
    image = curve_chart(
        lines,
        xlabel="epochs trained",
        ylabel=unit,
        title=", ".join(histories) if len(histories) == 1 else "",
        higher_is_better="loss" not in metric and "err" not in metric,
    )
    path = out or Path(run_dirs[0]) / "analysis" / f"curve_{metric.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return table, path
