"""The run directory's lock: one process at a time trains or evaluates a run.

`<run>/run.lock` is held with an exclusive, non-blocking flock(2) for the whole stage by the process that is
(or will be) global rank 0; the other ranks of a DDP job take no lock. The file names its holder (pid, host,
command, start time), so a refused start says who holds the run. The kernel drops the lock when its holder
ends, however it ends (kill -9 and OOM kills too): a lock is never stale, and a holder record left by a
process that died without clearing it is only named in a warning by the next start, which takes the run over.

A launcher that holds a run's lock hands it to the `ran` processes it starts (`RunLock.handoff`): they share
its open file description, so the run stays locked until the launcher and its runs have all ended, even if
the launcher itself is killed while they run.

Network file systems: since Linux 2.6.12 the NFS client turns flock(2) into a byte-range lock held by the
server, so it excludes processes on every client (unless mounted with `local_lock`); Lustre does so when
mounted with `-o flock`. Where the file system offers only node-local locks (Lustre `-o localflock`, BeeGFS
without global file locks), two hosts are not excluded. Where it offers none (ENOLCK, ENOSYS, EOPNOTSUPP),
the holder record is the whole lock: a live holder on this host refuses the start, a dead one is taken over,
and one on another host is taken over with a warning (it cannot be checked from here).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ran.train.config import ConfigError

LOCK_FILE = "run.lock"
HANDOFF_ENV = "RAN_RUN_LOCK_FD"  # the fd of a run lock a launcher hands to the `ran` it starts
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}

__all__ = ["HANDOFF_ENV", "LOCK_FILE", "Holder", "RunLock", "RunLocked"]


class RunLocked(ConfigError):
    """Another process trains or evaluates in this run directory; `holder` names it where its record says."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run's lock, as its lock file says."""

    pid: int
    host: str
    command: str
    since: str

    @classmethod
    def me(cls, command: str) -> Holder:
        return cls(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["command"]), str(data["since"]))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> bytes:
        return (json.dumps(self.__dict__) + "\n").encode()

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the process still runs; None when it ran on another host (not checkable from here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.command}, since {self.since})"


class RunLock:
    """The lock of the run directory `run_dir`, taken by `command` (e.g. 'ran fit'); see the module
    docstring. `acquire` raises RunLocked naming the holder; `release` (or leaving the `with` block) gives
    it back. `warn` is called with a sentence when a dead holder's record is taken over."""

    def __init__(self, run_dir: str | Path, command: str, warn: Callable[[str], Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self.warn = warn or (lambda text: warnings.warn(text, stacklevel=4))
        self.fd: int | None = None
        self._handed_over: bytes | None = None  # the launcher's record, put back when an inherited lock ends
        self._created: list[Path] = []  # the folders acquire made, removed again if left holding nothing

    # --- taking and giving back ------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing
        if self._adopt():
            return self
        for _ in range(10):  # the file may be replaced between open and flock (see _same_file)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # its folder was just removed by a holder that left it empty
                self.run_dir.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunLocked(self._message(holder), holder) from None
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    os.close(fd)
                    raise
                self._without_flock(fd, err)
                break
            if self._same_file(fd):
                self._take_over(self._read(fd))
                break
            os.close(fd)
        else:
            raise RunLocked(f"cannot lock {self.path}: the file keeps being replaced; run again")
        self.fd = fd
        self._write(Holder.me(self.command).dump())
        return self

    def release(self) -> None:
        """Give the lock back: clear the holder record (or put back the launcher's, for a lock handed over)
        and close the file. The flock ends with the last process sharing it, not with an unlock: a process
        given this lock (`handoff`) keeps holding it. A run directory that `acquire` created and that holds
        nothing but the lock file (a start that failed at once) is removed again, with the folders made for
        it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self._write(self._handed_over or b"", fd)
            if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                for folder in self._created:  # deepest first; stops at one that holds something
                    folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def handoff(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """The environment variable and the fd to pass to a `ran` process started for this run
        (`subprocess.Popen(..., env={**env, **vars}, pass_fds=fds)`), which then shares this lock."""
        if self.fd is None:
            return {}, ()
        return {HANDOFF_ENV: str(self.fd)}, (self.fd,)

    # --- the pieces --------------------------------------------------------------------------------------

    def _adopt(self) -> bool:
        """Share the lock a launcher handed down (HANDOFF_ENV names an fd open on this very file)."""
        given = os.environ.get(HANDOFF_ENV, "")
        if not given.isdigit():
            return False
        fd = int(given)
        try:
            if not self._same_file(fd):
                return False
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already held by this open file: no wait
        except OSError:
            return False
        os.environ.pop(HANDOFF_ENV)  # for this process only: the processes it starts take no lock
        self.fd = fd
        self._handed_over = self._read(fd, raw=True) or b""
        self._write(Holder.me(f"{self.command}, started by {self._describe(self._handed_over)}").dump())
        return True

    def _without_flock(self, fd: int, err: OSError) -> None:
        """No locks on this file system: the holder record is the lock (see the module docstring)."""
        holder = self._read(fd)
        if holder is not None and not holder.is_me() and holder.alive():
            os.close(fd)
            raise RunLocked(self._message(holder), holder)
        self.warn(
            f"{self.path}: this file system does not support locks ({os.strerror(err.errno)}); only the "
            "holder record guards the run, which cannot exclude a process on another host"
        )
        if holder is not None and not holder.is_me():
            self._take_over(holder)

    def _take_over(self, holder: Holder | None) -> None:
        if holder is None or holder.is_me():
            return
        state = "no longer runs" if holder.alive() is False else "no longer holds it"
        self.warn(f"taking over {self.path} from {holder}, which {state} (it ended without releasing it)")

    def _same_file(self, fd: int) -> bool:
        """Whether `fd` is open on the file now at `self.path` (not on one unlinked or replaced since)."""
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _read(self, fd: int, raw: bool = False) -> Any:
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            data = b""
        return data if raw else Holder.parse(data.decode(errors="replace"))

    def _write(self, data: bytes, fd: int | None = None) -> None:
        fd = self.fd if fd is None else fd
        assert fd is not None
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    @staticmethod
    def _describe(record: bytes) -> str:
        holder = Holder.parse(record.decode(errors="replace"))
        return f"pid {holder.pid} ({holder.command})" if holder else "its launcher"

    def _message(self, holder: Holder | None) -> str:
        who = str(holder) if holder else "another process"
        return (
            f"run directory {self.run_dir} is in use by {who}: wait for it to end or stop it; if that "
            f"process is gone (its node crashed), delete {self.path} and run again"
        )
