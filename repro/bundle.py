"""Results from several machines on one page: `repro bundle` packs finished runs as plain data, and `verify` checks a
bundle before `repro import` (repro.bundle_merge) writes anything.

A bundle is a .tar.gz laid out as a runs folder, with its manifest first:
    bundle.json                                  format; origin (host, date, repro version, git commit); every
                                                 file's sha256 and size; each run's config hash and its experiment
                                                 links (experiment, variant, seed); the analyses
    store/<hash>/<file>                          a finished run: planned config, config, metrics, curve, result,
                                                 placement (where it trained); its latest checkpoint only with
                                                 --with-weights
    <experiment>/analysis-<scale>.json, .npz     the experiments' analyses
Only regular files are packed, with neutral owners and modes. The runs packed are those the page judges (status
done in repro.runs.collect), so a run kept beside another of its config is packed only where it is the judged one.

A bundle is data, never code. `verify` reads the archive without extracting and refuses, naming the bundle and the
member: absolute paths, `..` components, links, devices and fifos, members over the size limit, members the manifest
does not list (or lists but are missing), files of no known run-folder or analysis name, contents that fail their
digest, and runs whose config does not hash to their folder's name and their records' hashes. Nothing in a bundle is
unpickled or executed: checkpoints are only ever read by the engine, with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io as stdio
import json
import re
import socket
import tarfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import repro
from repro import io
from repro.config import config_hash, from_dict
from repro.errors import UserError
from repro.record import RunRecord
from repro.rundir import STORE, RunDir, analysis_paths, store_dir

MANIFEST = "bundle.json"
FORMAT = 1
MAX_FILE = 2 * 1024 ** 3        # bytes per member, the default of `repro import --max-file-size`
JSON_LIMIT = 64 * 1024 ** 2     # a JSON member read into memory (the manifest, records, configs)
MAX_MEMBERS = 100_000           # a full-scale store of every claim is about a thousand files
RUN_FILES = ("planned", "config", "metrics", "curve", "result", "placement")  # RunDir attributes packed per run
WEIGHTS = ("checkpoint",)                                                       # with --with-weights
REQUIRED = ("planned", "result")
HASH_RE = re.compile(r"^[0-9a-f]{6,64}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def file_names(weights: bool = True) -> dict[str, str]:
    """{RunDir attribute: file name} of the files a bundle may hold per run (names are repro.rundir's)."""
    run = RunDir(Path("."))
    return {a: getattr(run, a).name for a in RUN_FILES + (WEIGHTS if weights else ())}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_size(text: str) -> int:
    """'2G', '500M', '64K' or bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text), re.I)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--max-file-size {text!r}: give bytes, or a number with K, M or G (e.g. 2G)")
    return int(m.group(1)) * 1024 ** ("KMG".find(m.group(2).upper()) + 1) if m.group(2) else int(m.group(1))


def safe_name(name: Any) -> bool:
    """An experiment, variant or scale name that is one plain path component."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name not in (".", "..", STORE)
            and not name.startswith(".") and not any(c in name for c in "/\\\0") and name.isprintable())


# --- pack -----------------------------------------------------------------------------------------------------------

def _judged_runs(runs_dir: Path, experiment: str) -> dict[str, dict]:
    """{config hash: {"dir", "links"}} of the done runs linked under `experiment` (or all)."""
    from repro.runs import collect  # the run table's own notion of done (a run kept beside is done only if judged)

    df = collect(runs_dir)
    rows = df[(df["status"] == "done") & ((df["experiment"] == experiment) | (experiment == "all"))]
    runs: dict[str, dict] = {}
    for r in rows.itertuples():
        if not (safe_name(r.experiment) and safe_name(r.variant)):
            raise UserError(f"{r.run_dir}: experiment or variant name {r.experiment}/{r.variant} cannot travel in a "
                            f"bundle (a plain name, no leading dot); rename it")
        entry = runs.setdefault(str(r.config_hash), {"dir": RunDir(Path(r.run_dir).resolve()), "links": []})
        entry["links"].append({"experiment": r.experiment, "variant": r.variant, "seed": int(r.seed)})
    return runs


