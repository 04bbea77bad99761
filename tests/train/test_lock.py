"""The run directory's lock (`ran.train.lock`): one holder at a time, the holder named, a dead holder's
record taken over with a warning, a lock handed from a launcher to the process it starts, a replaced lock
file, and file systems without locks."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from ran.train.lock import HANDOFF_ENV, LOCK_FILE, Holder, RunLock, RunLocked


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(pid: int, host: str | None = None, command: str = "ran fit") -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": command, "since": "t0"})


def test_one_holder_at_a_time_and_the_refusal_names_it(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "ran fit") as first:
        held = Holder.parse((run / LOCK_FILE).read_text())
        assert held is not None and held.is_me() and held.command == "ran fit"
        with pytest.raises(RunLocked) as refused:
            RunLock(run, "ran test").acquire()
        message = str(refused.value)
        me = f"pid {os.getpid()} on {socket.gethostname()} (ran fit, since "
        assert f"run directory {run} is in use by {me}" in message
        assert f"delete {run / LOCK_FILE}" in message and "\n" not in message
        assert refused.value.holder == held
        assert first.fd is not None
    assert not run.exists()  # released: the folder it made, holding nothing else, is gone again
    run.mkdir()
    with RunLock(run, "ran test", warn=pytest.fail):  # free again, and nothing to take over
        (run / "config.yaml").write_text("")
    assert (run / LOCK_FILE).read_text() == ""  # released in a folder it did not make: no holder named


def test_a_process_killed_with_its_lock_leaves_it_free_and_named(tmp_path):
    """kill -9 of a holder: the kernel drops the flock; the next start warns that it takes the record over."""
    run = tmp_path / "run"
    code = f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from ran.train.lock import RunLock; "
    code += f"RunLock({str(run)!r}, 'ran fit').acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"in use by pid {holder.pid} on"):
        RunLock(run, "ran fit").acquire()
    holder.kill()
    holder.wait()
    warnings: list[str] = []
    with RunLock(run, "ran fit", warn=warnings.append):
        assert len(warnings) == 1
        dead = f"pid {holder.pid} on {socket.gethostname()} (ran fit, since "
        assert warnings[0].startswith(f"taking over {run / LOCK_FILE} from {dead}")
        assert warnings[0].endswith("), which no longer runs (it ended without releasing it)")


def test_a_stale_record_of_another_host_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(record(4242, host="gone-node"))
    warnings: list[str] = []
    with RunLock(run, "ran fit", warn=warnings.append):
        assert len(warnings) == 1 and "from pid 4242 on gone-node" in warnings[0]
        assert "no longer holds it" in warnings[0]


def test_a_launcher_hands_its_lock_to_the_process_it_starts(tmp_path):
    """The child shares the launcher's lock (no refusal), names itself while it runs, puts the launcher's
    record back when done; the run stays locked while either of them lives."""
    run = tmp_path / "run"
    launcher = RunLock(run, "python -m experiments run").acquire()
    env, fds = launcher.handoff()
    assert env == {HANDOFF_ENV: str(launcher.fd)} and fds == (launcher.fd,)
    code = (
        f"import os, sys; sys.path.insert(0, {str(REPO)!r}); from ran.train.lock import RunLock; "
        f"lock = RunLock({str(run)!r}, 'ran fit').acquire(); "
        f"print(open({str(run / LOCK_FILE)!r}).read(), end='', flush=True); "
        f"print({HANDOFF_ENV!r} in os.environ, flush=True); sys.stdin.readline(); lock.release()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        pass_fds=fds,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    inside = Holder.parse(child.stdout.readline())
    assert inside is not None and inside.pid == child.pid
    assert inside.command == f"ran fit, started by pid {os.getpid()} (python -m experiments run)"
    assert child.stdout.readline().strip() == "False"  # not passed on to the processes the child starts
    os.close(launcher.fd)  # the launcher ends first (as a kill -9 ends it): the child still holds the run
    launcher.fd = None
    with pytest.raises(RunLocked, match=f"in use by pid {child.pid} on"):
        RunLock(run, "ran fit").acquire()
    child.stdin.write("\n")
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    put_back = Holder.parse((run / LOCK_FILE).read_text())
    assert put_back.pid == os.getpid() and put_back.command == "python -m experiments run"
    with RunLock(run, "ran fit"):  # free once both have ended
        pass


def test_a_handed_fd_of_another_file_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    other = RunLock(tmp_path / "other", "python -m experiments run").acquire()
    monkeypatch.setenv(HANDOFF_ENV, str(other.fd))
    try:
        with RunLock(tmp_path / "run", "ran fit") as lock:
            assert lock.fd != other.fd
            assert Holder.parse((tmp_path / "other" / LOCK_FILE).read_text()).command.startswith("python")
        assert os.environ[HANDOFF_ENV] == str(other.fd)  # still there for a process of that run
    finally:
        other.release()


def test_a_lock_file_replaced_while_held_is_not_shared(tmp_path):
    """A holder's lock file deleted and recreated (e.g. by hand): the next start locks the new file, and one
    that opened the old file before it was replaced does not count as holding the run."""
    run = tmp_path / "run"
    first = RunLock(run, "ran fit").acquire()
    (run / LOCK_FILE).unlink()
    with RunLock(run, "ran fit") as second:
        assert os.fstat(second.fd).st_ino == os.stat(run / LOCK_FILE).st_ino
        with pytest.raises(RunLocked):
            RunLock(run, "ran fit").acquire()
    first.release()


def test_without_flock_the_record_is_the_lock(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(record(live.pid))
        with pytest.raises(RunLocked, match=f"in use by pid {live.pid}"):
            RunLock(run, "ran fit", warn=lambda _: None).acquire()
    finally:
        live.kill()
        live.wait()
    (run / LOCK_FILE).write_text(record(dead_pid()))
    warnings: list[str] = []
    with RunLock(run, "ran fit", warn=warnings.append):
        assert "does not support locks" in warnings[0] and "no longer runs" in warnings[1]
        assert Holder.parse((run / LOCK_FILE).read_text()).is_me()
