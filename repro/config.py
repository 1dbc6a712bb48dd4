"""Run configuration: three dataclass sections, resolved once from layered overrides, then hashed.

A run is fully described by a `RunConfig`. Defaults are the paper's recipe (section 5) on ILSVRC-2012; scales
and experiments only override fields. `apply_overrides` takes dotted keys (`model.lrn`, `train.lr`) with values
from TOML files or from `--set key=value` strings, checks each key and value, and returns a new config.
`config_hash` covers every field that can change a result; fields marked `hash=False` (where the data lives,
worker counts, compile) do not, so moving a dataset or adding workers never retrains a finished run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from repro.errors import UserError
from repro.models.registry import list_models
from repro.schema import check, describe, spec

CONFIG_FORMAT = 8  # 2: cosine anneals per iteration; 3: torch reseeded per step (exact resume inside an epoch);
#                    4: no weight decay on biases unless train.decay_biases; 5: alexnet-paper drops the outputs of fc6 and fc7;
#                    6: data.normalize defaults to the mean image; 7: each epoch's order and crop draws come from
#                    SeedSequence(seed, epoch) (they came from seed + epoch, so seeds shared their data), crops keyed by
#                    sample id; train.batch_size is the global batch under DDP; the step seed leaves out the rank, and
#                    dropout masks and lighting noise are drawn for the global batch; 8: a compiled net draws dropout
#                    masks from torch's generator as eager does (inductor's fallback_random)


@dataclass(frozen=True)
class ModelConfig:
    name: str = spec("alexnet-paper", valid=(lambda name: name in list_models(),
                                           "is not a registered model; `repro models` lists them"),
                   help="registered model, see `repro models`")
    num_classes: int = spec(1000, valid=(lambda n: n >= 1, "must be at least 1"))
    activation: str = spec("relu", choices=("relu", "tanh"), help="section 3.1")
    lrn: bool = spec(True, help="local response normalisation after ReLU in conv1, conv2 (section 3.3)")
    lrn_alpha_mode: str = spec("per-size", choices=("paper", "per-size"),
                             help="paper: alpha as written; per-size: alpha/n as Caffe, torch and cuda-convnet2")
    lrn_form: str = spec("full", choices=("full", "gain"),
                       help="full: LRN as section 3.3; gain: at the same places only divide by k^beta (LRN's fixed "
                            "gain when alpha'*sum(a^2) << k), the control that keeps LRN's scale without its "
                            "normalisation; needs model.lrn = true")
    pooling: str = spec("overlap", choices=("overlap", "non-overlap"), help="3/2 or 2/2 max-pool (section 3.4)")
    towers: str = spec("two", choices=("two", "one-half", "one-full"), help="section 3.2")
    remove_layer: str = spec("none", choices=("none", "conv2", "conv3", "conv4", "conv5"),
                           help="section 7: take one middle conv layer out (the pools stay)")
    dropout: float = spec(0.5, help="dropout probability (section 4.2), 0 disables; alexnet-paper drops the outputs "
                        "of fc6 and fc7 (the paper, Caffe), alexnet-owt the inputs of fc6 and fc7 (torchvision), "
                        "cifar4 the input of its FC layer",
                        valid=(lambda p: 0.0 <= p < 1.0, "must be in [0, 1); 0 disables dropout"))
    input_size: int = spec(224, help="224 uses cuda-convnet's output rule (55x55 after conv1); 227 as Caffe")
    width: float = spec(1.0, help="multiplier on every conv and FC width (small scales)",
                      valid=(lambda w: w > 0, "must be > 0 (1.0 is the paper's widths)"))
    stem: str = spec("imagenet", choices=("imagenet", "tiny"),
                   help="imagenet: conv1 11x11/4; tiny: conv1 5x5/1 for 28-64 px inputs")
    init: str = spec("paper", choices=("paper", "kaiming"),
                   help="paper: N(0, 0.01), bias 1 in conv2, conv4, conv5, fc6, fc7")

    def __post_init__(self):
        # the one rule between two fields: the gain form replaces LRN layers, so without them it would do nothing
        # while its runs hashed apart from the no-LRN runs they equal
        if self.lrn_form == "gain" and not self.lrn:
            raise UserError("model.lrn_form = 'gain' needs model.lrn = true (it replaces the LRN layers, and with "
                            "model.lrn = false there are none); set model.lrn_form = 'full' or model.lrn = true")


@dataclass(frozen=True)
class DataConfig:
    dir: str = spec("data/imagenet", hash=False, help="folder with train.beton, val.beton, manifest.json")
    manifest_hash: str = spec("", help="filled in when the config is resolved; identifies the data")
    backend: str = spec("auto", choices=("auto", "ffcv", "torch", "nvjpeg"), hash=False,
                      help="auto: nvjpeg on CUDA; on CPU FFCV when importable, else the torchvision fallback")
    flip: bool = spec(True, help="random horizontal flips at train time")
    pca_lighting: float = spec(0.1, help="sigma of the PCA colour noise (section 4.1); 0 disables")
    normalize: str = spec("mean-image", choices=("mean-image", "mean", "mean-std"),
                        help="mean-image: subtract the training set's mean image, cropped and flipped as each "
                             "image (section 2 of the paper); mean: the per-channel mean; mean-std: per-channel "
                             "mean, then divide by the per-channel std")
    train_limit: int = spec(0, help="use a fixed random subset of this many training images; 0 = all")
    val_limit: int = spec(0, help="use a fixed random subset of this many validation images; 0 = all")
    workers: int = spec(0, hash=False, help="loader worker threads; 0 = all cores")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = spec(90)
    batch_size: int = spec(128)
    lr: float = spec(0.01)
    momentum: float = spec(0.9)
    weight_decay: float = spec(5e-4)
    decay_biases: bool = spec(False, help="weight decay on biases too; false as Caffe's reference AlexNet and "
                                        "cuda-convnet: weights only")
    schedule: str = spec("plateau", choices=("plateau", "step", "cosine", "constant"),
                       help="plateau: divide by 10 when val error stops improving (section 5)")
    lr_drops: int = spec(3, help="plateau/step: how many times the lr is divided by 10")
    plateau_patience: int = spec(3, help="plateau: epochs without improvement before a drop")
    warmup_epochs: float = spec(0.0, help="linear lr warm-up over this many epochs (not in the paper; 0 = none)")
    max_iters: int = spec(0, help="stop after this many iterations; 0 = run all epochs")
    target_train_err: float = spec(25.0, help="record the first iteration where train top-1 error falls below this")
    score_train: bool = spec(True, help="at every scoring, also score a fixed sample of training images (as many as "
                                         "the validation images) in evaluation mode: train_eval_top1_err, the "
                                         "training error without dropout or augmentation (dropout's gap)")
    learn_check: float = spec(0.05, valid=(lambda x: 0.0 <= x <= 1.0, "must be in [0, 1]; 0 turns the check off"),
                              help="after this share of the iterations, a run whose training error is still within "
                                   "train.learn_margin points of chance stops as 'did not learn' (0: never checks)")
    learn_margin: float = spec(5.0, valid=(lambda x: x >= 0, "must be >= 0"),
                               help="how far below chance (100 - 100/classes % error) the training error must be "
                                    "at the learn check")
    log_every: int = spec(20, help="iterations between points of the training curve")
    eval_every: int = spec(1, valid=(lambda n: n >= 1, "must be at least 1"),
                         help="score on the validation set after every N-th epoch and after the last; "
                              "N > 1 needs a schedule that does not read validation error (not plateau)")
    seed: int = spec(0, valid=(lambda s: s >= 0, "must be >= 0"),
                     help="the run's seed: initial weights, and with the epoch every epoch's order, crops and dropout")
    precision: str = spec("auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool = spec(True, hash=False)
    compile: str = spec("auto", choices=("auto", "true", "false"), hash=False,
                        help="torch.compile the training net; auto: on CUDA (a CPU run stays eager); if compiling "
                             "fails the run warns, notes it in its record's provenance and trains eager")
    eval_batch_size: int = spec(0, hash=False, valid=(lambda n: n >= 0, "must be >= 0 (0: twice train.batch_size)"),
                                help="images per forward pass when scoring, rounded up to a multiple of "
                                     "train.batch_size; 0: twice train.batch_size (the outputs do not depend on it)")
    ten_crop: bool = spec(True, help="also score the final model with 10-crop averaging (section 4.1)")
    device: str = spec("auto", hash=False, help="auto, cpu, cuda, cuda:1, ...")
    checkpoint_minutes: float = spec(0.0, hash=False,
                                   help="also checkpoint inside an epoch every this many minutes; 0 = at epoch ends only")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _section_types() -> dict[str, type]:
    return get_type_hints(RunConfig)


def all_keys() -> dict[str, dataclasses.Field]:
    """Every settable dotted key (`model.lrn`, ...) with its dataclass field."""
    out = {}
    for section, cls in _section_types().items():
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = f
    return out


def _coerce(key: str, f: dataclasses.Field, typ: type, value: Any) -> Any:
    """Turn a TOML value or a `--set` string into the field's type, or say exactly why not."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
                out = True
            elif isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
                out = False
            else:
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            if isinstance(value, bool) and "true" in (f.metadata.get("choices") or ()):
                value = str(value).lower()  # a switch with more states than a bool (train.compile) takes its bools
            if not isinstance(value, str):
                raise ValueError
            out = value
    except (ValueError, TypeError):
        raise UserError(f"{key} = {value!r} is not a valid {typ.__name__}; give a {typ.__name__} value") from None
    check(key, f, out)
    return out


