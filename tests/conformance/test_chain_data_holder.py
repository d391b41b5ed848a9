"""A live data holder behind a segment holder (PROTOCOL.md section 13, v1.10): [C1], [C3] at the party's end.

The node under test is data holder ``dh1`` of the session ``dh1 -> seg1 -> bank``, ``dh2 -> bank``; the kit plays
its segment holder seg1 (a ROUTER bound with seg1's key where dh1 connects) and, behind it, the label holder's end of
dh1's relayed session (the kit's own [C3] code and key files). dh1 stays in its handshake and link check, where a
message it must not act on would show at once (an answer, a step further, or its exit).
"""

from __future__ import annotations

import re
import time

import msgpack
import numpy as np
import pytest

from .chain import DH1, DH2, N_IDS, RUN, SEG, SESSION, DataHolderEnv, LabelHolderEnv, hello_fields, lh_welcome_for
from .peer import envelope, pack
from .relay import DOWN, Channel, flip

T = 10.0
QUIET = 0.4


def _node_cmd(request):
    opts = request.config.option
    if opts.target and not opts.node_cmd:
        pytest.skip("starts data holders: give --node-cmd to test another implementation's")
    return opts.node_cmd


@pytest.fixture(scope="module")
def dh_pool(request, tmp_path_factory, ctx):
    """The data holders of the tests below, started at once (a node's start-up is mostly imports)."""
    node_cmd = _node_cmd(request)
    envs = [DataHolderEnv(tmp_path_factory.mktemp("vfl-chain-dh"), node_cmd, ctx) for _ in range(2)]
    yield envs
    for env in envs:
        env.close()


@pytest.fixture
def dh(dh_pool):
    return dh_pool.pop()


def _header(frames):
    return msgpack.unpackb(frames[1], raw=False, strict_map_key=False)


def _with(frames, **fields):
    return [frames[0], pack({**_header(frames), **fields}), *frames[2:]]


def first_relay(env: DataHolderEnv) -> tuple[Channel, list[bytes]]:
    m = env.hop.recv(60.0)
    assert m is not None, f"no message from the data holder within 60 s\n{env.log_text()[-3000:]}"
    conn = env.hop.rid.decode()
    assert re.fullmatch(r"dh1/[0-9a-f]{16}", conn), f"[S1] routing id {conn!r}"
    ch = Channel(env.relay_key_at_lh(DH1), RUN, DH1, conn, DOWN)
    return ch, ch.check(m, "[C1] the data holder's first message: its HELLO as RELAY")


def next_up(env: DataHolderEnv, ch: Channel, what: str, timeout: float = T) -> dict | None:
    """The inner header of the data holder's next RELAY but relayed HEARTBEATs (a READY party heartbeats its label
    holder, [L1]), checked ([C3]); None if nothing came within ``timeout`` and ``timeout`` is QUIET."""
    deadline = time.monotonic() + timeout
    while True:
        m = env.hop.recv(max(0.0, deadline - time.monotonic()))
        if m is None and timeout == QUIET:
            return None
        assert m is not None, f"{what}: nothing from the data holder within {T} s\n{env.log_text()[-3000:]}"
        h = _header(ch.check(m, what))
        if h["type"] != "HEARTBEAT":
            return h


def test_C1_data_holder_sends_its_session_as_RELAY_to_its_segment_holder(dh):
    """[C1], [C3]: a data holder behind a segment holder connects to it and sends its session with the label holder
    as RELAY: party dh1, conn its routing id, seq 0, 1, 2 ..., the MAC of the spec's relay key, the inner messages
    as in sections 5-10 (HELLO, the link check's ECHO, PSI_START), and accepts the label holder's answers as
    authentic RELAYs."""
    ch, hello = first_relay(dh)
    h = _header(hello)
    assert h["type"] == "HELLO" and h["role"] == "data_holder" and h["party"] == DH1 and h["config"] == SESSION, h
    dh.hop.send(ch.wrap(lh_welcome_for(DH1)))
    echo = next_up(dh, ch, "[C1] the link check's ECHO")
    assert echo["type"] == "ECHO", echo
    m = dh.hop.got[-1][1]
    reply = envelope("ECHO_REPLY", {"seq": echo["seq"]}, [(n, np.frombuffer(b, dtype="<f4").reshape(s))
                                                           for n, d, s, b in m.tensors[1:]])
    dh.hop.send(ch.wrap(reply))
    assert next_up(dh, ch, "[C1] PSI_START after the link check")["type"] == "PSI_START"


