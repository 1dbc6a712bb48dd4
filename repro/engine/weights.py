"""`repro evaluate`: score a weights file through the harness's own evaluation path (`make_loaders` and
`repro.engine.scoring.evaluate`), centre crop and ten crops, top-1/top-5 error and accuracy.

Three kinds of file are read, with `torch.load(weights_only=True)` only and nothing downloaded: torchvision's AlexNet
state dict (`AlexNet_Weights.IMAGENET1K_V1`, alexnet-owt-7be5be79.pth, which the user fetches), one of our checkpoints
(a dict with "model" and "epoch", inside its run folder) or a run folder.

torchvision's weights go into the registry's `alexnet-owt` (one tower, no LRN), whose state-dict keys and shapes are
torchvision's one for one, and are scored as torchvision scores them: pixels / 255, its ImageNet mean/std (no mean
image, no PCA), a 224 centre crop of the 256 px stored image. The betons hold the shorter-side-256 centre square, so
that crop is the region torchvision's Resize(256) + CenterCrop(224) sees. Published: 56.522 / 79.066 top-1 / top-5
accuracy. Our checkpoints are scored with their run's own preprocessing and input size.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from repro import io
from repro.config import RunConfig, all_keys, apply_overrides, from_dict
from repro.data import make_loaders, read_manifest
from repro.data.augment import BatchTransform
from repro.engine.recipe import pick_device
from repro.engine.scoring import evaluate, load_model
from repro.errors import UserError
from repro.models import build_model, default_config
from repro.rundir import RunDir
from repro.views import Column

# torchvision's AlexNet: conv layers at features.0/3/6/8/10, linear layers at classifier.1/4/6
TORCHVISION_KEYS = tuple(f"{layer}.{p}" for layer in ("features.0", "features.3", "features.6", "features.8",
                                                      "features.10", "classifier.1", "classifier.4", "classifier.6")
                         for p in ("weight", "bias"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's normalisation, on pixels scaled to 0..1
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 224 / 256  # torchvision's CenterCrop(224) after Resize(256)
PUBLISHED = {"top1_acc": 56.522, "top5_acc": 79.066}  # AlexNet_Weights.IMAGENET1K_V1, ILSVRC-2012 val, 1 crop
ACCEPTED = ("--weights takes torchvision's AlexNet state dict (keys features.0.weight ... classifier.6.weight, "
            "e.g. alexnet-owt-7be5be79.pth), a repro checkpoint (a dict with 'model' and 'epoch', inside its run "
            "folder) or a run folder")
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError,
               AttributeError, TypeError, ImportError)

COLUMNS = [Column("view"), *(Column(key, header, "num", fmt="{:.3f}".format) for key, header in (
    ("top1_err", "top-1 err %"), ("top5_err", "top-5 err %"), ("top1_acc", "top-1 acc %"),
    ("top5_acc", "top-5 acc %")))]


@dataclass
class Weights:
    kind: str                # "torchvision" | "checkpoint" | "run"
    path: Path
    model: torch.nn.Module   # eval mode, on the CPU
    cfg: RunConfig | None    # the run's config; None for torchvision's weights
    num_classes: int


class TorchvisionTransform:
    """uint8 batch -> torchvision's model input: to 0..1, minus its ImageNet mean, over its std."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; {ACCEPTED}")


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:4]]
        return f"a dict with keys {', '.join(keys) or '(none)'}{', ...' if len(obj) > 4 else ''}"
    return f"a {type(obj).__name__}"


