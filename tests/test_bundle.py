"""Sharing results: `repro bundle` then `repro import` gives the same table and page; bundles of other seeds pool;
a run of the same config with other results is kept beside, flagged and never judged twice; re-importing writes
nothing; every hostile archive is refused with one line, exit code 2 and the runs folder unchanged."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fakes import fabricate_all, make_run, place_run  # noqa: E402
from test_report import SUMMARY_COLUMNS, summary_cells  # noqa: E402

from repro.bundle import MANIFEST, sha256_file, verify  # noqa: E402
from repro.claims import judge_claim  # noqa: E402
from repro.cli import app  # noqa: E402
from repro.experiments import load_registry  # noqa: E402
from repro.report import build_report  # noqa: E402
from repro.runs import collect  # noqa: E402

CLAIMS = ("ablation-lrn", "baseline", "ensemble")
PATHS = ("run_dir",)  # where the table says a run lies: the only column allowed to differ after an import


def registry():
    return {k: v for k, v in load_registry().items() if k in CLAIMS}


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def listing(root: Path) -> dict:
    """Every path under `root` (itself included) with its type, size, mtime and link target."""
    if not root.exists():
        return {}
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [None, *dirs, *files]:
            p = Path(folder) / name if name else Path(folder)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                              os.readlink(p) if p.is_symlink() else None)
    return out


def lrn_runs(runs: Path, seeds, host: str, offset: float = 0.0, gpu: str = "NVIDIA H200") -> None:
    """The LRN claim's three variants at demo scale for `seeds`, trained on `host`."""
    exp = registry()["ablation-lrn"]
    for s in seeds:
        for v, ov in exp.variants.items():
            top1 = 30.0 + 0.4 * s + (1.0 if v == "no-lrn" else 0.0) + offset + 0.05 * s * s
            real = make_run(runs, exp.name, v, s, scale="demo", metrics={"top1_err": top1, "top5_err": top1 / 3},
                            overrides={**exp.base, **ov})
            place_run(real, host, device=gpu, gpus="0")


def bundled(runs: Path, out: Path, experiment: str = "all") -> Path:
    res = cli("bundle", experiment, "--out", out, "--runs", runs)
    assert res.exit_code == 0, res.output
    return out


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in PATHS and not c.startswith("origin.")]
    return df[keep].sort_values(["experiment", "variant", "seed"]).reset_index(drop=True)


# --- the round trip --------------------------------------------------------------------------------------------------

