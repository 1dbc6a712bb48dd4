"""ImageNet's real quirks: odd files convert, broken files are skipped and listed, never silently dropped."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torchvision.transforms as T
from conftest_data import make_tree, opts, read_beton
from PIL import Image

from data_prep.images import SkipImage, paper_crop, read_image
from data_prep.prepare import prepare
from data_prep.turbojpeg import decode_rgb, turbojpeg

RED = (200, 30, 40)


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def quirky_files(folder):
    """Files that must convert: CMYK JPEG, PNG named .JPEG, greyscale, 1x1, huge and very thin, palette PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (50, 40), RED).convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG", quality=95)
    Image.new("RGB", (50, 40), RED).save(folder / "png_named.JPEG", format="PNG")
    Image.new("L", (50, 40), 120).save(folder / "grey.JPEG", format="JPEG", quality=95)
    Image.new("RGB", (1, 1), RED).save(folder / "tiny.JPEG", format="JPEG", quality=95)
    Image.new("RGB", (4000, 3000), RED).save(folder / "huge.JPEG", format="JPEG", quality=80)
    Image.new("RGB", (900, 3), RED).save(folder / "thin.JPEG", format="JPEG", quality=95)
    Image.new("RGB", (30, 30), RED).convert("P").save(folder / "palette.JPEG", format="PNG")


def broken_files(folder):
    """Files that must be skipped and listed, each with the reason expected in the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (folder / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "text.JPEG").write_text("<html>404 Not Found</html>")
    (folder / "empty.JPEG").write_bytes(b"")
    os.symlink("moved_away.JPEG", folder / "dangling.JPEG")
    return {"truncated.JPEG": "truncated image", "text.JPEG": "not an image (unknown format)",
            "empty.JPEG": "empty file", "dangling.JPEG": "unreadable"}


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quirky")
    quirky_files(folder)
    return folder


@pytest.mark.parametrize("name, colour", [("cmyk.JPEG", RED), ("png_named.JPEG", RED), ("grey.JPEG", (120,) * 3),
                                          ("tiny.JPEG", RED), ("huge.JPEG", RED), ("thin.JPEG", RED),
                                          ("palette.JPEG", RED)])
def test_quirky_files_convert_to_rgb(quirky, name, colour):
    out = paper_crop(read_image(str(quirky / name), 32), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.reshape(-1, 3).mean(0) - colour).max() < 6  # CMYK round trip and JPEG cost a few levels


def test_broken_files_raise_skip_with_reason(tmp_path):
    for name, reason in broken_files(tmp_path).items():
        with pytest.raises(SkipImage, match=reason.split(" (")[0]):
            read_image(str(tmp_path / name), 32)


def test_paper_crop_matches_torchvision(tmp_path):
    """Shorter side to res, centre crop: torchvision's Resize(res) + CenterCrop(res) on the same image as PIL
    (PIL's bilinear) agrees to within one level on under 1% of the pixels (torch's uint8 kernel rounds apart)."""
    rng = np.random.default_rng(1)
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32)])
    for w, h in [(200, 100), (96, 160), (64, 64), (10, 20)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out, ref = paper_crop(img, 32).astype(int), np.asarray(tf(Image.fromarray(img))).astype(int)
        assert out.shape == ref.shape == (32, 32, 3)
        assert np.abs(out - ref).max() <= 1 and (out != ref).mean() < 0.01


def test_quirks_and_broken_files_in_one_run(tmp_path):
    make_tree(tmp_path / "d" / "train", ["a", "b"], per_class=2)
    quirky_files(tmp_path / "d" / "train" / "a")
    reasons = broken_files(tmp_path / "d" / "train" / "b")
    make_tree(tmp_path / "d" / "val", ["a", "b"], per_class=1)
    summary = prepare("imagefolder", tmp_path / "d", tmp_path / "out", opts(res=40), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {os.path.basename(s["path"]): s["reason"] for s in m["skipped"]}
    assert skipped == reasons
    assert all(s["split"] == "train" for s in m["skipped"])
    assert m["splits"]["train"]["per_class"] == [2 + 7, 2] and m["splits"]["train"]["count"] == 11
    assert "skipped 4" in summary and "manifest.json" in summary
    images, labels = read_beton(tmp_path / "out" / "train.beton")
    assert len(images) == 11 and sorted(labels.tolist()) == [0] * 9 + [1] * 2
    assert all(im.shape == (40, 40, 3) for im in images)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_unreadable_file_is_skipped_and_listed(tmp_path, monkeypatch):
    make_tree(tmp_path / "d" / "train", ["a"], per_class=3)
    make_tree(tmp_path / "d" / "val", ["a"], per_class=1)
    locked = tmp_path / "d" / "train" / "a" / "a_1.JPEG"
    if os.geteuid() == 0:  # root reads any file: make this one refuse the way a chmod 000 file does
        real_open = open

        def refusing_open(path, *args, **kw):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kw)

        monkeypatch.setattr("builtins.open", refusing_open)
    else:
        locked.chmod(0)
    summary = prepare("imagefolder", tmp_path / "d", tmp_path / "out", opts(res=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["skipped"] == [{"path": str(locked), "split": "train", "reason": "unreadable: permission denied"}]
    assert m["splits"]["train"]["count"] == 2 and "skipped 1" in summary


@pytest.mark.skipif(turbojpeg()[0] is None, reason="libturbojpeg is not installed")
def test_turbojpeg_decodes_as_pil_and_recovers_after_a_broken_file(tmp_path):
    """The same pixels as PIL (draft included) for RGB and grey JPEGs; a truncated file gives None, and the
    decoder still works afterwards (libjpeg-turbo 2.0 otherwise returns 0 x 0 for the next file)."""
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120))
    cases = {"rgb": (jpeg_bytes(photo), 0), "small": (jpeg_bytes(photo), 50),
             "grey": (jpeg_bytes(photo.convert("L")), 0)}
    for name, (data, res) in cases.items():
        im = Image.open(io.BytesIO(data))
        if res:
            im.draft("RGB", (res, res))
        ref = np.asarray(im.convert("RGB"))
        assert decode_rgb(np.frombuffer(data[: len(data) // 2], np.uint8)) is None
        out = decode_rgb(np.frombuffer(data, np.uint8), min_side=res)
        assert out.shape == ref.shape and np.abs(out.astype(int) - ref).max() <= 1, name
    assert decode_rgb(np.frombuffer(cases["small"][0], np.uint8), min_side=50).shape == (60, 80, 3)
