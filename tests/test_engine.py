"""The training engine on tiny stand-ins: run files and record, resume equivalence, divergence, failures,
checkpoint fall-back, lr schedules, and ten-crop scoring against a hand computation."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine_support as sup
from engine_support import read_jsonl
from repro.config import config_hash
from repro.engine import checkpoint, evaluate, extract_features, fit, load_model, predict, schedule
from repro.engine import state as state_mod
from repro.engine.recipe import autocast_dtype
from repro.record import TIMING_KEYS
from repro.engine.scoring import topk_errors
from repro.errors import UserError
from repro.rundir import RunDir


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    sup.use_stand_ins(monkeypatch)
    torch.set_num_threads(1)



def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def interrupt_after_saves(monkeypatch, n):
    """Raise KeyboardInterrupt right after the n-th checkpoint save, as a signal arriving then would."""
    real = checkpoint.save
    count = {"n": 0}

    def save(run_dir, state):
        path = real(run_dir, state)
        count["n"] += 1
        if count["n"] == n:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", save)


def test_fit_writes_the_run_files_and_record(tmp_path):
    cfg = sup.tiny_config(**{"train.epochs": 3})
    result = fit(cfg, tmp_path, progress=False)
    assert result.to_dict() == json.loads((tmp_path / "result.json").read_text())
    assert result.status == "done" and result.error is None
    assert result.config_hash == config_hash(cfg)
    assert json.loads((tmp_path / "config.json").read_text())["config_hash"] == config_hash(cfg)
    assert result.epochs_done == 3 and result.iterations == 3 * 4  # 64 images / batch 16

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["iteration"] for r in rows] == [4, 8, 12]
    assert set(rows[0]) == {"epoch", "iteration", "train_loss", "train_top1_err", "val_top1_err", "val_top5_err",
                            "lr", "images_per_s", "seconds", "data_wait_s", "data_order_digest",
                            "train_eval_top1_err"}
    assert [r["data_order_digest"] for r in rows] == [f"stand-in-0-{e}" for e in range(3)]  # the loaders' own
    assert all(0 <= r["data_wait_s"] <= r["seconds"] for r in rows)
    curve = read_jsonl(tmp_path / "curve.jsonl")
    assert [c["iteration"] for c in curve] == [3, 6, 9, 12]
    first_below = next((c["iteration"] for c in curve if c["train_top1_err"] < 60.0), None)
    assert result.metrics["iters_to_target"] == first_below

    # The stored logits are the final model's centre-crop outputs in val order; the error follows from them.
    logits = np.load(tmp_path / "val_logits.npy")
    assert logits.dtype == np.float16 and logits.shape == (32, 4)
    _, labels = sup.make_images(32, 2)
    err = 100.0 * (logits.astype(np.float32).argmax(1) != labels.numpy()).mean()
    assert result.metrics["top1_err"] == pytest.approx(err)
    assert result.metrics["top5_err"] == 0.0  # 4 classes: the true one is always in the top 5
    assert result.metrics["best_val_top1_err"] == min(r["val_top1_err"] for r in rows)
    assert result.metrics["top1_err_10crop"] is not None
    prov = result.provenance
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert prov["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert prov["wall_time_s"] > 0 and prov["images_per_s"] > 0 and prov["started"] <= prov["finished"]
    assert prov["device"] == "cpu" and prov["data_backend"] == "torch" and prov["data_manifest_hash"] == "stand-in"
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] or prov["packages"]["torch"] == torch.__version__

    model, cfg2 = load_model(tmp_path)
    assert cfg2 == cfg
    x, _ = sup.make_images(32, 2)
    with torch.no_grad():
        out = model(sup.Transform(None, cfg, False)(x))
    np.testing.assert_allclose(out.numpy(), logits.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_a_finished_run_is_returned_not_retrained(tmp_path, monkeypatch):
    cfg = sup.tiny_config()
    first = fit(cfg, tmp_path, progress=False)
    monkeypatch.setattr(state_mod, "make_loaders", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert fit(cfg, tmp_path, progress=False) == first


def test_a_folder_of_another_config_is_refused(tmp_path):
    from repro.errors import UserError

    fit(sup.tiny_config(), tmp_path, progress=False)
    with pytest.raises(UserError, match="another config"):
        fit(sup.tiny_config(**{"train.lr": 0.02}), tmp_path, progress=False)


def test_resume_gives_the_same_run_as_going_straight(tmp_path, monkeypatch):
    cfg = sup.tiny_config(**{"train.epochs": 2, "train.log_every": 3})  # curve points straddle the epoch end
    straight = fit(cfg, tmp_path / "a", progress=False)

    with monkeypatch.context() as m:
        interrupt_after_saves(m, 1)
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, tmp_path / "b", progress=False)
    stopped = json.loads((tmp_path / "b" / "result.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["epochs_done"] == 1
    resumed = fit(cfg, tmp_path / "b", progress=False)

    assert resumed.status == "done" and resumed.iterations == straight.iterations
    assert resumed.metrics == straight.metrics
    for name in ("metrics.jsonl",):
        assert without_timing(read_jsonl(tmp_path / "a" / name)) == without_timing(read_jsonl(tmp_path / "b" / name))
    assert read_jsonl(tmp_path / "a" / "curve.jsonl") == read_jsonl(tmp_path / "b" / "curve.jsonl")
    wa, wb = checkpoint.load(tmp_path / "a")["model"], checkpoint.load(tmp_path / "b")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, caplog):
    cfg = sup.tiny_config(**{"train.epochs": 3})
    straight = fit(cfg, tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        interrupt_after_saves(m, 2)
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, tmp_path / "b", progress=False)
    ck = tmp_path / "b" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])

    with caplog.at_level(logging.WARNING, logger="repro.engine"):
        state = checkpoint.load(tmp_path / "b")
    assert state["epoch"] == 1
    assert len(caplog.records) == 1 and "checkpoint.prev.pt" in caplog.text and "\n" not in caplog.messages[0]

    resumed = fit(cfg, tmp_path / "b", progress=False)
    assert resumed.metrics == straight.metrics
    assert len(read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 3  # epoch 2's line was written again, once


def test_both_checkpoints_unreadable_is_a_user_error(tmp_path):
    from repro.errors import UserError

    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="delete"):
        checkpoint.load(tmp_path)


def test_checkpoints_hold_no_pickled_objects(tmp_path):
    fit(sup.tiny_config(), tmp_path, progress=False)
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # raises if anything but plain data was saved

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "epoch": 1, "x": Evil()}, tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.prev.pt").unlink()
    from repro.errors import UserError

    with pytest.raises(UserError):
        checkpoint.load(tmp_path)


def test_divergence_is_recorded_not_raised(tmp_path):
    cfg = sup.tiny_config(**{"model.activation": "tanh", "train.lr": 1e4, "train.epochs": 30, "train.log_every": 1})
    result = fit(cfg, tmp_path, progress=False)
    assert result.status == "diverged"
    assert "loss" in result.error and "\n" not in result.error
    assert result.epochs_done < 30
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "diverged"


def test_other_errors_are_recorded_as_failed_and_raised(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(state_mod, "make_loaders", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fit(sup.tiny_config(), tmp_path, progress=False)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: disk on fire second line"


def test_time_waiting_for_the_loader_is_measured(tmp_path, monkeypatch):
    # a loader that takes 50 ms per batch: the loop waits at least that long for each of its 4 batches an epoch
    monkeypatch.setattr(state_mod, "make_loaders", sup.slow_make_loaders(0.05))
    result = fit(sup.tiny_config(**{"train.epochs": 2}), tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(0.2 <= r["data_wait_s"] <= r["seconds"] for r in rows)
    total = sum(r["seconds"] for r in rows)
    assert result.provenance["data_wait_fraction"] == pytest.approx(sum(r["data_wait_s"] for r in rows) / total)


def test_progress_bar_runs(tmp_path, capsys):
    fit(sup.tiny_config(**{"train.epochs": 1}), tmp_path, progress=True)
    assert "img/s" in capsys.readouterr().out


# --- schedules ----------------------------------------------------------------------------------------------------

def test_plateau_divides_by_ten_at_most_lr_drops_times(tmp_path):
    # lr so small that the validation error cannot change: every epoch after the first is "no improvement".
    cfg = sup.tiny_config(**{"train.schedule": "plateau", "train.lr": 1e-9, "train.plateau_patience": 1,
                             "train.lr_drops": 2, "train.epochs": 5})
    fit(cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-9, 1e-9, 1e-10, 1e-11, 1e-11], rel=1e-9)


def test_plateau_waits_for_patience_and_resets_on_improvement():
    t = sup.tiny_config(**{"train.schedule": "plateau", "train.lr": 0.01, "train.plateau_patience": 2,
                           "train.lr_drops": 3}).train
    state, lrs = schedule.initial_state(t), []
    for err in [50, 40, 45, 41, 39, 39, 39, 39, 39]:
        lrs.append(schedule.lr_at(t, state, len(lrs)))
        state = schedule.after_epoch(t, state, err)
    # improvements at 50, 40, 39; two epochs without one after 40 (45, 41) -> drop; after 39, two more -> drop
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.0001, 0.0001])


def test_step_and_cosine_schedules():
    t = sup.tiny_config(**{"train.schedule": "step", "train.epochs": 90, "train.lr_drops": 3, "train.lr": 0.01}).train
    s = schedule.initial_state(t)
    got = [schedule.lr_at(t, s, e) for e in (0, 22, 23, 44, 45, 67, 68, 89)]
    assert got == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    t = sup.tiny_config(**{"train.schedule": "cosine", "train.epochs": 10, "train.lr": 0.1}).train
    got = [schedule.lr_at(t, s, e) for e in (0, 5, 9)]
    assert got == pytest.approx([0.1, 0.05, 0.05 * (1 + math.cos(math.pi * 0.9))])
    # within an epoch the cosine moves every step: step 50 of 100 in epoch 5 is position 5.5 of 10
    assert schedule.lr_at(t, s, 5, 50, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.55)))
    assert schedule.changes_within_epoch(t, 9)


def test_warmup_rises_linearly_then_hands_over():
    t = sup.tiny_config(**{"train.schedule": "constant", "train.lr": 0.1, "train.warmup_epochs": 0.5}).train
    s = schedule.initial_state(t)
    # 10 steps an epoch, warm-up over the first 5: lr * (i + 1) / 5
    assert [schedule.lr_at(t, s, 0, i, 10) for i in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert schedule.changes_within_epoch(t, 0) and not schedule.changes_within_epoch(t, 1)
    assert schedule.lr_at(t, s, 1, 0, 10) == pytest.approx(0.1)


# --- evaluation ---------------------------------------------------------------------------------------------------

def test_ten_crop_averages_the_softmax_of_ten_views():
    torch.manual_seed(0)
    model = sup.TinyNet(num_classes=5).eval()
    images = torch.randint(0, 256, (12, 3, 10, 10), dtype=torch.uint8)
    labels = torch.randint(0, 5, (12,))
    loader = [(images[:7], labels[:7]), (images[7:], labels[7:])]
    tf = sup.Transform(None, None, False)

    metrics, logits = evaluate(model, loader, tf, crop=8, ten_crop=True)
    mean_probs, got_labels = predict(model, loader, tf, crop=8, ten_crop=True)

    # By hand: the 4 corners and the centre of a 10x10 image at 8x8, and their mirror images.
    x = tf(images)
    views = [x[..., t:t + 8, l:l + 8] for t, l in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    views += [v.flip(-1) for v in views]
    with torch.no_grad():
        probs = torch.stack([F.softmax(model(v), 1) for v in views]).mean(0)
        centre = model(views[4])
    torch.testing.assert_close(mean_probs, probs)
    torch.testing.assert_close(logits, centre)
    assert torch.equal(got_labels, labels)

    def errors(scores):
        order = scores.argsort(1, descending=True)
        top1 = (order[:, 0] != labels).float().mean().item() * 100
        top5 = (~(order[:, :5] == labels[:, None]).any(1)).float().mean().item() * 100
        return top1, top5

    assert (metrics["top1_err_10crop"], metrics["top5_err_10crop"]) == pytest.approx(errors(probs))
    assert (metrics["top1_err"], metrics["top5_err"]) == pytest.approx(errors(centre))
    assert metrics["top5_err"] == 0.0 and 0 < metrics["top1_err"] < 100  # 5 classes; a random net errs sometimes


def test_max_iters_stops_mid_epoch_and_counts_that_epoch(tmp_path):
    result = fit(sup.tiny_config(**{"train.epochs": 5, "train.max_iters": 6}), tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.status == "done" and result.iterations == 6 and result.epochs_done == 2
    assert [r["iteration"] for r in rows] == [4, 6]


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path):
    cfg = sup.tiny_config(**{"train.precision": "bf16", "train.channels_last": True})
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert fit(cfg, tmp_path, progress=False).status == "done"


def test_a_training_set_smaller_than_a_batch_is_a_user_error(tmp_path):
    from repro.errors import UserError

    with pytest.raises(UserError, match="train.batch_size"):
        fit(sup.tiny_config(**{"data.train_limit": 8}), tmp_path, progress=False)  # 8 images, batch 16
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_extract_features_is_the_last_hidden_layer_in_loader_order():
    torch.manual_seed(0)
    model = sup.TinyNet().eval()
    images = torch.randint(0, 256, (9, 3, 10, 10), dtype=torch.uint8)
    labels = torch.arange(9) % 4
    loader = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    tf = sup.Transform(None, None, False)
    feats, got = extract_features(model, loader, tf, crop=8)
    with torch.no_grad():
        expected = model.forward_features(tf(images[..., 1:9, 1:9]))
    assert feats.shape == (9, model.features_dim)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(got, labels)


def test_topk_errors_by_hand():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.35, 0.05, 0.0], [0.5, 0.01, 0.1, 0.12, 0.13, 0.14]])
    top1, top5 = topk_errors(scores, torch.tensor([3, 1]))  # row 0 right; row 1's class ranks 6th of 6
    assert top1 == pytest.approx(50.0) and top5 == pytest.approx(50.0)
    top1, top5 = topk_errors(scores, torch.tensor([4, 2]))  # both rank 5th: top-1 wrong, top-5 right
    assert top1 == pytest.approx(100.0) and top5 == pytest.approx(0.0)


def test_eval_every_scores_every_nth_epoch_and_the_last(tmp_path):
    result = fit(sup.tiny_config(**{"train.epochs": 4, "train.eval_every": 3}), tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["val_top1_err"] is not None for r in rows] == [False, False, True, True]
    assert result.metrics["top1_err"] == rows[-1]["val_top1_err"]
    assert result.metrics["best_val_top1_err"] == min(rows[2]["val_top1_err"], rows[3]["val_top1_err"])


def test_eval_every_with_the_plateau_schedule_is_refused(tmp_path):
    from repro.errors import UserError

    with pytest.raises(UserError, match="train.eval_every = 2: the plateau schedule"):
        fit(sup.tiny_config(**{"train.eval_every": 2, "train.schedule": "plateau"}), tmp_path, progress=False)


def test_a_run_stuck_at_chance_stops_as_did_not_learn(tmp_path):
    # lr 0: the weights never move, so the training error stays at chance (75% on 4 classes) and the learn check
    # at half the run (iteration 120 of 240) stops it; the same run with a working lr passes the check and finishes
    over = {"train.epochs": 60, "train.learn_check": 0.5, "train.log_every": 10}
    result = fit(sup.tiny_config(**over, **{"train.lr": 0.0}), tmp_path / "stuck", progress=False)
    assert result.status == "did not learn" and "within 5 points of chance (75.0% for 4 classes)" in result.error
    assert result.iterations == 120 and RunDir(tmp_path / "stuck").own_status() == "did not learn"
    again = fit(sup.tiny_config(**over, **{"train.lr": 0.0}), tmp_path / "stuck", progress=False)
    assert again.status == "did not learn" and again.iterations == 120  # finished: returned, not trained again
    learns = fit(sup.tiny_config(**over), tmp_path / "learns", progress=False)
    assert learns.status == "done" and learns.iterations == 240
    # too short a run for the check (under 100 steps) is never stopped by it
    short = fit(sup.tiny_config(**{"train.epochs": 4, "train.lr": 0.0, "train.learn_check": 0.5}), tmp_path / "s",
                progress=False)
    assert short.status == "done"


def test_a_checkpoint_counts_samples_so_another_world_size_continues_at_the_same_one(tmp_path):
    # the batch is global: step k is samples [k B, (k + 1) B) of the epoch at any world size
    state = types.SimpleNamespace(cfg=sup.tiny_config(**{"train.batch_size": 16}), run_dir=RunDir(tmp_path))
    assert state_mod._batch_at(state, {"epoch": 0, "batch": 3, "samples": 48, "world": 2}) == 3
    assert state_mod._batch_at(state, {"epoch": 0, "batch": 5}) == 5  # a checkpoint from before samples were kept
    with pytest.raises(UserError, match="not at a step of train.batch_size = 16"):
        state_mod._batch_at(state, {"epoch": 0, "batch": 3, "samples": 40, "world": 1})
    cfg = sup.tiny_config(**{"train.epochs": 1})
    fit(cfg, tmp_path / "r", progress=False)
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert saved["world"] == 1 and saved["samples"] == saved["batch"] * 16