def _analyses(runs_dir: Path, experiments: set[str]) -> list[dict]:
    """Each analysis of `experiments` stored under its own scale's names: {experiment, scale, json, npz}."""
    out = []
    for exp in sorted(experiments):
        for path in sorted((runs_dir / exp).glob("*.json")) if safe_name(exp) else []:
            data = io.read_json(path) if path.is_file() and not path.is_symlink() else None
            scale = data.get("scale") if isinstance(data, dict) else None
            if not safe_name(scale):
                continue
            json_path, npz_path = analysis_paths(runs_dir, exp, scale)
            if json_path == path:
                out.append({"experiment": exp, "scale": scale, "json": json_path, "npz": npz_path})
    return out


def _origin(runs: dict[str, dict]) -> dict[str, Any]:
    """Where and when the bundle was made, and the code of its runs (a finished run's provenance)."""
    prov = next((rec.provenance for e in runs.values() if (rec := e["dir"].read_record()) is not None), {})
    return {"host": socket.gethostname(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "repro_version": repro.__version__, "git_commit": prov.get("git_commit"),
            "packages": prov.get("packages")}


def _files(runs_dir: Path, runs: dict[str, dict], analyses: list[dict], weights: bool) -> dict[str, Path]:
    """{path in the bundle: file here} for every file packed."""
    names, out = file_names(weights), {}
    for h, entry in sorted(runs.items()):
        arc = store_dir(Path(), h)
        for attr in names:
            src = getattr(entry["dir"], attr)
            if src.is_file() and not src.is_symlink():
                out[getattr(arc, attr).as_posix()] = src
            elif attr in REQUIRED:
                raise UserError(f"{src}: missing; a finished run needs it (run `repro run` again to rebuild it)")
    for a in analyses:
        for key in ("json", "npz"):
            if a[key].is_file() and not a[key].is_symlink():
                out[a[key].relative_to(runs_dir).as_posix()] = a[key]
    return out


def pack(runs_dir: Path | str, experiment: str, out: Path | str, *, with_weights: bool = False) -> dict[str, Any]:
    """Write the bundle of `experiment` (or `all`) to `out`, atomically; returns its manifest."""
    runs_dir, out = Path(runs_dir), Path(out)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no runs folder; pass --runs or run `repro run all --scale demo` first")
    runs = _judged_runs(runs_dir, experiment)
    if not runs:
        raise UserError(f"{runs_dir}: no finished runs of {experiment!r}; `repro status --runs {runs_dir}` lists "
                        f"what there is")
    experiments = {link["experiment"] for e in runs.values() for link in e["links"]}
    analyses = _analyses(runs_dir, experiments)
    files = _files(runs_dir, runs, analyses, with_weights)
    digests = {arc: {"sha256": sha256_file(src), "size": src.stat().st_size} for arc, src in files.items()}
    manifest = {"format": FORMAT, "origin": _origin(runs), "experiments": sorted(experiments),
                "with_weights": with_weights, "files": digests,
                "runs": [{"config_hash": h, "links": e["links"]} for h, e in sorted(runs.items())],
                "analyses": [{"experiment": a["experiment"], "scale": a["scale"]} for a in analyses]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out) as tmp, tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        blob = json.dumps(manifest, indent=1, sort_keys=True).encode()
        tar.addfile(_info(MANIFEST, len(blob), manifest["origin"]["created"]), stdio.BytesIO(blob))
        for arc, src in files.items():
            with open(src, "rb") as f:  # a file changed since it was hashed fails its digest on import
                tar.addfile(_info(arc, digests[arc]["size"], src.stat().st_mtime), f)
    return manifest


def _info(name: str, size: int, mtime: float | str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, 0o644, tarfile.REGTYPE
    info.mtime = datetime.fromisoformat(mtime).timestamp() if isinstance(mtime, str) else mtime
    return info


# --- verify ---------------------------------------------------------------------------------------------------------

@dataclass
class Bundle:
    """A bundle that passed every check: its manifest, the file members to extract and the runs' records."""

    path: Path
    digest: str                                      # sha256 of the bundle file
    manifest: dict[str, Any]
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)   # path in the bundle -> its member
    records: dict[str, RunRecord] = field(default_factory=dict)         # config hash -> run record

    @property
    def tag(self) -> str:
        return self.digest[:8]

    def run_files(self, h: str) -> dict[str, str]:
        """{file name: sha256} of run `h`'s files in the bundle."""
        prefix = f"{STORE}/{h}/"
        return {p[len(prefix):]: d["sha256"] for p, d in self.manifest["files"].items() if p.startswith(prefix)}


def refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path}: refused, {what}; nothing was imported (bundles are made by `repro bundle`)")


