"""`RanCLI`: LightningCLI for `ImageClassifier` with any datamodule, and what ran adds to every stage's
Trainer (the run directory's checkpoints, results and config, the loggers' settings, the fault callbacks).
See the docstring of `ran.cli` for the commands, the run directory and the W&B record."""

from __future__ import annotations

import inspect
import signal
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from ran.cli.meta import SaveRunConfig, config_files, run_meta
from ran.cli.runs import RunConfig, SameCheckpointOnEveryRank, check_checkpoint, prepare_run
from ran.tools.mask_monitor import SoftMaskMonitor
from ran.train.allocator import keep_freed_memory
from ran.train.callbacks import (
    AtomicCheckpointIO,
    DivergenceGuard,
    GracefulStop,
    LastCheckpoint,
    PredictionWriter,
    RNGStateCallback,
    RunInterrupted,
    StepProgressBar,
    ValidateAtMaxSteps,
)
from ran.train.config import ConfigError, resolve_config_args
from ran.train.lock import RunLock
from ran.train.metric_state import MetricStateCallback
from ran.train.module import ImageClassifier
from ran.train.recipe import check_compile_mode, check_cuda_graph
from ran.train.results import ResultsWriter
from ran.train.throughput import ImageThroughput
from ran.train.tracking import sweep_run_id, wandb_mode

__all__ = ["RanArgumentParser", "RanCLI"]


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
        self.lock: RunLock | None = None
        args = list(sys.argv[1:] if args is None else args)
        self.config_files = config_files(args)
        try:
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
        finally:
            if self.lock is not None:  # held from the settling of the run directory to the stage's end
                self.lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    # The run directory is settled right after parsing, before LightningCLI reads `ckpt_path` (so that
    # 'last' and 'best' are resolved to files) and before anything is instantiated.
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            subcommand = self.config.subcommand
            settled = prepare_run(subcommand, self.config[subcommand])
            self.run_dir, self.wandb_id, self.lock = settled.run_dir, settled.wandb_id, settled.lock

    def _parse_ckpt_path(self) -> None:
        """Off: the checkpoint's hyperparameters never override the config (see the class docstring)."""

    def _check_checkpoint(self) -> None:
        check_checkpoint(self.config[self.subcommand].get("ckpt_path"), self.model.hparams)

    def before_fit(self) -> None:
        self._check_checkpoint()
        try:
            check_compile_mode(self.model.hparams, self.trainer.world_size)
            check_cuda_graph(self.model.hparams, self.trainer)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.trainer.strategy.root_device.type == "cpu":
            # Measured to make CPU training steps 7-15% faster (ran.train.allocator); not applied to GPU jobs,
            # where it was not measured and would only make DataLoader workers keep their freed memory.
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
        callbacks += [
            SameCheckpointOnEveryRank(cfg.get("ckpt_path")),
            RNGStateCallback(),
            MetricStateCallback(),
        ]
        callbacks += [ValidateAtMaxSteps(), ResultsWriter(self.run_dir.path)]
        if last is not None:
            best = ModelCheckpoint(
                dirpath=self.run_dir.checkpoints,
                filename="best",
                monitor="val/acc1",
                mode="max",
                save_top_k=1,
                auto_insert_metric_name=False,
                # A resume from a state saved before a best.ckpt that a killed run wrote replaces that file
                # (the default would write best-v1.ckpt beside it, and `--ckpt_path best` read the old one).
                enable_version_counter=False,
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
        stage is a W&B run of its own, `<name>-<stage>` beside the fit's `<name>`), online or offline. In a
        W&B sweep trial, wandb takes the agent's id, project and entity whatever it is passed (warning about
        each), so none are passed: `self.wandb_id` is the agent's id already."""
        if issubclass(kind, CSVLogger):
            return {"save_dir": self.run_dir.path, "name": "csv"}
        stage = self.subcommand
        mode = wandb_mode()
        agent = sweep_run_id() is not None
        return {
            "name": run.name if stage == "fit" else f"{run.name}-{stage}",
            "save_dir": self.run_dir.path,
            "id": None if agent else self.wandb_id,
            "project": None if agent else run.project,
            "entity": None if agent else run.entity,
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