PLAIN = {  # the label holder's messages, sent by the segment holder in the clear: none may be acted on
    "WELCOME": lambda ch: lh_welcome_for(DH1),
    "BYE_not_ok": lambda ch: envelope("BYE", {"ok": False, "reason": "conformance kit: a plain BYE"}),
    "HEARTBEAT": lambda ch: envelope("HEARTBEAT"),
    "ECHO_REPLY": lambda ch: envelope("ECHO_REPLY", {"seq": 0}),
}
BAD_RELAYS = {  # RELAYs of a WELCOME that fail a check of [C3] at the party's end
    "bad_mac": lambda ch: flip(ch.wrap(lh_welcome_for(DH1), advance=False), 2, 3),
    "wrong_seq": lambda ch: ch.wrap(lh_welcome_for(DH1), seq=1),
    "wrong_conn": lambda ch: Channel(ch.key, RUN, DH1, "dh1/" + "0" * 16, DOWN).wrap(lh_welcome_for(DH1)),
    "wrong_party": lambda ch: Channel(ch.key, RUN, DH2, ch.conn, DOWN).wrap(lh_welcome_for(DH1)),
    "direction_up": lambda ch: Channel(ch.key, RUN, DH1, ch.conn, "up").wrap(lh_welcome_for(DH1)),
    "no_header_tensor": lambda ch: _with(ch.wrap(lh_welcome_for(DH1), advance=False),
                                        tensors=[{"name": "x", "dtype": "uint8",
                                                  "shape": [len(lh_welcome_for(DH1)[1])]}]),
}


def test_C1_data_holder_drops_plain_messages_and_bad_RELAYs_from_its_segment_holder(dh):
    """[C1]: from its segment holder a data holder accepts only BACKWARD and ERROR in the clear, and RELAYs that pass
    [C3]: a plain WELCOME, BYE {ok: false}, HEARTBEAT, ECHO_REPLY, and a RELAY of a WELCOME with a flipped byte, the
    next-but-one seq, another conn, another party, the other direction or no `~header` are each dropped (no answer,
    no step further, no exit) and logged; then the authentic WELCOME with seq 0 is accepted (so none of them moved
    the seq) and the link check's ECHO is the next message."""
    ch, _ = first_relay(dh)
    for name, build in {**PLAIN, **BAD_RELAYS}.items():
        dh.hop.send(build(ch))
    m = dh.hop.recv(QUIET)
    assert m is None, f"[C1] the data holder must drop them all, it answered {m.summary()}"
    assert dh.proc.poll() is None, f"[C1] the data holder exited\n{dh.log_text()[-2000:]}"
    log = dh.log_text()
    assert log.lower().count("dropped") >= len(PLAIN) + len(BAD_RELAYS), (
        f"[C1] every dropped message is logged:\n{log[-3000:]}")
    dh.hop.send(ch.wrap(lh_welcome_for(DH1)))
    echo = next_up(dh, ch, "[C1] the authentic WELCOME after the dropped ones")
    assert echo["type"] == "ECHO", echo  # had it acted on an earlier WELCOME, this one would get an ERROR
    # READY now: a replay of that authentic WELCOME is dropped too (acted on, it would get UNEXPECTED_MESSAGE)
    dh.hop.send(ch.wrap(lh_welcome_for(DH1), seq=0))
    dh.hop.send(envelope("BYE", {"ok": False, "reason": "conformance kit: a plain BYE"}))
    h = next_up(dh, ch, "[C1] in READY", QUIET)
    assert h is None and dh.proc.poll() is None, f"[C1] in READY, a replayed WELCOME and a plain BYE: {h}"
    # an ERROR in the clear is the segment holder's own, and is accepted (logged); an authentic BYE ends the session
    dh.hop.send(ch.wrap(envelope("BYE", {"ok": False, "reason": "conformance kit: relayed BYE"})))
    rc = dh.wait(10.0)
    assert rc not in (None, 0), f"[C1] an authentic relayed BYE {{ok: false}} ends the session, got {rc}"
    assert "relayed BYE" in dh.log_text()


