"""The bucketed PSI on the wire (PROTOCOL.md 1.8, [P12], [P16], [P17]): the session config's psi_buckets, what an
older peer gets, and PSI messages checked against the session's bucketing."""

from __future__ import annotations

import pytest

from vfl.protocol import ErrorCode, Hello, LabelHolderMachine, PsiBucket, PsiStart, SessionConfig, Welcome
from vfl.protocol.errors import RemoteProtocolError
from vfl.protocol.psi_phase import PairwisePsi, PsiPlan
from vfl.psi import PsiEngine, encode_ids

from .test_machines import RUN, error_codes, feed, sends

PLAIN = SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True)
AUTO = SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True, psi_buckets="auto")
SEVEN = SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True, psi_buckets=7)
NONCE = "00" * 16


def lh_for(cfg: SessionConfig) -> LabelHolderMachine:
    plan = PsiPlan(items=[], engine=None, buckets=cfg.psi_buckets)
    return LabelHolderMachine(party="bank", run=RUN, config=cfg, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                              join_timeout_s=60.0, psi=plan)


def hello_with(cfg: SessionConfig, version=(1, 8)) -> Hello:
    return Hello(version=version, role="data_holder", party="alice", run=RUN, config=cfg.to_wire(), digest=cfg.digest)


def test_P16_one_bucket_is_absent_from_the_config_so_the_digest_is_that_of_1_7():
    assert "psi_buckets" not in PLAIN.to_wire()
    assert SessionConfig.from_wire(PLAIN.to_wire()) == PLAIN
    assert SEVEN.to_wire()["psi_buckets"] == 7 and AUTO.to_wire()["psi_buckets"] == "auto"
    assert len({PLAIN.digest, SEVEN.digest, AUTO.digest}) == 3
    assert SessionConfig.from_wire(SEVEN.to_wire()) == SEVEN


@pytest.mark.parametrize("cfg", [AUTO, SEVEN])
def test_P16_a_1_7_data_holder_gets_CONFIG_MISMATCH_naming_psi_buckets(cfg):
    lh = lh_for(cfg)
    out = feed(lh, hello_with(PLAIN, version=(1, 7)))  # a 1.7 node knows no psi_buckets: its config lacks it
    assert error_codes(out) == [ErrorCode.CONFIG_MISMATCH]
    (err,) = sends(out)
    assert "psi_buckets" in err.diff and "psi_buckets: label holder has" in err.message


def test_P16_a_bucketed_data_holder_gets_CONFIG_MISMATCH_from_an_unbucketed_label_holder():
    out = feed(lh_for(PLAIN), hello_with(SEVEN))
    assert error_codes(out) == [ErrorCode.CONFIG_MISMATCH]
    assert "psi_buckets" in sends(out)[0].diff
    assert isinstance(sends(feed(lh_for(SEVEN), hello_with(SEVEN)))[0], Welcome)


@pytest.mark.parametrize("bad", [1, 0, (1 << 16) + 1, "Auto", True, 2.0, None])
def test_P16_psi_buckets_present_must_be_auto_or_2_to_65536(bad):
    wire = {**PLAIN.to_wire(), "psi_buckets": bad}
    with pytest.raises(RemoteProtocolError, match="psi_buckets") as exc:
        SessionConfig.from_wire(wire)
    assert exc.value.code is ErrorCode.BAD_FIELD


def test_P16_psi_buckets_needs_psi():
    with pytest.raises(ValueError, match="psi_buckets needs psi"):
        SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi_buckets=4)


def test_the_machines_run_the_bucketing_the_session_agreed():
    with pytest.raises(ValueError, match="psi_buckets"):
        LabelHolderMachine(party="bank", run=RUN, config=SEVEN, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                           join_timeout_s=60.0, psi=PsiPlan(items=[], engine=None))


@pytest.fixture(scope="module")
def engine():
    with PsiEngine(workers=1) as eng:
        yield eng


def pair(engine, buckets, role="label_holder"):
    plan = PsiPlan(items=encode_ids(range(20)), engine=engine, chunk_size=8, buckets=buckets)
    return PairwisePsi(plan, run=RUN, nonce=NONCE, role=role)


@pytest.mark.parametrize("field", ["buckets", "bucket_items"])
def test_P17_bucket_fields_in_an_unbucketed_session_are_PSI_FAILED(engine, field):
    psi = pair(engine, 1)
    with pytest.raises(RemoteProtocolError, match=f"PSI_START.{field} in a session without bucketed PSI") as exc:
        psi.receive(PsiStart(n_items=20, chunk_size=8, **{field: 4}))
    assert exc.value.code is ErrorCode.PSI_FAILED


def test_P17_PSI_BUCKET_in_an_unbucketed_session_is_PSI_FAILED(engine):
    psi = pair(engine, 1)
    psi.receive(PsiStart(n_items=20, chunk_size=8))
    with pytest.raises(RemoteProtocolError, match="PSI_BUCKET in a session without bucketed PSI") as exc:
        psi.receive(PsiBucket(bucket=0, n_items=5))
    assert exc.value.code is ErrorCode.PSI_FAILED


def test_P13_a_bad_bucket_on_the_wire_is_PSI_FAILED(engine):
    psi = pair(engine, 4)
    assert psi.receive(PsiStart(n_items=20, chunk_size=8, bucket_items=4096)) == []
    (start,) = psi.start()
    assert start.buckets == 4 and start.bucket_items is None
    with pytest.raises(RemoteProtocolError, match="PSI_BUCKET.bucket = 4 but the PSI has 4 buckets") as exc:
        psi.receive(PsiBucket(bucket=4, n_items=5))
    assert exc.value.code is ErrorCode.PSI_FAILED


def test_P12_the_data_holder_waits_for_K_then_opens_bucket_0(engine):
    lh, dh = pair(engine, "auto"), pair(engine, "auto", role="data_holder")
    (d_start,) = dh.start()
    assert d_start.buckets is None and not dh.has_work  # D waits for K before it partitions
    lh.receive(d_start)
    (l_start,) = lh.start()
    assert l_start.buckets == 1  # no budget at either party: one bucket
    (opened,) = dh.receive(l_start)
    assert isinstance(opened, PsiBucket) and opened.bucket == 0 and opened.n_items == 20 and dh.has_work
