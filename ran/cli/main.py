"""`main`: the `ran` command's dispatch (`fit|validate|test|predict`, `summary`, `export`) and its exit
codes: a user's error is one line and exit 2 (config) or 1 (data, divergence), a stop by a signal 128 + its
number."""

from __future__ import annotations

import sys
import warnings

from pytorch_lightning.utilities.exceptions import MisconfigurationException

from datamodules.errors import CorruptImageError, DatasetLayoutError, DataSettingError
from ran.cli.app import RanCLI
from ran.cli.export import export_main
from ran.tools.summary import summary_main
from ran.train.callbacks import RunInterrupted, TrainingDiverged
from ran.train.config import ConfigError
from ran.train.rundir import UnreadableCheckpoint

__all__ = ["USER_ERRORS", "main"]


USAGE = """usage: ran {fit,validate,test,predict} -c CONFIG [--section.key VALUE ...]
       ran summary MODEL | ran summary --all [--markdown]
       ran export --ckpt-path CKPT --out DIR

  fit, validate, test, predict   train or evaluate (LightningCLI; `ran fit --help` lists every option)
  summary                        parameters, multiply-adds and stage shapes of the registered networks
  export                         a checkpoint's network as trained weights (safetensors and config.json)
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
    if argv and argv[0] == "export":
        return export_main(argv[1:])
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
