"""Claiming a run across processes and hosts: a lease file, not a lock (repro.rundir says where it lies).

`fcntl.flock` is not to be trusted over NFS and similar shared filesystems, so the claim that keeps two launchers
off one run is a lease file created with O_CREAT|O_EXCL (atomic on every POSIX filesystem, NFSv3 and later
included). It holds the owner (host, pid, Slurm job id, a random token) and a heartbeat time that the owner
refreshes while it trains. A lease whose heartbeat is older than `stale_after` seconds, or whose owner process is
gone (same host only), is stale and may be taken over: the taker renames it aside (only one rename can win) and
checks that what it moved is the stale lease it read before creating its own.
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


def is_stale(lease: dict[str, Any] | None, *, stale_after: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """A lease nobody keeps alive: no heartbeat for `stale_after` s, or its process on this host has ended."""
    if lease is None:
        return False  # being written this instant (or unreadable: judged by its age in `claim`)
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > stale_after:
        return True
    return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0)))


def holder(path: Path, *, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The live lease in the file `path` (owner and heartbeat), or None when nobody holds it."""
    lease = _read(Path(path))
    return None if lease is None or is_stale(lease, stale_after=stale_after) else lease


class Lease:
    """A held lease; `refresh()` renews the heartbeat, `release()` gives it up, `keep_alive()` renews on a thread."""

    def __init__(self, path: Path, owner: dict[str, Any]):
        self.path = Path(path)
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        current = _read(self.path)
        if current is None or current.get("token") != self.owner["token"]:
            raise LeaseLost(f"{self.path}: taken over by {current and current.get('host')}:{current and current.get('pid')}")
        self.owner["heartbeat"] = time.time()
        io.write_json(self.path, self.owner)

    def release(self) -> None:
        self.stop()
        current = _read(self.path)
        if current is not None and current.get("token") == self.owner["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

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


def _create(path: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
        f.flush()
        os.fsync(f.fileno())
    return True


def claim(path: Path, *, job_id: str | None = None, stale_after: float = STALE_AFTER_S,
          **extra: Any) -> Lease | None:
    """Take the lease in the file `path`, or return None when another live owner holds it."""
    path = Path(path)
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "token": uuid.uuid4().hex,
             "since": now, "heartbeat": now, **extra}
    for _ in range(2):
        if _create(path, owner):
            return Lease(path, owner)
        seen = _read(path)
        if seen is None:  # unreadable: half-written this instant, or left so by a crash long ago
            try:
                if now - path.stat().st_mtime <= stale_after:
                    return None
            except FileNotFoundError:
                continue
        elif not is_stale(seen, stale_after=stale_after, now=now):
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
