"""Every command a message suggests parses on the real command line, and the data hints make the folder asked for;
`repro run --dry-run` plans without the data, from the scale's nominal sizes, and prints no made-up hash."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from repro.cli import app
from repro.data import read_manifest
from repro.errors import UserError
from repro.hints import prepare_command, scale_sources
from repro.scales import load_scales

REPO = Path(__file__).resolve().parent.parent
SUGGESTED = re.compile(r"`(repro [^`]+)`")


def parse(line: str, placeholder: Path) -> None:
    """Parse `line` as the shell would pass it to `repro`, `...` replaced by a real folder: options, choices, types."""
    args = shlex.split(line.replace("...", str(placeholder)))
    assert args[0] == "repro", line
    group = typer.main.get_command(app)
    with group.make_context("repro", args[1:2]) as ctx:
        sub = group.get_command(ctx, args[1])
        assert sub is not None, f"{line}: no command {args[1]!r}"
        sub.make_context(args[1], args[2:], parent=ctx).close()


def _suggested(text: str) -> list[str]:
    return SUGGESTED.findall(" ".join(text.split()))


# Run in a fresh interpreter: late in a long test run, CPython 3.11's ast.parse can fail with "AST constructor
# recursion depth mismatch" (it did, here and in the layout test).
MESSAGE_STRINGS = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    tree = ast.parse(open(path).read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    out[path] = [("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                  if isinstance(node, ast.JoinedStr) else node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                        and id(node) not in docstrings)]
print(json.dumps(out))
"""


