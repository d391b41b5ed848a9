"""Bucketed PSI (``vfl.psi.buckets``, PROTOCOL.md [P12]-[P17]) in memory: the result is the set intersection, in one
order at both parties, for every K; K = 1 is exactly the plain exchange; every check on a peer's bucket messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.psi import encode_ids
from vfl.psi import exchange as core
from vfl.psi.buckets import (
    MAX_BUCKETS,
    MIN_BUCKET_ITEMS,
    BucketedReceiver,
    BucketedSender,
    BucketedStart,
    BucketStart,
    MemoryBuckets,
    assign_buckets,
    bucket_key,
    capacity_for,
    choose_buckets,
    run_bucketed_in_memory,
)
from vfl.psi.cipher import PsiKey
from vfl.psi.errors import (
    ChunkOrderError,
    LimitExceededError,
    MalformedMessageError,
    PsiRemoteError,
    TruncatedStreamError,
)

NONCE = bytes(range(16))


def parties(engine, a, b, k, *, chunk=16, keys=(None, None), capacity=(None, None), nonce=NONCE):
    # small sets with small capacities: the [P18] floor lowered to 1 (its own tests put it back)
    d = BucketedSender(MemoryBuckets(a), engine=engine, run_id="run", nonce=nonce, chunk_size=chunk, buckets=k,
                       key=keys[0], capacity=capacity[0], min_bucket_items=1)
    lh = BucketedReceiver(MemoryBuckets(b), engine=engine, run_id="run", nonce=nonce, chunk_size=chunk, buckets=k,
                          key=keys[1], capacity=capacity[1], min_bucket_items=1)
    return d, lh


def check_result(a, b, d_rows, l_rows):
    """The intersection, as Python sets compute it, in the same order at both parties, each row pointing at the
    party's own input."""
    assert [a[i] for i in d_rows] == [b[i] for i in l_rows]
    assert set(a[i] for i in d_rows) == set(a) & set(b)
    assert len(d_rows) == len(set(a) & set(b))
    assert d_rows.dtype == l_rows.dtype == np.int64


def ids(values) -> list[bytes]:
    return encode_ids(sorted(values))


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    k=st.sampled_from([1, 2, 7, 64]),
    a=st.sets(st.integers(0, 400), max_size=120),
    b=st.sets(st.integers(0, 400), max_size=120),
    chunk=st.integers(1, 40),
)
def test_bucketed_psi_is_the_set_intersection_in_one_order(engine, k, a, b, chunk):
    a, b = ids(a), ids(b)
    d, lh = parties(engine, a, b, k, chunk=chunk)
    d_rows, l_rows = run_bucketed_in_memory(d, lh)
    check_result(a, b, d_rows, l_rows)
    assert d.k == lh.k == k


@pytest.mark.parametrize("k", [1, 2, 7, 64])
@pytest.mark.parametrize(
    "a, b",
    [
        (range(0, 2), range(0, 600)),  # one side much larger (most of the 64 buckets empty on the small side)
        (range(0, 600), range(595, 600)),
        (range(0, 300), range(0, 300)),  # every item shared
        (range(0, 300), range(300, 600)),  # nothing shared
        (range(0, 0), range(0, 50)),  # an empty set: every bucket empty on one side
        (range(0, 5), range(0, 0)),
    ],
    ids=["small-large", "large-small", "all-shared", "none-shared", "empty-left", "empty-right"],
)
def test_bucketed_psi_on_skewed_sets(engine, k, a, b):
    a, b = ids(a), ids(b)
    d, lh = parties(engine, a, b, k, chunk=64)
    check_result(a, b, *run_bucketed_in_memory(d, lh))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.sets(st.integers(0, 300), max_size=100), b=st.sets(st.integers(0, 300), max_size=100))
