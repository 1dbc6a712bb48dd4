"""Bad input to `repro prepare-data`: one line naming the culprit, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
from conftest_data import make_cifar, make_fashion, make_imagenet, make_tree
from typer.testing import CliRunner

from repro.cli import app


def run(*args):
    result = CliRunner().invoke(app, ["prepare-data", *map(str, args), "--quiet", "--workers", "1"])
    return result


def assert_refused(result, *words, out=None):
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text and text.startswith("error:")
    for w in words:
        assert str(w) in text, text
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


class Payload:
    """Unpickling this calls os.system, creating the marker file, if the loader ever executes code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_missing_root(tmp_path):
    assert_refused(run("imagenet", "--root", tmp_path / "nope", "--out", tmp_path / "out"),
                   tmp_path / "nope", "--root", out=tmp_path / "out")


def test_root_needed(tmp_path):
    assert_refused(run("cifar10", "--out", tmp_path / "out"), "--root", out=tmp_path / "out")


def test_wrong_layout_no_train_folder(tmp_path):
    make_tree(tmp_path / "d" / "validation", ["a"], 1)
    assert_refused(run("imagefolder", "--root", tmp_path / "d", "--out", tmp_path / "out"),
                   "train/", out=tmp_path / "out")


def test_wrong_layout_fashion_mnist_files_missing(tmp_path):
    (tmp_path / "fm").mkdir()
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "train-images-idx3-ubyte.gz", out=tmp_path / "out")


def test_idx_with_wrong_magic(tmp_path):
    make_fashion(tmp_path / "fm")
    import gzip

    with gzip.open(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + bytes(20))
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "t10k-labels-idx1-ubyte.gz", "magic", out=tmp_path / "out")


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path / "d" / "train", ["a", "b"], 1)
    make_tree(tmp_path / "d" / "val", ["a", "b"], 1)
    (tmp_path / "d" / "train" / "c").mkdir()
    assert_refused(run("imagefolder", "--root", tmp_path / "d", "--out", tmp_path / "out"),
                   tmp_path / "d" / "train" / "c", "empty", out=tmp_path / "out")


@pytest.mark.parametrize("change", ["too few", "too many"])
def test_devkit_ground_truth_line_count(tmp_path, change):
    make_imagenet(tmp_path / "in", ["n01", "n02"], per_class=1, val="devkit")
    gt = tmp_path / "in" / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    lines = gt.read_text().splitlines()
    gt.write_text("\n".join(lines[:-1] if change == "too few" else lines + lines[:1]) + "\n")
    assert_refused(run("imagenet", "--root", tmp_path / "in", "--out", tmp_path / "out"),
                   gt, f"{len(lines) + (-1 if change == 'too few' else 1)} labels", out=tmp_path / "out")


@pytest.mark.parametrize("change", ["missing row", "extra row"])
def test_kaggle_csv_mismatch(tmp_path, change):
    make_imagenet(tmp_path / "in", ["n01", "n02"], per_class=1, val="kaggle")
    csv = tmp_path / "in" / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines = lines[:-1] if change == "missing row" else lines + ["ILSVRC2012_val_00000099,n01 1 2 3 4"]
    csv.write_text("\n".join(lines) + "\n")
    assert_refused(run("imagenet", "--root", tmp_path / "in", "--out", tmp_path / "out"), csv, out=tmp_path / "out")


def test_flat_val_without_labels(tmp_path):
    make_imagenet(tmp_path / "in", ["n01", "n02"], per_class=1, val="kaggle")
    (tmp_path / "in" / "LOC_val_solution.csv").unlink()
    assert_refused(run("imagenet", "--root", tmp_path / "in", "--out", tmp_path / "out"),
                   "meta.mat", out=tmp_path / "out")


def test_output_under_a_file(tmp_path):
    make_fashion(tmp_path / "fm")
    (tmp_path / "file").write_text("x")
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "file" / "out"),
                   tmp_path / "file" / "out", "--out")


def test_read_only_output(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fm")

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("data_prep.prepare.tempfile.mkstemp", read_only)
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "Read-only file system", tmp_path / "out", out=tmp_path / "out")


def test_full_disk(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fm")
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")(10**9, 10**9 - 1000, 1000)  # 1 kB left
    monkeypatch.setattr("data_prep.prepare.shutil.disk_usage", lambda path: usage)
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "not enough space", out=tmp_path / "out")


def test_disk_full_while_writing(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fm")
    import data_prep.writer as writer

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_split", no_space)
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "No space left on device")
    assert not (tmp_path / "out").exists()  # the folder this run created is gone again


