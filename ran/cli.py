"""The `ran` command: `ran fit|validate|test|predict` (LightningCLI) and `ran summary`.

    ran fit -c experiments/configs/cifar10/attention92.yaml                      # train
    ran fit -c experiments/configs/cifar10/attention92.yaml --ckpt_path last     # resume the same run
    ran test -c experiments/configs/cifar10/attention92.yaml --ckpt_path best    # test its best checkpoint
    ran fit -c experiments/configs/cifar10/attention92.yaml --print_config       # the merged config

Config inheritance (`__base__`) and the resolved config: see `ran.config`.

Runs: each run lives in `<run.root>/<run.name>` (default `runs/<name>`): `config.yaml` (the resolved config;
`config_<stage>.yaml` for validate/test/predict), `checkpoints/best.ckpt` (by val/acc1) and
`checkpoints/last.ckpt`, `results.json` (final metrics, see `ran.results`), the W&B files under `wandb/` or
`csv/version_N/metrics.csv`.
`ran fit` refuses an existing run directory unless it resumes (`--ckpt_path last|best|PATH`, or a SLURM
requeue that left `hpc_ckpt_N.ckpt`) or `--run.overwrite true` is given.

The W&B record: each stage of a run is a W&B run of its own, in the run's group (`--run.group`) and with the
stage as its `job_type`: `ran fit` logs to `<name>` (its id kept in `wandb_run_id`, so a resumed fit continues
it), `ran validate|test|predict` to `<name>-<stage>` (id in `wandb_run_id_<stage>`; testing again continues
that run). Testing therefore never rewrites the fit's config, and a dashboard filters stages by job type. Each
W&B run's config is the resolved config that stage ran with, plus `meta`: the stage, the `-c` config files,
the seed, the git commit and whether the checkout had changes, the package versions and, for the evaluating
stages, the fit's W&B id; `run.suite`, `run.budget` and `run.factors` are set by `python -m experiments run`.

Loggers: `--run.logger wandb|csv|none` picks ran's logger; `--trainer.logger` adds more (e.g. a
TensorBoardLogger). A WandbLogger or CSVLogger given there gets ran's settings (run directory, W&B id, name,
project, `--run.entity`, group, tags, job type) for every argument it leaves at its default, so W&B options
such as `--trainer.logger.log_model all` pass through; one of the same kind as `--run.logger` replaces ran's.
With any logger, the learning rate and Lightning's ThroughputMonitor (images/s; FLOPs/s and MFU on GPUs whose
peak Lightning knows) are logged too.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.throughput import measure_flops
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from datamodules.errors import CorruptImageError, DatasetLayoutError, DataSettingError
from ran.allocator import keep_freed_memory
from ran.callbacks import (
    AtomicCheckpointIO,
    DivergenceGuard,
    GracefulStop,
    LastCheckpoint,
    PredictionWriter,
    RNGStateCallback,
    RunInterrupted,
    StepProgressBar,
    TrainingDiverged,
    ValidateAtMaxSteps,
)
from ran.config import ConfigError, resolve_config_args
from ran.mask_monitor import SoftMaskMonitor
from ran.module import ImageClassifier, check_compile_mode
from ran.registry import create_model, list_models
from ran.results import ResultsWriter
from ran.rundir import RunDir, UnreadableCheckpoint, checkpoint_problem
from ran.summary import summary_main
from ran.tracking import new_wandb_id, wandb_mode

__all__ = [
    "RanCLI",
    "RunConfig",
    "is_launch_rank_zero",
    "main",
    "run_meta",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSIONED_PACKAGES = ("torch", "pytorch_lightning", "torchmetrics", "torchvision", "wandb", "ran")


# --- runs --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Run directory and experiment tracking.

    Args:
        name: run name: the directory `<root>/<name>` and the W&B run name (default: the model's arch).
        root: folder holding the run directories.
        logger: 'wandb' (offline when no API key is configured or WANDB_MODE says so), 'csv' or 'none'; a
            logger given with --trainer.logger is added to it (or, of the same kind, replaces it).
        project: W&B project.
        entity: W&B entity (user or team; default: the API key's default entity).
        group: W&B group (e.g. the dataset, or an ablation's name).
        tags: W&B tags.
        suite: the experiment suite the run belongs to (set by `python -m experiments run`).
        budget: the suite's budget (paper, cpu-mini, smoke; set by the launcher).
        factors: the run's factors within its suite, e.g. {learning: nal, depth: 92} (set by the launcher).
        overwrite: `ran fit` deletes an existing run directory of the same name and starts afresh.
        checkpoint_every_n_steps: also save checkpoints/last.ckpt every this many optimizer steps (it is
            saved after every validation, at the end and on SIGTERM/SIGINT anyway); 0 turns it off.
        allow_unfinished: let `ran test` evaluate a run whose fit did not finish (interrupted, diverged,
            failed or still running); its test results then record the fit's status.
    """

    name: str | None = None
    root: str = "runs"
    logger: Literal["wandb", "csv", "none"] = "wandb"
    project: str = "residual-attention"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    suite: str | None = None
    budget: str | None = None
    factors: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    checkpoint_every_n_steps: int = 1000
    allow_unfinished: bool = False


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


