"""The run record: what a run leaves behind when it ends (repro.rundir names its file), the engine's output that
the run store and the report read. One dataclass, written by `fit` (and by a launcher for a run that crashed
outside `fit`).

status: done | diverged | did not learn (its training error stayed near chance past `train.learn_check`: stopped
early, never evidence) | failed | interrupted (a stop signal; resumes when run again) | preempted (a preemption
request; a launcher requeues it and it continues from the same batch of the same epoch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


RESULT_FORMAT = 1
STATUSES = ("done", "diverged", "did not learn", "failed", "interrupted", "preempted")
# Fields of an epoch's metrics line that measure the machine, not the run: resumed and straight runs differ in them.
TIMING_KEYS = ("seconds", "images_per_s", "data_wait_s")
METRICS = ("top1_err", "top5_err", "top1_err_10crop", "top5_err_10crop", "train_loss", "train_top1_err",
           "train_eval_top1_err", "best_val_top1_err", "iters_to_target")


def finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: such numbers become null."""
    return {k: (None if isinstance(v, float) and not finite(v) else v) for k, v in values.items()}


@dataclass
class RunRecord:
    status: str
    config: dict[str, Any]
    config_hash: str
    error: str | None = None
    epochs_done: int = 0
    iterations: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    lrn_strength: dict[str, Any] | None = None  # LRN models: how strongly each LRN layer normalises, at the end
    format: int = RESULT_FORMAT

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"run status {self.status!r} is not one of {', '.join(STATUSES)}")
        self.metrics, self.provenance = _clean(self.metrics), _clean(self.provenance)

    @property
    def finished(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RunRecord | None:
        """The record in `d`, or None when `d` is not a record of this format (an older one, or not a record)."""
        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError):
            return None
