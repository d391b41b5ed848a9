"""Section 5 [M2] (ERROR is never answered) and section 8 [R2] (at most 100 ERRORs per peer per second)."""

from __future__ import annotations

import math
import time

import pytest

from . import cases as C
from .kit import next_key, run_case
from .peer import CODES, SIGNATURE, envelope, pack


@pytest.mark.parametrize("case", C.M2_MALFORMED_ERRORS, ids=[c.id for c in C.M2_MALFORMED_ERRORS])
def test_M2_malformed_ERROR_is_not_answered(kit, case):
    """[M2]: a message that fails section 3 and whose header names the type ERROR gets no answer at all (the
    ECHO sent right after it gets the next, and only, answer)."""
    run_case(kit, case)


@pytest.mark.parametrize("state", ["IDLE", "READY"])
def test_M2_valid_ERRORs_of_every_code_are_not_answered(kit, state):
    """[M2]: ERRORs with every code 1..15 (with ref and diff where they fit) get no answer, in IDLE and READY."""
    p = kit.peer(key=next_key(kit))
    if state == "READY":
        kit.handshake(p)
    for code in range(1, 16):
        f = {"code": code, "message": f"conformance kit: code {code}", "ref": "WELCOME"}
        if code == CODES["CONFIG_MISMATCH"]:
            f["diff"] = {"run": ["a", "b"]}
        p.send_raw(envelope("ERROR", f), pace=False)
    if state == "READY":
        kit.assert_ready(p, "[M2] after 14 ERRORs")
        kit.bye(p)
    else:
        kit.assert_not_ready(p, "[M2] after 14 ERRORs")
    p.expect_nothing(0.1, "[M2]")


def test_R2_error_rate_limit(kit):
    """[R2]: 300 malformed messages sent at once get at most 100 + 100/s x elapsed ERRORs (a bucket of 100 that
    refills at 100 per second), at least the first ~100 are answered ([E1]), and after a quiet second a malformed
    message gets its ERROR again."""
    key = kit.target.key("rate")
    if kit.target.external:
        time.sleep(1.1)  # the only party may have spent its bucket in earlier tests
    p = kit.peer(key=key)
    bad = [SIGNATURE, pack({"type": "KIT_RATE_TEST"})]
    n = 300
    t0 = time.monotonic()
    for _ in range(n):
        p.send_raw(bad, pace=False)
    errors, others = [], []
    t_last = t0
    deadline = t0 + 5.0
    while time.monotonic() < deadline:
        m = p.recv(0.5)
        if m is None:
            break
        t_last = m.t
        (errors if m.type == "ERROR" else others).append(m)
    kit.drained(p)
    assert not others, f"only ERRORs expected, got {[m.summary() for m in others[:5]]}"
    codes = {m.get("code") for m in errors}
    assert codes <= {CODES["UNKNOWN_TYPE"]}, f"every answer must be UNKNOWN_TYPE, got codes {codes}"
    elapsed = t_last - t0
    allowed = 100 + math.ceil(100 * elapsed) + 5
    print(f"[R2] {len(errors)} ERRORs for {n} malformed messages within {elapsed:.2f} s (allowed {allowed})")
    assert len(errors) <= allowed, (
        f"[R2] {len(errors)} ERRORs in {elapsed:.2f} s for {n} malformed messages: a bucket of 100 refilling at "
        f"100/s allows at most {allowed}"
    )
    assert len(errors) >= 90, f"[E1] with a full bucket the first ~100 malformed messages must be answered; got {len(errors)}"
    time.sleep(max(0.0, 1.1 - (time.monotonic() - t_last)))
    p.send_raw(bad, pace=False)
    p.expect_error("UNKNOWN_TYPE", kit.T, "[R2] after a quiet second the bucket has refilled")
    kit.assert_healthy("after [R2]")


def test_R2_error_budget_is_the_partys_not_the_connections(kit):
    """[R2]: the label holder keys the bucket by the authenticated identity: three connections of one party (three
    routing ids) sending 150 malformed messages each get at most 100 + 100/s x elapsed ERRORs between them."""
    key = kit.target.key("rate")
    time.sleep(1.1)  # the party's bucket refills (the test above drained it)
    peers = [kit.peer(key=key) for _ in range(3)]
    bad = [SIGNATURE, pack({"type": "KIT_RATE_TEST"})]
    t0 = time.monotonic()
    for _ in range(150):
        for p in peers:
            p.send_raw(bad, pace=False)
    errors, t_last = 0, t0
    deadline = t0 + 5.0
    for p in peers:
        while time.monotonic() < deadline:
            m = p.recv(0.5)
            if m is None:
                break
            assert m.type == "ERROR" and m.get("code") == CODES["UNKNOWN_TYPE"], m.summary()
            errors, t_last = errors + 1, max(t_last, m.t)
    for p in peers:
        kit.drained(p)
    allowed = 100 + math.ceil(100 * (t_last - t0)) + 5
    assert errors <= allowed, (
        f"[R2] 3 connections of {key.name} got {errors} ERRORs in {t_last - t0:.2f} s for 450 malformed messages: "
        f"one bucket per party allows at most {allowed}"
    )
    assert errors >= 90, f"[E1] with a full bucket the first ~100 must be answered; got {errors}"
