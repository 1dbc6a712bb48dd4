"""A run folder as one object: the name of every file in it, whether a process holds it, and its status.

Layout of a runs folder (every name below is spelled here and nowhere else):
    store/<config_hash>/                          one run (`RunDir`): the files listed in the class
    <experiment>/<variant>/seed<k>-<hash>         -> ../../store/<hash>  (relative symlink)
    <experiment>/analysis-<scale>.json, .npz      an experiment's post-training analysis at one scale
A run shared by several experiments (the baseline) therefore exists, and is trained, once.

Held: a lease file (repro.lease: O_CREAT|O_EXCL, a heartbeat; good across hosts on NFS) keeps two processes off one
run, and `fcntl.flock` on a lock file adds a fast path on one machine. A live lease or a held lock is "running".

Status (`RunDir.status`): the run's own files say done / diverged / did not learn / failed / interrupted / preempted
(the run record),
interrupted (a checkpoint or metrics but no record: killed), pending (nothing yet), stale (a record of another
format) or running (held); where a launcher knows the run's job (`Job`), its state is folded in: queued, requeued,
cancelled or failed with the launcher's reason.
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from repro import io, lease
from repro.config import to_dict
from repro.record import RunRecord
from repro.errors import UserError

STORE = "store"
LOCK = ".lock"
# seed<k>-<hash>, or seed<k>-<hash>@<tag> for a run of the same config with other results kept beside it by
# `repro import` (store/<hash>@<tag>; repro.bundle_merge); group 2 is the config hash either way
LINK_RE = re.compile(r"^seed(\d+)-([0-9a-f]+)(?:@[0-9a-f]+)?$")
REUSED = ("done", "diverged", "did not learn")  # a run that ended so is never trained again (it would end so again)


@dataclass(frozen=True)
class Job:
    """What a launcher knows of a run's job: its phase (pending, running, completed, cancelled, failed), how often
    it was requeued, and the launcher's words on why it waits or how it ended."""

    id: str
    phase: str
    restarts: int = 0
    reason: str = ""


