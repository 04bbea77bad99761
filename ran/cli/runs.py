"""A run's directory, settled before a stage runs: the `run` config group, where the run lives, its lock,
whether `ran fit` may start, resume or must refuse it, which checkpoint `--ckpt_path auto|last|best` means
(the same on every rank), and whether a checkpoint holds the network the config builds."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment

from ran.nn.registry import list_models
from ran.train.config import ConfigError
from ran.train.lock import RunLock
from ran.train.module import describe_network, network_of
from ran.train.rundir import RunDir, checkpoint_problem
from ran.train.tracking import new_wandb_id, sweep_run_id

__all__ = [
    "RunConfig",
    "SameCheckpointOnEveryRank",
    "SettledRun",
    "auto_checkpoint",
    "check_checkpoint",
    "check_fit_finished",
    "check_not_finished",
    "check_writable",
    "find_checkpoint",
    "is_launch_rank_zero",
    "prepare_run",
]


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


@dataclass
class SettledRun:
    """What `prepare_run` settled: the run directory, the stage's W&B run id and the run's lock (held by the
    process that is or will be global rank 0; None on the other ranks)."""

    run_dir: RunDir
    wandb_id: str
    lock: RunLock | None


def prepare_run(subcommand: str, cfg: Any) -> SettledRun:
    """Settle the run directory of `ran SUBCOMMAND` with the parsed config `cfg` before anything is built:
    the run's name (a W&B sweep trial's gets its W&B id appended), the directory's lock, a refused, cleared
    or reused directory, `ckpt_path` 'auto' resolved to 'last' or None and 'last'/'best' to a file in `cfg`.

    The W&B id is a sweep agent's (which wandb takes whatever it is passed), else the stored one (so a resumed
    stage continues its W&B run), else WANDB_RUN_ID or a new one. Every rank of a DDP job settles the same
    checkpoint from the same files; only the rank-0 process locks, creates, clears or deletes anything."""
    if cfg.model.arch not in list_models():
        raise ConfigError(
            f"unknown model {cfg.model.arch!r} (model.arch); known models: {', '.join(list_models())}"
        )
    if cfg.trainer.get("default_root_dir") is not None:
        raise ConfigError(
            "trainer.default_root_dir is set by ran: choose the run directory with --run.root and --run.name"
        )
    run = cfg.run
    run.name = run.name or cfg.model.arch
    agent_id = sweep_run_id()
    if agent_id and not run.name.endswith(f"-{agent_id}"):
        run.name = f"{run.name}-{agent_id}"  # one directory per trial: an agent passes every trial one name
    run_dir = RunDir(Path(run.root) / run.name)
    lock = None
    if is_launch_rank_zero():
        warn_of_a_shared_torchrun_store()
        check_writable(run_dir.path)
        lock = RunLock(run_dir.path, f"ran {subcommand}").acquire()
    try:
        if lock is not None:  # the lock's holder alone: no other process can be writing one
            run_dir.remove_partial_saves()
        _settle(subcommand, cfg, run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    wandb_id = agent_id or run_dir.wandb_id(subcommand) or os.environ.get("WANDB_RUN_ID") or new_wandb_id()
    return SettledRun(run_dir, wandb_id, lock)


def warn_of_a_shared_torchrun_store() -> None:
    """torchrun (torch 2.x) keeps one TCP store for every restart of its group and the workers use it
    without a per-restart prefix (torch.distributed.rendezvous, `_create_c10d_store`), so a restarted
    group's ranks can read the dead ranks' connection keys and hang while connecting (seen with gloo). Said
    at a first start that may be restarted, where the fix still helps."""
    env = os.environ
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if (
        shared
        and env.get("TORCHELASTIC_RESTART_COUNT") == "0"
        and env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
    ):
        warnings.warn(
            "torchrun --max-restarts shares one TCP store between the group's restarts, where a restarted "
            "group can hang while connecting: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
            stacklevel=3,
        )


def _settle(subcommand: str, cfg: Any, run_dir: RunDir) -> None:
    run = cfg.run
    ckpt = cfg.get("ckpt_path")
    if ckpt == "auto":
        ckpt = cfg.ckpt_path = auto_checkpoint(subcommand, run_dir, run.overwrite)
    foreign = ckpt not in (None, "last", "best") and not run_dir.owns(ckpt)
    if subcommand == "fit" and ckpt == "last":
        check_not_finished(run_dir, cfg.trainer.get("max_steps"))
    if subcommand == "fit" and is_launch_rank_zero():
        requeued = SLURMEnvironment.detect() and bool(run_dir.hpc_checkpoints())
        if run_dir.holds_run() and ckpt is None and not requeued:
            if not run.overwrite:
                raise ConfigError(
                    f"run directory {run_dir.path} exists; resume with --ckpt_path last (or auto), pick "
                    "another --run.name (or --run.root), or pass --run.overwrite true to delete it and start "
                    "afresh"
                )
            run_dir.delete_run()
        elif not run_dir.holds_run() and run_dir.path.exists() and ckpt is None:
            # Left by a start that failed or was killed before its first checkpoint: nothing to keep.
            run_dir.clear_started_files()
    if foreign and run_dir.holds_run():
        raise ConfigError(
            f"--ckpt_path {ckpt} belongs to another run, and run directory {run_dir.path} holds a run of its "
            "own: give a new --run.name for this one (or --ckpt_path last to use its own checkpoints)"
        )
    if subcommand == "test":
        check_fit_finished(run_dir, run.allow_unfinished)
    if ckpt in ("last", "best"):
        cfg.ckpt_path = str(find_checkpoint(run_dir, ckpt))


def auto_checkpoint(subcommand: str, run_dir: RunDir, overwrite: bool = False) -> str | None:
    """What `--ckpt_path auto` means: 'last' (the newest readable checkpoint) when the run directory holds
    a run, None (start afresh) when it does not or `--run.overwrite true` asks for a fresh start. A fit that
    diverged is not resumed: it would diverge again."""
    if subcommand != "fit":
        raise ConfigError(
            f"--ckpt_path auto resumes or starts a fit; ran {subcommand} takes best, last or a checkpoint "
            "file"
        )
    if overwrite or not run_dir.holds_run():
        return None
    if run_dir.fit_status() == "diverged":
        raise ConfigError(
            f"the fit of {run_dir.path} diverged (see {run_dir.results_file}), and --ckpt_path auto does not "
            "resume it, as it would diverge again: resume with --ckpt_path last and a lower --model.lr, or "
            "start afresh with --run.overwrite true"
        )
    return "last"


def check_not_finished(run_dir: RunDir, max_steps: int | None) -> None:
    """A resumed fit whose run finished at `max_steps` has nothing to train: say so and exit 0 (a restarted
    job, a resumed sweep trial) rather than rewrite its results with an empty fit."""
    results = run_dir.read_results() if run_dir.fit_status() == "finished" else {}
    step = results.get("fit", {}).get("global_step")
    if max_steps is not None and max_steps > 0 and step is not None and step >= max_steps:
        print(
            f"ran fit: {run_dir.path} finished already at step {step} (--trainer.max_steps {max_steps}); "
            "nothing to train (ran test evaluates it; a larger --trainer.max_steps trains on)",
            file=sys.stderr,
        )
        raise SystemExit(0)


class SameCheckpointOnEveryRank(pl.Callback):
    """Checks, once the process group exists, that every rank resolved the same `--ckpt_path` (each rank
    settles it from the run directory's files before any process group exists; a restarted group reads
    files that no process writes meanwhile, so they agree, and this makes sure)."""

    def __init__(self, ckpt_path: str | None) -> None:
        self.ckpt_path = ckpt_path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        mine = str(Path(self.ckpt_path).resolve()) if self.ckpt_path else None
        chosen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(chosen, mine)
        if len(set(chosen)) > 1:
            raise ConfigError(
                "the ranks resolved different checkpoints ("
                + ", ".join(f"rank {r}: {c}" for r, c in enumerate(chosen))
                + "): a process wrote the run directory while this job started; start it again"
            )


def find_checkpoint(run_dir: RunDir, which: str) -> Path:
    """'last': the newest readable of checkpoints/*.ckpt and SLURM's hpc_ckpt_*.ckpt; 'best': best.ckpt. A
    ConfigError saying where it looked when there is none."""
    found = run_dir.find_checkpoint(which, warn=lambda text: warnings.warn(text, stacklevel=3))
    if found is None:
        looked = "checkpoints/best.ckpt" if which == "best" else "checkpoints/*.ckpt, hpc_ckpt_*.ckpt"
        hint = "check --run.name and --run.root"
        if which == "last":
            hint += (
                "; a run killed before its first checkpoint starts again with the same command without "
                "--ckpt_path"
            )
        raise ConfigError(
            f"--ckpt_path {which}: no readable checkpoint in {run_dir.path} (looked for {looked}); {hint}"
        )
    if which == "last" and found != run_dir.last_ckpt and run_dir.last_ckpt.exists():
        warnings.warn(f"resuming from {found}, the newest readable checkpoint", stacklevel=3)
    return found


def check_checkpoint(ckpt: str | None, hparams: Any) -> None:
    """A ConfigError when checkpoint `ckpt` cannot be read or holds another network than `hparams` (the
    configured module's hyperparameters) build."""
    if ckpt is None:
        return
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
    except Exception:
        # The whole-file CRC check runs only when loading failed, to name what is wrong with the file.
        problem = checkpoint_problem(Path(ckpt))
        if problem is None:
            raise
        raise ConfigError(
            f"--ckpt_path {ckpt}: {problem}; give a complete checkpoint (or --ckpt_path last)"
        ) from None
    if saved and network_of(saved) != network_of(hparams):
        raise ConfigError(
            f"checkpoint {ckpt} holds {describe_network(network_of(saved))}, but the config builds "
            f"{describe_network(network_of(hparams))}: pass the config the checkpoint was trained with"
        )


def check_fit_finished(run_dir: RunDir, allow_unfinished: bool) -> None:
    """`ran test` of a run whose fit did not finish is refused unless --run.allow_unfinished is given."""
    status = run_dir.fit_status()
    if status in (None, "finished") or allow_unfinished:
        return
    raise ConfigError(
        f"the fit of {run_dir.path} did not finish (status {status!r} in {run_dir.results_file}): resume it "
        "with `ran fit ... --ckpt_path last`, or pass --run.allow_unfinished true to test it anyway"
    )
