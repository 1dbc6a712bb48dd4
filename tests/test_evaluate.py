"""`repro evaluate`: torchvision's AlexNet weights scored through the harness's loaders and `evaluate` give what
torchvision's own model computes on the same crops with torchvision's preprocessing; our checkpoints score with
their run's preprocessing; any other file, and data with another class count, are refused in one line.

The data: 8 synthetic classes stored at 112 px, scored on a 98 px centre crop (112 x 224/256, as 224 of 256).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import AlexNet_Weights
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from conftest_data import opts
from data_prep.prepare import prepare
from repro.cli import app
from repro.config import apply_overrides, RunConfig, config_hash, to_dict
from repro.data.beton import BetonReader
from repro.engine import checkpoint
from repro.engine.weights import torchvision_crop
from repro.errors import UserError
from repro.models import build_model, default_config

CLASSES, STORED, CROP = 8, 112, 98
PRESET = AlexNet_Weights.IMAGENET1K_V1.transforms  # torchvision's own eval transform (nothing is downloaded)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "syn112"
    prepare("synthetic", None, out, opts(res=STORED, classes=str(CLASSES), train_per_class=4, val_per_class=2),
            progress=False)
    return out


def split(data: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored image (uint8 N, 3, 112, 112) and label of a split, read with the harness's beton reader."""
    reader = BetonReader(data / f"{name}.beton")
    return torch.stack([reader.image(i) for i in range(len(reader))]), torch.from_numpy(reader.labels)