def test_one_bucket_is_exactly_the_plain_exchange(engine, a, b):
    a, b = ids(a), ids(b)
    kd, kl = PsiKey.generate(), PsiKey.generate()
    plain = core.run_in_memory(
        core.PsiSender(a, engine=engine, run_id="run", nonce=NONCE, chunk_size=16, key=kd),
        core.PsiReceiver(b, engine=engine, run_id="run", nonce=NONCE, chunk_size=16, key=kl),
    )
    d, lh = parties(engine, a, b, 1, keys=(kd, kl))
    bucketed = run_bucketed_in_memory(d, lh)
    assert np.array_equal(bucketed[0], plain[0]) and np.array_equal(bucketed[1], plain[1])


def test_the_order_is_bucket_then_joint_token(engine):
    a = ids(range(0, 400))
    b = ids(range(100, 500))
    d, lh = parties(engine, a, b, 7)
    d_rows, _ = run_bucketed_in_memory(d, lh)
    which = assign_buckets([a[i] for i in d_rows], bucket_key("run", NONCE), 7)
    assert np.all(np.diff(which.astype(np.int64)) >= 0)  # bucket by bucket
    assert len(set(which.tolist())) == 7


def test_a_memory_budget_chooses_K_and_both_parties_hold_it(engine):
    a, b = ids(range(0, 900)), ids(range(450, 1500))
    d, lh = parties(engine, a, b, "auto", capacity=(400, None), chunk=100)
    check_result(a, b, *run_bucketed_in_memory(d, lh))
    assert d.k == lh.k == choose_buckets(len(a) + len(b), 400) > 1
    # the label holder's own budget counts as well: the larger requirement wins
    d, lh = parties(engine, a, b, "auto", capacity=(None, 200), chunk=100)
    run_bucketed_in_memory(d, lh)
    assert d.k == lh.k == choose_buckets(len(a) + len(b), 200)


def test_the_partition_is_fresh_with_every_nonce():
    items = ids(range(2000))
    one = assign_buckets(items, bucket_key("run", NONCE), 16)
    other = assign_buckets(items, bucket_key("run", bytes(16)), 16)
    assert np.mean(one == other) < 0.2  # independent partitions agree on about 1/16 of the items
    assert np.array_equal(one, assign_buckets(items, bucket_key("run", NONCE), 16))  # the same key, the same buckets
    counts = np.bincount(one, minlength=16)
    assert counts.min() > 60 and counts.max() < 190  # about 125 each


def test_choose_buckets_is_the_fewest_that_fit():
    assert choose_buckets(10, None) == 1 and choose_buckets(0, 5) == 1
    for total, cap in [(6300, 4096), (2_000_000, capacity_for(256)), (10**7, 10**5), (500, 30)]:
        k = choose_buckets(total, cap)
        mean = total / k
        assert mean + 7 * (2 * mean) ** 0.5 + 7 <= cap
        if k > 1:
            m = total / (k - 1)
            assert m + 7 * (2 * m) ** 0.5 + 7 > cap
    assert choose_buckets(10**12, 10) == MAX_BUCKETS  # cannot fit: the most buckets, then the size checks refuse


# ------------------------------------------------------------------------------------------------ wire checks


def started(engine, k=4, *, a=range(0, 40), b=range(20, 60), capacity=(None, None)):
    """Both PSI_STARTs exchanged; returns (D, L, D's first PSI_BUCKET)."""
    d, lh = parties(engine, ids(a), ids(b), k, capacity=capacity)
    lh.receive(d.start())
    (first,) = d.receive(lh.start())
    return d, lh, first


def test_P13_a_bucket_index_outside_0_to_K_minus_1_is_refused(engine):
    d, lh, first = started(engine)
    with pytest.raises(LimitExceededError, match="bucket = 4 but the PSI has 4 buckets"):
        lh.receive(BucketStart(bucket=4, n_items=first.n_items))
    d, lh, first = started(engine)
    with pytest.raises(LimitExceededError, match="has 4 buckets"):
        d.receive(BucketStart(bucket=9, n_items=0))


