"""Each (seed, epoch) has its own order and crop draws, the same at any number of processes, and a digest that says
which data an epoch saw; every epoch of a real run records it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import repro.data.order as order_mod
from repro.data.crops import draw_words
from repro.data.order import BatchOrder, crop_key, epoch_order, order_digest, rank_share


def test_no_two_seed_epoch_pairs_share_an_order_or_crops():
    ids = np.arange(1000)
    pairs = list(itertools.product(range(8), range(8)))
    digests = {order_digest(ids, s, e, 32) for s, e in pairs}
    orders = {epoch_order(ids, s, e).tobytes() for s, e in pairs}
    keys = {crop_key(s, e).tobytes() for s, e in pairs}
    assert len(digests) == len(orders) == len(keys) == len(pairs)
    # the old rule, a generator seeded by seed + epoch, made seed 1's epoch 0 seed 0's epoch 1: not any more
    old = [np.random.default_rng(s + e).permutation(ids) for s, e in ((1, 0), (0, 1))]
    assert np.array_equal(*old)
    assert not np.array_equal(epoch_order(ids, 1, 0), epoch_order(ids, 0, 1))
    assert order_digest(ids, 1, 0, 32) != order_digest(ids, 0, 1, 32)
    # and the crops of one sample differ between those two epochs
    one = np.array([17], dtype=np.uint64)
    assert (draw_words(one, crop_key(1, 0)) != draw_words(one, crop_key(0, 1))).any()


def test_the_digest_is_stable_and_sees_order_and_crops():
    ids = np.arange(200)
    assert order_digest(ids, 3, 5, 16) == order_digest(ids.copy(), 3, 5, 16)
    assert len(order_digest(ids, 3, 5, 16)) == 16
    # it covers the samples trained on: a subset of other ids is another digest
    assert order_digest(ids[:100], 3, 5, 16) != order_digest(ids[100:], 3, 5, 16)


def test_the_digest_changes_with_the_order_alone_and_with_the_crops_alone(monkeypatch):
    ids = np.arange(200)
    digest = order_digest(ids, 3, 5, 16)
    real_order, real_key = order_mod.epoch_order, order_mod.crop_key
    with monkeypatch.context() as m:  # the same samples, the same crops, another order
        m.setattr(order_mod, "epoch_order", lambda i, s, e: real_order(i, s, e)[::-1])
        assert order_digest(ids, 3, 5, 16) != digest
    with monkeypatch.context() as m:  # the same order, other crop draws
        m.setattr(order_mod, "crop_key", lambda s, e: real_key(s, e) + np.uint64(1))
        assert order_digest(ids, 3, 5, 16) != digest
    assert order_digest(ids, 3, 5, 16) == digest


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_global_order_is_the_same_at_any_world_size(world):
    order = epoch_order(np.arange(1003), 5, 2)
    batch = 96 // world  # a global step of 96 samples
    shares = [rank_share(order, batch, r, world) for r in range(world)]
    steps = len(order) // 96
    assert all(len(s) == steps * batch for s in shares)
    # step k of all ranks together is samples [96k, 96k+96) of the one global order
    together = np.concatenate([np.concatenate([s[k * batch:(k + 1) * batch] for s in shares]) for k in range(steps)])
    np.testing.assert_array_equal(together, order[:steps * 96])


def test_batch_order_hands_out_the_key_and_the_epoch_order():
    ids = np.arange(10, 60)
    order = BatchOrder(ids, 8, train=True, seed=4, distributed=False)
    order.epoch = 2
    items = list(order)
    assert all(key == tuple(int(k) for k in crop_key(4, 2)) for key, _ in items)
    got = np.concatenate([batch for _, batch in items])
    np.testing.assert_array_equal(got, epoch_order(ids, 4, 2)[:48])
    order.epoch, order.first_batch = 2, 3  # a resume inside the epoch: its later batches, unchanged
    assert [b for _, b in order] == [b for _, b in items[3:]]
    val = BatchOrder(ids, 8, train=False, seed=4, distributed=False)
    assert np.concatenate(list(val)).tolist() == ids.tolist()


def test_seeds_must_be_non_negative():
    with pytest.raises(ValueError):
        crop_key(-1, 0)
