"""The sans-I/O two-party exchange: results against Python sets, identical order, and validation of every input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.psi.curve import P
from vfl.psi.engine import PsiEngine, encode_ids
from vfl.psi.errors import (
    ChunkOrderError,
    DuplicateIdError,
    EmptyIntersectionError,
    InvalidIdError,
    InvalidPointError,
    InvalidResultError,
    LimitExceededError,
    LowOrderPointError,
    MalformedMessageError,
    PsiRemoteError,
    PsiStateError,
    TruncatedStreamError,
)
from vfl.psi.exchange import (
    BlindedChunk,
    PsiReceiver,
    PsiSender,
    PsiStart,
    ReplyChunk,
    ResultChunk,
    run_in_memory,
    secure_permutation,
)

from .conftest import all_on_main_curve, on_main_curve

ids = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.text(min_size=100, max_size=300),
)


def run(engine, xs, ys, *, cs=3, cr=4, record=None, **kw):
    s = PsiSender(encode_ids(xs), engine=engine, run_id="test-run", nonce=b"n0", chunk_size=cs, **kw)
    r = PsiReceiver(encode_ids(ys), engine=engine, run_id="test-run", nonce=b"n0", chunk_size=cr, **kw)
    r.receive(s.start())
    s.receive(r.start())
    results = []
    for chunk in s.blinded_chunks():
        if record is not None:
            record.append(chunk)
        for reply in r.receive(chunk):
            if record is not None:
                record.append(reply)
            results += s.receive(reply)
    for chunk in r.blinded_chunks():
        if record is not None:
            record.append(chunk)
        results += s.receive(chunk)
    for res in results:
        if record is not None:
            record.append(res)
        assert r.receive(res) == []
    return s, r


def check_result(xs, ys, s, r):
    want = set(xs) & set(ys)
    got_s = [xs[i] for i in s.rows.tolist()]
    got_r = [ys[i] for i in r.rows.tolist()]
    assert got_s == got_r  # same IDs, same order on both sides
    assert set(got_s) == want and len(got_s) == len(want)
    assert np.array_equal(s.tokens, r.tokens)
    keys = [bytes(t) for t in s.tokens]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # ascending joint token
    assert s.rows.dtype == np.int64 and r.rows.dtype == np.int64


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_matches_python_sets(engine, data):
    universe = data.draw(st.lists(ids, unique=True, max_size=30))
    xs = [u for u in universe if data.draw(st.booleans())]
    ys = [u for u in universe if data.draw(st.booleans())]
    xs = data.draw(st.permutations(xs))
    cs = data.draw(st.integers(1, 8))
    cr = data.draw(st.integers(1, 8))
    record: list = []
    s, r = run(engine, xs, ys, cs=cs, cr=cr, record=record)
    check_result(xs, ys, s, r)
    for msg in record:  # every point either party produced lies on the main curve
        if isinstance(msg, BlindedChunk):
            assert all_on_main_curve(msg.points)


@pytest.mark.parametrize(
    "xs, ys",
    [
        ([], []),
        ([], ["a"]),
        (["a"], []),
        (["a"], ["a"]),
        (["a"], ["b"]),
        (list(range(20)), list(range(20, 40))),  # disjoint
        (list(range(20)), list(range(20))[::-1]),  # identical
        (["1", 1, "01", 10], [1, "10", "01"]),  # "1" != 1
        (["Ωmega", "日本語", "🦜", "e\u0301", "é"], ["é", "🦜", "x" * 5000]),  # unicode, NFC != NFD, long
        ([10**40, -(10**40), 0], [0, 10**40]),
    ],
)
def test_edge_cases(engine, xs, ys):
    s, r = run(engine, xs, ys, cs=2, cr=3)
    check_result(xs, ys, s, r)
    with pytest.raises(EmptyIntersectionError) if not set(xs) & set(ys) else _nullcontext():
        s.require_nonempty()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_with_process_pool():
    xs = [f"user{i}" for i in range(0, 300)]
    ys = [f"user{i}" for i in range(150, 420)]
    with PsiEngine(workers=2, task_items=32) as eng:
        s = PsiSender(encode_ids(xs), engine=eng, run_id="r", nonce=b"x", chunk_size=50)
        r = PsiReceiver(encode_ids(ys), engine=eng, run_id="r", nonce=b"x", chunk_size=64)
        run_in_memory(s, r)
    check_result(xs, ys, s, r)


def test_order_is_not_id_order(engine):
    xs = list(range(200))
    s, r = run(engine, xs, xs, cs=64, cr=64)
    assert s.rows.tolist() != sorted(s.rows.tolist())
    assert sorted(s.rows.tolist()) == list(range(200))


def test_fresh_keys_give_fresh_tokens(engine):
    s1, _ = run(engine, [1, 2, 3], [1, 2, 3])
    s2, _ = run(engine, [1, 2, 3], [1, 2, 3])
    assert not set(map(bytes, s1.tokens)) & set(map(bytes, s2.tokens))


def test_domains_must_match(engine):
    s = PsiSender(encode_ids([1, 2]), engine=engine, run_id="a", nonce=b"1")
    r = PsiReceiver(encode_ids([1, 2]), engine=engine, run_id="a", nonce=b"2")
    run_in_memory(s, r)
    assert len(s.rows) == 0 and len(r.rows) == 0


def test_duplicates(engine):
    with pytest.raises(DuplicateIdError, match="2 duplicate IDs") as info:
        PsiSender(encode_ids(["a", "b", "a", "a"]), engine=engine, run_id="r")
    assert info.value.count == 2 and info.value.example == b"s:a"
    assert info.value.code == "PSI_DUPLICATE_ID"
    xs = ["a", "b", "a", "c", "b"]
    s = PsiSender(encode_ids(xs), engine=engine, run_id="r", nonce=b"n0", dedupe=True)
    assert s.n_items == 3
    r = PsiReceiver(encode_ids(["b", "c", "d", "b"]), engine=engine, run_id="r", nonce=b"n0", dedupe=True)
    run_in_memory(s, r)
    assert sorted(s.rows.tolist()) == [1, 3]  # first occurrences
    assert sorted(r.rows.tolist()) == [0, 1]


def test_items_must_be_bytes(engine):
    with pytest.raises(InvalidIdError, match="encode_ids"):
        PsiSender(["a"], engine=engine, run_id="r")  # type: ignore[list-item]


def test_secure_permutation():
    for n in (0, 1, 2, 100):
        assert sorted(secure_permutation(n).tolist()) == list(range(n))
    assert secure_permutation(1000).tolist() != list(range(1000))


def test_state_errors(engine):
    s = PsiSender(encode_ids([1]), engine=engine, run_id="r")
    with pytest.raises(PsiStateError):
        s.blinded_chunks()
    with pytest.raises(PsiStateError):
        _ = s.rows
    s.start()
    with pytest.raises(PsiStateError):
        s.start()
    s.blinded_chunks()
    with pytest.raises(PsiStateError):
        s.blinded_chunks()


# ------------------------------------------------------------------------------------------------ tampering


def started(engine, xs=range(10), ys=range(5, 12), cs=4, cr=3, **kw):
    s = PsiSender(encode_ids(list(xs)), engine=engine, run_id="r", nonce=b"n", chunk_size=cs, **kw)
    r = PsiReceiver(encode_ids(list(ys)), engine=engine, run_id="r", nonce=b"n", chunk_size=cr, **kw)
    r.receive(s.start())
    s.receive(r.start())
    return s, r


def _twist_point() -> np.ndarray:
    u = 2
    while on_main_curve(u):
        u += 1
    return np.frombuffer(u.to_bytes(32, "little"), np.uint8)


def _with_row(points: np.ndarray, row: int, value: np.ndarray) -> np.ndarray:
    out = points.copy()
    out[row] = value
    return out


def _u(v: int) -> np.ndarray:
    return np.frombuffer(v.to_bytes(32, "little"), np.uint8)


@pytest.mark.parametrize(
    "mutate, exc",
    [
        (lambda c: dataclasses.replace(c, chunk=1), ChunkOrderError),
        (lambda c: dataclasses.replace(c, last=True), TruncatedStreamError),
        (lambda c: dataclasses.replace(c, points=c.points[:-1]), ChunkOrderError),
        (lambda c: dataclasses.replace(c, points=c.points.astype(np.int8)), MalformedMessageError),
        (lambda c: dataclasses.replace(c, points=c.points[:, :16]), MalformedMessageError),
        (lambda c: dataclasses.replace(c, chunk="0"), MalformedMessageError),
        (lambda c: dataclasses.replace(c, last=None), MalformedMessageError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 2, _u(P))), InvalidPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 2, _u(2**255 - 1))), InvalidPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 2, _u(9))), None),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 1, _u(9) | _top())), InvalidPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 2, _twist_point())), InvalidPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 0, _u(0))), LowOrderPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 0, _u(1))), InvalidPointError),
        (lambda c: dataclasses.replace(c, points=_with_row(c.points, 0, _u(P - 1))), InvalidPointError),
    ],
)
@pytest.mark.parametrize("side", ["label", "data"])
def test_bad_blinded_chunk_rejected(engine, mutate, exc, side):
    s, r = started(engine)
    src, dst = (s, r) if side == "label" else (r, s)
    first = next(iter(src.blinded_chunks()))
    bad = mutate(first)
    if exc is None:  # control: a valid point that is not the peer's hash is accepted (it just will not match)
        dst.receive(bad)
        return
    with pytest.raises(exc) as info:
        dst.receive(bad)
    assert isinstance(info.value, PsiRemoteError) and info.value.remote


def _top() -> np.ndarray:
    t = np.zeros(32, np.uint8)
    t[31] = 0x80
    return t


def test_twist_accepted_without_verify_curve(engine):
    s, r = started(engine, verify_curve=False)
    first = next(iter(s.blinded_chunks()))
    r.receive(dataclasses.replace(first, points=_with_row(first.points, 2, _twist_point())))


def test_stream_order_errors(engine):
    s, r = started(engine)
    chunks = list(s.blinded_chunks())
    assert [c.last for c in chunks] == [False, False, True]
    r.receive(chunks[0])
    with pytest.raises(ChunkOrderError):
        r.receive(chunks[0])  # replay
    with pytest.raises(ChunkOrderError):
        r.receive(chunks[2])  # gap
    r.receive(chunks[1])
    with pytest.raises(ChunkOrderError, match="not marked last"):
        r.receive(dataclasses.replace(chunks[2], last=False))
    r.receive(chunks[2])
    with pytest.raises(ChunkOrderError, match="after the peer's last"):
        r.receive(chunks[2])


def test_start_validation(engine):
    s = PsiSender(encode_ids([1]), engine=engine, run_id="r", max_peer_items=10, max_peer_chunk=100)
    with pytest.raises(MalformedMessageError, match="before the peer's PsiStart"):
        s.receive(BlindedChunk(chunk=0, last=True, points=np.zeros((0, 32), np.uint8)))
    with pytest.raises(LimitExceededError):
        s.receive(PsiStart(n_items=11, chunk_size=5))
    with pytest.raises(LimitExceededError):
        s.receive(PsiStart(n_items=5, chunk_size=0))
    with pytest.raises(LimitExceededError):
        s.receive(PsiStart(n_items=5, chunk_size=101))
    with pytest.raises(MalformedMessageError):
        s.receive(PsiStart(n_items=5.0, chunk_size=5))
    with pytest.raises(MalformedMessageError):
        s.receive(PsiStart(n_items=True, chunk_size=5))
    big = PsiReceiver(encode_ids([1]), engine=engine, run_id="r")
    big.receive(PsiStart(n_items=2**32 - 1, chunk_size=1 << 20))  # announced, not allocated
    over = PsiReceiver(encode_ids([1]), engine=engine, run_id="r")
    with pytest.raises(LimitExceededError):
        over.receive(PsiStart(n_items=2**32, chunk_size=5))  # positions are uint32
    s.receive(PsiStart(n_items=np.int64(5), chunk_size=5))
    with pytest.raises(MalformedMessageError, match="second PsiStart"):
        s.receive(PsiStart(n_items=5, chunk_size=5))
    with pytest.raises(MalformedMessageError, match="unexpected message"):
        s.receive("hello")  # type: ignore[arg-type]
    r = PsiReceiver(encode_ids([1]), engine=engine, run_id="r")
    r.receive(PsiStart(n_items=1, chunk_size=5))
    with pytest.raises(MalformedMessageError, match="unexpected message ReplyChunk"):
        r.receive(ReplyChunk(chunk=0, last=True, tokens=np.zeros((1, 16), np.uint8)))


def test_truncated_stream_never_finishes(engine):
    s, r = started(engine)
    for c in list(s.blinded_chunks())[:-1]:  # the last chunk is lost
        for rep in r.receive(c):
            s.receive(rep)
    out = []
    for c in r.blinded_chunks():
        out += s.receive(c)
    assert out == [] and not s.done and not r.done
    with pytest.raises(PsiStateError):
        _ = s.rows
    with pytest.raises(ChunkOrderError, match="before all"):
        r.receive(ResultChunk(chunk=0, last=True, tokens=np.zeros((0, 16), np.uint8),
                              positions=np.zeros(0, np.uint32)))


def test_empty_set_stream_is_one_empty_last_chunk(engine):
    s, r = started(engine, xs=[], ys=[1])
    chunks = list(s.blinded_chunks())
    assert len(chunks) == 1 and chunks[0].last and chunks[0].points.shape == (0, 32)
    with pytest.raises(TruncatedStreamError):
        s2, r2 = started(engine, xs=[1, 2], ys=[1])
        r2.receive(dataclasses.replace(next(iter(s2.blinded_chunks())), points=np.zeros((0, 32), np.uint8),
                                       last=True))


# replies (L -> D)


def _replies(engine, **kw):
    s, r = started(engine, **kw)
    chunks = list(s.blinded_chunks())
    replies = [rep for c in chunks for rep in r.receive(c)]
    return s, r, chunks, replies


def test_bad_replies(engine):
    s, r, chunks, replies = _replies(engine)
    with pytest.raises(ChunkOrderError):
        s.receive(replies[1])
    with pytest.raises(MalformedMessageError):
        s.receive(dataclasses.replace(replies[0], tokens=np.zeros((4, 32), np.uint8)))
    with pytest.raises(ChunkOrderError):
        s.receive(dataclasses.replace(replies[0], tokens=replies[0].tokens[:2]))
    with pytest.raises(TruncatedStreamError):
        s.receive(dataclasses.replace(replies[0], last=True))
    # a reply for a chunk not yet sent
    s2, r2 = started(engine)
    gen = iter(s2.blinded_chunks())
    c0 = next(gen)
    (rep0,) = r2.receive(c0)
    s2.receive(rep0)
    with pytest.raises(ChunkOrderError, match="not sent yet"):
        s2.receive(dataclasses.replace(replies[1], chunk=1))


def test_repeated_reply_token_detected(engine):
    s, r, chunks, replies = _replies(engine)
    t = replies[0].tokens.copy()
    t[1] = t[0]
    s.receive(dataclasses.replace(replies[0], tokens=t))
    for rep in replies[1:]:
        s.receive(rep)
    with pytest.raises(InvalidResultError, match="repeated token"):
        for c in r.blinded_chunks():
            s.receive(c)


def test_repeated_peer_point_detected(engine):
    s, r, chunks, replies = _replies(engine)
    for rep in replies:
        s.receive(rep)
    lchunks = list(r.blinded_chunks())
    p = lchunks[0].points.copy()
    p[1] = p[0]
    with pytest.raises(InvalidResultError, match="same point twice"):
        s.receive(dataclasses.replace(lchunks[0], points=p))
        for c in lchunks[1:]:
            s.receive(c)


# results (D -> L)


def _results(engine, **kw):
    s, r, chunks, replies = _replies(engine, **kw)
    out = []
    for rep in replies:
        out += s.receive(rep)
    for c in r.blinded_chunks():
        out += s.receive(c)
    return s, r, out


def _fresh_result_case(engine):
    # 12 shared items, result chunk size 4 -> three result chunks
    return _results(engine, xs=range(20), ys=range(8, 30), cs=4, cr=5)


@pytest.mark.parametrize(
    "mutate, exc",
    [
        (lambda m: dataclasses.replace(m, chunk=1), ChunkOrderError),
        (lambda m: dataclasses.replace(m, tokens=m.tokens.astype(np.int8)), MalformedMessageError),
        (lambda m: dataclasses.replace(m, positions=m.positions.astype(np.int64)), MalformedMessageError),
        (lambda m: dataclasses.replace(m, positions=m.positions[:2]), MalformedMessageError),
        (lambda m: dataclasses.replace(m, tokens=m.tokens[::-1].copy(), positions=m.positions[::-1].copy()),
         InvalidResultError),
        (lambda m: dataclasses.replace(m, positions=np.full_like(m.positions, 10**6)), InvalidResultError),
        (lambda m: dataclasses.replace(m, tokens=np.concatenate([m.tokens] * 2),
                                       positions=np.concatenate([m.positions] * 2)), ChunkOrderError),
    ],
)
def test_bad_result_chunk(engine, mutate, exc):
    s, r, out = _fresh_result_case(engine)
    assert len(out) == 3
    with pytest.raises(exc):
        r.receive(mutate(out[0]))


def test_result_token_must_be_known(engine):
    s, r, out = _fresh_result_case(engine)
    t = out[-1].tokens.copy()
    t[-1] = 0xFF  # ascending still, but not a token we computed
    for m in out[:-1]:
        r.receive(m)
    with pytest.raises(InvalidResultError, match="matches none"):
        r.receive(dataclasses.replace(out[-1], tokens=t))


def test_result_positions_must_be_distinct(engine):
    s, r, out = _fresh_result_case(engine)
    p = out[-1].positions.copy()
    p[-1] = out[0].positions[0]
    for m in out[:-1]:
        r.receive(m)
    with pytest.raises(InvalidResultError, match="twice"):
        r.receive(dataclasses.replace(out[-1], positions=p))


def test_result_ascending_across_chunks(engine):
    s, r, out = _fresh_result_case(engine)
    r.receive(out[0])
    with pytest.raises(InvalidResultError, match="ascending"):
        r.receive(dataclasses.replace(out[1], chunk=1, tokens=out[0].tokens, positions=out[0].positions))


def test_result_count_bounded(engine):
    s, r, out = _results(engine, xs=range(3), ys=range(3), cs=4, cr=4)
    m = out[0]
    assert len(m.tokens) == 3
    with pytest.raises(LimitExceededError):
        r.receive(dataclasses.replace(m, last=False))
        r.receive(dataclasses.replace(m, chunk=1))


def test_after_done(engine):
    s, r, out = _fresh_result_case(engine)
    for m in out:
        r.receive(m)
    assert r.done
    with pytest.raises(ChunkOrderError):
        r.receive(out[-1])
