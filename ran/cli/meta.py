"""What a run records about itself besides its metrics: the resolved config in the run directory and the
loggers (`SaveRunConfig`), and `meta`: the stage, the config files, the git commit, the package versions."""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import LightningArgumentParser, SaveConfigCallback

from ran.train.rundir import RunDir

__all__ = ["SaveRunConfig", "config_files", "git_state", "package_versions", "run_meta"]

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONED_PACKAGES = ("torch", "pytorch_lightning", "torchmetrics", "torchvision", "wandb", "ran")


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config into the run directory (`config.yaml` for fit, `config_<stage>.yaml`
    otherwise) with the stage's W&B run id, and sends it with `meta` (see :func:`run_meta`) to every logger as
    hyperparameters (the W&B run config), on rank 0, once the data is set up."""

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Any,
        run_dir: str,
        wandb_id: str | None = None,
        meta: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(parser, config, overwrite=True, save_to_log_dir=False, **kwargs)
        self.run_dir = RunDir(Path(run_dir))
        self.wandb_id = wandb_id
        self.meta = meta or {}

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        path = self.run_dir.config_file(stage)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        if self.wandb_id:
            self.run_dir.save_wandb_id(self.wandb_id, stage)
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)
        meta = {**self.meta, "seed": config.get("seed_everything")}
        for logger in trainer.loggers:
            logger.log_hyperparams({**config, "meta": meta})


def config_files(argv: Sequence[str]) -> list[str]:
    """The config files named by `-c/--config` in `argv`, as given (a YAML string is no file)."""
    files = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else value
        if value is not None and "\n" not in value and Path(value).is_file():
            files.append(value)
    return files


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it ({commit: None} outside a git
    checkout, e.g. an installed wheel)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes)}


def package_versions() -> dict[str, str | None]:
    """The installed versions of the packages a run's result depends on."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_meta(stage: str, files: list[str], fit_wandb_id: str | None) -> dict[str, Any]:
    """What the config alone does not say about a run, logged beside it as `meta`: the stage, the config files
    it was started from, the git commit (and whether the checkout was modified), the package versions and, for
    validate/test/predict, the W&B id of the fit they evaluate (the seed is added by SaveRunConfig)."""
    meta: dict[str, Any] = {
        "stage": stage,
        "config_files": files,
        "git": git_state(),
        "versions": package_versions(),
    }
    if stage != "fit":
        meta["fit_wandb_id"] = fit_wandb_id
    return meta
