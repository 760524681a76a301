"""One writer per workdir: an exclusive ``flock`` on ``<workdir>/.lock`` held for the run's life.

The file names the holder (pid, host, start time) so a refused run can say who holds it. The kernel drops an
flock when its process dies, however it dies, so a lock left by a SIGKILLed run is simply taken over: the
file's stale content is overwritten, never trusted. Holding is re-entrant within a process (`main` and the
stage it calls may both take it). In a multi-process run only process 0 locks, and every process learns the
answer from it, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import time

from therapy_rl import errors

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # real path -> [fd, depth] of the locks this process holds


def _holder_of(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _try_lock(path: str) -> tuple[int | None, dict]:
    """(fd, {}) when this process now holds ``path``; (None, holder's record) when another process does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_of(fd)
        os.close(fd)
        return None, holder
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, {}


def _busy_error(workdir: str, holder: dict) -> errors.RunBusyError:
    if "host" in holder:
        who = f"pid {holder.get('pid', '?')} on host {holder['host']} (since {holder.get('since', '?')})"
    elif holder.get("pid", -1) > 0:  # a process other than 0 knows only the pid process 0 read
        who = f"pid {holder['pid']} on process 0's host"
    else:
        who = "another process (its pid is not written yet)"
    return errors.RunBusyError(f"workdir {workdir} is in use by {who}: one run per workdir. Wait for it to end, "
                               f"stop it, or pass another --workdir")


def _agree_across_processes(holder_pid: int) -> int:
    """Process 0's answer (0 = locked, else the holder's pid) broadcast to every process."""
    import jax

    if jax.process_count() == 1:
        return holder_pid
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(holder_pid)))


@contextlib.contextmanager
def hold(workdir: str):
    """Holds ``<workdir>/.lock`` (creating the workdir) for the block; raises `RunBusyError` naming the holder
    when another live process holds it."""
    import jax

    os.makedirs(workdir, exist_ok=True)
    path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    fd, holder = (None, {}) if jax.process_index() != 0 else _try_lock(path)
    busy_pid = 0 if jax.process_index() != 0 or fd is not None else int(holder.get("pid", -1) or -1)
    busy_pid = _agree_across_processes(busy_pid)
    if busy_pid:  # process 0 found it held (so holds no fd itself)
        raise _busy_error(workdir, holder or {"pid": busy_pid})
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        del _held[path]
        if fd is not None:
            _release(fd)


def locked(stage):
    """Decorator: ``stage(config, workdir, ...)`` runs holding ``workdir``'s lock (see `hold`)."""

    @functools.wraps(stage)
    def run_locked(config, workdir: str, *args, **kwargs):
        with hold(workdir):
            return stage(config, workdir, *args, **kwargs)

    return run_locked


def _release(fd: int) -> None:
    os.ftruncate(fd, 0)  # still locked: no one reads a half-cleared record
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
