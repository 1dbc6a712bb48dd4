"""The retrieval analysis: queries and searched images are seeded samples stratified over classes, every run's model
counts, and the interval treats a class's queries as one unit (against scipy and hand computations)."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist

from repro.claims import retrieval
from repro.claims.registry import Evidence


def test_the_sample_covers_every_class_of_class_ordered_labels_evenly():
    labels = np.repeat(np.arange(50), 20)  # sorted by class, as ImageNet's validation set: the first 500 are 25 classes
    pos, per_class = retrieval.stratified_sample(labels, 500, np.random.default_rng(0))
    assert per_class == 10 and len(pos) == 500 and len(np.unique(pos)) == 500
    assert np.array_equal(np.bincount(labels[pos]), np.full(50, 10))
    assert np.all(np.diff(pos) > 0)  # in stored order, for the loaders
    again, _ = retrieval.stratified_sample(labels, 500, np.random.default_rng(0))
    other, _ = retrieval.stratified_sample(labels, 500, np.random.default_rng(1))
    assert np.array_equal(pos, again) and not np.array_equal(pos, other)
    # a class smaller than its share gives all it has; more classes than queries: one query each
    uneven = np.concatenate([np.zeros(3, int), np.ones(40, int)])
    pos, per_class = retrieval.stratified_sample(uneven, 20, np.random.default_rng(0))
    assert per_class == 10 and np.array_equal(np.bincount(uneven[pos]), [3, 10])
    many = np.repeat(np.arange(1000), 50)
    pos, per_class = retrieval.stratified_sample(many, 500, np.random.default_rng(0))
    assert per_class == 1 and np.array_equal(np.bincount(many[pos]), np.ones(1000))


def test_queries_and_searched_images_are_drawn_over_all_classes_of_the_pool(monkeypatch):
    pools = {"val": (np.arange(1000, 1600, dtype=np.uint64), np.repeat(np.arange(30), 20)),
             "train": (np.arange(0, 30000, 2, dtype=np.uint64), np.repeat(np.arange(30), 500))}
    monkeypatch.setattr(retrieval, "_split", lambda cfg, manifest, split: pools[split])
    q_ids, d_ids, how = retrieval._samples(None, {})
    q_labels = pools["val"][1][(q_ids - 1000).astype(int)]
    d_labels = pools["train"][1][(d_ids // 2).astype(int)]
    assert np.array_equal(np.bincount(q_labels), np.full(30, 17))  # ceil(500 / 30)
    assert np.array_equal(np.bincount(d_labels), np.full(30, 334))  # ceil(10000 / 30)
    assert how["seed"] == retrieval.SAMPLE_SEED and how["queries_per_class"] == 17
    assert how["query_pool"] == 600 and how["database_pool"] == 15000
    again = retrieval._samples(None, {})
    assert np.array_equal(again[0], q_ids) and np.array_equal(again[1], d_ids)


def test_nearest_reads_the_database_in_chunks_and_agrees_with_brute_force():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (13, 3, 4, 4), generator=g, dtype=torch.uint8)
    db = torch.randint(0, 256, (50, 3, 4, 4), generator=g, dtype=torch.uint8)
    idx = retrieval.nearest(q, db, 4, chunk=7)
    d = cdist(q.flatten(1).double().numpy(), db.flatten(1).double().numpy())
    assert np.array_equal(idx.numpy(), np.argsort(d, axis=1, kind="stable")[:, :4])


def test_every_model_counts_and_the_hits_are_averaged_per_query():
    g = torch.Generator().manual_seed(2)
    ql, dl = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (40,), generator=g)
    qf = [torch.randn(12, 6, generator=g) for _ in range(2)]
    df = [torch.randn(40, 6, generator=g) for _ in range(2)]
    qp, dp = torch.randn(12, 5, generator=g), torch.randn(40, 5, generator=g)
    done = [(types.SimpleNamespace(variant="baseline", seed=s, config_hash=f"h{s}"), None, {}) for s in range(2)]
    out, _ = retrieval._agreements(done, qf, df, qp, dp, ql, dl)

    def hits(q, db):
        nn = np.argsort(cdist(q.numpy(), db.numpy()), axis=1)[:, :5]
        return (dl.numpy()[nn] == ql.numpy()[:, None]).sum(1)

    by_model = [hits(q, d) for q, d in zip(qf, df)]
    assert out["n_models"] == 2 and [m["seed"] for m in out["models"]] == [0, 1]
    assert out["per_query"]["feature_hits_by_model"] == [h.tolist() for h in by_model]
    assert out["per_query"]["feature_hits"] == pytest.approx(np.mean(by_model, axis=0))
    assert out["feature_agreement"] == pytest.approx(np.mean(by_model) / 5)
    assert out["per_query"]["pixel_hits"] == hits(qp, dp).tolist()
    share = np.bincount(dl.numpy(), minlength=3) / 40
    assert out["per_query"]["chance"] == pytest.approx(share[ql.numpy()])
    assert out["version"] == retrieval.ANALYSIS_VERSION and out["query_classes"] == len(np.unique(ql.numpy()))


def _analysis(labels, feat, pix, k=5, chance=0.1):
    return {"version": retrieval.ANALYSIS_VERSION, "k": k, "n_models": 3, "queries": len(labels),
            "per_query": {"label": list(labels), "feature_hits": list(feat), "pixel_hits": list(pix),
                          "chance": [chance] * len(labels)}}


def test_the_interval_is_over_classes_not_queries():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 25)  # class-ordered queries
    # a class effect shared by all of a class's queries: the queries of one class are not independent
    feat = np.clip(np.repeat(rng.integers(1, 5, 8), 25) + rng.integers(-1, 2, 200), 0, 5)
    pix = rng.integers(0, 3, 200)
    c, chance = retrieval.judge(None, Evidence("full", None, _analysis(labels, feat, pix)))[0]
    by_class = pd.Series(100.0 * (feat - pix) / 5).groupby(labels).mean()
    ci = stats.ttest_1samp(by_class.to_numpy(), 0.0).confidence_interval(0.95)
    assert c.measured.n == 8 and "over classes" in c.measured.method
    assert c.measured.mean == pytest.approx(by_class.mean())
    assert (c.measured.lo, c.measured.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert c.values == {f"class {k}": pytest.approx(v) for k, v in by_class.items()}
    assert "200 queries in 8 classes" in c.reason and "3 model(s)" in c.reason
    over_queries = stats.ttest_1samp(100.0 * (feat - pix) / 5, 0.0).confidence_interval(0.95)
    assert c.measured.hi - c.measured.lo > over_queries.high - over_queries.low  # what the old interval claimed
    assert chance.context and chance.measured.n == 8
    assert chance.measured.mean == pytest.approx((100.0 * feat / 5 - 10.0).mean())  # equal class sizes


def test_an_analysis_of_the_older_format_is_not_judged():
    old = {"k": 5, "queries": 4, "per_query": {"feature_hits": [5, 4, 5, 3], "pixel_hits": [1, 0, 2, 1]}}
    c = retrieval.judge(None, Evidence("demo", None, old))[0][0]
    assert c.verdict == "not run" and "older format" in c.reason and "--scale demo" in c.reason
    assert retrieval.judge(None, Evidence("demo", None, {"status": "no done runs"}))[0][0].verdict == "not run"


def test_the_figure_shows_queries_of_different_classes():
    labels = np.repeat(np.arange(5), 4)
    picked = retrieval._figure_queries(labels, 8)
    assert labels[picked].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