@pytest.mark.parametrize("where", ["file", "folder"])
def test_symlink_loop(tmp_path, where):
    make_tree(tmp_path / "d" / "train", ["a"], 1)
    make_tree(tmp_path / "d" / "val", ["a"], 1)
    link = tmp_path / "d" / "train" / ("a/loop.JPEG" if where == "file" else "loop")
    os.symlink(link.name, link)  # points at itself
    assert_refused(run("imagefolder", "--root", tmp_path / "d", "--out", tmp_path / "out"),
                   link, "symlink loop", out=tmp_path / "out")


def test_cifar_payload_is_refused_without_running(tmp_path):
    make_cifar(tmp_path / "c", per_batch=2)
    marker = tmp_path / "owned"
    (tmp_path / "c" / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(marker)}, protocol=3))
    assert_refused(run("cifar10", "--root", tmp_path / "c", "--out", tmp_path / "out"),
                   "data_batch_3", "system", out=tmp_path / "out")
    assert not marker.exists()
    # the payload is real: plain pickle would have run it
    pickle.loads((tmp_path / "c" / "data_batch_3").read_bytes())
    assert marker.exists()


def test_cifar_garbage_batch(tmp_path):
    make_cifar(tmp_path / "c", per_batch=2)
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle at all")
    assert_refused(run("cifar10", "--root", tmp_path / "c", "--out", tmp_path / "out"), "test_batch",
                   out=tmp_path / "out")


@pytest.mark.parametrize("args, words", [
    (["--classes", "11"], ["10 classes"]),
    (["--classes", "0"], ["--classes 0", "at least 1"]),
    # the file form --classes had before --class-list existed: the error names the option to use
    (["--classes", "{tmp}/ids.txt"], ["--classes", "expected a number", "--class-list {tmp}/ids.txt"]),
    (["--class-list", "{tmp}/missing.txt"], ["--class-list {tmp}/missing.txt", "one class id per line"]),
    (["--class-list", "{tmp}/ids.txt"], ["--class-list", "'shirt'"]),
    (["--class-list", "{tmp}/twice.txt"], ["--class-list", "'3'", "twice"]),
    (["--class-list", "{tmp}/empty.txt"], ["--class-list", "no class ids"]),
    (["--classes", "2", "--class-list", "{tmp}/ids.txt"], ["--classes 2", "--class-list", "one of them"]),
])
def test_bad_classes_option(tmp_path, args, words):
    make_fashion(tmp_path / "fm")
    (tmp_path / "ids.txt").write_text("0\nshirt\n")
    (tmp_path / "twice.txt").write_text("3\n1\n3\n")
    (tmp_path / "empty.txt").write_text("# nothing here\n")
    args, words = [a.format(tmp=tmp_path) for a in args], [w.format(tmp=tmp_path) for w in words]
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out", *args),
                   *words, out=tmp_path / "out")


def test_class_list_on_synthetic_is_refused(tmp_path):
    (tmp_path / "ids.txt").write_text("0\n1\n")
    assert_refused(run("synthetic", "--out", tmp_path / "out", "--class-list", tmp_path / "ids.txt"),
                   "--class-list", "--classes N", out=tmp_path / "out")


def test_worker_that_dies_fails_cleanly_instead_of_hanging(tmp_path, monkeypatch):
    make_fashion(tmp_path / "fm")
    import data_prep.writer as writer

    def die(self, i):
        os._exit(3)  # what a worker killed by the OOM killer or a full disk looks like to the parent

    monkeypatch.setattr(writer.SplitDataset, "__getitem__", die)
    assert_refused(run("fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "out"),
                   "worker process died", "exit code 3")
    assert not (tmp_path / "out").exists()


def test_broken_files_are_listed_not_fatal(tmp_path):
    """Truncated, text-named-.JPEG and zero-byte files: exit 0, counted in the summary, listed in the manifest."""
    from conftest_data import class_image

    make_tree(tmp_path / "d" / "train", ["a"], 2)
    make_tree(tmp_path / "d" / "val", ["a"], 1)
    folder = tmp_path / "d" / "train" / "a"
    good = (folder / "a_0.JPEG").read_bytes()
    (folder / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "page.JPEG").write_text("<html>not found</html>")
    (folder / "zero.JPEG").write_bytes(b"")
    class_image(0).save(folder / "fine.JPEG")
    result = run("imagefolder", "--root", tmp_path / "d", "--out", tmp_path / "out", "--res", "16")
    assert result.exit_code == 0, result.output
    assert "skipped 3" in result.output and "Traceback" not in result.output
    import json

    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(os.path.basename(s["path"]) for s in m["skipped"]) == ["cut.JPEG", "page.JPEG", "zero.JPEG"]
    assert m["splits"]["train"]["count"] == 3