@pytest.mark.slow  # three real nodes and a PSI: about 15 s
def test_C1_data_holder_sends_FORWARD_in_the_clear_and_everything_else_as_RELAY(request, tmp_path, ctx):
    """[C1] end to end: a real label holder, a real data holder dh2 feeding it directly, and a real dh1 behind the
    kit's seg1, which joins the label holder as a segment holder and passes RELAYs both ways unchanged. Everything
    dh1 sends before training (HELLO, PSI, CHECKPOINT_DONE, HEARTBEATs) reaches seg1 as RELAY, and its first
    training message, FORWARD(0), in the clear: float32 [b, 4] of its cut layer, for seg1. On the way the label
    holder's side is checked too: seg1's SCHEDULE carries rows ([C5]), and seg1 gets its SCHEDULE, EPOCH and
    CHECKPOINT before dh1's relayed ones ([C6])."""
    node_cmd = _node_cmd(request)
    lh = LabelHolderEnv(tmp_path, node_cmd, ctx)
    nodes = [lh]
    try:
        nodes.append(DataHolderEnv(tmp_path, node_cmd, ctx, party=DH1, keys=lh.keys))
        nodes.append(DataHolderEnv(tmp_path, node_cmd, ctx, party=DH2, endpoint=lh.address, keys=lh.keys))
        dh1 = nodes[1]
        seg = lh.peer(SEG)
        seg.send("HELLO", hello_fields(SEG, "segment_holder"))
        seg.expect("WELCOME", 60.0, "seg1 joins the label holder")
        relayed_types = []
        control: list[tuple[str, str]] = []  # what seg1 heard from the label holder: its own, and dh1's relayed
        rows = None
        forward = None
        deadline = time.monotonic() + 60.0
        while forward is None and time.monotonic() < deadline:
            for node in nodes:
                assert node.proc.poll() is None, f"a node exited with {node.proc.returncode}\n{node.log_text()[-3000:]}"
            m = dh1.hop.recv(0.01, skip_heartbeats=False)
            if m is not None:
                if m.type == "FORWARD":
                    forward = m
                    break
                assert m.type == "RELAY", f"[C1] dh1 sent its segment holder a plain {m.summary()}"
                relayed_types.append(msgpack.unpackb(m.tensors[0][3], raw=False).get("type"))
                seg.send_raw(m.frames, pace=False)
            down = seg.recv(0.01)
            if down is not None and down.type == "RELAY" and down.get("party") == DH1:
                control.append((DH1, msgpack.unpackb(down.tensors[0][3], raw=False).get("type")))
                dh1.hop.send(down.frames)
            elif down is not None:
                control.append((SEG, down.type))
                if down.type == "SCHEDULE":
                    rows = down.get("rows")
        assert forward is not None, f"no FORWARD from dh1 within 60 s; it relayed {relayed_types}\n" \
            f"{dh1.log_text()[-2000:]}\n{lh.log_text()[-2000:]}"
        assert forward.get("step") == 0 and forward.tensors[0][:2] == ("activations", "float32"), forward.summary()
        assert forward.tensors[0][2][1] == SESSION["cut_widths"][DH1], forward.summary()
        for t in ("HELLO", "PSI_START", "PSI_ITEMS", "CHECKPOINT_DONE"):
            assert t in relayed_types, f"[C1] dh1's {t} must travel as RELAY: it relayed {relayed_types}"
        assert rows == N_IDS, f"[C5] seg1's SCHEDULE must carry rows = {N_IDS} (every id is shared), got {rows}"
        for t in ("SCHEDULE", "EPOCH", "CHECKPOINT"):  # [C6]: the segment holder first, then the parties behind it
            assert (SEG, t) in control and (DH1, t) in control, f"[C6] {t}: {control}"
            assert control.index((SEG, t)) < control.index((DH1, t)), f"[C6] seg1's {t} must come first: {control}"
    finally:
        for node in nodes:
            node.close()
