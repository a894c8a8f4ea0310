"""The global sample order: a function of (seed, epoch, identities), kept by identity."""
import numpy as np
import pytest

from data.order import epoch_order, order_keys, position, sample_ids


@pytest.fixture
def names():
    return [f"train/c{i % 7}/img_{i:05d}.jpg" for i in range(2000)]


@pytest.mark.parametrize("groups", [None, "shards"])
def test_order_is_a_permutation_fixed_by_seed_and_epoch(names, groups):
    ids = sample_ids(names)
    shard = np.arange(len(ids)) // 300 if groups else None
    order = epoch_order(ids, seed=3, epoch=1, groups=shard, window=2)
    assert sorted(order.tolist()) == list(range(len(ids)))
    assert np.array_equal(order, epoch_order(ids, seed=3, epoch=1, groups=shard, window=2))
    assert not np.array_equal(order, epoch_order(ids, seed=3, epoch=2, groups=shard, window=2))
    assert not np.array_equal(order, epoch_order(ids, seed=4, epoch=1, groups=shard, window=2))


def test_shard_windows_keep_reads_local(names):
    ids = sample_ids(names)
    shard = np.arange(len(ids)) // 100  # 20 shards
    order = epoch_order(ids, seed=0, epoch=0, groups=shard, window=2)
    for start in range(0, len(order), 200):  # each window of 2 shards is visited as one block
        assert len(np.unique(shard[order[start:start + 200]])) == 2


@pytest.mark.parametrize("groups", [None, "shards"])
def test_removing_samples_keeps_the_others_order_and_the_position(names, groups):
    ids = sample_ids(names)
    shard = np.arange(len(ids)) // 300 if groups else None
    keys = order_keys(ids, 0, 5, shard, window=2)
    order = epoch_order(ids, 0, 5, shard, window=2)
    done = 700
    last = order[done - 1]
    consumed = set(order[:done].tolist())
    assert position(ids, keys, order, keys[last], ids[last]) == done
    removed = {order[10], order[done - 1], order[1500]}  # before, at and after the position
    keep = np.array([i for i in range(len(ids)) if i not in removed])
    kept_ids, kept_shard = ids[keep], None if shard is None else shard[keep]
    new_keys = order_keys(kept_ids, 0, 5, kept_shard, window=2)
    new_order = epoch_order(kept_ids, 0, 5, kept_shard, window=2)
    assert [keep[i] for i in new_order] == [i for i in order if i not in removed]
    resumed = position(kept_ids, new_keys, new_order, keys[last], ids[last])
    assert set(keep[new_order[:resumed]].tolist()) == consumed - removed
