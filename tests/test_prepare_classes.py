"""Which classes `repro prepare-data` keeps: CMC's ImageNet-100 for `--classes 100` on WNID sources, a seeded sample
for other counts, a file's ids for `--class-list`; and the manifest's record of the choice."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest_data import FM_NAMES, make_fashion, make_imagenet, opts, read_beton
from typer.testing import CliRunner

from data_prep.classes import IMAGENET100, imagenet100
from data_prep.prepare import prepare
from repro.cli import app

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "data_prep" / "class_lists" / "imagenet100-cmc.txt"
# sha256 of HobbitLong/CMC's imagenet100.txt (commit bc687a26de7ae350d98f671d25d164b65336b8c2): one WNID a line
CMC_SHA256 = "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"
# ILSVRC-2012 classes that are not in CMC's list; the first three are the first three WNIDs in sorted order
OTHERS = ["n01440764", "n01443537", "n01484850", "n15075141"]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def cli(*args):
    return CliRunner().invoke(app, ["prepare-data", *map(str, args), "--quiet", "--workers", "1"])


@pytest.fixture(scope="module")
def wnid_trees(tmp_path_factory):
    """train/<wnid>/ and val/<wnid>/ trees: `full` holds CMC's 100 classes and 4 others; `partial` lacks one of
    CMC's classes (links to the full tree's folders)."""
    tmp = tmp_path_factory.mktemp("wnids")
    make_imagenet(tmp / "full", sorted(imagenet100()) + OTHERS, per_class=1, val="folders")
    missing = sorted(imagenet100())[7]
    for split in ("train", "val"):
        (tmp / "partial" / split).mkdir(parents=True)
        for folder in (tmp / "full" / split).iterdir():
            if folder.name != missing:
                os.symlink(folder, tmp / "partial" / split / folder.name)
    return tmp / "full", tmp / "partial", missing


def test_shipped_list_is_cmcs_imagenet100_and_is_package_data():
    ids = imagenet100()
    assert len(ids) == len(set(ids)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in ids)
    assert not set(OTHERS) & set(ids)
    assert hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest() == CMC_SHA256
    header = " ".join(line for line in LIST.read_text().splitlines() if line.startswith("#"))
    assert "HobbitLong/CMC" in header and "imagenet100.txt" in header
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["data_prep"]
    assert any(fnmatch(str(LIST.relative_to(REPO / "data_prep")), g) for g in globs)  # an installed package has it


def test_classes_100_on_imagenet_keeps_cmcs_list(wnid_trees, tmp_path):
    full, _, _ = wnid_trees
    result = cli("imagenet", "--root", full, "--out", tmp_path / "out", "--classes", "100", "--res", "8")
    assert result.exit_code == 0, result.output
    m = manifest(tmp_path / "out")
    assert m["classes"]["ids"] == sorted(imagenet100())  # labels in sorted WNID order, as ImageFolder gives them
    assert m["classes"]["chosen_by"] == IMAGENET100
    assert m["splits"]["train"]["per_class"] == [1] * 100 and m["splits"]["val"]["per_class"] == [2] * 100
    assert m["settings"]["classes"] == "100"


@pytest.mark.parametrize("tree, want", [("full", "cmc"), ("partial", "sample")])
def test_classes_100_on_imagefolder_keeps_cmcs_list_only_when_all_are_there(wnid_trees, tmp_path, tree, want):
    full, partial, missing = wnid_trees
    root = full if tree == "full" else partial
    prepare("imagefolder", root, tmp_path / "out", opts(classes="100", res=8), progress=False)
    m = manifest(tmp_path / "out")
    if want == "cmc":
        assert m["classes"]["ids"] == sorted(imagenet100()) and m["classes"]["chosen_by"] == IMAGENET100
    else:
        assert len(m["classes"]["ids"]) == 100 and m["classes"]["ids"] == sorted(m["classes"]["ids"])
        assert m["classes"]["chosen_by"] == "seeded random sample of 100 of 103 classes (seed 0)"
        assert missing not in m["classes"]["ids"]


def test_classes_100_on_imagenet_without_all_of_cmcs_classes_is_refused(wnid_trees, tmp_path):
    _, partial, missing = wnid_trees
    result = cli("imagenet", "--root", partial, "--out", tmp_path / "out", "--classes", "100", "--res", "8")
    text = result.output.strip()
    assert result.exit_code == 2 and len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert "ImageNet-100" in text and missing in text and "--class-list" in text
    assert not (tmp_path / "out").exists()


def test_classes_n_is_a_seeded_sample_in_class_order(tmp_path):
    data = make_fashion(tmp_path / "fm", n_train=30, n_val=10)
    picked = {}
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        prepare("fashion-mnist", tmp_path / "fm", out, opts(classes="3", seed=seed), progress=False)
        m = manifest(out)
        ids = m["classes"]["ids"]
        assert len(ids) == 3 and ids == sorted(ids, key=int)
        assert m["classes"]["names"] == [FM_NAMES[int(i)] for i in ids]
        assert m["classes"]["chosen_by"] == f"seeded random sample of 3 of 10 classes (seed {seed})"
        assert m["splits"]["train"]["per_class"] == [3, 3, 3]
        picked[seed] = ids
        # label j is class ids[j]: each stored image is one of that class's source images
        images, labels = read_beton(out / "train.beton")
        source = {(int(lab), im.tobytes()) for im, lab in zip(*data["train"])}
        assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all((int(ids[lab]), im[..., 0].tobytes()) in source for im, lab in zip(images, labels))
    assert len({tuple(ids) for ids in picked.values()}) > 1  # the seed decides
    assert all(ids != ["0", "1", "2"] for ids in picked.values())  # not the first three
    prepare("fashion-mnist", tmp_path / "fm", tmp_path / "again", opts(classes="3", seed=1), progress=False)
    assert manifest(tmp_path / "again")["classes"]["ids"] == picked[1]  # and the same seed, the same classes


def test_class_list_keeps_the_files_classes_in_its_order(tmp_path):
    make_fashion(tmp_path / "fm", n_train=30, n_val=10)
    (tmp_path / "ids.txt").write_text("# boots and bags\n9\n8   bag\n\n3\n")
    result = cli("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out",
                 "--class-list", tmp_path / "ids.txt")
    assert result.exit_code == 0, result.output
    m = manifest(tmp_path / "out")
    assert m["classes"]["ids"] == ["9", "8", "3"] and m["classes"]["names"] == [FM_NAMES[i] for i in (9, 8, 3)]
    assert m["classes"]["chosen_by"] == f"file {tmp_path / 'ids.txt'}"
    assert m["settings"]["classes"] == str(tmp_path / "ids.txt")


def test_no_classes_option_keeps_all(tmp_path):
    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    prepare("fashion-mnist", tmp_path / "fm", tmp_path / "out", opts(), progress=False)
    m = manifest(tmp_path / "out")
    assert m["classes"]["ids"] == [str(i) for i in range(10)] and m["classes"]["chosen_by"] == "all"


def test_folder_from_the_first_n_rule_is_not_up_to_date(tmp_path):
    """A manifest without `chosen_by` was written when --classes N kept the first N ids: same settings, yet
    other classes than the rule now keeps, so it is rebuilt."""
    make_fashion(tmp_path / "fm", n_train=20, n_val=10)
    out, o = tmp_path / "out", opts(classes="3", seed=4)
    prepare("fashion-mnist", tmp_path / "fm", out, o, progress=False)
    assert "up to date" in prepare("fashion-mnist", tmp_path / "fm", out, o, progress=False)
    old = manifest(out)
    del old["classes"]["chosen_by"]
    old["classes"]["ids"] = ["0", "1", "2"]
    (out / "manifest.json").write_text(json.dumps(old))
    assert "up to date" not in prepare("fashion-mnist", tmp_path / "fm", out, o, progress=False)
    assert manifest(out)["classes"]["chosen_by"].startswith("seeded random sample of 3")
    # another seed draws other classes: not up to date either
    assert "up to date" not in prepare("fashion-mnist", tmp_path / "fm", out, opts(classes="3", seed=5),
                                       progress=False)