def check_value(key: str, value: Any) -> None:
    """Raise the one-line UserError for a value that `key` (e.g. "model.activation") does not allow."""
    check(key, all_keys()[key], value)


def check_section(section: str, values: Any) -> None:
    """Check every field of a section dataclass built in code (e.g. `ModelConfig(...)`), as overrides are."""
    for f in dataclasses.fields(values):
        check(f"{section}.{f.name}", f, getattr(values, f.name))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], source: str = "--set") -> RunConfig:
    """Return `cfg` with dotted-key overrides applied; `source` names where they came from in errors."""
    keys = all_keys()
    types = {sec: get_type_hints(cls) for sec, cls in _section_types().items()}
    sections = {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in types}
    for key, value in overrides.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; `repro keys` lists them"
            raise UserError(f"{source}: unknown key {key!r}{hint}")
        sec, name = key.split(".", 1)
        sections[sec][name] = _coerce(key, keys[key], types[sec][name], value)
    return RunConfig(**{sec: cls(**sections[sec]) for sec, cls in _section_types().items()})


def parse_set(items: list[str]) -> dict[str, str]:
    """Parse `--set key=value` strings into a dict; values stay strings and are coerced per field."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: write it as key=value, e.g. --set train.lr=0.02")
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
    """Rebuild a config saved with `to_dict`; unknown sections or keys are errors naming `source`."""
    flat, sections = {}, _section_types()
    for sec, values in d.items():
        if sec not in sections or not isinstance(values, dict):
            raise UserError(f"{source}: unknown config section {sec!r}; expected {', '.join(sections)}")
        flat.update({f"{sec}.{k}": v for k, v in values.items()})
    return apply_overrides(RunConfig(), flat, source=source)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """`{"model.lrn": True, ...}`: one column per field, for tables."""
    return {f"{sec}.{k}": v for sec, values in to_dict(cfg).items() for k, v in values.items()}


def config_hash(cfg: RunConfig) -> str:
    """12 hex digits over every field that can change a result (and the config format)."""
    keys = all_keys()
    payload = {k: v for k, v in flatten(cfg).items() if keys[k].metadata.get("hash", True)}
    payload["format"] = CONFIG_FORMAT
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def describe_keys() -> str:
    """A help text listing every key with its default and meaning."""
    return "\n".join(line for section, cls in _section_types().items() for line in describe(cls, f"{section}."))
