"""The `ran` command: `ran fit|validate|test|predict` (LightningCLI) and `ran summary`.

    ran fit -c experiments/configs/cifar10/attention92.yaml                      # train
    ran fit -c experiments/configs/cifar10/attention92.yaml --ckpt_path last     # resume the same run
    ran test -c experiments/configs/cifar10/attention92.yaml --ckpt_path best    # test its best checkpoint
    ran fit -c experiments/configs/cifar10/attention92.yaml --print_config       # the merged config

Config inheritance: a YAML config may name the configs it extends in a top-level `__base__` key (one path or
a list, relative to the file that names them). The bases are resolved recursively and merged in order, then
the file itself is merged on top: mappings merge key by key; any other value (scalars, lists) replaces the
base's; a mapping whose `class_path` differs from the base's replaces it whole (its `init_args` belong to
another class). The merged YAML is what LightningCLI parses, so `--print_config` shows it, unknown keys are
errors, and later `-c` files and command-line flags override it as usual.

Runs: each run lives in `<run.root>/<run.name>` (default `runs/<name>`): `config.yaml` (the resolved config),
`checkpoints/best.ckpt` (by val/acc1) and `checkpoints/last.ckpt`, `results.json` (final metrics, see
`ran.results`), the W&B files under `wandb/` (and `wandb_run_id`, so that a resumed run continues the same W&B
run) or `csv/version_N/metrics.csv`.
`ran fit` refuses an existing run directory unless it resumes (`--ckpt_path last|best|PATH`, or a SLURM
requeue that left `hpc_ckpt_N.ckpt`) or `--run.overwrite true` is given.
"""

from __future__ import annotations

import netrc
import os
import secrets
import shutil
import string
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from datamodules.errors import CorruptImageError, DatasetLayoutError, DataSettingError
from ran.allocator import keep_freed_memory
from ran.callbacks import PredictionWriter, RNGStateCallback, StepProgressBar, ValidateAtMaxSteps
from ran.module import ImageClassifier
from ran.registry import list_models
from ran.results import ResultsWriter

BASE_KEY = "__base__"
WANDB_ID_FILE = "wandb_run_id"

__all__ = [
    "BASE_KEY",
    "ConfigError",
    "RanCLI",
    "RunConfig",
    "is_launch_rank_zero",
    "load_config",
    "main",
    "wandb_mode",
]


class ConfigError(Exception):
    """A problem with the user's configuration or run directory, reported without a traceback."""


# --- config inheritance ------------------------------------------------------------------------------------


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged onto `base` (see the module docstring for the rules); neither is modified."""
    if "class_path" in base and "class_path" in override and base["class_path"] != override["class_path"]:
        return dict(override)
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config and resolve its `__base__` chain into one mapping."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} {base!r} not found (looked for {base_path.resolve()})")
        merged = merge_configs(merged, load_config(base_path, (*_chain, path)))
    return merge_configs(merged, data)


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace every `-c/--config FILE` whose file uses `__base__` by the merged YAML (LightningCLI's
    `--config` accepts a YAML string as well as a path)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            flag, value, i = arg, argv[i + 1], i + 2
        elif arg.startswith("--config="):
            flag, value, i = "--config", arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).is_file() and _has_base(Path(value)):
            value = yaml.safe_dump(load_config(value), sort_keys=False)
        out += [flag, value]
    return out


def _has_base(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False  # LightningCLI reports the syntax error itself
    return isinstance(data, dict) and BASE_KEY in data


# --- runs --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Run directory and experiment tracking.

    Args:
        name: run name: the directory `<root>/<name>` and the W&B run name (default: the model's arch).
        root: folder holding the run directories.
        logger: 'wandb' (offline when no API key is configured or WANDB_MODE says so), 'csv' or 'none'.
        project: W&B project.
        group: W&B group (e.g. the dataset, or an ablation's name).
        tags: W&B tags.
        overwrite: `ran fit` deletes an existing run directory of the same name and starts afresh.
    """

    name: str | None = None
    root: str = "runs"
    logger: Literal["wandb", "csv", "none"] = "wandb"
    project: str = "residual-attention"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    overwrite: bool = False


