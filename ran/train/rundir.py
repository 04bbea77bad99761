"""A run directory: where one run keeps its files, and the one reader and writer of its `results.json`.

    <root>/<name>/
        config.yaml            the resolved config of the fit (config_<stage>.yaml for validate/test/predict)
        checkpoints/last.ckpt  the newest training state (every N steps, every validation, the end, a signal)
        checkpoints/best.ckpt  the best validation top-1
        hpc_ckpt_<n>.ckpt      Lightning's SLURM pre-emption checkpoints
        results.json           the run's status and final metrics, readable without W&B or a network
        wandb_run_id           the fit's W&B run id, so that a resumed run continues the same W&B run
        wandb_run_id_<stage>   the W&B run id of `ran validate|test|predict` (a run of its own, see ran.cli)
        run.lock               held (flock) by the process working in the run, naming it (`ran.train.lock`)

`results.json`:

    {"fit":      {"status": "running" | "finished" | "interrupted" | "diverged" | "failed",
                  "global_step": 2000, "max_steps": 2000, "epoch": 2, "metrics": {"val/acc1": 0.61, ...},
                  "best_model_path": ".../checkpoints/best.ckpt", "best_model_score": 0.62, "error": "..."},
     "validate": {"metrics": {"val/acc1": 0.60, ...}, "ckpt_path": ".../best.ckpt"},
     "test":     {"metrics": {"test/acc1": 0.60, "test/err1": 39.9, ...}, "ckpt_path": ".../best.ckpt"}}

A run counts as finished only when its fit says "finished"; every other status (or an unreadable file) is
never a result.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ran.train.lock import LOCK_FILE

RESULTS_FILE = "results.json"
WANDB_ID_FILE = "wandb_run_id"
FIT_STATUSES = ("running", "finished", "interrupted", "diverged", "failed")

__all__ = [
    "FIT_STATUSES",
    "RESULTS_FILE",
    "WANDB_ID_FILE",
    "RunDir",
    "UnreadableCheckpoint",
    "UnreadableResults",
    "checkpoint_problem",
    "write_atomically",
]


class UnreadableResults(ValueError):
    """A `results.json` that exists but cannot be read or does not have the documented shape."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is truncated or not a checkpoint at all."""


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    Beside, not in TMPDIR: a rename within one filesystem is atomic, so a kill at any moment leaves either the
    old file or the new one, never a truncated one (a move from node-local /tmp would be a copy).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be loaded as a checkpoint (missing, truncated, not a torch zip archive), or None.

    Checks every member's CRC, so a file cut short by a kill or a full disk is caught before Lightning
    fails on it with a traceback that names no file.
    """
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a readable checkpoint ({err})"
    return f"corrupt member {bad}" if bad else None


def _newest_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


def _check_shape(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UnreadableResults(f"{path}: expected a JSON object, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UnreadableResults(f"{path}: section {section!r} must be an object")
        if not isinstance(values.get("metrics", {}), dict):
            raise UnreadableResults(f"{path}: {section}.metrics must be an object")
    fit = data.get("fit", {})
    if "status" in fit and fit["status"] not in FIT_STATUSES:
        raise UnreadableResults(f"{path}: unknown fit status {fit['status']!r}")
    return data


@dataclass(frozen=True)
class RunDir:
    """The files of one run, by name (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def wandb_id_file(self) -> Path:
        return self.stage_wandb_id_file("fit")

    def stage_wandb_id_file(self, stage: str) -> Path:
        return self.path / (WANDB_ID_FILE if stage == "fit" else f"{WANDB_ID_FILE}_{stage}")

    def config_file(self, stage: str = "fit") -> Path:
        return self.path / ("config.yaml" if stage == "fit" else f"config_{stage}.yaml")

    def read_config(self, stage: str = "fit") -> dict[str, Any]:
        """The resolved config the run ran with ({} when absent)."""
        path = self.config_file(stage)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def hpc_checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("hpc_ckpt_*.ckpt"))

    def all_checkpoints(self) -> list[Path]:
        """Every checkpoint of the run: the training states (last.ckpt, hpc_ckpt_*.ckpt) newest first, then
        the rest (best.ckpt, which is never newer than last.ckpt at the same step)."""
        if not self.path.is_dir():
            return []
        states = [p for p in self.checkpoints.glob("last*.ckpt") if p.is_file()] + self.hpc_checkpoints()
        others = [p for p in self.checkpoints.glob("*.ckpt") if p.is_file() and p not in states]
        return _newest_first(states) + _newest_first(others)

    def holds_run(self) -> bool:
        """Whether a started run lives here: one with a checkpoint. A directory left by a start that failed or
        was killed before its first checkpoint holds nothing worth keeping and is reused."""
        return bool(self.all_checkpoints())

    def clear_started_files(self) -> None:
        """Remove what a start that never reached a checkpoint wrote (configs, results, W&B id, logger and
        picture folders), leaving any other file of the user's in place."""
        for path in [
            *self.path.glob("config*.yaml"),
            self.results_file,
            *self.path.glob(WANDB_ID_FILE + "*"),
        ]:
            path.unlink(missing_ok=True)
        for name in ("csv", "wandb", "masks", "checkpoints"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def remove_partial_saves(self) -> list[Path]:
        """Delete the temporary files of saves cut short by a kill (`write_atomically`'s `.<name>.tmp<pid>`
        beside results.json, the W&B ids and the checkpoints). Only for the holder of the run's lock: no
        other process can be writing one."""
        partial = [
            p for folder in (self.path, self.checkpoints) for p in folder.glob(".*.tmp*") if p.is_file()
        ]
        for path in partial:
            path.unlink(missing_ok=True)
        return partial

    def delete_run(self) -> None:
        """Delete everything in the directory but its lock file (held by the process that deletes it, so
        that no other process can start in the directory meanwhile)."""
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def owns(self, path: str | Path) -> bool:
        """Whether `path` lies inside this run directory."""
        return Path(path).resolve().is_relative_to(self.path.resolve())

    def find_checkpoint(self, which: Literal["last", "best"], warn: Any = None) -> Path | None:
        """The checkpoint to resume from ('last': the newest readable of last.ckpt, hpc_ckpt_*.ckpt and
        best.ckpt) or to evaluate ('best': best.ckpt). An unreadable newer file is skipped and `warn` is
        called with a sentence naming it; None when there is no readable candidate."""
        candidates = [self.best_ckpt] if which == "best" else self.all_checkpoints()
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if warn is not None and path.exists():
                warn(f"skipping {path}: {problem}")
        return None

    # --- results.json ------------------------------------------------------------------------------------

    def read_results(self) -> dict[str, Any]:
        """The run's results ({} when there is no file); UnreadableResults naming the file when it cannot be
        read or has the wrong shape."""
        path = self.results_file
        if not path.exists():
            return {}
        try:
            text = path.read_text()
        except OSError as err:
            raise UnreadableResults(f"{path}: {err.strerror or err}") from None
        if not text.strip():
            raise UnreadableResults(f"{path}: empty file")
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UnreadableResults(f"{path}: not valid JSON ({err})") from None
        return _check_shape(path, data)

    def update_results(self, section: str, values: dict[str, Any]) -> Path:
        """Merge `values` into `section` of results.json, atomically (an unreadable old file is replaced)."""
        try:
            data = self.read_results()
        except UnreadableResults:
            data = {}
        data[section] = {**data.get(section, {}), **values}
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        write_atomically(self.results_file, lambda f: f.write(text))
        return self.results_file

    def fit_status(self) -> str | None:
        """The fit's status, 'unreadable' when results.json cannot be read, None when there is none."""
        try:
            return self.read_results().get("fit", {}).get("status")
        except UnreadableResults:
            return "unreadable"

    # --- W&B ---------------------------------------------------------------------------------------------

    def wandb_id(self, stage: str = "fit") -> str | None:
        """The W&B run id of `stage` persisted here, if any."""
        path = self.stage_wandb_id_file(stage)
        return path.read_text().strip() if path.is_file() else None

    def save_wandb_id(self, run_id: str, stage: str = "fit") -> None:
        """Persist `stage`'s W&B run id once (atomically: a kill mid-write leaves no empty id behind)."""
        path = self.stage_wandb_id_file(stage)
        if not self.wandb_id(stage):
            write_atomically(path, lambda f: f.write(f"{run_id}\n".encode()))