def test_P13_a_repeated_bucket_is_refused(engine):
    d, lh, first = started(engine)
    lh.receive(first)
    with pytest.raises(ChunkOrderError, match="repeats a bucket"):
        lh.receive(first)
    d, lh, first = started(engine)
    (answer,) = lh.receive(first)
    d.receive(answer)
    with pytest.raises(ChunkOrderError, match="repeats a bucket"):
        d.receive(answer)


def test_P13_a_skipped_bucket_and_a_bucket_before_the_last_one_finished_are_refused(engine):
    d, lh, first = started(engine)
    with pytest.raises(ChunkOrderError, match="skips ahead; expected bucket 0"):
        lh.receive(BucketStart(bucket=1, n_items=0))
    d, lh, first = started(engine)
    lh.receive(first)
    with pytest.raises(ChunkOrderError, match="before bucket 0 finished"):
        lh.receive(BucketStart(bucket=1, n_items=0))
    d, lh, first = started(engine)
    (answer,) = lh.receive(first)
    d.receive(answer)
    with pytest.raises(ChunkOrderError, match="before bucket 0 finished"):  # L may not open what D has not
        d.receive(BucketStart(bucket=1, n_items=0))


def test_P13_every_bucket_exactly_once_adds_up_to_the_announced_set(engine):
    d, lh, first = started(engine)
    with pytest.raises(LimitExceededError, match="only 40 of the peer's announced 40 are left"):
        lh.receive(BucketStart(bucket=0, n_items=41))
    d, lh, first = started(engine, k=1)
    with pytest.raises(TruncatedStreamError, match="buckets hold 39 items, not the 40"):
        lh.receive(BucketStart(bucket=0, n_items=39))


def test_P13_a_chunk_outside_an_open_bucket_is_refused(engine):
    d, lh, first = started(engine)
    chunk = d.work()[0]
    with pytest.raises(ChunkOrderError, match="outside an open bucket"):
        lh.receive(chunk)


def test_P12_K_must_be_what_the_session_agreed(engine):
    d, lh = parties(engine, ids(range(10)), ids(range(10)), 4)
    d.start()
    with pytest.raises(MalformedMessageError, match="buckets = 5, but the session agreed on 4"):
        d.receive(BucketedStart(n_items=10, chunk_size=16, buckets=5))


@pytest.mark.parametrize("bad", [0, MAX_BUCKETS + 1, True, "7", None])
def test_P12_K_out_of_range_or_missing_is_refused(engine, bad):
    d, lh = parties(engine, ids(range(10)), ids(range(10)), "auto")
    d.start()
    with pytest.raises(PsiRemoteError, match="PSI_START.buckets"):
        d.receive(BucketedStart(n_items=10, chunk_size=16, buckets=bad))


def test_P12_too_few_buckets_for_the_data_holders_budget_is_refused(engine):
    d, lh = parties(engine, ids(range(100)), ids(range(100)), "auto", capacity=(50, None))
    d.start()
    with pytest.raises(LimitExceededError, match="too few for 100 \\+ 100 items"):
        d.receive(BucketedStart(n_items=100, chunk_size=16, buckets=2))


def test_P12_who_sends_which_start_field(engine):
    d, lh = parties(engine, ids(range(10)), ids(range(10)), "auto")
    with pytest.raises(MalformedMessageError, match="the label holder decides K"):
        lh.receive(BucketedStart(n_items=10, chunk_size=16, buckets=3))
    d.start()
    with pytest.raises(MalformedMessageError, match="only D sends it"):
        d.receive(BucketedStart(n_items=10, chunk_size=16, buckets=3, bucket_items=100))


class CountingBuckets(MemoryBuckets):
    """MemoryBuckets that count their partitions: a refused K must be refused before any item is partitioned."""

    partitions = 0

    def partition(self, key: bytes, k: int, keep: int = 0, peer_n_items: int = 0) -> np.ndarray:
        self.partitions += 1
        return super().partition(key, k, keep, peer_n_items)


