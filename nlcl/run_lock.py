"""One run per folder: a run holds an exclusive lock on its run_dir while it works.

The lock is `fcntl.flock` on `<run_dir>/.nlcl.lock`, which names its holder (pid, host, start
time). The kernel drops a flock when its process dies, however it dies, so the lock of a killed
run is stale the moment it is killed: the next start takes it over without any clean-up.
A second process that finds the lock held exits with `RunDirLocked` naming the holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".nlcl.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run folder."""


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path):
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunDirLocked(
                f"run_dir '{run_dir}' is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(started {holder.get('started', '?')}); wait for that run to end or choose another run_dir") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield me
    finally:
        os.close(fd)  # closing the descriptor releases the flock
        if created and os.listdir(run_dir) == [LOCK_NAME]:  # a start that failed leaves no folder behind
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