def read_weights(path: Path | str) -> Weights:
    """The model of a weights file or run folder, by kind; anything else is refused in one line."""
    path = Path(path)
    if path.is_dir():
        if not RunDir(path).config.is_file():
            raise _refuse(path, "a folder without a trained run's config")
        model, cfg = load_model(path)
        return Weights("run", path, model, cfg, cfg.model.num_classes)
    if not path.is_file():
        raise _refuse(path, "not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        raise _refuse(path, f"not a file torch.load(weights_only=True) reads ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "epoch" in state:
        return _from_checkpoint(path, state)
    if isinstance(state, dict) and set(state) == set(TORCHVISION_KEYS):
        return _from_torchvision(path, state)
    raise _refuse(path, f"{_describe(state)}, neither torchvision's AlexNet state dict nor a repro checkpoint")


def _from_torchvision(path: Path, state: dict) -> Weights:
    """torchvision's state dict in the registry's alexnet-owt: the same keys and shapes, so it loads as it is."""
    fc8 = state["classifier.6.weight"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()) or fc8.ndim != 2:
        raise _refuse(path, "torchvision's AlexNet keys without its tensors")
    num_classes = int(fc8.shape[0])
    model = build_model(default_config("alexnet-owt", num_classes=num_classes))
    expected = model.state_dict()
    for key in TORCHVISION_KEYS:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise _refuse(path, f"{key} has shape {list(state[key].shape)}, torchvision's AlexNet with "
                                f"{num_classes} classes has {list(expected[key].shape)}")
    model.load_state_dict(state)
    return Weights("torchvision", path, model.eval(), None, num_classes)


def _from_checkpoint(path: Path, state: dict) -> Weights:
    """One of our checkpoint files, with the config of the run folder it lies in."""
    config = RunDir(path.parent).config
    try:
        cfg = from_dict(json.loads(config.read_text())["config"], source=str(config))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is a repro checkpoint but {config} is missing or unreadable; pass the run folder, "
                        f"or keep the checkpoint inside its run folder") from None
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit the model of {config} ({cfg.model.name}); "
                        f"pass the checkpoint of that run") from None
    return Weights("checkpoint", path, model.eval(), cfg, cfg.model.num_classes)


def stored_size(manifest: dict) -> int:
    """The side of the images the val loader yields (as make_loaders reads it from the manifest)."""
    res = int(manifest["settings"].get("res") or manifest["image"]["height"])
    if not manifest["image"].get("fixed_size", True):
        return res
    return min(int(manifest["image"]["height"]), int(manifest["image"]["width"]))


def torchvision_crop(stored: int, folder: Path | str = "the data") -> int:
    """torchvision's centre crop for `stored` px images (224 of 256), refused where the registry's alexnet-owt would
    not compute what torchvision's AlexNet does: its 3/2 max-pools round up (cuda-convnet's rule) and torchvision's
    round down, which agree only on odd map sizes (55, 27, 13 at 224)."""
    crop = round(stored * CROP_RATIO)
    size, pooled = (crop + 2 * 2 - 11) // 4 + 1, []  # conv1: 11x11, stride 4, padding 2; conv2..conv5 keep sizes
    for _ in range(3):  # a max-pool after conv1, conv2 and conv5
        pooled.append(size)
        size = (size - 3) // 2 + 1
    fix = "score torchvision's weights on data prepared at 256 px (`repro prepare-data imagenet --root ... --res 256`)"
    if min(pooled) < 3:
        raise UserError(f"{folder}: its {stored} px images give a {crop} px crop, too small for AlexNet; {fix}")
    even = [n for n in pooled if n % 2 == 0]
    if even:
        raise UserError(f"{folder}: its {stored} px images give a {crop} px crop, where torchvision's AlexNet and "
                        f"the registry's alexnet-owt pool {even[0]} px maps to different sizes (rounding down, "
                        f"rounding up); {fix}")
    return crop


def _loader_config(weights: Weights, folder: Path, crop: int, batch_size: int, backend: str,
                   train_count: int) -> RunConfig:
    """The config the loaders read: the whole val split of `folder`, the run's own normalisation for our runs."""
    base = weights.cfg or RunConfig()
    sets: dict[str, Any] = {"data.dir": str(folder), "data.val_limit": 0, "data.train_limit": 0,
                            "data.backend": backend, "model.input_size": crop,
                            # make_loaders refuses a batch larger than the training split (its train loader drops
                            # the last partial batch); only the val batches are read here
                            "train.batch_size": max(1, min(batch_size, train_count))}
    if weights.cfg is None:
        sets["data.normalize"] = "mean"  # anything but "mean-image", which the loaders would subtract themselves
    return apply_overrides(base, sets, source="repro evaluate")


class _Counted:
    """The val loader, moving a progress bar on by each batch's images."""

    def __init__(self, loader, bar, task):
        self.loader, self.bar, self.task = loader, bar, task

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images, labels
            self.bar.advance(self.task, len(labels))


def _run(model, loader, transform, *, crop: int, ten_crop: bool, count: int, progress: bool) -> dict:
    if not progress:
        return evaluate(model, loader, transform, crop=crop, ten_crop=ten_crop)[0]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from repro.views import progress_console

    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=progress_console(stderr=True)) as bar:
        task = bar.add_task("scoring", total=count)
        return evaluate(model, _Counted(loader, bar, task), transform, crop=crop, ten_crop=ten_crop)[0]


