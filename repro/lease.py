"""Claiming a run across processes and hosts: a lease file, not a lock (repro.rundir says where it lies).

`fcntl.flock` is not to be trusted over NFS and similar shared filesystems, so the claim that keeps two launchers
off one run is a lease file created with O_CREAT|O_EXCL (atomic on every POSIX filesystem, NFSv3 and later
included). It holds the owner (host, pid, Slurm job id, a random token). The heartbeat is the file's modification
time, which the owner touches through the descriptor it created the file with: a heartbeat can never rewrite a
lease another process has put in its place. Staleness is judged by the shared filesystem's own clock (the
modification time of a file touched just before, beside the lease), never by comparing two hosts' clocks.

A lease is stale, and may be taken over, when its file has not been touched for `stale_after` seconds, when its
owner process is gone (same host only), or when the taker is a requeued run of the owner's own Slurm job (the same
job id on another process: Slurm requeued the job, so its old process is dead, wherever it ran). The taker renames
it aside (only one rename can win) and checks that what it moved is the stale lease it read before creating its
own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from repro import io

HEARTBEAT_S = float(os.environ.get("REPRO_LEASE_HEARTBEAT_S", "20"))
STALE_AFTER_S = float(os.environ.get("REPRO_LEASE_STALE_S", "300"))


class LeaseLost(RuntimeError):
    """Another process took this lease over (our heartbeat stopped for longer than the stale timeout)."""


def _read(path: Path) -> dict[str, Any] | None:
    data = io.read_json(path)
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def filesystem_now(path: Path) -> float:
    """The time on the clock of the filesystem that holds `path`: the modification time of a file touched now beside
    it (on NFS the server stamps it), so that hosts with skewed clocks judge a heartbeat alike."""
    probe = Path(path).with_name(Path(path).name + ".clock")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
    except FileNotFoundError:
        raise
    except OSError:  # a folder this process may only read (a copy, a read-only mount): this host's clock
        return time.time()
    try:
        os.utime(fd)
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def is_stale(lease: dict[str, Any], age: float, *, stale_after: float = STALE_AFTER_S,
             job_id: str | None = None) -> bool:
    """A lease nobody keeps alive: untouched for `stale_after` s (`age`, on the filesystem's clock), its process on
    this host gone, or held for `job_id` by another process (that job was requeued: its old process is dead)."""
    if age > stale_after:
        return True
    here = lease.get("host") == socket.gethostname()
    if here and not _pid_alive(int(lease.get("pid", 0))):
        return True
    own = here and int(lease.get("pid", 0)) == os.getpid()
    return job_id is not None and lease.get("job_id") == job_id and not own


def _age(path: Path) -> float:
    return filesystem_now(path) - path.stat().st_mtime


def holder(path: Path, *, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The live lease in the file `path` (its owner, and its last heartbeat as `heartbeat`: the file's modification
    time), or None when nobody holds it."""
    path = Path(path)
    lease = _read(path)
    try:
        if lease is None or is_stale(lease, _age(path), stale_after=stale_after):
            return None
        return {**lease, "heartbeat": path.stat().st_mtime}
    except FileNotFoundError:  # released this instant
        return None


class Lease:
    """A held lease; `refresh()` renews the heartbeat, `release()` gives it up, `keep_alive()` renews on a thread."""

    def __init__(self, path: Path, owner: dict[str, Any], fd: int):
        self.path = Path(path)
        self.owner = owner
        self._fd = fd  # the file we created: touching it never touches a lease that replaced ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        current = _read(self.path)
        if current is None or current.get("token") != self.owner["token"]:
            raise LeaseLost(f"{self.path}: taken over by {current and current.get('host')}:{current and current.get('pid')}")
        os.utime(self._fd)

    def release(self) -> None:
        self.stop()
        current = _read(self.path)
        if current is not None and current.get("token") == self.owner["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keep_alive(self, interval: float = HEARTBEAT_S, on_lost=None) -> "Lease":
        """Refresh the heartbeat every `interval` s on a thread; call `on_lost()` (once) if the lease was taken
        over, so that the training loop stops before it writes into a folder that is no longer its own."""
        def beat():
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except LeaseLost:
                    if on_lost is not None:
                        on_lost()
                    return
                except OSError:
                    continue  # a hiccup of the shared filesystem; the next beat tries again

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _create(path: Path, owner: dict[str, Any]) -> int | None:
    """The descriptor of a new lease file holding `owner`, or None when one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    os.write(fd, json.dumps(owner).encode())
    os.fsync(fd)
    return fd


def claim(path: Path, *, job_id: str | None = None, stale_after: float = STALE_AFTER_S,
          **extra: Any) -> Lease | None:
    """Take the lease in the file `path`, or return None when another live owner holds it."""
    path = Path(path)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "token": uuid.uuid4().hex,
             "since": filesystem_now(path), **extra}
    for _ in range(2):
        fd = _create(path, owner)
        if fd is not None:
            return Lease(path, owner, fd)
        seen = _read(path)
        try:
            age = _age(path)
        except FileNotFoundError:
            continue  # released this instant: try to create ours
        if seen is None:  # unreadable: half-written this instant, or left so by a crash long ago
            if age <= stale_after:
                return None
        elif not is_stale(seen, age, stale_after=stale_after, job_id=job_id):
            return None
        aside = path.with_name(f"{path.name}.{owner['token']}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # someone else moved it first; try to create ours
        moved = _read(aside)
        if seen is not None and (moved is None or moved.get("token") != seen.get("token")):
            # we moved a lease created after our read: put it back (link fails if a third one exists)
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return None
        aside.unlink(missing_ok=True)
    return None