@contextmanager
def folder_lock(folder: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold `folder`'s lock file for the block; yields False (without waiting) when another process holds it.
    Where the filesystem refuses locks (some NFS mounts: ENOLCK) it yields True unlocked: leases keep runs apart."""
    fd = os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunDir:
    """One run folder, `runs/store/<config hash>/`, and every file in it."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        p = self.path
        self.config = p / "config.json"            # the config the engine trains (written by `fit`)
        self.planned = p / "planned.json"          # the config and scale it was planned with (`repro run`)
        self.metrics = p / "metrics.jsonl"         # one line per epoch
        self.curve = p / "curve.jsonl"             # the training curve, one line per `train.log_every` steps
        self.val_logits = p / "val_logits.npy"     # the final model's validation logits (for the ensemble)
        self.result = p / "result.json"            # the run record (repro.record), once it ended
        self.checkpoint = p / "checkpoint.pt"      # the latest checkpoint
        self.checkpoint_prev = p / "checkpoint.prev.pt"  # the one before, while a new one is renamed in
        self.lease_file = p / ".lease"             # who holds the run (repro.lease; it touches ".lease.clock" to
        #                                            read the filesystem's clock)
        self.lock_file = p / LOCK                  # flock: the fast path on one machine
        self.train_log = p / "train.log"           # a local-pool worker's output
        self.error_log = p / "error.log"           # the traceback of a failed run
        self.placement = p / "placement.json"      # where it trained: launcher, host, GPUs, job id, log
        self.events = p / "events"                 # TensorBoard event files, one subfolder (repro.engine.events)
        self.progress = p / "progress.json"        # where a training run is, rewritten every few seconds
        self.launch = p / "launch.json"            # how it was submitted: launcher, job id, log, earlier job ids
        self.origin = p / "origin.json"            # an imported run: its bundle, digest, origin host, import date

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def config_hash(self) -> str:
        return self.path.name

    # --- files ----------------------------------------------------------------------------------------------------

    def read_planned(self) -> dict[str, Any] | None:
        planned = io.read_json(self.planned)
        return planned if isinstance(planned, dict) else None

    def planned_config(self) -> dict[str, Any] | None:
        """The config dict the run was planned with, or None."""
        config = (self.read_planned() or {}).get("config")
        return config if isinstance(config, dict) else None

    def read_record(self) -> RunRecord | None:
        """The run record, or None when there is none, it is unreadable or of another format."""
        return RunRecord.from_dict(io.read_json(self.result))

    def write_record(self, record: RunRecord) -> None:
        io.write_json(self.result, record.to_dict())

    def read_placement(self) -> dict[str, Any]:
        return _dict(io.read_json(self.placement))

    def write_placement(self, where: dict[str, Any]) -> None:
        io.write_json(self.placement, where)

    def read_launch(self) -> dict[str, Any]:
        return _dict(io.read_json(self.launch))

    def write_launch(self, record: dict[str, Any]) -> None:
        io.write_json(self.launch, record)

    def metric_rows(self) -> list[dict]:
        return io.read_jsonl(self.metrics)

    def curve_rows(self) -> list[dict]:
        return io.read_jsonl(self.curve)

    def has_progress(self) -> bool:
        """A checkpoint or a metrics line: something to resume from, or to show."""
        return any(p.exists() for p in (self.checkpoint, self.checkpoint_prev, self.metrics))

    # --- held -----------------------------------------------------------------------------------------------------

    def lock(self, *, wait: bool = False):
        """`with run.lock() as got:` the flock on this machine (`got` False: another process holds it)."""
        return folder_lock(self.path, wait=wait)

    def is_locked(self) -> bool:
        """True when some process (this one included, through another open) holds the flock."""
        if not self.lock_file.exists():
            return False
        with self.lock() as got:
            return not got

    def holder(self) -> dict[str, Any] | None:
        """The live lease's owner (host, pid, job id, heartbeat), or None when nobody holds the run."""
        return lease.holder(self.lease_file)

    def is_held(self) -> bool:
        return self.is_locked() or self.holder() is not None

    def claim(self, *, job_id: str | None = None, **extra: Any) -> lease.Lease | None:
        """Take the run's lease, or None when another live owner holds it."""
        return lease.claim(self.lease_file, job_id=job_id, **extra)

    # --- status ---------------------------------------------------------------------------------------------------

    def own_status(self, *, check_held: bool = True) -> str:
        """What the run's files say (see the module docstring); `check_held` False for the process holding it."""
        if not self.path.is_dir():
            return "pending"
        if check_held and self.is_held():
            return "running"
        raw = io.read_json(self.result)  # None when missing or cut short by a kill
        if raw is not None:
            record = RunRecord.from_dict(raw)
            return record.status if record is not None else "stale"  # a record of another format
        return "interrupted" if self.has_progress() else "pending"  # killed without a record: it can resume

    def status(self, job: Job | None = None, *, check_held: bool = True) -> tuple[str, str | None]:
        """(status, reason): the run's files, with its launcher's job state folded in where `job` is given. A run
        held by a live lease is running whatever its job says (a duplicate job that failed, a stale requeue)."""
        own = self.own_status(check_held=check_held)
        if own in REUSED or job is None or job.phase == "completed":
            return own, None
        if own == "running" or job.phase == "running":
            return "running", None
        if job.phase == "pending":
            return ("requeued" if job.restarts else "pending"), job.reason or None
        return ("cancelled" if job.phase == "cancelled" else "failed"), job.reason or None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# --- the runs folder ------------------------------------------------------------------------------------------------

def store_dir(runs_dir: Path | str, config_hash: str) -> RunDir:
    return RunDir(Path(runs_dir) / STORE / config_hash)


def link_path(runs_dir: Path | str, experiment: str, variant: str, seed: int, config_hash: str) -> Path:
    return Path(runs_dir) / experiment / variant / f"seed{seed}-{config_hash}"


def create(runs_dir: Path | str, run, *, planned: dict[str, Any] | None = None) -> RunDir:
    """Create the run folder of a PlannedRun and its experiment's link; return the run folder.

    `planned.json` records the resolved config and scale so that a run that never started still shows up with its
    settings, and the experiments, variants and seeds that plan it (the run's name in TensorBoard). Creating the
    link with `os.symlink` is atomic, so two processes can race here safely."""
    real = store_dir(runs_dir, run.config_hash)
    real.path.mkdir(parents=True, exist_ok=True)
    user = {"experiment": run.experiment, "variant": run.variant, "seed": run.seed}
    known = real.read_planned()
    if known is None:
        io.write_json(real.planned, planned or {"scale": run.scale, "config": to_dict(run.cfg),
                                                "config_hash": run.config_hash, "runs": [user]})
    elif user not in known.setdefault("runs", []):
        known["runs"].append(user)
        io.write_json(real.planned, known)
    link = link_path(runs_dir, run.experiment, run.variant, run.seed, run.config_hash)
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(real.path, link.parent)
    try:
        os.symlink(target, link, target_is_directory=True)
    except FileExistsError:
        if os.readlink(link) != target:
            raise UserError(f"{link} exists and does not point to {target}; remove it and run again") from None
    return real


def iter_links(runs_dir: Path | str) -> Iterator[tuple[str, str, int, str, Path]]:
    """(experiment, variant, seed, config_hash, link) for every run link, in a stable order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return
    for exp in sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name != STORE):
        for variant in sorted(p for p in exp.iterdir() if p.is_dir() and not p.is_symlink()):
            for link in sorted(variant.iterdir()):
                m = LINK_RE.match(link.name)
                if m:
                    yield exp.name, variant.name, int(m.group(1)), m.group(2), link


def analysis_paths(runs_dir: Path | str, experiment: str, scale: str | None) -> tuple[Path, Path]:
    """The JSON (numbers) and npz (figure arrays) of an experiment's analysis at one scale."""
    stem = f"analysis-{scale}" if scale else "analysis"
    folder = Path(runs_dir) / experiment
    return folder / f"{stem}.json", folder / f"{stem}.npz"


def analysis_files(runs_dir: Path | str) -> Iterator[tuple[str, Path]]:
    """(experiment, JSON path) of every analysis under `runs_dir`."""
    runs_dir = Path(runs_dir)
    if runs_dir.is_dir():
        for path in sorted(runs_dir.glob("*/analysis*.json")):
            yield path.parent.name, path