@pytest.fixture(scope="module")
def tv_weights(data, tmp_path_factory) -> Path:
    """torchvision's AlexNet, random features, fc8 set to the training images' class means of fc7 (so the scores
    are far from chance and depend on the preprocessing), saved as a plain state dict."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None, num_classes=CLASSES).eval()
    images, labels = split(data, "train")
    with torch.no_grad():
        x = PRESET(crop_size=CROP, resize_size=STORED)(images)
        fc7 = model.classifier[:6](torch.flatten(model.avgpool(model.features(x)), 1))
        means = torch.stack([fc7[labels == k].mean(0) for k in range(CLASSES)])
        model.classifier[6].weight.copy_(F.normalize(means, dim=1) * 10)
        model.classifier[6].bias.zero_()
    path = tmp_path_factory.mktemp("weights") / "alexnet-test.pth"
    torch.save(model.state_dict(), path)
    return path


def topk(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = scores.topk(5, dim=1).indices
    return (100.0 * (top[:, 0] != labels).float().mean().item(),
            100.0 * (1 - (top == labels[:, None]).any(1).float().mean().item()))


@torch.no_grad()
def torchvision_reference(weights: Path, data: Path, mean=None, std=None) -> dict[str, float]:
    """torchvision's model on torchvision's own eval transform (Resize(112) of the 112 px image, CenterCrop(98), to
    0..1, its mean/std), and on ten_crop of the same images; `mean`, `std` replace its normalisation."""
    model = torchvision.models.alexnet(weights=None, num_classes=CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    preset = PRESET(crop_size=CROP, resize_size=STORED)
    images, labels = split(data, "val")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mean or preset.mean, std or preset.std)

    centre = model(preset(images) if mean is None else normalise(TF.center_crop(images, [CROP, CROP])))
    views = TF.ten_crop(TF.resize(images, [STORED], antialias=True), [CROP, CROP])
    averaged = torch.stack([F.softmax(model(normalise(v)), dim=1) for v in views]).mean(0)
    (top1, top5), (top1_10, top5_10) = topk(centre, labels), topk(averaged, labels)
    return {"top1_err": top1, "top5_err": top5, "loss": F.cross_entropy(centre, labels).item(),
            "top1_err_10crop": top1_10, "top5_err_10crop": top5_10}


def run_cli(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args, "--backend", "torch", "--device", "cpu", "-q"])


def test_the_registry_model_is_torchvisions_alexnet_key_for_key():
    """alexnet-owt (one tower, no LRN) has torchvision's keys and shapes, so its state dict loads as it is, and
    computes what torchvision's model computes at 224 and at the test's 98 px crop."""
    ours = build_model(default_config("alexnet-owt", num_classes=CLASSES)).eval()
    theirs = torchvision.models.alexnet(weights=None, num_classes=CLASSES).eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for size in (224, CROP):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
        # 112 px: ours pools 6 px maps to 3 (ceil rule), torchvision's to 2; that is why such crops are refused
        x = torch.randn(2, 3, 112, 112)
        assert not torch.allclose(ours(x), theirs(x), rtol=1e-3, atol=1e-4)


def test_torchvision_crop_is_224_of_256_and_refuses_where_the_pools_disagree():
    assert torchvision_crop(256) == 224 and torchvision_crop(STORED) == CROP
    with pytest.raises(UserError, match="112 px crop.*pool 6 px maps"):
        torchvision_crop(128)
    with pytest.raises(UserError, match="too small"):
        torchvision_crop(64)


def test_torchvision_weights_score_as_torchvision_computes_them(data, tv_weights, tmp_path):
    out = tmp_path / "result.json"
    res = run_cli("--weights", str(tv_weights), "--data", str(data), "--out", str(out))
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert (result["kind"], result["crop_px"], result["stored_px"], result["images"]) == \
        ("torchvision", CROP, STORED, CLASSES * 2)
    got, want = result["metrics"], torchvision_reference(tv_weights, data)
    for key in ("top1_err", "top5_err", "top1_err_10crop", "top5_err_10crop"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["top1_acc"] == pytest.approx(100 - want["top1_err"]) and want["top1_err"] < 50  # far from chance
    assert "centre crop" in res.stdout and "ten crops" in res.stdout and f"{got['top1_acc']:.3f}" in res.stdout
    # the comparison can tell preprocessing apart: pixels on 0..1 minus 0.5 score otherwise
    wrong = torchvision_reference(tv_weights, data, mean=[0.5] * 3, std=[0.5] * 3)
    assert wrong["loss"] != pytest.approx(want["loss"], rel=1e-3)
    assert (wrong["top1_err"], wrong["top5_err"], wrong["top1_err_10crop"]) != \
        (want["top1_err"], want["top5_err"], want["top1_err_10crop"])


def make_run(data: Path, folder: Path) -> tuple[Path, torch.nn.Module, RunConfig]:
    """A run folder as the engine leaves it: config.json and a checkpoint, of a small alexnet-owt at 98 px."""
    manifest = json.loads((data / "manifest.json").read_text())
    cfg = apply_overrides(RunConfig(), {"model.name": "alexnet-owt", "model.towers": "one-full", "model.lrn": False,
                                        "model.width": 0.25, "model.input_size": CROP, "model.num_classes": CLASSES,
                                        "model.init": "kaiming", "data.dir": str(data),
                                        "data.manifest_hash": manifest["hash"]})
    torch.manual_seed(2)
    model = build_model(cfg.model).eval()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": to_dict(cfg), "config_hash": config_hash(cfg)}))
    checkpoint.save(folder, {"model": model.state_dict(), "epoch": 3})
    return folder, model, cfg


@torch.no_grad()
def test_our_run_scores_with_its_own_preprocessing(data, tmp_path):
    """The run's normalisation (the paper's mean image, cut as the centre crop) and its input size."""
    run, model, cfg = make_run(data, tmp_path / "runs" / "store" / "abc")
    assert cfg.data.normalize == "mean-image"
    res = run_cli("--weights", str(run), "--out", str(tmp_path / "run.json"), "--no-ten-crop")  # --data: the run's
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "run.json").read_text())
    images, labels = split(data, "val")
    mean_image = torch.from_numpy(np.load(data / "mean_image.npy")).permute(2, 0, 1)
    logits = model(TF.center_crop(images.float() - mean_image, [CROP, CROP]))
    top1, top5 = topk(logits, labels)
    assert (got["kind"], got["normalize"], got["crop_px"]) == ("run", "mean-image", CROP)
    assert got["metrics"]["top1_err"] == pytest.approx(top1) and got["metrics"]["top5_err"] == pytest.approx(top5)
    assert got["metrics"]["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    channel_mean = torch.tensor(json.loads((data / "manifest.json").read_text())["mean"]).view(1, 3, 1, 1)
    other = model(TF.center_crop(images.float() - channel_mean, [CROP, CROP]))  # a per-channel mean scores otherwise
    assert F.cross_entropy(other, labels).item() != pytest.approx(got["metrics"]["loss"], rel=1e-3)
    # the checkpoint file itself, beside its config.json, is the same run
    res = run_cli("--weights", str(run / "checkpoint.pt"), "--out", str(tmp_path / "file.json"), "--no-ten-crop")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "file.json").read_text())["metrics"] == got["metrics"]


def bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {"text": folder / "notes.txt", "other state dict": folder / "resnet.pth",
             "pickled module": folder / "whole-model.pt", "wrong shapes": folder / "alexnet-96.pth",
             "no run folder": folder / "empty", "checkpoint alone": folder / "checkpoint.pt"}
    files["text"].write_text("features.0.weight\n")
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, files["other state dict"])
    torch.save(torch.nn.Linear(2, 2), files["pickled module"])  # torch.save(model): a pickle that could run code
    state = torchvision.models.alexnet(weights=None, num_classes=CLASSES).state_dict()
    state["features.0.weight"] = torch.zeros(96, 3, 11, 11)
    torch.save(state, files["wrong shapes"])
    files["no run folder"].mkdir()
    torch.save({"model": {}, "epoch": 1}, files["checkpoint alone"])  # no config.json beside it
    return files


def test_other_files_are_refused_in_one_line_and_nothing_is_written(data, tmp_path):
    out = tmp_path / "results" / "result.json"
    for kind, path in bad_files(tmp_path / "bad").items():
        res = run_cli("--weights", str(path), "--data", str(data), "--out", str(out))
        assert res.exit_code == 2, (kind, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in res.output, (kind, res.output)
        assert ("--weights takes" in lines[0]) or kind == "checkpoint alone", (kind, lines[0])
        assert not out.parent.exists(), kind


def test_another_class_count_or_a_folder_as_out_is_refused(data, tmp_path):
    weights = tmp_path / "alexnet-10.pth"
    torch.save(torchvision.models.alexnet(weights=None, num_classes=10).state_dict(), weights)
    out = tmp_path / "result.json"
    res = run_cli("--weights", str(weights), "--data", str(data), "--out", str(out))
    assert res.exit_code == 2 and not out.exists(), res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"scores 10 classes but {data} has {CLASSES}" in lines[0], res.stderr
    res = run_cli("--weights", str(weights), "--data", str(data), "--out", str(tmp_path))  # --out: a folder
    assert res.exit_code == 2 and "--out" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_data_stored_where_the_pools_disagree_is_refused(data, tv_weights, tmp_path):
    """A 128 px folder (a 112 px crop) is refused before anything is scored or written."""
    copy = shutil.copytree(data, tmp_path / "syn128")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"]["res"] = manifest["image"]["height"] = manifest["image"]["width"] = 128
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = run_cli("--weights", str(tv_weights), "--data", str(copy), "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 2 and not (tmp_path / "r.json").exists(), res.output
    assert "112 px crop" in res.stderr and len(res.stderr.strip().splitlines()) == 1
