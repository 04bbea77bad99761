"""Where the analyses' pictures and tables go in W&B: the active run, or a run directory's own run resumed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import wandb

from experiments.analysis.networks import RunDirectory
from ran.train.rundir import WANDB_ID_FILE
from ran.train.tracking import wandb_mode

__all__ = ["active_wandb_run", "attached_wandb_run"]


def active_wandb_run() -> Any:
    """The active W&B run (`wandb.run`, e.g. one opened by :func:`attached_wandb_run`) or None."""
    return wandb.run


@contextlib.contextmanager
def attached_wandb_run(run: RunDirectory) -> Iterator[Any]:
    """The W&B run that `ran fit` logged `run` to, resumed by the id in its `wandb_run_id` file (online with
    credentials, offline into `<run>/wandb/` otherwise, as `ran fit` chooses), active while the block runs.
    Yields None, opening nothing, for a run that logged elsewhere (no `wandb_run_id`)."""
    id_file = run.path / WANDB_ID_FILE
    if not id_file.is_file():
        print(f"{run.path} has no {WANDB_ID_FILE} (not logged to W&B): the results stay in files")
        yield None
        return
    settings = run.config.get("run") or {}
    wandb_run = wandb.init(
        id=id_file.read_text().strip(),
        resume="allow",
        dir=run.path,
        mode=wandb_mode(),
        project=settings.get("project"),
        group=settings.get("group"),
        name=settings.get("name") or run.name,
    )
    try:
        yield wandb_run
    finally:
        wandb_run.finish()