def _check_options(backend: str, device: str) -> None:
    backends = all_keys()["data.backend"].metadata["choices"]
    if backend not in backends:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(backends)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")


def _data_folder(weights: Weights, data: Path | str | None) -> tuple[Path, dict]:
    """The data folder and its manifest, refused when its class count is not the weights'."""
    folder = Path(data if data is not None else (weights.cfg or RunConfig()).data.dir)
    manifest = read_manifest(folder)
    classes = len(manifest["classes"]["ids"])
    if classes != weights.num_classes:
        raise UserError(f"{weights.path} scores {weights.num_classes} classes but {folder} has {classes}; pass "
                        f"--data with a folder prepared with the weights' {weights.num_classes} classes")
    return folder, manifest


def score(weights: Weights, data: Path | str | None = None, *, ten_crop: bool = True, batch_size: int = 128,
          device: str = "auto", backend: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Centre-crop (and ten-crop) errors and accuracies of `weights` on the val split of `data` (default: the run's
    data folder, or data/imagenet), with what was scored: kind, classes, images, crop, normalisation."""
    _check_options(backend, device)
    folder, manifest = _data_folder(weights, data)
    stored = stored_size(manifest)
    crop = torchvision_crop(stored, folder) if weights.cfg is None else weights.cfg.model.input_size
    cfg = _loader_config(weights, folder, crop, batch_size, backend, int(manifest["splits"]["train"]["count"]))
    dev = pick_device(device)
    loaders = make_loaders(cfg, device=dev)
    transform = TorchvisionTransform() if weights.cfg is None else BatchTransform(loaders.manifest, cfg, train=False)
    metrics = _run(weights.model.to(dev), loaders.val, transform, crop=crop, ten_crop=ten_crop,
                   count=loaders.num_val, progress=progress)
    for view in ("", "_10crop") if ten_crop else ("",):
        for k in ("top1", "top5"):
            metrics[f"{k}_acc{view}"] = 100.0 - metrics[f"{k}_err{view}"]
    out = {"weights": str(weights.path), "kind": weights.kind, "data": str(folder), "data_hash": manifest.get("hash"),
           "classes": weights.num_classes, "images": loaders.num_val, "stored_px": stored, "crop_px": crop,
           "normalize": "torchvision (ImageNet mean/std)" if weights.cfg is None else cfg.data.normalize,
           "device": str(dev), "backend": loaders.backend, "metrics": metrics, "notes": []}
    if weights.cfg is None:
        out["published"] = dict(PUBLISHED, top1_err=100.0 - PUBLISHED["top1_acc"],
                                top5_err=100.0 - PUBLISHED["top5_acc"])
        if stored != 256 or weights.num_classes != 1000:
            out["notes"].append("the published numbers are for ILSVRC-2012 val at 256 px (a 224 px crop)")
        ids = manifest["classes"]["ids"]
        if manifest.get("source") == "imagenet" and ids != sorted(ids):  # torchvision's class k: the k-th WNID
            out["notes"].append(f"{folder} orders its classes otherwise than torchvision (sorted WNIDs)")
    elif weights.cfg.data.manifest_hash and weights.cfg.data.manifest_hash != manifest.get("hash"):
        out["notes"].append(f"{folder} is not the data the run trained on; its normalisation statistics are used")
    return out


def result_rows(result: dict) -> list[dict]:
    """The table's rows: centre crop, ten crops, and torchvision's published numbers beside its weights."""
    m = result["metrics"]
    rows = [{"view": "centre crop", **{k: m[k] for k in ("top1_err", "top5_err", "top1_acc", "top5_acc")}}]
    if "top1_err_10crop" in m:
        rows.append({"view": "ten crops", **{k: m[f"{k}_10crop"] for k in ("top1_err", "top5_err", "top1_acc",
                                                                           "top5_acc")}})
    if "published" in result:
        rows.append({"view": "published, 1 crop", **result["published"]})
    return rows


def result_title(result: dict) -> str:
    return (f"{result['weights']} ({result['kind']}) on {result['data']}: {result['images']:,} val images, "
            f"{result['classes']} classes, {result['crop_px']} px centre of {result['stored_px']} px, "
            f"normalisation: {result['normalize']}")


def check_output(out: Path | str | None) -> None:
    """Refuse an --out that cannot be a file before any scoring is spent."""
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {Path(out) / 'evaluate.json'}")


def write_result(out: Path | str, result: dict) -> Path:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(out, result)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    return out