def test_bundle_then_import_gives_the_same_table_and_page(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    fabricate_all(a, registry(), scale="demo", seeds=3)
    for real in (a / "store").iterdir():
        place_run(real, "lab-a", device="NVIDIA A100-SXM4-80GB", gpus="0")
    out = bundled(a, tmp_path / "a.tar.gz")
    manifest = verify(out).manifest
    assert {r["config_hash"] for r in manifest["runs"]} == {p.name for p in (a / "store").iterdir()}
    assert all(len(d["sha256"]) == 64 for d in manifest["files"].values()) and manifest["origin"]["git_commit"]
    assert not [f for f in manifest["files"] if f.endswith(".pt")]  # no checkpoints without --with-weights

    res = cli("import", out, "--runs", c)
    assert res.exit_code == 0, res.output
    for runs, name in ((a, "a.csv"), (c, "c.csv")):
        assert cli("results", "--runs", runs, "--out", tmp_path / name).exit_code == 0
    here, there = (pd.read_csv(tmp_path / n) for n in ("a.csv", "c.csv"))
    assert len(here) == len(there) == 3 * 5  # 3 seeds x (3 LRN variants, baseline, ensemble)
    pd.testing.assert_frame_equal(comparable(here), comparable(there))
    assert set(there["origin.bundle"]) == {"a.tar.gz"} and here["origin.bundle"].isna().all()
    assert set(there["placement.host"]) == {"lab-a"}

    pages = [build_report(r, tmp_path / f"{r.name}.html", registry=registry()).read_text() for r in (a, c)]
    cells = [summary_cells(p) for p in pages]
    assert set(cells[0]) == set(CLAIMS)
    for claim in CLAIMS:
        mine, theirs = (dict(zip(SUMMARY_COLUMNS, x[claim])) for x in cells)
        assert [mine[k] for k in ("mean", "ci", "n", "verdict")] == [theirs[k] for k in ("mean", "ci", "n", "verdict")]
    assert cells[1]["ablation-lrn"][SUMMARY_COLUMNS.index("n")].splitlines()[0] == "3"
    assert "came from 1" in pages[1] and "came from" not in pages[0]
    assert "lab-a: NVIDIA A100-SXM4-80GB (GPU 0)" in pages[1] and "2026-11-26 05:12 UTC" in pages[1]


def test_a_bundle_of_nothing_is_one_line_and_no_file(tmp_path):
    lrn_runs(tmp_path / "a", [0], "lab-a")
    for args in (["nosuch", "--runs", tmp_path / "a"], ["all", "--runs", tmp_path / "absent"]):
        res = cli("bundle", *args, "--out", tmp_path / "out" / "x.tar.gz")
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_parquet_results_after_an_import(tmp_path):
    lrn_runs(tmp_path / "a", [0, 1], "lab-a")
    cli("import", bundled(tmp_path / "a", tmp_path / "a.tar.gz"), "--runs", tmp_path / "c")
    res = cli("results", "--runs", tmp_path / "c", "--out", tmp_path / "r.parquet", "--format", "parquet")
    assert res.exit_code == 0, res.output
    back = pd.read_parquet(tmp_path / "r.parquet")
    assert len(back) == 6 and back["origin.bundle"].eq("a.tar.gz").all() and back["top1_err"].notna().all()
    assert back["placement.host"].eq("lab-a").all()


# --- pooling and conflicts -------------------------------------------------------------------------------------------

def test_two_bundles_of_other_seeds_pool_into_one_interval(tmp_path):
    lrn_runs(tmp_path / "a", [0, 1], "lab-a")
    lrn_runs(tmp_path / "b", [2, 3, 4], "hpc-b", gpu="NVIDIA A100")
    one, two = bundled(tmp_path / "a", tmp_path / "a.tar.gz"), bundled(tmp_path / "b", tmp_path / "b.tar.gz")
    exp = registry()["ablation-lrn"]
    alone = judge_claim(exp, collect(tmp_path / "a")).comparisons[0].measured.n
    res = cli("import", one, two, "--runs", tmp_path / "c")
    assert res.exit_code == 0, res.output
    df = collect(tmp_path / "c")
    pooled = judge_claim(exp, df).comparisons[0]
    assert alone == 2 and pooled.measured.n == 5 and sorted(pooled.values) == [0, 1, 2, 3, 4]
    assert set(df["origin.bundle"]) == {"a.tar.gz", "b.tar.gz"} and set(df["placement.host"]) == {"lab-a", "hpc-b"}
    page = build_report(tmp_path / "c", tmp_path / "c.html", registry={exp.name: exp}).read_text()
    assert dict(zip(SUMMARY_COLUMNS, summary_cells(page)[exp.name]))["n"].splitlines()[0] == "5"
    assert "15 runs on this page came from 2" in " ".join(page.split())
    assert "hpc-b: NVIDIA A100 (GPU 0)" in page and f"b.tar.gz ({sha256_file(two)[:8]})" in page


def test_other_results_of_a_local_config_are_kept_beside_flagged_and_not_judged(tmp_path):
    lrn_runs(tmp_path / "a", [0, 1], "lab-a", offset=5.0)   # the same configs, trained elsewhere: other numbers
    lrn_runs(tmp_path / "c", [0, 1], "here")
    out = bundled(tmp_path / "a", tmp_path / "a.tar.gz")
    exp, c = registry()["ablation-lrn"], tmp_path / "c"
    local = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in (c / "store").iterdir()}
    before = judge_claim(exp, collect(c)).comparisons[0]
    res = cli("import", out, "--runs", c)
    assert res.exit_code == 0 and "6 kept beside" in res.output, res.output
    tag = sha256_file(out)[:8]
    for h, files in local.items():  # never overwritten
        assert {f.name: f.read_bytes() for f in (c / "store" / h).iterdir()} == files
        kept = c / "store" / f"{h}@{tag}"
        assert json.loads((kept / "origin.json").read_text())["beside"] == h
        assert json.loads((kept / "origin.json").read_text())["bundle"] == "a.tar.gz"
    df = collect(c)
    assert len(df) == 12 and (df["status"] == "conflict").sum() == 6
    assert df.loc[df["status"] == "conflict", "run_dir"].str.endswith(f"@{tag}").all()
    assert df.loc[df["status"] == "conflict", "error"].str.contains("not judged").all()
    after = judge_claim(exp, df).comparisons[0]
    assert after.measured.n == before.measured.n == 2 and after.values == before.values
    page = build_report(c, tmp_path / "c.html", registry={exp.name: exp}).read_text()
    assert "conflict" in page and "kept beside" in page
    # the local run of one config gone, the kept one is that config's judged run
    h = next(iter(local))
    (c / "store" / h / "result.json").unlink()
    assert (collect(c)["status"] == "conflict").sum() == 5


