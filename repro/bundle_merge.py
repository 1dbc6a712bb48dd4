"""`repro import`: bundles (repro.bundle) merged into the local run store, never over a local result.

Every bundle given is verified completely (repro.bundle.verify: paths, member types, sizes, the manifest's listing,
digests, config hashes) before anything is written; one that fails stops the command with one line and nothing
written. Then, per run of a bundle, by its config hash h:
- not here: added as store/<h> with its experiment links: extracted into a temporary folder inside the runs folder
  (tarfile's data filter, after our own checks), its digests checked again there, then renamed into place;
- here with the same results (the same files, or a finished record with the same final metrics): skipped, only
  missing experiment links are added; importing a bundle twice writes nothing the second time;
- here but only planned (no record, no checkpoint, nobody holding it): its files are moved in, the record last;
- here with other results (the same config trained elsewhere, or a local run that failed or still trains): kept
  beside it as store/<h>@<tag> (tag: the first 8 hex digits of the bundle's sha256), linked as seed<k>-<h>@<tag>.
Each imported run gets an origin record (RunDir.origin): the bundle's file name and sha256, its origin host, date,
repro version and git commit, the date imported, and `beside`: the hash of the local run it was kept beside.
Analyses are added where there is none at that scale; a local one is kept.

Pooling: imported runs are ordinary rows of repro.runs.collect, so other seeds of a config (other hashes) pool
into the same intervals as local ones. A run kept beside is the same config, seed included, measured twice: pooling
it would count one seed twice and averaging would hide that one config gave two results. So repro.runs shows it with
status `conflict` (its numbers and origin kept, flagged on the page) and no verdict uses it, unless no folder before
it (the local run, then the kept ones by name) holds a finished run: then it is the one judged run of its config.
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from repro import io
from repro.bundle import MAX_FILE, STORE, Bundle, check_member, refuse, sha256_file, verify
from repro.errors import UserError
from repro.rundir import RunDir, analysis_paths, folder_lock, link_path, store_dir


@dataclass
class Step:
    """What importing one run does: add, fill (a local run only planned), same (skip) or beside."""

    h: str
    action: str
    target: RunDir
    links: list[tuple[Path, str]] = field(default_factory=list)   # (link, relative target) to create


def same_results(run: RunDir, bundle: Bundle, h: str) -> bool:
    """The local folder holds this run: the same files, or a finished record with the same final metrics."""
    files = bundle.run_files(h)
    if all((run.path / n).is_file() and sha256_file(run.path / n) == sha for n, sha in files.items()):
        return True
    local = run.read_record()
    return local is not None and local.finished and local.metrics == bundle.records[h].metrics


def _step(bundle: Bundle, runs_dir: Path, h: str) -> Step:
    main = store_dir(runs_dir, h)
    kept = sorted(main.path.parent.glob(f"{h}@*")) if main.path.parent.is_dir() else []
    for folder in [main.path, *kept]:
        if folder.is_dir() and same_results(RunDir(folder), bundle, h):
            return Step(h, "same", RunDir(folder))
    if not main.path.exists():
        return Step(h, "add", main)
    if main.own_status() == "pending":
        return Step(h, "fill", main)
    beside = RunDir(main.path.with_name(f"{h}@{bundle.tag}"))
    if beside.path.exists():
        raise UserError(f"{beside}: exists with other files than {bundle.path} holds; move it away and import again")
    return Step(h, "beside", beside)


def _links(step: Step, run: dict, runs_dir: Path) -> None:
    """The experiment links the step still needs; refuses a link name taken by another target."""
    suffix = step.target.path.name[len(step.h):]  # "" or "@<tag>"
    for x in run["links"]:
        link = link_path(runs_dir, x["experiment"], x["variant"], x["seed"], step.h)
        link = link.with_name(link.name + suffix)
        rel = os.path.relpath(step.target.path, link.parent)
        if os.path.islink(link) and os.readlink(link) == rel:
            continue
        if os.path.lexists(link):
            raise UserError(f"{link}: exists and does not point to {rel}; move it away and import again")
        step.links.append((link, rel))


def _analysis_steps(bundle: Bundle, runs_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """([(path in the bundle, destination)] to write, [notes]) for the bundle's analyses."""
    files, writes, notes = bundle.manifest["files"], [], []
    for a in bundle.manifest.get("analyses", []):
        json_dest, npz_dest = analysis_paths(runs_dir, a["experiment"], a["scale"])
        pairs = [(d.relative_to(runs_dir).as_posix(), d) for d in (npz_dest, json_dest)]  # the JSON last: it
        pairs = [(arc, dest) for arc, dest in pairs if arc in files]                      # makes it visible
        if not json_dest.exists():
            writes += pairs
        elif any(not dest.is_file() or sha256_file(dest) != files[arc]["sha256"] for arc, dest in pairs):
            notes.append(f"kept the local {a['experiment']} analysis at {a['scale']} scale")
    return writes, notes