def is_launch_rank_zero() -> bool:
    """Whether this process will be global rank 0, judged from the launcher's environment before any process
    group exists: torchrun (RANK), Lightning's own DDP launcher (LOCAL_RANK and NODE_RANK) or srun
    (SLURM_PROCID), checked in Lightning's order."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"]) == 0 and int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) == 0
    return int(env.get("SLURM_PROCID", 0)) == 0


def wandb_has_credentials() -> bool:
    """An API key in WANDB_API_KEY or a ~/.netrc (or $NETRC) entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> Literal["online", "offline", "disabled"]:
    """WANDB_MODE if set ('dryrun' counts as offline), else online with credentials and offline without."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled"):
        return mode  # type: ignore[return-value]
    if mode == "dryrun":
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a started run: its config (written once the data is set up) or checkpoints. A
    directory left by a start that failed earlier (e.g. missing data) is reused."""
    return (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()


def read_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id persisted in `run_dir` (so that a resumed run continues the same W&B run), if any."""
    path = run_dir / WANDB_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def new_wandb_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, W&B's own format)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _newest(paths: list[Path]) -> Path | None:
    existing = [p for p in paths if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def _hpc_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


# --- the CLI -----------------------------------------------------------------------------------------------


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config into the run directory (`config.yaml` for fit, `config_<stage>.yaml`
    otherwise) with the W&B run id, and sends it to every logger as hyperparameters (the W&B run config), on
    rank 0, once the data is set up."""

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Any,
        run_dir: str,
        wandb_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(parser, config, overwrite=True, save_to_log_dir=False, **kwargs)
        self.run_dir = Path(run_dir)
        self.wandb_id = wandb_id

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        path = self.run_dir / ("config.yaml" if stage == "fit" else f"config_{stage}.yaml")
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        if self.wandb_id and not (self.run_dir / WANDB_ID_FILE).is_file():
            (self.run_dir / WANDB_ID_FILE).write_text(self.wandb_id + "\n")
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class RanArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage in error messages (the full one lists every option)."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        print(f"usage: {prog} [-c CONFIG] [--SECTION.KEY VALUE ...]", file=file or sys.stdout)


class RanCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` with any datamodule (chosen by `data.class_path`), a `run` group
    (run directory, logger, W&B project/group/tags), best/last checkpoints, RNG state in checkpoints and a
    learning-rate monitor. See the module docstring of `ran.cli`."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            ImageClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            auto_configure_optimizers=False,
            parser_class=RanArgumentParser,
            parser_kwargs={"prog": "ran"},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    # The run directory is settled right after parsing, before LightningCLI reads `ckpt_path` (so that
    # 'last' and 'best' are resolved to files) and before anything is instantiated.
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            self._prepare_run(self.config.subcommand, self.config[self.config.subcommand])

    def _prepare_run(self, subcommand: str, cfg: Any) -> None:
        if cfg.model.arch not in list_models():
            raise ConfigError(
                f"unknown model {cfg.model.arch!r} (model.arch); known models: {', '.join(list_models())}"
            )
        if cfg.trainer.get("default_root_dir") is not None:
            raise ConfigError(
                "trainer.default_root_dir is set by ran: choose the run directory with "
                "--run.root and --run.name"
            )
        if cfg.trainer.get("logger") is not None:
            raise ConfigError(
                "trainer.logger is set by ran: choose the logger with --run.logger (wandb, csv or none)"
            )
        run = cfg.run
        run.name = run.name or cfg.model.arch
        self.run_dir = Path(run.root) / run.name
        ckpt = cfg.get("ckpt_path")
        if subcommand == "fit" and is_launch_rank_zero():
            requeued = SLURMEnvironment.detect() and bool(_hpc_checkpoints(self.run_dir))
            if holds_run(self.run_dir) and ckpt is None and not requeued:
                if not run.overwrite:
                    raise ConfigError(
                        f"run directory {self.run_dir} exists; resume with --ckpt_path last, pick another "
                        "--run.name (or --run.root), or pass --run.overwrite true to delete it and start "
                        "afresh"
                    )
                shutil.rmtree(self.run_dir)
        if ckpt in ("last", "best"):
            cfg.ckpt_path = str(self._find_checkpoint(ckpt))
        self.wandb_id = read_wandb_id(self.run_dir) or new_wandb_id()

    def _find_checkpoint(self, which: str) -> Path:
        """'last': the newest of checkpoints/last*.ckpt and SLURM's hpc_ckpt_*.ckpt; 'best': best.ckpt."""
        ckpt_dir = self.run_dir / "checkpoints"
        if which == "best":
            found = _newest([ckpt_dir / "best.ckpt"])
        else:
            found = _newest([*ckpt_dir.glob("last*.ckpt"), *_hpc_checkpoints(self.run_dir)])
        if found is None:
            looked = "checkpoints/best.ckpt" if which == "best" else "checkpoints/last.ckpt, hpc_ckpt_*.ckpt"
            raise ConfigError(
                f"--ckpt_path {which}: no checkpoint in {self.run_dir} (looked for {looked}); "
                "check --run.name and --run.root"
            )
        return found

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(str(err)) from None

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config[self.subcommand]
        trainer_cfg = self._get(self.config_init, "trainer")
        loggers = self._loggers(cfg.run)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        callbacks += [RNGStateCallback(), ValidateAtMaxSteps(), ResultsWriter(self.run_dir)]
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.run_dir / "checkpoints",
                    filename="best",
                    monitor="val/acc1",
                    mode="max",
                    save_top_k=1,
                    save_last=True,
                    auto_insert_metric_name=False,
                )
            )
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            callbacks.append(StepProgressBar())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self.run_dir))
        wandb_id = self.wandb_id if cfg.run.logger == "wandb" else None
        self.save_config_kwargs = {"run_dir": str(self.run_dir), "wandb_id": wandb_id}
        # enable_autolog_hparams=False: SaveRunConfig sends the whole resolved config to the loggers instead
        # of Lightning's flat mix of the model's and the datamodule's arguments.
        return super().instantiate_trainer(
            default_root_dir=str(self.run_dir),
            logger=loggers or False,
            callbacks=callbacks,
            enable_autolog_hparams=False,
            **kwargs,
        )

    def _loggers(self, run: Any) -> list[Logger]:
        if run.logger == "csv":
            return [CSVLogger(save_dir=self.run_dir, name="csv")]
        if run.logger == "wandb":
            mode = wandb_mode()
            return [
                WandbLogger(
                    name=run.name,
                    save_dir=self.run_dir,
                    id=self.wandb_id,
                    project=run.project,
                    group=run.group,
                    tags=list(run.tags) or None,
                    offline=mode == "offline",
                    **({"mode": mode} if mode != "offline" else {}),
                )
            ]
        return []


USAGE = """usage: ran {fit,validate,test,predict} -c CONFIG [--section.key VALUE ...]
       ran summary MODEL | ran summary --all [--markdown]

  fit, validate, test, predict   train or evaluate (LightningCLI; `ran fit --help` lists every option)
  summary                        parameters, multiply-adds and stage shapes of the registered networks
"""


# Exceptions that are the user's to fix (config, data): reported as one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    MisconfigurationException,
    FileNotFoundError,
    NotADirectoryError,
    CorruptImageError,
    DatasetLayoutError,
    DataSettingError,
)


def _one_line(err: BaseException) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker, its last line (not the worker's
    traceback)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the `ran` command with `argv` (default: sys.argv[1:]) and return its exit code.

    In-process calls work for single-process runs and `ddp_spawn`; `strategy=ddp` relaunches `sys.argv`, so
    run it as a command (`ran fit ...`, torchrun or srun).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    if argv and argv[0] == "summary":
        from ran.summary import summary_main

        return summary_main(argv[1:])
    if not argv:
        print(USAGE, file=sys.stderr, end="")
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
    subcommand = argv[0] if argv[0] in ("fit", "validate", "test", "predict") else None
    prog = f"ran {subcommand}" if subcommand else "ran"
    status = 0
    # LightningCLI warns when given `args` while sys.argv has arguments: here `args` is sys.argv with the
    # configs' __base__ chains resolved (sys.argv itself stays as typed, for DDP's relaunch of the command).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
    try:
        RanCLI(args=resolve_config_args(argv))
    except SystemExit as exit_:  # argument errors (jsonargparse has printed them), --help, --print_config
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        status = 2
    except BaseException as err:
        status = 1
        if not isinstance(err, USER_ERRORS):
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
    finally:
        _finish_wandb(status)
    return status


def _finish_wandb(status: int) -> None:
    """Close the process's W&B run (Lightning leaves it open), so the next in-process run starts its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=status)


if __name__ == "__main__":
    sys.exit(main())