def check_member(path: Path, m: tarfile.TarInfo, max_file: int) -> None:
    """Refuse a member that could write outside its folder, is not a plain file, or is too large."""
    name = m.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise refuse(path, f"member {name!r} has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise refuse(path, f"member {name!r} has a '..' component")
    if m.issym() or m.islnk():
        raise refuse(path, f"member {name!r} is a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r})")
    if m.ischr() or m.isblk() or m.isfifo():
        raise refuse(path, f"member {name!r} is a {'fifo' if m.isfifo() else 'device file'}")
    if not (m.isreg() or m.isdir()):
        raise refuse(path, f"member {name!r} is not a regular file")
    if m.size > max_file:
        raise refuse(path, f"member {name!r} is {m.size:,} bytes, over the limit of {max_file:,} (--max-file-size)")


def _read(tar: tarfile.TarFile, m: tarfile.TarInfo, limit: int | None = None) -> tuple[str, bytes | None]:
    """(sha256, the bytes when the member is at most `limit` bytes long)."""
    h, keep = hashlib.sha256(), limit is not None and m.size <= limit
    chunks = []
    f = tar.extractfile(m)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        if keep:
            chunks.append(block)
    return h.hexdigest(), b"".join(chunks) if keep else None


def _expected_paths(path: Path, manifest: dict) -> dict[str, str]:
    """{path a file may have in the bundle: what it is}, from the manifest's runs and analyses; refuses a
    malformed manifest."""
    runs, analyses = manifest.get("runs"), manifest.get("analyses")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict) or not isinstance(runs, list) \
            or not isinstance(analyses, list) or not isinstance(manifest.get("origin"), dict):
        raise refuse(path, f"{MANIFEST} is not a bundle manifest of format {FORMAT}")
    out = {}
    for run in runs:
        h, links = (run.get("config_hash"), run.get("links")) if isinstance(run, dict) else (None, None)
        if not isinstance(h, str) or not HASH_RE.match(h) or not isinstance(links, list) or not all(
                isinstance(x, dict) and safe_name(x.get("experiment")) and safe_name(x.get("variant"))
                and isinstance(x.get("seed"), int) and not isinstance(x.get("seed"), bool) and x["seed"] >= 0
                for x in links):
            raise refuse(path, f"{MANIFEST} has a malformed run entry {str(run)[:80]!r}")
        if f"{STORE}/{h}/{file_names()['result']}" in out:
            raise refuse(path, f"{MANIFEST} lists run {h} twice")
        out.update({f"{STORE}/{h}/{name}": f"run:{h}:{attr}" for attr, name in file_names().items()})
    for a in analyses:
        if not isinstance(a, dict) or not safe_name(a.get("experiment")) or not safe_name(a.get("scale")):
            raise refuse(path, f"{MANIFEST} has a malformed analysis entry {str(a)[:80]!r}")
        for p in analysis_paths(Path(), a["experiment"], a["scale"]):
            out[p.as_posix()] = "analysis"
    return out


def _check_listing(path: Path, manifest: dict, members: dict[str, tarfile.TarInfo], folders: list[str]) -> None:
    """Every member listed (a folder: as one holding a listed file), every listed file present with its size,
    every listed file of a known kind."""
    files, expected = manifest["files"], _expected_paths(path, manifest)
    unlisted = [n for n in members if n not in files]
    unlisted += [n for n in folders if not any(f.startswith(n.rstrip("/") + "/") for f in files)]
    if unlisted:
        raise refuse(path, f"member {unlisted[0]!r} is not listed in its {MANIFEST}")
    for name, d in files.items():
        if name not in expected:
            raise refuse(path, f"{MANIFEST} lists {name!r}, which is no run-folder or analysis file")
        if not isinstance(d, dict) or not SHA_RE.match(str(d.get("sha256"))) or not isinstance(d.get("size"), int):
            raise refuse(path, f"{MANIFEST} has no sha256 and size for {name!r}")
        if name not in members:
            raise refuse(path, f"{name!r} is listed in its {MANIFEST} but missing from the archive")
        if members[name].size != d["size"]:
            raise refuse(path, f"member {name!r} is {members[name].size} bytes, its {MANIFEST} says {d['size']}")
    needed = [f"{STORE}/{run['config_hash']}/{file_names()[attr]}" for run in manifest["runs"] for attr in REQUIRED]
    needed += [analysis_paths(Path(), a["experiment"], a["scale"])[0].as_posix() for a in manifest["analyses"]]
    for name in needed:
        if name not in files:
            raise refuse(path, f"{MANIFEST} lists no {name!r}, which its runs and analyses need")