def test_the_same_results_trained_elsewhere_are_not_added_twice(tmp_path):
    lrn_runs(tmp_path / "a", [0], "lab-a")
    lrn_runs(tmp_path / "c", [0], "here")  # same metrics, other host and provenance
    res = cli("import", bundled(tmp_path / "a", tmp_path / "a.tar.gz"), "--runs", tmp_path / "c")
    assert res.exit_code == 0 and "nothing new, 3 run(s) already here" in res.output, res.output
    assert not [p for p in (tmp_path / "c" / "store").iterdir() if "@" in p.name]


def test_reimporting_a_bundle_writes_nothing(tmp_path):
    lrn_runs(tmp_path / "a", [0, 1], "lab-a")
    fabricate_all(tmp_path / "a", registry(), scale="demo", seeds=2)  # with an analysis (the ensemble's)
    out = bundled(tmp_path / "a", tmp_path / "a.tar.gz")
    assert cli("import", out, "--runs", tmp_path / "c").exit_code == 0
    before = listing(tmp_path / "c")
    res = cli("import", out, out, "--runs", tmp_path / "c")
    assert res.exit_code == 0 and "nothing new" in res.output, res.output
    assert listing(tmp_path / "c") == before and len(before) > 20


def test_a_planned_local_run_is_filled_in_and_weights_are_never_unpickled(tmp_path):
    lrn_runs(tmp_path / "a", [0], "lab-a")
    h = next(p.name for p in (tmp_path / "a" / "store").iterdir())
    marker = tmp_path / "pwned"
    # a checkpoint that runs a command if anything unpickles it
    (tmp_path / "a" / "store" / h / "checkpoint.pt").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    res = cli("bundle", "all", "--out", tmp_path / "w.tar.gz", "--runs", tmp_path / "a", "--with-weights")
    assert res.exit_code == 0, res.output
    c = tmp_path / "c" / "store" / h
    c.mkdir(parents=True)
    (c / "planned.json").write_bytes((tmp_path / "a" / "store" / h / "planned.json").read_bytes())
    res = cli("import", tmp_path / "w.tar.gz", "--runs", tmp_path / "c")
    assert res.exit_code == 0 and "filled in" in res.output, res.output
    assert (c / "checkpoint.pt").read_bytes() == (tmp_path / "a" / "store" / h / "checkpoint.pt").read_bytes()
    assert not marker.exists() and collect(tmp_path / "c")["status"].eq("done").all()


# --- hostile archives ------------------------------------------------------------------------------------------------

