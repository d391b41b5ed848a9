"""Resuming a bucketed PSI on the wire (PROTOCOL.md 1.9, [P19]-[P22]): the label holder keeps a pair's nonce while
its bucketed PSI has finished buckets and is not aligned, and only then; the resume fields of PSI_START are checked
against the session's bucketing. (The exchange's resume logic: tests/psi/test_psi_resume.py; real processes killed
with kill -9: tests/node/test_psi_resume_nodes.py.)"""

from __future__ import annotations

import pytest

from vfl.protocol import ErrorCode, LabelHolderMachine, PsiStart, SessionConfig, Welcome
from vfl.protocol.errors import RemoteProtocolError
from vfl.protocol.psi_phase import PairwisePsi, PsiPlan
from vfl.psi import PsiEngine, encode_ids

from .test_machines import RUN, feed, sends
from .test_psi_buckets_wire import hello_with

FOUR = SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True, psi_buckets=4)
PLAIN = SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True)
NONCE = "00" * 16


@pytest.fixture(scope="module")
def engine():
    with PsiEngine(workers=1) as eng:
        yield eng


def lh_for(cfg, engine, **plan) -> LabelHolderMachine:
    psi = PsiPlan(items=encode_ids(range(0, 200)), engine=engine, chunk_size=16, buckets=cfg.psi_buckets or 1, **plan)
    return LabelHolderMachine(party="bank", run=RUN, config=cfg, now=0.0, heartbeat_s=1.0, peer_timeout_s=50.0,
                              join_timeout_s=60.0, psi=psi)


def welcome_nonce(lh, now=0.0) -> str:
    (welcome,) = [m for m in sends(feed(lh, hello_with(FOUR, version=(1, 9)), now=now)) if isinstance(m, Welcome)]
    return welcome.psi_nonce


def run_buckets(lh, engine, nonce, finished: int):
    """A data holder's side of the pair, driven until the label holder finished ``finished`` buckets."""
    dh = PairwisePsi(PsiPlan(items=encode_ids(range(100, 300)), engine=engine, chunk_size=16, buckets=4),
                     run=RUN, nonce=nonce, role="data_holder")
    to_l = dh.start()
    for step in range(10_000):  # bounded: each turn moves every message in flight or computes a chunk
        p = lh.parties["alice"]
        if p.psi is not None and p.psi.finished_buckets >= finished:
            return p
        to_d = []
        for m in to_l:
            to_d += sends(feed(lh, m, now=1.0 + step * 1e-3))
        to_d += [o.message for o in lh.work(1.0) if hasattr(o, "message")]
        to_l = []
        for m in to_d:
            to_l += dh.receive(m)
        to_l += dh.work()
    raise AssertionError("the label holder did not finish the buckets")


def test_P19_a_pair_with_finished_buckets_keeps_its_nonce_when_the_data_holder_says_HELLO_again(engine):
    lh = lh_for(FOUR, engine)
    first = welcome_nonce(lh)
    p = run_buckets(lh, engine, first, 1)
    assert p.psi.finished_buckets >= 1
    assert welcome_nonce(lh, now=2.0) == first  # restarted: the same partition, so it can resume
    assert welcome_nonce(lh, now=3.0) == first  # and again, before any new PSI_START


def test_P1_a_pair_without_finished_buckets_gets_a_fresh_nonce(engine):
    lh = lh_for(FOUR, engine)
    first = welcome_nonce(lh)
    run_buckets(lh, engine, first, 0)
    assert lh.parties["alice"].psi.finished_buckets == 0
    assert welcome_nonce(lh, now=2.0) != first


def test_P19_an_earlier_process_s_unfinished_pair_is_resumed_with_its_nonce(engine):
    lh = lh_for(FOUR, engine, resume_nonces={"alice": NONCE, "mallory": "11" * 16})
    assert welcome_nonce(lh) == NONCE


def test_P19_an_unbucketed_session_never_reuses_a_nonce(engine):
    lh = lh_for(PLAIN, engine, resume_nonces={"alice": NONCE})
    hello = hello_with(PLAIN, version=(1, 9))
    nonces = {[m for m in sends(feed(lh, hello, now=t)) if isinstance(m, Welcome)][0].psi_nonce for t in (0.0, 1.0)}
    assert len(nonces) == 2 and NONCE not in nonces


@pytest.mark.parametrize("fields", [{"resume": 2}, {"resume_digest": "ab" * 32}])
def test_P21_resume_fields_in_an_unbucketed_session_are_PSI_FAILED(engine, fields):
    psi = PairwisePsi(PsiPlan(items=encode_ids(range(20)), engine=engine, chunk_size=8), run=RUN, nonce=NONCE,
                      role="label_holder")
    with pytest.raises(RemoteProtocolError, match="in a session without bucketed PSI") as exc:
        psi.receive(PsiStart(n_items=20, chunk_size=8, **fields))
    assert exc.value.code is ErrorCode.PSI_FAILED


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "zz" * 32, ""])
def test_P21_a_resume_digest_that_is_not_64_lowercase_hex_digits_is_PSI_FAILED(engine, digest):
    psi = PairwisePsi(PsiPlan(items=encode_ids(range(20)), engine=engine, chunk_size=8, buckets=4), run=RUN,
                      nonce=NONCE, role="label_holder")
    with pytest.raises(RemoteProtocolError, match="resume_digest must be 64 lowercase hex digits") as exc:
        psi.receive(PsiStart(n_items=20, chunk_size=8, resume=1, resume_digest=digest))
    assert exc.value.code is ErrorCode.PSI_FAILED


def test_P20_the_resume_fields_round_trip_on_the_wire(engine):
    from vfl.protocol.codec import decode, encode

    msg = PsiStart(n_items=20, chunk_size=8, buckets=4, resume=3, resume_digest="ab" * 32)
    assert decode([bytes(memoryview(f).cast("B")) for f in encode(msg)]) == msg


def test_P1_a_pair_that_started_over_without_finished_buckets_gets_a_fresh_nonce_again(engine):
    lh = lh_for(FOUR, engine)
    first = welcome_nonce(lh)
    run_buckets(lh, engine, first, 1)
    assert welcome_nonce(lh, now=2.0) == first  # [P19]: it has a finished bucket
    p = run_buckets(lh, engine, first, 0)  # a data holder with nothing saved: the pair starts over (r = 0) ...
    assert p.psi.resumed_at == 0 and p.psi.finished_buckets == 0  # ... and the label holder dropped its buckets
    assert welcome_nonce(lh, now=3.0) != first  # so [P1] again, as after a restart of the label holder itself