def _extract(bundle: Bundle, tmp: Path, arcs: list[str]) -> None:
    """Extract `arcs` into `tmp` (checked again, then tarfile's data filter), and check their digests there."""
    try:
        with tarfile.open(bundle.path, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers()}
            chosen = []
            for arc in arcs:
                m = members.get(arc)
                if m is None or not m.isreg() or m.size != bundle.manifest["files"][arc]["size"]:
                    raise refuse(bundle.path, f"member {arc!r} changed while importing")
                check_member(bundle.path, m, m.size)
                chosen.append(m)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=chosen, filter="data")
            else:  # Python without extraction filters: our own checks above are the guard
                tar.extractall(tmp, members=chosen)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise refuse(bundle.path, f"not readable while importing ({type(e).__name__}: {e})") from None
    for arc in arcs:
        if sha256_file(tmp / arc) != bundle.manifest["files"][arc]["sha256"]:
            raise refuse(bundle.path, f"member {arc!r} fails its sha256 digest")


def _origin(bundle: Bundle, step: Step) -> dict:
    o = bundle.manifest["origin"]
    return {"bundle": bundle.path.name, "bundle_sha256": bundle.digest, "host": o.get("host"),
            "created": o.get("created"), "repro_version": o.get("repro_version"), "git_commit": o.get("git_commit"),
            "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"), "imported_on": socket.gethostname(),
            "beside": step.h if step.action == "beside" else None}


def _place(step: Step, src: Path, bundle: Bundle) -> str:
    """Move one extracted run folder into the store; returns what was done (a key of OUTCOMES)."""
    io.write_json(RunDir(src).origin, _origin(bundle, step))
    if step.action in ("add", "beside"):
        if step.target.path.exists():
            raise UserError(f"{step.target}: appeared while importing {bundle.path}; import again")
        step.target.path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, step.target.path)
        io.fsync_dir(step.target.path.parent)
        return "added" if step.action == "add" else "kept beside"
    lease = step.target.claim()
    if lease is None:
        return "skipped"
    try:
        last = RunDir(src).result.name  # the record last: a reader sees the run done only once all is there
        for f in sorted(src.iterdir(), key=lambda p: p.name == last):
            os.replace(f, step.target.path / f.name)
    finally:
        lease.release()
    return "filled in"


OUTCOMES = {"added": "", "filled in": "the local run was only planned; its files are the bundle's now",
            "kept beside": "the same config with other results is here; not judged while that run is done",
            "skipped": "the local run started training while importing; import again to keep this one beside it"}


def merge(bundle: Bundle, runs_dir: Path) -> list[str]:
    """Import one verified bundle into `runs_dir`; one line per run written and per note."""
    steps = []
    for run in bundle.manifest["runs"]:
        step = _step(bundle, runs_dir, run["config_hash"])
        _links(step, run, runs_dir)
        steps.append(step)
    analyses, notes = _analysis_steps(bundle, runs_dir)
    moved = [s for s in steps if s.action != "same"]
    if not moved and not analyses and not any(s.links for s in steps):
        return [f"{bundle.path}: nothing new, {len(steps)} run(s) already here"] + notes
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir / f".import-{os.getpid()}-{bundle.tag}"
    done: list[tuple[Step, str]] = []
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed import of this process id: inert, never read
        tmp.mkdir()
        arcs = [f"{STORE}/{s.h}/{n}" for s in moved for n in bundle.run_files(s.h)] + [a for a, _ in analyses]
        _extract(bundle, tmp, arcs)
        done = [(s, _place(s, tmp / STORE / s.h, bundle)) for s in moved]
        for s in steps:
            for link, rel in s.links if (s, "skipped") not in done else ():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(rel, link, target_is_directory=True)
        for arc, dest in analyses:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with folder_lock(dest.parent, wait=True):  # as repro.analysis writes it
                os.replace(tmp / arc, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{sum(1 for _, o in done if o == k)} {k}" for k in OUTCOMES if any(o == k for _, o in done))
    head = (f"{bundle.path} (from {bundle.manifest['origin'].get('host')}): {counts or 'no run added'}, "
            f"{len(steps) - len(moved)} run(s) already here, {len(analyses)} analysis file(s) added")
    return [head] + [f"  store/{s.target.path.name}: {o}: {OUTCOMES[o]}" for s, o in done if OUTCOMES[o]] + notes


def import_bundles(paths: list[Path | str], runs_dir: Path | str, *, max_file: int = MAX_FILE) -> list[str]:
    """Verify every bundle, then merge each in turn; returns the lines to print."""
    if not paths:
        raise UserError("no bundle given; `repro import results.tar.gz` imports one")
    checked = [verify(p, max_file) for p in paths]  # nothing is written before every bundle passed
    need = sum(d["size"] for b in checked for d in b.manifest["files"].values())
    target = next(p for p in (Path(runs_dir).resolve(), *Path(runs_dir).resolve().parents) if p.exists())
    free = shutil.disk_usage(target).free
    if need > free:  # a bundle unpacks to what its manifest lists (checked): refuse before filling the disk
        raise UserError(f"{runs_dir}: the bundle(s) unpack to {need:,} bytes, more than the {free:,} free there; "
                        "free space or import into another --runs folder")
    lines = []
    for bundle in checked:
        lines += merge(bundle, Path(runs_dir))
    return lines