def members_of(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(bundle) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def write_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name: str, kind=tarfile.REGTYPE, data: bytes | None = b"{}", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info, data if kind == tarfile.REGTYPE else None


def _relisted(members, name: str, data: bytes):
    """`members` with `name`'s bytes replaced and the manifest's digest and size updated to match."""
    manifest = json.loads(next(d for m, d in members if m.name == MANIFEST))
    import hashlib
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    out = [(m, data if m.name == name else d) for m, d in members]
    return [(m, json.dumps(manifest).encode() if m.name == MANIFEST else d) for m, d in out]


def _flip(data: bytes) -> bytes:
    return data[:-2] + (b"x" if data[-2:-1] != b"x" else b"y") + data[-1:]


def _other_lr(data: bytes) -> bytes:
    record = json.loads(data)
    record["config"]["train"]["lr"] = 0.5
    return json.dumps(record).encode()


def _remanifested(members, change):
    """`members` with the manifest changed in place by `change(manifest)`."""
    manifest = json.loads(next(d for m, d in members if m.name == MANIFEST))
    change(manifest)
    return [(m, json.dumps(manifest).encode() if m.name == MANIFEST else d) for m, d in members]


def _misfiled_seed(manifest):
    manifest["runs"][0]["links"][0]["seed"] += 3


def _with_analysis(members, name: str, scale: str, data: bytes):
    """`members` plus an analysis file `name`, listed in the manifest under `scale`."""
    import hashlib

    def change(manifest):
        manifest["analyses"].append({"experiment": "ablation-lrn", "scale": scale})
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return _remanifested(members, change) + [entry(name, data=data)]


def hostile(case: str, members, h: str):
    metrics, result = f"store/{h}/metrics.jsonl", f"store/{h}/result.json"
    swap = lambda name, new: [new if m.name == name else (m, d) for m, d in members]  # noqa: E731
    data = dict((m.name, d) for m, d in members)
    return {
        "absolute": lambda: members + [entry("/tmp/evil.json")],
        "dotdot": lambda: members + [entry("store/../../evil.json")],
        "symlink": lambda: swap(metrics, entry(metrics, tarfile.SYMTYPE, linkname="/etc/passwd")),
        "hardlink": lambda: swap(metrics, entry(metrics, tarfile.LNKTYPE, linkname=result)),
        "device": lambda: members + [entry(f"store/{h}/null", tarfile.CHRTYPE)],
        "fifo": lambda: swap(metrics, entry(metrics, tarfile.FIFOTYPE)),
        "oversize": lambda: _relisted(members, metrics, data[metrics] + b"\n" * 200_000),
        "unlisted": lambda: members + [entry(f"store/{h}/notes.txt", data=b"hello")],
        "digest": lambda: [(m, _flip(d) if m.name == metrics else d) for m, d in members],
        "config-hash": lambda: _relisted(members, result, _other_lr(data[result])),
        "wrong-seed": lambda: _remanifested(members, _misfiled_seed),
        # filed as scale "zz", it says "full": it would stand in for the local full-scale analysis
        "analysis-scale": lambda: _with_analysis(members, "ablation-lrn/analysis-zz.json", "zz",
                                                 json.dumps({"scale": "full", "runs": []}).encode()),
        "not-a-tar": None,
    }[case]


REFUSALS = {"absolute": "absolute path", "dotdot": "'..' component", "symlink": "symbolic link",
            "hardlink": "hard link", "device": "device file", "fifo": "is a fifo", "oversize": "over the limit",
            "unlisted": "not listed in its bundle.json", "digest": "fails its sha256 digest",
            "config-hash": "config hashes to", "wrong-seed": "trained with train.seed",
            "analysis-scale": "not the zz-scale analysis", "not-a-tar": "not a readable .tar.gz"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_hostile_bundle_is_refused_with_one_line_and_nothing_written(tmp_path, case):
    lrn_runs(tmp_path / "a", [0], "lab-a")
    good = bundled(tmp_path / "a", tmp_path / "good.tar.gz")
    h = sorted(p.name for p in (tmp_path / "a" / "store").iterdir())[0]
    bad = tmp_path / f"{case}.tar.gz"
    make = hostile(case, members_of(good), h)
    if make is None:
        bad.write_bytes(b"\x1f\x8b not really gzip")
    else:
        write_tar(bad, make())
    local = tmp_path / "c"
    lrn_runs(local, [5], "here")
    limit = ["--max-file-size", "100K"] if case == "oversize" else []
    for runs in (local, tmp_path / "absent"):
        before = listing(runs)
        res = cli("import", good, bad, "--runs", runs, *limit)  # a good bundle first: it is not imported either
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2, res.output
        assert len(lines) == 1 and str(bad) in lines[0] and REFUSALS[case] in lines[0], res.output
        assert listing(runs) == before
    assert not (tmp_path / "absent").exists()
    assert cli("import", good, "--runs", local, *limit).exit_code == 0  # alone, the good one goes in


def test_a_bundle_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    lrn_runs(tmp_path / "a", [0], "lab-a")
    good = bundled(tmp_path / "a", tmp_path / "good.tar.gz")
    import repro.bundle_merge as bundle_merge
    real = bundle_merge.shutil.disk_usage
    monkeypatch.setattr(bundle_merge.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    res = cli("import", good, "--runs", tmp_path / "c")
    assert res.exit_code == 2 and "more than the 1,000 free there" in res.output, res.output
    assert not (tmp_path / "c").exists()