def test_P18_a_data_holder_budget_below_the_floor_is_refused_before_partitioning(engine):
    src = CountingBuckets(ids(range(100)))
    lh = BucketedReceiver(src, engine=engine, run_id="run", nonce=NONCE, chunk_size=16, buckets="auto")
    with pytest.raises(LimitExceededError, match=f"PSI_START.bucket_items = 1 outside the allowed range \\[{MIN_BUCKET_ITEMS}"):
        lh.receive(BucketedStart(n_items=10**6, chunk_size=16, bucket_items=1))
    assert src.partitions == 0 and MIN_BUCKET_ITEMS == capacity_for(1)


def test_P18_a_label_holder_that_asks_for_more_buckets_than_any_budget_needs_is_refused(engine):
    src = CountingBuckets(ids(range(100)))
    d = BucketedSender(src, engine=engine, run_id="run", nonce=NONCE, chunk_size=16, buckets="auto")
    d.start()
    most = choose_buckets(100 + 10**6, MIN_BUCKET_ITEMS)
    with pytest.raises(LimitExceededError, match=f"PSI_START.buckets = {most + 1} is more than any budget needs"):
        d.receive(BucketedStart(n_items=10**6, chunk_size=16, buckets=most + 1))
    assert src.partitions == 0
    # exactly the bound is accepted: the K a peer with the smallest budget would need
    d = BucketedSender(MemoryBuckets(ids(range(100))), engine=engine, run_id="run", nonce=NONCE, chunk_size=16,
                       buckets="auto")
    d.start()
    assert d.receive(BucketedStart(n_items=10**6, chunk_size=16, buckets=most))


def test_P18_sets_that_fit_no_K_are_refused_before_partitioning(engine):
    src = CountingBuckets(ids(range(100)))
    lh = BucketedReceiver(src, engine=engine, run_id="run", nonce=NONCE, chunk_size=16, buckets="auto")
    n = 4 * MAX_BUCKETS * MIN_BUCKET_ITEMS  # a set this big cannot fit 65,536 buckets of the smallest budget
    with pytest.raises(LimitExceededError, match="do not fit the data holder's PSI_START.bucket_items"):
        lh.receive(BucketedStart(n_items=n, chunk_size=16, bucket_items=MIN_BUCKET_ITEMS))
    assert src.partitions == 0


def test_P14_a_bucket_larger_than_the_capacity_is_refused(engine):
    # D's budget allows 8 buckets of 62 items; a label holder that puts all its 60 items in bucket 0 is refused
    d, lh, first = started(engine, k=8, a=range(0, 60), b=range(0, 60), capacity=(62, None))
    assert first.n_items > 0
    with pytest.raises(LimitExceededError, match=r"holds \d+ \+ 60 items, more than this party's capacity of 62"):
        d.receive(BucketStart(bucket=0, n_items=60))
    d, lh, first = started(engine, k=4, a=range(0, 40), b=range(0, 40), capacity=(None, 30))
    with pytest.raises(LimitExceededError, match="capacity of 30"):
        lh.receive(BucketStart(bucket=0, n_items=40))


def test_P15_the_partition_is_the_specified_keyed_hash_and_every_item_is_in_one_bucket(engine):
    import hashlib

    from vfl.psi.curve import hash_domain

    key = hashlib.blake2b(hash_domain("run", NONCE), digest_size=32, person=b"vfl/psi/bucket1").digest()
    assert key == bucket_key("run", NONCE)
    items = ids(range(300))
    spec = [int.from_bytes(hashlib.blake2b(x, key=key, digest_size=8).digest(), "little") % 7 for x in items]
    assert assign_buckets(items, key, 7).tolist() == spec
    source = MemoryBuckets(items)
    counts = source.partition(key, 7)
    rows = np.concatenate([source.bucket(b)[1] for b in range(7)])
    assert counts.sum() == len(items) and sorted(rows.tolist()) == list(range(300))
    assert all(spec[r] == b for b in range(7) for r in source.bucket(b)[1].tolist())
