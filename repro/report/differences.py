"""The page's "Differences from the paper" tables: per scale, each recipe field whose value in the runs' resolved
configs differs from the paper's, and the data against ILSVRC-2012.

Generated from the run table's `model.*`, `data.*` and `train.*` columns against `RunConfig()` (whose defaults are
the paper's recipe, section 5), so the page cannot drift from what ran. Two fields are compared with the paper's
text where the default is not it: LRN's alpha (the paper applies alpha as written; the default divides it by n, as
the author's cuda-convnet2, Caffe and torch do) and the precision (the paper trained in fp32; `auto` is bf16 on CUDA).
"""

from __future__ import annotations

import pandas as pd

from repro.claims.facts import data_facts
from repro.config import RunConfig, flatten
from repro.scales import largest_first

# (column, what it is): the recipe, not the switches a claim compares (LRN on/off, pooling, dropout, ...)
FIELDS = [
    ("model.init", "initialisation"), ("model.input_size", "input size (px)"), ("model.width", "width multiplier"),
    ("model.stem", "first layer"), ("model.lrn_alpha_mode", "LRN's alpha"),
    ("data.normalize", "input normalisation"), ("data.train_limit", "training images (0 = all)"),
    ("data.flip", "horizontal flips"),
    ("train.epochs", "epochs"), ("train.batch_size", "batch size"), ("train.lr", "learning rate"),
    ("train.momentum", "momentum"), ("train.weight_decay", "weight decay"),
    ("train.schedule", "learning-rate schedule"), ("train.lr_drops", "lr drops by 10"),
    ("train.plateau_patience", "plateau patience (epochs)"), ("train.warmup_epochs", "lr warm-up (epochs)"),
    ("train.precision", "precision"),
]
PAPER_TEXT = {"model.lrn_alpha_mode": "paper", "train.precision": "fp32"}
WORDS = {
    "model.init": {"paper": "N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7", "kaiming": "He normal"},
    "model.lrn_alpha_mode": {"paper": "alpha as written", "per-size": "alpha / n (cuda-convnet2, Caffe, torch)"},
    "model.stem": {"imagenet": "conv1 11x11 stride 4", "tiny": "conv1 5x5 stride 1"},
    "data.normalize": {"mean-image": "minus the mean image", "mean": "minus the channel means",
                       "mean-std": "channel mean and std"},
    "train.precision": {"fp32": "fp32", "bf16": "bf16 autocast"},
    "data.flip": {True: "on", False: "off"},
}
PAPER_DATA = {"source": "imagenet", "classes": 1000, "px": 256}  # ILSVRC-2012 stored at 256 px (section 2)
DATA_FIELDS = [("source", "data"), ("classes", "classes"), ("px", "stored image size (px)")]


def _text(key: str, value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return WORDS.get(key, {}).get(value, f"{value:g}" if isinstance(value, float) else str(value))


def _precision(row: pd.Series) -> str:
    """What `auto` meant for the run: bf16 autocast on CUDA, fp32 on a CPU (the device its record names)."""
    value, device = row.get("train.precision"), row.get("prov.device")
    if value != "auto":
        return value
    if not isinstance(device, str) or not device:
        return "auto"
    return "fp32" if device.lower() in ("cpu", "mps") else "bf16"


def _used(values: pd.DataFrame) -> str:
    """Each value used, with the experiments that used it when not all did (columns value, experiment)."""
    groups = values.groupby("value", sort=False)["experiment"].apply(lambda s: sorted(set(s)))
    if len(groups) == 1:
        return str(groups.index[0])
    everyone = len(set(values["experiment"]))
    common = max(groups.index, key=lambda v: len(groups[v]))
    out = []
    for value, exps in sorted(groups.items(), key=lambda kv: (kv[0] != common, kv[0])):
        who = ("every experiment" if len(exps) == everyone else f"{len(exps)} of {everyone} experiments"
               if value == common and len(exps) > 3 else ", ".join(exps))
        out.append(f"{value} ({who})")
    return "; ".join(out)


def _field_rows(rows: pd.DataFrame) -> list[dict]:
    defaults = flatten(RunConfig())
    out = []
    for key, what in FIELDS:
        if key not in rows:
            continue
        paper = PAPER_TEXT.get(key, defaults[key])
        raw = rows.apply(_precision, axis=1) if key == "train.precision" else rows[key]
        values = pd.DataFrame({"raw": raw, "experiment": rows["experiment"]}).dropna()
        if values.empty or all(_text(key, v) == _text(key, paper) for v in values["raw"]):
            continue
        values["value"] = [_text(key, v) for v in values["raw"]]
        out.append(dict(field=key, what=what, paper=_text(key, paper), used=_used(values)))
    return out


def _data_rows(rows: pd.DataFrame) -> list[dict]:
    """The data's source, class count and stored size (its manifest) where they differ from ILSVRC-2012's."""
    dirs = rows.get("data.dir", pd.Series(dtype=object)).dropna().unique()
    facts = [f for f in (data_facts(str(d)) for d in dirs) if f]
    out = []
    for key, what in DATA_FIELDS:
        if not any(f.get(key) != PAPER_DATA[key] for f in facts):
            continue
        shown = "name" if key == "source" else key
        used = "; ".join(sorted({str(f[shown]) for f in facts}))
        paper = "ILSVRC-2012" if key == "source" else str(PAPER_DATA[key])
        out.append(dict(field=f"manifest: {key}", what=what, paper=paper, used=used))
    return out


def differences(df: pd.DataFrame) -> list[dict]:
    """Per scale with runs, largest first: {'scale', 'runs', 'rows': [{field, what, paper, used}]}."""
    if df.empty or "scale" not in df:
        return []
    out = []
    for scale in largest_first(set(df["scale"].dropna().astype(str))):
        rows = df[df["scale"].astype(str) == scale]
        runs = rows["config_hash"].nunique() if "config_hash" in rows else len(rows)  # a shared run once
        out.append(dict(scale=scale, runs=runs, rows=_data_rows(rows) + _field_rows(rows)))
    return out
