"""Resuming a bucketed PSI (``vfl.psi.buckets``, PROTOCOL.md [P19]-[P22]) in memory.

A pairwise PSI is cut off at an arbitrary message (both sides lose whatever was in flight, as a kill -9 or a lost
connection does), then both parties start again with fresh secret exponents and what their sources kept (the
finished buckets, as the node's spill folder keeps them across a kill). The result is the set intersection, in one
order at both parties; the finished buckets keep the first run's order; with the same exponents the result is
exactly the uninterrupted run's. Every check on a peer's resume fields is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.psi import encode_ids
from vfl.psi.buckets import (
    BucketedReceiver,
    BucketedSender,
    BucketedStart,
    MemoryBuckets,
    chain_digest,
    run_bucketed_in_memory,
)
from vfl.psi.cipher import PsiKey
from vfl.psi.errors import InvalidResultError, LimitExceededError, MalformedMessageError

NONCE = bytes(range(16))


def ids(values) -> list[bytes]:
    return encode_ids(sorted(values))


def make(engine, d_src, l_src, k, *, keys=(None, None), chunk=8):
    d = BucketedSender(d_src, engine=engine, run_id="run", nonce=NONCE, chunk_size=chunk, buckets=k, key=keys[0],
                       min_bucket_items=1)
    lh = BucketedReceiver(l_src, engine=engine, run_id="run", nonce=NONCE, chunk_size=chunk, buckets=k, key=keys[1],
                          min_bucket_items=1)
    return d, lh


def run_until(d: BucketedSender, lh: BucketedReceiver, deliveries: int | None = None, stop=None) -> None:
    """Drive the exchange as run_bucketed_in_memory does, but stop (dropping everything in flight) after
    ``deliveries`` messages were handed to a party, once ``stop()`` holds, or when the exchange ended."""
    lh.receive(d.start())
    to_l = d.receive(lh.start())
    to_d: list = []
    n = 0

    def halt() -> bool:
        return (deliveries is not None and n >= deliveries) or (stop is not None and stop())

    for _ in range(100_000):  # bounded: every turn moves a message or computes a chunk
        if halt() or not (to_l or to_d or d.has_work or lh.has_work):
            return
        while to_l and not halt():
            to_d += lh.receive(to_l.pop(0))
            n += 1
        to_l += d.work()
        while to_d and not halt():
            to_l += d.receive(to_d.pop(0))
            n += 1
        to_d += lh.work()
    raise AssertionError("the exchange did not stop")


def check(a, b, d_rows, l_rows):
    assert [a[i] for i in d_rows] == [b[i] for i in l_rows]
    assert set(a[i] for i in d_rows) == set(a) & set(b) and len(d_rows) == len(set(a) & set(b))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_a=st.integers(0, 120),
    n_b=st.integers(0, 120),
    shift=st.integers(0, 120),
    k=st.sampled_from([1, 2, 7, 16]),
    cut=st.integers(0, 400),
)
def test_a_resumed_psi_is_the_intersection_in_one_order_and_keeps_the_finished_buckets(engine, n_a, n_b, shift, k, cut):
    a, b = ids(range(n_a)), ids(range(shift, shift + n_b))
    d0, l0 = make(engine, MemoryBuckets(a), MemoryBuckets(b), k)
    run_until(d0, l0, cut)
    d_src, l_src = MemoryBuckets.after(d0.source), MemoryBuckets.after(l0.source)
    kept_d = {bk: r.copy() for bk, r in d_src.committed.items()}
    both = min(len(kept_d), len(l_src.committed))
    d1, l1 = make(engine, d_src, l_src, k)  # fresh exponents: a key is never kept
    d_rows, l_rows = run_bucketed_in_memory(d1, l1)
    check(a, b, d_rows, l_rows)
    # the buckets both had finished are not exchanged again: they keep the first run's rows and order
    assert d1.resumed_at == l1.resumed_at == both
    for bk in range(d1.resumed_at):
        assert np.array_equal(d_src.result(bk), kept_d[bk])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(1, 300), k=st.sampled_from([2, 7]))
def test_with_the_same_exponents_a_resumed_psi_equals_the_uninterrupted_one(engine, cut, k):
    a, b = ids(range(0, 90)), ids(range(30, 130))
    keys = (PsiKey.generate(), PsiKey.generate())
    ref = run_bucketed_in_memory(*make(engine, MemoryBuckets(a), MemoryBuckets(b), k, keys=keys))
    d0, l0 = make(engine, MemoryBuckets(a), MemoryBuckets(b), k, keys=keys)
    run_until(d0, l0, cut)
    d1, l1 = make(engine, MemoryBuckets.after(d0.source), MemoryBuckets.after(l0.source), k, keys=keys)
    got = run_bucketed_in_memory(d1, l1)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def interrupted(engine, k=7, finished=3):
    """Sources after a run cut off once the label holder finished ``finished`` buckets."""
    a, b = ids(range(0, 200)), ids(range(100, 300))
    d0, l0 = make(engine, MemoryBuckets(a), MemoryBuckets(b), k)
    run_until(d0, l0, stop=lambda: l0.finished_buckets >= finished)
    assert l0.finished_buckets == finished and l0.k == k
    return a, b, MemoryBuckets.after(d0.source), MemoryBuckets.after(l0.source)


def test_P20_the_data_holder_announces_its_finished_buckets_and_their_chain_digest(engine):
    a, b, d_src, l_src = interrupted(engine)
    d, _ = make(engine, d_src, l_src, 7)
    start = d.start()
    c = len(d_src.earlier().finished)
    assert c in (3, 4)  # D finishes a bucket before L has checked its result
    assert start.resume == c and start.resume_digest == chain_digest(7, [f.digest for f in d_src.earlier().finished])
    fresh = BucketedSender(MemoryBuckets(a), engine=engine, run_id="run", nonce=NONCE, buckets=7, min_bucket_items=1)
    assert fresh.start().resume is None and fresh.start is not None


def test_P20_the_label_holder_resumes_at_the_fewer_finished_buckets_and_sends_its_chain(engine):
    a, b, d_src, l_src = interrupted(engine)
    d, lh = make(engine, d_src, l_src, 7)
    lh.receive(d.start())
    start = lh.start()
    assert start.resume == 3 and start.resume_digest == chain_digest(7, [f.digest for f in l_src.earlier().finished])
    assert [m.bucket for m in d.receive(start)] == [3]  # D opens the first bucket not finished by both


def test_P20_a_label_holder_without_the_pair_s_buckets_starts_over(engine):
    a, b, d_src, _ = interrupted(engine)
    d, lh = make(engine, d_src, MemoryBuckets(b), 7)
    d_rows, l_rows = run_bucketed_in_memory(d, lh)
    assert lh.resumed_at == d.resumed_at == 0
    check(a, b, d_rows, l_rows)


def test_P20_a_changed_data_holder_set_size_starts_over(engine):
    a, b, _, l_src = interrupted(engine)
    a2 = ids(range(0, 201))
    d, lh = make(engine, MemoryBuckets(a2), l_src, 7)
    # a data holder may not even claim a resume for another set: here it claims one, and L still starts over
    start = d.start()
    forged = BucketedStart(n_items=start.n_items, chunk_size=start.chunk_size, resume=2, resume_digest=bytes(32))
    lh.receive(forged)
    assert lh.start().resume is None and lh.resumed_at == 0


def test_P20_a_data_holder_whose_chain_digest_differs_is_refused(engine):
    a, b, d_src, l_src = interrupted(engine)
    d, lh = make(engine, d_src, l_src, 7)
    start = d.start()
    forged = BucketedStart(n_items=start.n_items, chunk_size=start.chunk_size, resume=3, resume_digest=bytes(32))
    with pytest.raises(InvalidResultError, match="finished bucket.*delete the psi-buckets folder of either party"):
        lh.receive(forged)  # it would fail again at every start: the error says how to start over


def test_P20_resume_fields_are_checked(engine):
    a, b, d_src, l_src = interrupted(engine)
    for bad, err, what in [
        (dict(resume=3), MalformedMessageError, "without resume_digest"),
        (dict(resume_digest=bytes(32)), MalformedMessageError, "without resume_digest"),
        (dict(resume=3, resume_digest=b"short"), MalformedMessageError, "32 bytes"),
        (dict(resume=0, resume_digest=bytes(32)), LimitExceededError, "resume"),
        (dict(resume=8, resume_digest=bytes(32)), LimitExceededError, "more than the 7 buckets"),
    ]:
        _, lh = make(engine, d_src, l_src, 7)
        with pytest.raises(err, match=what):
            lh.receive(BucketedStart(n_items=len(a), chunk_size=8, **bad))


def test_P21_the_data_holder_refuses_a_resume_it_cannot_check(engine):
    a, b, d_src, l_src = interrupted(engine)
    c = len(d_src.earlier().finished)
    own = chain_digest(7, [f.digest for f in d_src.earlier().finished[:3]])
    for start, err, what in [
        (BucketedStart(n_items=len(b), chunk_size=8, buckets=7, resume=c + 1, resume_digest=own), MalformedMessageError,
         "finished"),
        (BucketedStart(n_items=len(b), chunk_size=8, buckets=7, resume=3, resume_digest=bytes(32)), InvalidResultError,
         "differ from ours.*start the PSI over"),
        (BucketedStart(n_items=len(b) + 1, chunk_size=8, buckets=7, resume=3, resume_digest=own), MalformedMessageError,
         "IDs"),
    ]:
        d, _ = make(engine, d_src, l_src, 7)
        d.start()
        with pytest.raises(err, match=what):
            d.receive(start)
    fresh = BucketedSender(MemoryBuckets(a), engine=engine, run_id="run", nonce=NONCE, buckets=7, min_bucket_items=1)
    fresh.start()
    with pytest.raises(MalformedMessageError, match="finished 0 bucket"):
        fresh.receive(BucketedStart(n_items=len(b), chunk_size=8, buckets=7, resume=1, resume_digest=own))


def test_P22_a_pair_whose_every_bucket_was_finished_resumes_with_nothing_to_exchange(engine):
    a, b = ids(range(0, 60)), ids(range(30, 90))
    d0, l0 = make(engine, MemoryBuckets(a), MemoryBuckets(b), 4)
    ref = run_bucketed_in_memory(d0, l0)
    d, lh = make(engine, MemoryBuckets.after(d0.source), MemoryBuckets.after(l0.source), 4)
    lh.receive(d.start())
    start = lh.start()
    assert start.resume == 4 and lh.done
    assert d.receive(start) == [] and d.done and not d.has_work and not lh.has_work
    assert np.array_equal(d.rows, ref[0]) and np.array_equal(lh.rows, ref[1])
