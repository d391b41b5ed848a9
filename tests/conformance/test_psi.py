"""Section 10, the limits of PSI_START ([P11]), against a label holder of the test's own with `psi: true` (a refused
PSI_START ends its session, [P9]): n_items above `[psi].max_items` is TOO_LARGE, chunk_size outside 1..1,048,576 is
PSI_FAILED; the other READY data holder is told with BYE {ok: false} and the label holder exits 1."""

from __future__ import annotations

import re
import subprocess

import pytest

MAX_CHUNK = 1 << 20

CASES = {  # name -> ([psi] settings, accepted (n_items, chunk_size) or None, refused (n_items, chunk_size), code)
    "n_items_over_max_items": ({"max_items": 1000}, (1000, 1000), (1001, 1000), "TOO_LARGE"),
    "n_items_over_the_default_max_items": ({}, (10, MAX_CHUNK), (100_000_001, 65536), "TOO_LARGE"),
    "chunk_size_0": ({}, (10, 1), (10, 0), "PSI_FAILED"),
    "chunk_size_over_1048576": ({}, None, (10, MAX_CHUNK + 1), "PSI_FAILED"),
}


def _until(p, type_: str, timeout: float, what: str):
    """The first message of ``type_``, skipping the PSI stream (bounded: by count and by time)."""
    for _ in range(1000):
        m = p.recv_app(timeout)
        assert m is not None, f"{what}: no {type_} within {timeout} s\n{p.history()}"
        if m.type == type_:
            return m
        assert m.type.startswith("PSI_"), f"{what}: expected {type_}, got {m.summary()}\n{p.history()}"
    raise AssertionError(f"{what}: no {type_} in 1000 messages")


@pytest.mark.parametrize("which", list(CASES))
def test_P11_PSI_START_limits(own_node, which):
    """[P1]: WELCOME carries a 32-lowercase-hex psi_nonce. [P11]: a PSI_START within the limits is answered with the
    label holder's own PSI_START; one past them gets the ERROR of its limit, then [P9]: BYE {ok: false} to the other
    data holder and exit 1."""
    settings, accepted, refused, code = CASES[which]
    k = own_node(data_holders=["a", "b"], psi=settings)
    pa, pb = k.peer(key=k.target.parties["a"]), k.peer(key=k.target.parties["b"])
    for p in (pa, pb):
        w = k.handshake(p)
        nonce = w.get("psi_nonce")
        assert type(nonce) is str and re.fullmatch("[0-9a-f]{32}", nonce), f"[P1] WELCOME.psi_nonce = {nonce!r}"
    if accepted is not None:
        pa.send("PSI_START", {"n_items": accepted[0], "chunk_size": accepted[1]})
        _until(pa, "PSI_START", k.T, f"[P3] PSI_START n_items={accepted[0]} chunk_size={accepted[1]}")
    pb.send("PSI_START", {"n_items": refused[0], "chunk_size": refused[1]})
    pb.expect_error(code, k.T, f"[P11] PSI_START n_items={refused[0]} chunk_size={refused[1]}")
    bye = _until(pa, "BYE", k.T, "[P9] the other data holder when the PSI failed")
    assert bye.get("ok") is False, f"[P9] BYE to the other data holder must be ok: false: {bye.summary()}"
    try:
        rc = k.target.proc.wait(10.0)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 1, f"[P9] the label holder must exit 1 after a failed PSI, got {rc}\n{k.target.log_tail()}"
    pa.maybe_ready = pb.maybe_ready = False