def message_strings(paths: list[Path]) -> dict[str, list[str]]:
    """Each module's string literals that are not docstrings (f-strings with `{}` where values go)."""
    out = subprocess.run([sys.executable, "-c", MESSAGE_STRINGS, *map(str, paths)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_command_written_in_the_code_parses(tmp_path):
    """Messages and help texts: a bare `repro <command>` names a command; one with arguments parses."""
    group = typer.main.get_command(app)
    found = []
    paths = [*REPO.glob("repro/**/*.py"), *REPO.glob("data_prep/**/*.py")]
    for texts in message_strings(paths).values():
        for text in texts:
            found += [c for c in _suggested(text) if "{" not in c]  # the built ones are tested below
    assert len(found) >= 8
    for line in found:
        args = line.split()
        if args[1:] == ["--help"]:
            continue
        assert args[1] in group.commands, line
        if len(args) > 2:
            parse(line, tmp_path)


def test_each_scale_hint_parses_and_subset_names_the_real_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the hints read a prepared folder's manifest: none of the scales' folders here
    sources = scale_sources()
    assert set(sources) == set(load_scales())
    for scale, (data, _) in sources.items():
        parse(prepare_command(data), tmp_path)
    assert prepare_command("data/imagenet-100") == \
        "repro prepare-data imagenet --root ... --classes 100 --res 128 --out data/imagenet-100"
    assert prepare_command("data/fashion-mnist") == "repro prepare-data fashion-mnist --out data/fashion-mnist"
    assert prepare_command(tmp_path / "cifar10").startswith("repro prepare-data cifar10 --root ... --out ")
    assert prepare_command(tmp_path / "my photos").endswith(f"--out '{tmp_path / 'my photos'}'")


def _hint_of(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    commands = _suggested(str(e.value))
    assert len(commands) == 1, str(e.value)
    return commands[0]


def test_data_errors_suggest_a_command_that_rebuilds_the_folder(synthetic_data, tmp_path, monkeypatch):
    data = shutil.copytree(synthetic_data, tmp_path / "copy")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "val.beton").write_bytes(b"short")
    hint = _hint_of(lambda: read_manifest(data))
    assert hint.endswith(f"--out {data} --force") and "synthetic" in hint
    parse(hint, tmp_path)
    # pasted, it makes the folder again with the settings it had
    res = CliRunner().invoke(app, shlex.split(hint)[1:] + ["--quiet", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rebuilt = json.loads((data / "manifest.json").read_text())
    # same settings and images (the betons' bytes, and so the hash, depend on the writer's worker count)
    assert rebuilt["settings"] == manifest["settings"] and rebuilt["classes"] == manifest["classes"]
    assert {k: v["count"] for k, v in rebuilt["splits"].items()} == {k: v["count"] for k, v in manifest["splits"].items()}

    (data / "manifest.json").write_text("{not json")
    parse(_hint_of(lambda: read_manifest(data)), tmp_path)
    parse(_hint_of(lambda: read_manifest(tmp_path / "missing")), tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "baseline", "--scale", "subset"])
    assert res.exit_code == 2
    hint = _suggested(res.output)[0]
    assert hint.startswith("repro prepare-data imagenet --root ... --classes 100 --res 128 --out ")
    parse(hint, tmp_path)


def test_imagenet_manifest_gives_its_root_and_settings(tmp_path):
    manifest = {"source": "imagenet", "root": "/datasets/ILSVRC 2012",
                "settings": {"res": 128, "max_side": True, "classes": "100", "train_per_class": None,
                             "val_per_class": 50, "jpeg_quality": 90, "write_mode": "jpg", "seed": 0}}
    cmd = prepare_command(tmp_path / "x", manifest, force=True)
    assert cmd == (f"repro prepare-data imagenet --root '/datasets/ILSVRC 2012' --res 128 --classes 100 "
                   f"--val-per-class 50 --write-mode jpg --max-side --out {tmp_path / 'x'} --force")
    parse(cmd, tmp_path)


@pytest.mark.parametrize("recorded", ["/lists/my classes.txt", "ids.txt"])  # --class-list; an old --classes FILE
def test_manifest_with_a_class_file_gives_class_list(tmp_path, recorded):
    manifest = {"source": "imagenet", "root": "/datasets/ilsvrc",
                "settings": {"res": 128, "max_side": False, "classes": recorded, "train_per_class": None,
                             "val_per_class": None, "jpeg_quality": 90, "write_mode": "jpg", "seed": 0}}
    cmd = prepare_command(tmp_path / "x", manifest)
    assert f" --class-list {shlex.quote(recorded)} " in cmd and "--classes" not in cmd
    parse(cmd, tmp_path)


def test_class_list_and_seeded_classes_rebuild_from_their_hints(tmp_path):
    """The hint from a real manifest, pasted, keeps the same classes: a file's, and a seeded sample's."""
    from conftest_data import make_fashion

    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    (tmp_path / "ids.txt").write_text("7\n2\n")
    for name, args in (("file", ["--class-list", str(tmp_path / "ids.txt")]),
                       ("sample", ["--classes", "4", "--seed", "3"])):
        out = tmp_path / name
        first = CliRunner().invoke(app, ["prepare-data", "fashion-mnist", "--root", str(tmp_path / "fm"), "--out",
                                         str(out), *args, "--quiet", "--workers", "1"])
        assert first.exit_code == 0, first.output
        made = json.loads((out / "manifest.json").read_text())
        hint = prepare_command(out, force=True)
        parse(hint, tmp_path)
        res = CliRunner().invoke(app, shlex.split(hint)[1:] + ["--quiet", "--workers", "1"])
        assert res.exit_code == 0 and "up to date" not in res.output, res.output
        assert json.loads((out / "manifest.json").read_text())["classes"] == made["classes"]


def test_dry_run_without_data_plans_from_nominal_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "ablation-lrn", "--scale", "subset", "--dry-run", "--format", "plain"])
    assert res.exit_code == 0, res.output
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    assert lines[0] == ["experiment", "variant", "seed", "hash", "status", "images", "est_time"]
    # 126,689 nominal training images x 40 epochs per run; no hash, since a run's hash covers the data
    assert [row[3:6] for row in lines[1:]] == [["", "no data", "5,067,560"]] * 9  # 3 variants x 3 seeds
    assert "nominal dataset sizes (126,689 training images, 100 classes)" in " ".join(res.stderr.split())
    hint = _suggested(res.stderr)[0]
    assert hint == "repro prepare-data imagenet --root ... --classes 100 --res 128 --out data/imagenet-100"
    table = CliRunner().invoke(app, ["run", "ablation-lrn", "--scale", "full", "--dry-run"])
    assert table.exit_code == 0 and "after data" in table.stdout
    assert not re.search(r"\b[0-9a-f]{12}\b", table.stdout)  # no hash printed that a later run would not have
    assert "1,281,167 training images, 1000 classes" in " ".join(table.stdout.split())
    assert not (tmp_path / "runs").exists()  # nothing recorded under a hash that is not the run's
