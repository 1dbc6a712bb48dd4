"""The engine's speed paths on the CPU: the loop reads the device only at its syncs (not per step), a failed
torch.compile falls back to eager with the same results, and scoring at a larger batch gives the same outputs."""

from __future__ import annotations

import logging

import pytest
import torch

import engine_support as sup
from engine_support import read_jsonl
from repro.config import apply_overrides, RunConfig
from repro.engine import checkpoint, evaluate, fit
from repro.engine import state as state_mod
from repro.engine import train as train_mod
from repro.engine.state import wants_compile
from repro.models import build_model

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")  # what makes a host wait for a GPU


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    sup.use_stand_ins(monkeypatch)
    torch.set_num_threads(1)



class CountingBatches:
    """A training loader that counts the batches handed out so far (over all epochs) in `step["n"]`."""

    def __init__(self, batches, step):
        self.batches, self.step = batches, step

    def __iter__(self):
        for batch in self.batches:
            self.step["n"] += 1
            yield batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


def test_the_loop_reads_the_device_only_at_its_syncs(tmp_path, monkeypatch):
    """A curve point every step (log_every 1), 8 points per sync: of 40 steps an epoch, only steps 8, 16, 24, 32
    and the epoch's end (40, where scoring and the checkpoint read the device too) read anything back."""
    monkeypatch.setattr(train_mod, "CURVE_SYNC_STEPS", 8)
    step, reads = {"n": 0}, []

    def make(*a, **k):
        loaders = sup.make_loaders(*a, **k)
        loaders.train = CountingBatches(loaders.train, step)
        return loaders

    monkeypatch.setattr(state_mod, "make_loaders", make)
    for name in READS:
        def counted(self, *a, _real=getattr(torch.Tensor, name), **k):
            reads.append(step["n"])
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = sup.tiny_config(**{"data.train_limit": 640, "train.epochs": 2, "train.log_every": 1})
    result = fit(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert result.status == "done" and result.iterations == 80
    syncs = {0} | {epoch * 40 + k for epoch in range(2) for k in (8, 16, 24, 32, 40)}  # 0: set-up
    assert reads and set(reads) <= syncs, sorted(set(reads) - syncs)
    assert [r["iteration"] for r in read_jsonl(tmp_path / "curve.jsonl")] == list(range(1, 81))


def test_curve_rows_written_later_are_the_same_rows(tmp_path, monkeypatch):
    """The curve file and every result are the same whether the points reach the host at every point or 50 at a
    time (a checkpoint inside the epoch syncs first, so a resume from it is exact)."""
    cfg = sup.tiny_config(**{"data.train_limit": 320, "train.epochs": 2, "train.log_every": 1,
                             "train.checkpoint_minutes": 1e-9})
    runs = {}
    for k in (1, 50):
        monkeypatch.setattr(train_mod, "CURVE_SYNC_STEPS", k)
        runs[k] = fit(cfg, tmp_path / str(k), progress=False)
    assert runs[1].metrics == runs[50].metrics and runs[1].status == "done"
    assert read_jsonl(tmp_path / "1" / "curve.jsonl") == read_jsonl(tmp_path / "50" / "curve.jsonl")
    wa, wb = checkpoint.load(tmp_path / "1")["model"], checkpoint.load(tmp_path / "50")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class FailsAtFirstStep(torch.nn.Module):
    """What torch.compile returns when its compiler is missing: the error comes at the first call, after the
    forward has drawn from the generator (so the eager retry must reseed the step)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        torch.rand(7)
        raise RuntimeError("inductor: no working C compiler\nsecond line")


def _refuse(*a, **k):
    raise RuntimeError("torch.compile is not supported here")


@pytest.mark.parametrize("compile_fn", [_refuse, lambda net, **k: FailsAtFirstStep(net)],
                         ids=["compile-call", "first-step"])
def test_a_failed_compile_trains_eager_with_the_same_results(tmp_path, monkeypatch, caplog, compile_fn):
    monkeypatch.setattr(state_mod, "_warned", set())
    eager = fit(sup.tiny_config(**{"train.compile": "false"}), tmp_path / "eager", progress=False)
    assert eager.provenance["compile"] == "off"
    monkeypatch.setattr(torch, "compile", compile_fn)
    with caplog.at_level(logging.WARNING, logger="repro.engine"):
        first = fit(sup.tiny_config(**{"train.compile": "true"}), tmp_path / "a", progress=False)
        second = fit(sup.tiny_config(**{"train.compile": "true", "train.seed": 1}), tmp_path / "b", progress=False)
    assert first.status == second.status == "done", first.error
    note = first.provenance["compile"]
    assert note.startswith("torch.compile failed (RuntimeError: ") and note.endswith("; trained eager")
    assert "\n" not in note and second.provenance["compile"].endswith("trained eager")
    assert len(caplog.records) == 1 and caplog.records[0].getMessage() == note  # once per process
    assert first.metrics == eager.metrics
    assert read_jsonl(tmp_path / "a" / "curve.jsonl") == read_jsonl(tmp_path / "eager" / "curve.jsonl")


def test_compiled_runs_draw_dropout_masks_from_torchs_generator(tmp_path, monkeypatch):
    import torch._inductor.config as inductor
    seen = []

    def record(net, **kwargs):
        seen.append(inductor.fallback_random)
        return net

    monkeypatch.setattr(torch, "compile", record)
    with inductor.patch(fallback_random=False):  # torch's own way to set its config for a while, restored after
        result = fit(sup.tiny_config(**{"train.compile": "true"}), tmp_path, progress=False)
    assert result.provenance["compile"] == "on" and seen == [True]


def test_compile_is_on_by_default_on_cuda_only(tmp_path):
    assert RunConfig().train.compile == "auto"
    assert wants_compile("auto", torch.device("cuda")) and not wants_compile("auto", torch.device("cpu"))
    assert wants_compile("true", torch.device("cpu")) and not wants_compile("false", torch.device("cuda"))
    assert fit(sup.tiny_config(), tmp_path, progress=False).provenance["compile"] == "off"  # auto on a CPU


class ReusedBuffer:
    """Batches written into one buffer, as FFCV's loader reuses its output memory."""

    def __init__(self, images, labels, sizes):
        self.images, self.labels, self.sizes = images, labels, sizes

    def __iter__(self):
        x, y, start = torch.empty_like(self.images[:max(self.sizes)]), torch.empty_like(self.labels), 0
        for n in self.sizes:
            x[:n].copy_(self.images[start:start + n])
            y[:n].copy_(self.labels[start:start + n])
            yield x[:n], y[:n]
            start += n


@pytest.mark.parametrize("ten_crop", [False, True])
def test_scoring_at_a_larger_batch_gives_the_same_outputs(ten_crop):
    cfg = apply_overrides(RunConfig(), {"model.num_classes": 4, "model.stem": "tiny", "model.width": 0.125,
                                        "model.input_size": 24})
    torch.manual_seed(0)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (31, 3, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 4, (31,))
    sizes = [8, 8, 8, 7]

    def transform(x):
        return (x.float() - 120.0).contiguous(memory_format=torch.channels_last)

    results = [evaluate(model, ReusedBuffer(images, labels, sizes), transform, crop=24, ten_crop=ten_crop,
                        merge=merge) for merge in (1, 2, 3, 4)]
    metrics, logits = results[0]
    assert logits.shape == (31, 4) and 0 <= metrics["top1_err"] <= 100
    for other, other_logits in results[1:]:
        assert other == metrics and torch.equal(other_logits, logits)
    with torch.no_grad():  # and they are the model's outputs on each image's centre crop
        want = model.eval()(transform(images[:, :, 2:26, 2:26]))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_evaluation_batch_is_twice_the_training_batch_by_default():
    t = sup.tiny_config(**{"train.batch_size": 16}).train
    assert train_mod._eval_merge(t) == 2
    assert train_mod._eval_merge(apply_overrides(RunConfig(), {"train.eval_batch_size": 40}).train) == 1  # 128
    assert train_mod._eval_merge(apply_overrides(RunConfig(), {"train.eval_batch_size": 300}).train) == 3