def _check_run(path: Path, run: dict, texts: dict[str, bytes]) -> RunRecord:
    """The run's finished record, once its config hashes to its folder's name and to every hash it records."""
    h, names = run["config_hash"], file_names()

    def load(attr: str) -> dict | None:
        raw = texts.get(f"{STORE}/{h}/{names[attr]}")
        try:
            return json.loads(raw) if raw is not None else None
        except ValueError:
            raise refuse(path, f"{STORE}/{h}/{names[attr]} is not JSON") from None

    result = load("result")
    record = RunRecord.from_dict(result)
    if record is None or not record.finished:
        raise refuse(path, f"{STORE}/{h}/{names['result']} is not a finished run record of this version")
    for attr, d in (("result", result), ("planned", load("planned")), ("config", load("config"))):
        if d is None and attr == "config":
            continue
        config, recorded = (d.get("config"), d.get("config_hash")) if isinstance(d, dict) else (None, None)
        try:
            actual = config_hash(from_dict(config, source=f"{path}:{STORE}/{h}/{names[attr]}"))
        except (UserError, TypeError, AttributeError, ValueError):
            raise refuse(path, f"{STORE}/{h}/{names[attr]} holds no valid config") from None
        if actual != h or recorded != h:
            raise refuse(path, f"{STORE}/{h}/{names[attr]}: its config hashes to {actual} and it records "
                               f"{recorded}, not the folder's name {h} (an edited record, or a run of a repro version that "
                               f"computes runs differently: retrain it with this one)")
    # the run table reads a run's seed from its link: a run filed under another seed would be paired wrongly
    seed = from_dict(result["config"]).train.seed
    misfiled = [x["seed"] for x in run["links"] if x["seed"] != seed]
    if misfiled:
        raise refuse(path, f"{MANIFEST} files run {h} under seed {misfiled[0]}, but it trained with train.seed = {seed}")
    return record


def _check_analyses(path: Path, manifest: dict, texts: dict[str, bytes]) -> None:
    """Each analysis is the scale its name says: the run table files an analysis under the scale it records, so a
    mislabelled one would stand in for a local analysis of another scale."""
    for a in manifest["analyses"]:
        name = analysis_paths(Path(), a["experiment"], a["scale"])[0].as_posix()
        try:
            scale = json.loads(texts.get(name) or b"").get("scale")
        except (ValueError, AttributeError):
            scale = None
        if scale != a["scale"]:
            raise refuse(path, f"{name} is not the {a['scale']}-scale analysis its name says (it records {scale!r})")


def verify(path: Path | str, max_file: int = MAX_FILE) -> Bundle:
    """Check a bundle completely, reading it without extracting anything; refuse it (UserError) on any fault."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such bundle file; make one with `repro bundle all --out results.tar.gz`")
    try:
        digest = sha256_file(path)
        with tarfile.open(path, "r:*") as tar:
            return _verify_open(path, digest, tar, max_file)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise refuse(path, f"not a readable .tar.gz ({type(e).__name__}: {e})") from None


def _verify_open(path: Path, digest: str, tar: tarfile.TarFile, max_file: int) -> Bundle:
    members: dict[str, tarfile.TarInfo] = {}
    folders: list[str] = []
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS:
            raise refuse(path, f"it has over {MAX_MEMBERS:,} members")
        check_member(path, m, max_file)
        if m.name in members:
            raise refuse(path, f"member {m.name!r} appears twice")
        if m.isreg():
            members[m.name] = m
        else:
            folders.append(m.name)
    top = members.pop(MANIFEST, None)
    if top is None:
        raise refuse(path, f"it has no {MANIFEST}")
    try:
        manifest = json.loads(_read(tar, top, JSON_LIMIT)[1] or b"")
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise refuse(path, f"its {MANIFEST} is not a JSON object")
    _check_listing(path, manifest, members, folders)
    texts = {}
    for name, m in members.items():
        sha, text = _read(tar, m, JSON_LIMIT if name.endswith(".json") else None)
        if sha != manifest["files"][name]["sha256"]:
            raise refuse(path, f"member {name!r} fails its sha256 digest")
        if text is not None:
            texts[name] = text
    bundle = Bundle(path, digest, manifest, members)
    for run in manifest["runs"]:
        bundle.records[run["config_hash"]] = _check_run(path, run, texts)
    _check_analyses(path, manifest, texts)
    return bundle
