"""Kind `effect` with training error scored in evaluation mode: dropout's gap and its iterations to converge read
that measure, not the running error that dropout and augmentation raise."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes import make_run  # noqa: E402

from repro.claims import judge_claim  # noqa: E402
from repro.claims import convergence, verdicts as V  # noqa: E402
from repro.experiments import load_registry  # noqa: E402
from repro.report.sections import fmt_effect  # noqa: E402
from repro.runs import collect  # noqa: E402


def runs_with_eval_mode(root: Path, *, dropout_reaches: int | None) -> None:
    """Five seeds. Validation error: dropout 25, no dropout 27. Running training error (dropout and crops on):
    dropout 24.5, no dropout 20 (a gap of +0.5 against +7). In evaluation mode: dropout 15, no dropout 10 (a gap of
    +10 against +17). Evaluation-mode training error per scored epoch (every 3rd, 45 iterations apart): no dropout
    at or below 30% from iteration 90, dropout from `dropout_reaches` (None: never)."""
    for s in range(5):
        for v, drop in (("dropout", 0.5), ("no-dropout", 0.0)):
            val, running, evalm = (25.0, 24.5, 15.0) if drop else (27.0, 20.0, 10.0)
            reach = (dropout_reaches if drop else 90)
            d = make_run(root, "dropout", v, s, scale="demo", overrides={"model.dropout": drop, "train.score_train": True},
                         metrics={"top1_err": val + 0.1 * s, "train_top1_err": running, "train_eval_top1_err": evalm})
            rows = [{"epoch": 3 * k, "iteration": 45 * k, "train_top1_err": running, "val_top1_err": val,
                     "train_eval_top1_err": 20.0 if reach is not None and 45 * k >= reach else 60.0}
                    for k in range(1, 11)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_gap_and_the_iterations_use_the_evaluation_mode_error(tmp_path):
    exp = load_registry()["dropout"]
    runs_with_eval_mode(tmp_path / "runs", dropout_reaches=180)
    r = judge_claim(exp, collect(tmp_path / "runs"), None, tmp_path / "runs")
    by_metric = {c.metric: c for c in r.comparisons}
    gap = by_metric["top1_err - train_eval_top1_err"]
    # (25 - 15) - (27 - 10) = -7 in evaluation mode; the running error would have said (25 - 24.5) - (27 - 20) = -6.5
    assert gap.measured.mean == pytest.approx(-7.0) and "evaluation mode" in gap.reason
    it = by_metric["iters_to_converge"]
    assert it.measured.mean == pytest.approx(180 / 90) and "(evaluation mode)" in it.label


def test_a_dropout_run_that_never_converges_counts_as_a_bound(tmp_path):
    exp = load_registry()["dropout"]
    runs_with_eval_mode(tmp_path / "runs", dropout_reaches=None)
    it = next(c for c in judge_claim(exp, collect(tmp_path / "runs"), None, tmp_path / "runs").comparisons
              if c.metric == "iters_to_converge")
    # dropout never reached 30%: it counts at its total iterations, so the ratio is a lower bound, shown as one
    assert "did not reach" in it.reason and "bound" in it.reason
    assert it.measured.bound == ">" and math.isfinite(it.measured.mean)
    assert fmt_effect(it.measured, it.unit)[0] == f"> {it.measured.mean:.2f}x"
    assert it.verdict == "same direction"  # at demo scale only the sign is judged, and a lower bound keeps it


@pytest.mark.parametrize("up, verdict, kept", [
    # the true ratio is larger than measured (a lower bound), towards the paper's 6x
    (True, "reproduced", "same direction"), (True, "same direction, smaller", "same direction"),
    (True, "same direction, larger", "same direction, larger"), (True, "same direction", "same direction"),
    (True, "opposite", "inconclusive"),  # measured below 1, but the true ratio may lie above it
    # the true ratio is smaller than measured (an upper bound), away from the paper's side
    (False, "reproduced", "inconclusive"), (False, "same direction, larger", "inconclusive"),
    (False, "same direction", "inconclusive"), (False, "opposite", "opposite"),
    (False, "inconclusive", "inconclusive"),
])
def test_a_censored_ratio_keeps_only_what_its_bound_can_show(up, verdict, kept):
    comp = V.Comparison("tanh / relu", "iters_to_target", "x", 6.0, V.Interval(3.0, 2.0, 4.5, 5), verdict, "r")
    # inverse ratio (treatment / control): a censored treatment makes its numerator too small, the ratio too small
    convergence._as_bound(comp, treatment_censored=up, control_censored=not up, inverse=True)
    assert comp.measured.bound == (">" if up else "<") and comp.verdict == kept
    both = V.Comparison("t / c", "iters_to_target", "x", 6.0, V.Interval(3.0, 2.0, 4.5, 5), verdict, "r")
    convergence._as_bound(both, treatment_censored=True, control_censored=True, inverse=True)
    assert both.verdict == "inconclusive"