def check_writable(path: Path) -> None:
    """A ConfigError unless `path` can be created and written: its nearest existing ancestor must be a
    writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write the run directory {path}: {existing} is not a writable directory; "
            "choose another --run.root"
        )


NETWORK_KEYS = ("arch", "num_classes", "attention", "learning", "mask", "model_kwargs")


def network_of(hparams: Any) -> dict[str, Any]:
    """The settings that decide a network's architecture and outputs, from ImageClassifier hyperparameters."""
    net = {k: hparams.get(k) for k in NETWORK_KEYS}
    net["model_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in (net["model_kwargs"] or {}).items()
    }
    return net


def _describe(net: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={net[k]}" for k in NETWORK_KEYS[2:] if net[k])
    return f"{net['arch']} with {net['num_classes']} classes" + (f" ({extra})" if extra else "")


# --- throughput --------------------------------------------------------------------------------------------

# Batches over which ImageThroughput averages its rates (Lightning's default, 100, leaves short runs without).
THROUGHPUT_WINDOW = 20


def batch_images(batch: Any) -> int:
    """The number of images in an (images, labels) batch, or in a batch of images alone."""
    return (batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]


def network_flops(hparams: Any, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs per image of the network `hparams` describe, counted by Lightning's `measure_flops` on a copy
    built on the meta device (no memory, no arithmetic): 'train' is forward and backward, 'eval' forward."""
    net = network_of(hparams)
    choices = {k: net[k] for k in ("attention", "learning", "mask") if net[k]}
    with torch.device("meta"):
        model = create_model(net["arch"], num_classes=net["num_classes"], **choices, **net["model_kwargs"])
        images = torch.zeros(1, *input_shape[1:])
    train = measure_flops(model.train(), lambda: model(images), lambda logits: logits.sum())
    return {"train": train, "eval": measure_flops(model.eval(), lambda: model(images))}


class ImageThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for image batches: images/s (`train/device/samples_per_sec`, and
    `validate/...`, `test/...`) over the last `THROUGHPUT_WINDOW` batches and, on a device whose peak FLOPs
    Lightning knows (recent NVIDIA GPUs), the FLOPs/s and model FLOPs utilisation (`train/device/mfu`). The
    FLOPs per batch are the network's FLOPs per image (:func:`network_flops`, from the module's
    `example_input_array`) times the batch's images, handed to the monitor as the module's `flops_per_batch`
    before each batch. They are not counted where no peak is known (CPUs): counting takes a few seconds."""

    def __init__(self) -> None:
        super().__init__(batch_size_fn=batch_images, window_size=THROUGHPUT_WINDOW)
        self.flops_per_image: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        example = pl_module.example_input_array
        if self.available_flops and not self.flops_per_image and isinstance(example, torch.Tensor):
            self.flops_per_image = network_flops(pl_module.hparams, example.shape)

    def _set_flops(self, pl_module: pl.LightningModule, batch: Any, kind: str) -> None:
        """Give the monitor the batch's FLOPs as `pl_module.flops_per_batch` (None: not counted)."""
        count = self.flops_per_image.get(kind)
        pl_module.flops_per_batch = None if count is None else count * batch_images(batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "train")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "eval")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any
    ) -> None:
        self._set_flops(pl_module, batch, "eval")


# --- the CLI -----------------------------------------------------------------------------------------------


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


class RanArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage in error messages (the full one lists every option)."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        print(f"usage: {prog} [-c CONFIG] [--SECTION.KEY VALUE ...]", file=file or sys.stdout)


class RanCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` with any datamodule (chosen by `data.class_path`), a `run` group
    (run directory, logger, W&B project/group/tags), best/last checkpoints written atomically, RNG state in
    checkpoints, a graceful stop on SIGTERM/SIGINT, a stop on divergence and a learning-rate monitor. See the
    module docstring of `ran.cli`.

    The config and the command line decide the network and the recipe; a checkpoint given with `--ckpt_path`
    is loaded into them (LightningCLI's default, the checkpoint's saved hyperparameters overriding the
    config, is turned off), and one of another network or class count is refused.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        self.stop: GracefulStop | None = None
        args = list(sys.argv[1:] if args is None else args)
        self.config_files = config_files(args)
        super().__init__(
            ImageClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            auto_configure_optimizers=False,
            parser_class=RanArgumentParser,
            # allow_abbrev=False: `--run.over true` is an error, not `--run.overwrite true`
            parser_kwargs={"prog": "ran", "allow_abbrev": False},
            args=resolve_config_args(args),
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

    def _parse_ckpt_path(self) -> None:
        """Off: the checkpoint's hyperparameters never override the config (see the class docstring)."""

    def _prepare_run(self, subcommand: str, cfg: Any) -> None:
        if cfg.model.arch not in list_models():
            raise ConfigError(
                f"unknown model {cfg.model.arch!r} (model.arch); known models: {', '.join(list_models())}"
            )
        if cfg.trainer.get("default_root_dir") is not None:
            raise ConfigError(
                "trainer.default_root_dir is set by ran: choose the run directory with --run.root and "
                "--run.name"
            )
        run = cfg.run
        run.name = run.name or cfg.model.arch
        self.run_dir = RunDir(Path(run.root) / run.name)
        ckpt = cfg.get("ckpt_path")
        foreign = ckpt not in (None, "last", "best") and not self.run_dir.owns(ckpt)
        if is_launch_rank_zero():
            check_writable(self.run_dir.path)
        if subcommand == "fit" and is_launch_rank_zero():
            requeued = SLURMEnvironment.detect() and bool(self.run_dir.hpc_checkpoints())
            if self.run_dir.holds_run() and ckpt is None and not requeued:
                if not run.overwrite:
                    raise ConfigError(
                        f"run directory {self.run_dir.path} exists; resume with --ckpt_path last, pick "
                        "another "
                        "--run.name (or --run.root), or pass --run.overwrite true to delete it and start "
                        "afresh"
                    )
                shutil.rmtree(self.run_dir.path)
            elif not self.run_dir.holds_run() and self.run_dir.path.exists() and ckpt is None:
                # Left by a start that failed or was killed before its first checkpoint: nothing to keep.
                self.run_dir.clear_started_files()
        if foreign and self.run_dir.holds_run():
            raise ConfigError(
                f"--ckpt_path {ckpt} belongs to another run, and run directory {self.run_dir.path} holds a "
                "run "
                "of its own: give a new --run.name for this one (or --ckpt_path last to use its own "
                "checkpoints)"
            )
        if subcommand == "test":
            self._check_fit_finished(run)
        if ckpt in ("last", "best"):
            cfg.ckpt_path = str(self._find_checkpoint(ckpt))
        self.wandb_id = self.run_dir.wandb_id(subcommand) or new_wandb_id()

    def _find_checkpoint(self, which: str) -> Path:
        """'last': the newest readable of checkpoints/*.ckpt and SLURM's hpc_ckpt_*.ckpt; 'best':
        best.ckpt."""
        found = self.run_dir.find_checkpoint(which, warn=lambda text: warnings.warn(text, stacklevel=2))
        if found is None:
            looked = "checkpoints/best.ckpt" if which == "best" else "checkpoints/*.ckpt, hpc_ckpt_*.ckpt"
            hint = "check --run.name and --run.root"
            if which == "last":
                hint += (
                    "; a run killed before its first checkpoint starts again with the same command without "
                    "--ckpt_path"
                )
            raise ConfigError(
                f"--ckpt_path {which}: no readable checkpoint in {self.run_dir.path} (looked for "
                f"{looked}); {hint}"
            )
        if which == "last" and found != self.run_dir.last_ckpt and self.run_dir.last_ckpt.exists():
            warnings.warn(f"resuming from {found}, the newest readable checkpoint", stacklevel=2)
        return found

    def _check_checkpoint(self) -> None:
        """A ConfigError when `--ckpt_path` cannot be read or holds another network than the config builds."""
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt is None:
            return
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get(
                "hyper_parameters", {}
            )
        except Exception:
            # The whole-file CRC check runs only when loading failed, to name what is wrong with the file.
            problem = checkpoint_problem(Path(ckpt))
            if problem is None:
                raise
            raise ConfigError(
                f"--ckpt_path {ckpt}: {problem}; give a complete checkpoint (or --ckpt_path last)"
            ) from None
        if saved and network_of(saved) != network_of(self.model.hparams):
            raise ConfigError(
                f"checkpoint {ckpt} holds {_describe(network_of(saved))}, but the config builds "
                f"{_describe(network_of(self.model.hparams))}: pass the config the checkpoint was trained "
                "with"
            )

    def _check_fit_finished(self, run: Any) -> None:
        """`ran test` of a run whose fit did not finish is refused unless --run.allow_unfinished is given."""
        status = self.run_dir.fit_status()
        if status in (None, "finished") or run.allow_unfinished:
            return
        raise ConfigError(
            f"the fit of {self.run_dir.path} did not finish (status {status!r} in "
            f"{self.run_dir.results_file}): "
            "resume it with `ran fit ... --ckpt_path last`, or pass --run.allow_unfinished true to test "
            "it anyway"
        )

    def before_fit(self) -> None:
        self._check_checkpoint()
        try:
            check_compile_mode(self.model.hparams, self.trainer.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.trainer.strategy.root_device.type == "cpu":
            # Measured to make CPU training steps 7-15% faster (ran.allocator); not applied to GPU jobs, where
            # it was not measured and would only make DataLoader workers keep their freed memory.
            keep_freed_memory()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            signum = (self.stop.signum if self.stop else None) or signal.SIGTERM
            name = signal.Signals(signum).name
            step = self.trainer.global_step
            saved = f"; saved {self.run_dir.last_ckpt} at step {step}" if subcommand == "fit" else ""
            resume = "; resume with the same command and --ckpt_path last" if subcommand == "fit" else ""
            raise RunInterrupted(signum, f"stopped by {name}{saved}{resume}") from None
        finally:
            if self.stop is not None:
                self.stop.restore_handlers()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(str(err)) from None

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config[self.subcommand]
        trainer_cfg = self._get(self.config_init, "trainer")
        loggers = self._loggers(cfg.run, cfg.trainer.get("logger"), trainer_cfg.get("logger"))
        checkpointing = trainer_cfg.get("enable_checkpointing", True) is not False
        last = (
            LastCheckpoint(self.run_dir.last_ckpt, cfg.run.checkpoint_every_n_steps)
            if checkpointing
            else None
        )
        self.stop = GracefulStop(last)
        # DivergenceGuard first: it must see a step's loss before any callback saves that step's weights.
        callbacks = [DivergenceGuard(), *(trainer_cfg.get("callbacks") or [])]
        callbacks += [RNGStateCallback(), ValidateAtMaxSteps(), ResultsWriter(self.run_dir.path)]
        if last is not None:
            best = ModelCheckpoint(
                dirpath=self.run_dir.checkpoints,
                filename="best",
                monitor="val/acc1",
                mode="max",
                save_top_k=1,
                auto_insert_metric_name=False,
            )
            callbacks += [best, last]
        callbacks += [self.stop, SoftMaskMonitor(self.run_dir.path)]
        if loggers:
            callbacks += [LearningRateMonitor(logging_interval="step"), ImageThroughput()]
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            callbacks.append(StepProgressBar())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self.run_dir.path))
        plugins = list(trainer_cfg.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        wandb_id = self.wandb_id if any(isinstance(x, WandbLogger) for x in loggers) else None
        meta = run_meta(self.subcommand, self.config_files, self.run_dir.wandb_id("fit"))
        self.save_config_kwargs = {"run_dir": str(self.run_dir.path), "wandb_id": wandb_id, "meta": meta}
        # enable_autolog_hparams=False: SaveRunConfig sends the whole resolved config to the loggers instead
        # of Lightning's flat mix of the model's and the datamodule's arguments.
        return super().instantiate_trainer(
            default_root_dir=str(self.run_dir.path),
            logger=loggers or False,
            callbacks=callbacks,
            plugins=plugins,
            enable_autolog_hparams=False,
            **kwargs,
        )

    def _loggers(self, run: Any, given: Any, instantiated: Any) -> list[Logger]:
        """The run's loggers: `--run.logger`'s (W&B or CSV, with ran's settings) and every logger of
        `--trainer.logger`; a given WandbLogger or CSVLogger gets ran's settings (run directory, W&B id, name,
        project, entity, group, tags, job type) for each argument it leaves at its default, and one of the
        same kind as `--run.logger` replaces ran's. `--trainer.logger false` turns logging off."""
        if given is False:
            return []
        configs = [] if given in (None, True) else (given if isinstance(given, list) else [given])
        objects = (
            []
            if instantiated in (None, True)
            else (list(instantiated) if isinstance(instantiated, (list, tuple)) else [instantiated])
        )
        loggers = []
        for config, obj in zip(configs, objects):
            kind = type(obj) if isinstance(obj, (WandbLogger, CSVLogger)) else None
            if kind is None:
                loggers.append(obj)
                continue
            init_args = config.init_args.as_dict() if hasattr(config.init_args, "as_dict") else {}
            init_args.update(dict(config.get("dict_kwargs") or {}))
            loggers.append(kind(**{**self._logger_defaults(kind, run), **_explicit_args(kind, init_args)}))
        kinds = {"wandb": WandbLogger, "csv": CSVLogger}
        ran_kind = kinds.get(run.logger)
        if ran_kind is not None and not any(isinstance(x, ran_kind) for x in loggers):
            loggers.insert(0, ran_kind(**self._logger_defaults(ran_kind, run)))
        return loggers

    def _logger_defaults(self, kind: type, run: Any) -> dict[str, Any]:
        """ran's settings of a WandbLogger or CSVLogger: files in the run directory; for W&B the run's id,
        name, project, entity, group and tags, `job_type` the subcommand (fit, validate, test, predict: each
        stage is a W&B run of its own, `<name>-<stage>` beside the fit's `<name>`), online or offline."""
        if issubclass(kind, CSVLogger):
            return {"save_dir": self.run_dir.path, "name": "csv"}
        stage = self.subcommand
        mode = wandb_mode()
        return {
            "name": run.name if stage == "fit" else f"{run.name}-{stage}",
            "save_dir": self.run_dir.path,
            "id": self.wandb_id,
            "project": run.project,
            "entity": run.entity,
            "group": run.group,
            "tags": list(run.tags) or None,
            "job_type": stage,
            "offline": mode == "offline",
            **({"mode": mode} if mode != "offline" else {}),
        }


def _explicit_args(kind: type, init_args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a logger config that differ from the class's defaults (jsonargparse fills in every
    argument; W&B's own, passed through **kwargs, default to None)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(kind.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {k: v for k, v in init_args.items() if v is not None and v != defaults.get(k)}


USAGE = """usage: ran {fit,validate,test,predict} -c CONFIG [--section.key VALUE ...]
       ran summary MODEL | ran summary --all [--markdown]

  fit, validate, test, predict   train or evaluate (LightningCLI; `ran fit --help` lists every option)
  summary                        parameters, multiply-adds and stage shapes of the registered networks
"""


# Exceptions that are the user's to fix (config, data, a diverged recipe): one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    MisconfigurationException,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    CorruptImageError,
    DatasetLayoutError,
    DataSettingError,
    TrainingDiverged,
    UnreadableCheckpoint,
)


def _one_line(err: BaseException) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker, its last line (not the worker's
    traceback)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the `ran` command with `argv` (default: sys.argv[1:]) and return its exit code: 0, 1 for a
    failed or diverged run, 2 for a usage or config error, 128 + signal for a run stopped by SIGTERM (143) or
    SIGINT (130) after saving its state.

    In-process calls work for single-process runs and `ddp_spawn`; `strategy=ddp` relaunches `sys.argv`, so
    run it as a command (`ran fit ...`, torchrun or srun).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "summary":
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
        RanCLI(args=argv)
    except RunInterrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        status = err.exit_code
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
