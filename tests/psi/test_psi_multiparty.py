"""Several data holders: pairwise exchanges with the label holder, then one intersection in one order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.psi.engine import encode_ids
from vfl.psi.errors import (
    ChunkOrderError,
    EmptyIntersectionError,
    InvalidResultError,
    LimitExceededError,
    MalformedMessageError,
    PsiLocalError,
    PsiStateError,
)
from vfl.psi.exchange import PsiReceiver, PsiSender, run_in_memory
from vfl.psi.multiparty import (
    FinalRowsReceiver,
    PairwiseResult,
    RowsChunk,
    apply_positions,
    combine,
    rows_chunks,
)


def star(engine, label_ids, holders_ids, *, chunk=4):
    """Run the pairwise PSIs, combine at L, ship positions; returns (L final rows, [D_i final rows])."""
    results, senders = [], []
    for i, xs in enumerate(holders_ids):
        s = PsiSender(encode_ids(xs), engine=engine, run_id="mp", nonce=b"pair-%d" % i, chunk_size=chunk)
        r = PsiReceiver(encode_ids(label_ids), engine=engine, run_id="mp", nonce=b"pair-%d" % i, chunk_size=chunk)
        run_in_memory(s, r)
        results.append(PairwiseResult.of(r))
        senders.append(s)
    plan = combine(results)
    finals = []
    for s, pos in zip(senders, plan.positions):
        rx = FinalRowsReceiver(s.rows)
        for msg in rows_chunks(pos, chunk_size=3):
            rx.receive(msg)
        finals.append(rx.rows)
    return plan.label_rows, finals


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_star_matches_python_sets(engine, data):
    m = data.draw(st.integers(1, 8), label="data holders")
    universe = data.draw(st.lists(st.one_of(st.text(max_size=6), st.integers(-50, 50)), unique=True, max_size=14))
    label_ids = [u for u in universe if data.draw(st.booleans())]
    holders = [data.draw(st.permutations([u for u in universe if data.draw(st.booleans())])) for _ in range(m)]
    label_rows, finals = star(engine, label_ids, holders)
    want = set(label_ids).intersection(*map(set, holders))
    order = [label_ids[i] for i in label_rows.tolist()]
    assert set(order) == want and len(order) == len(want)
    for xs, rows in zip(holders, finals):
        assert [xs[i] for i in rows.tolist()] == order  # identical order at every party


def test_eight_holders_fixed(engine):
    label_ids = list(range(100))
    holders = [list(range(k, 100, 1)) + [1000 + k] for k in range(8)]
    label_rows, finals = star(engine, label_ids, holders, chunk=16)
    order = [label_ids[i] for i in label_rows.tolist()]
    assert sorted(order) == list(range(7, 100))
    assert order != sorted(order)
    for xs, rows in zip(holders, finals):
        assert [xs[i] for i in rows.tolist()] == order


def test_first_holder_positions_ascending(engine):
    label_rows, finals = star(engine, list(range(30)), [list(range(30)), list(range(0, 30, 2))])
    res = combine([PairwiseResult(rows=np.arange(5), tokens=np.zeros((5, 16), np.uint8)),
                   PairwiseResult(rows=np.array([4, 2, 0]), tokens=np.zeros((3, 16), np.uint8))])
    assert res.label_rows.tolist() == [0, 2, 4]
    assert res.positions[0].tolist() == [0, 2, 4]
    assert res.positions[1].tolist() == [2, 1, 0]
    assert res.positions[0].dtype == np.uint32


def test_combine_validation():
    with pytest.raises(PsiLocalError):
        combine([])
    with pytest.raises(PsiLocalError):
        combine([PairwiseResult(rows=np.array([1, 1]), tokens=np.zeros((2, 16), np.uint8))])
    with pytest.raises(PsiLocalError):
        combine([PairwiseResult(rows=np.array([1, 2]), tokens=np.zeros((3, 16), np.uint8))])
    a = PairwiseResult(rows=np.array([1, 2]), tokens=np.zeros((2, 16), np.uint8))
    b = PairwiseResult(rows=np.array([3]), tokens=np.zeros((1, 16), np.uint8))
    assert len(combine([a, b])) == 0
    with pytest.raises(EmptyIntersectionError):
        combine([a, b], allow_empty=False)


def test_rows_chunks():
    msgs = rows_chunks(np.arange(7), chunk_size=3)
    assert [len(m.positions) for m in msgs] == [3, 3, 1] and [m.last for m in msgs] == [False, False, True]
    (empty,) = rows_chunks(np.arange(0), chunk_size=3)
    assert empty.last and len(empty.positions) == 0


def test_final_rows_receiver_validation():
    pair = np.array([10, 11, 12, 13])
    rx = FinalRowsReceiver(pair)
    with pytest.raises(PsiStateError):
        _ = rx.rows
    with pytest.raises(MalformedMessageError):
        rx.receive(RowsChunk(chunk=0, last=False, positions=np.array([1], np.int64)))
    with pytest.raises(ChunkOrderError):
        rx.receive(RowsChunk(chunk=1, last=False, positions=np.array([1], np.uint32)))
    with pytest.raises(InvalidResultError):
        rx.receive(RowsChunk(chunk=0, last=False, positions=np.array([4], np.uint32)))
    with pytest.raises(InvalidResultError):
        rx.receive(RowsChunk(chunk=0, last=False, positions=np.array([1, 1], np.uint32)))
    rx.receive(RowsChunk(chunk=0, last=False, positions=np.array([3, 1], np.uint32)))
    with pytest.raises(InvalidResultError):
        rx.receive(RowsChunk(chunk=1, last=False, positions=np.array([3], np.uint32)))
    with pytest.raises(LimitExceededError):
        rx.receive(RowsChunk(chunk=1, last=False, positions=np.array([0, 2, 0], np.uint32)))
    rx.receive(RowsChunk(chunk=1, last=True, positions=np.array([0], np.uint32)))
    assert rx.rows.tolist() == [13, 11, 10]
    with pytest.raises(ChunkOrderError):
        rx.receive(RowsChunk(chunk=2, last=True, positions=np.array([], np.uint32)))
    with pytest.raises(MalformedMessageError):
        FinalRowsReceiver(pair).receive("x")  # type: ignore[arg-type]
    small = FinalRowsReceiver(pair, max_chunk=1)
    with pytest.raises(LimitExceededError):
        small.receive(RowsChunk(chunk=0, last=True, positions=np.array([0, 1], np.uint32)))
    with pytest.raises(MalformedMessageError):
        FinalRowsReceiver(pair).receive(dataclasses.replace(
            RowsChunk(chunk=0, last=True, positions=np.array([0], np.uint32)), last="yes"))


def test_apply_positions():
    assert apply_positions(np.array([5, 6, 7]), np.array([2, 0], np.uint32)).tolist() == [7, 5]
    for bad in ([3], [0, 0], [-1], [0, 1, 2, 0]):
        with pytest.raises((InvalidResultError, LimitExceededError)):
            apply_positions(np.array([5, 6, 7]), np.array(bad))


def test_final_rows_receiver_lets_go_of_the_pairwise_rows_once_done():
    """A data holder holds its receiver until it leaves the session: once the final rows are in, the pairwise rows
    and the seen-mask (9 bytes per pairwise row) go."""
    rx = FinalRowsReceiver(np.arange(1000, 1010))
    rx.receive(RowsChunk(chunk=0, last=True, positions=np.array([4, 2], np.uint32)))
    assert rx.rows.tolist() == [1004, 1002]
    assert len(rx._pairwise) == 0 and len(rx._seen) == 0 and rx._parts == []
    assert rx._pairwise.base is None and rx._seen.base is None  # not views that keep the whole arrays alive
