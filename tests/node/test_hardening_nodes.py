"""Issue 12 with real node processes: one party's connections replace each other cleanly ([S1], [S5]).

Before issue 12 the label holder's ROUTER handed a routing id over to whichever connection claimed it last, and two
connections racing for one routing id ended the label holder in ``Assertion failed: !_io_error``: 3 of 3 tries with
the same data holder started twice. Now every socket has its own routing id and the session layer switches a party
to its newest connection, telling the old one ``ERROR REPLACED``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .procs import Nodes
from .test_sessions import FAST, session

LIBZMQ_ABORT = "Assertion failed"


def label_holder_and_dh1(nodes: Nodes, cfg: dict):
    """The label holder listening and dh1 past its link check, in READY."""
    lh = nodes.start(cfg["bank"])
    lh.wait_for("listening on")
    dh1 = nodes.start(cfg["dh1"])
    dh1.wait_for("link check:")
    return lh, dh1


@pytest.mark.parametrize("attempt", range(3))
def test_S5_the_same_data_holder_started_twice_replaces_the_first(tmp_path, attempt):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh, first = label_holder_and_dh1(nodes, cfg)
        second = nodes.start(cfg["dh1"])  # started by mistake with the same config and key
        assert first.wait(timeout=20) == 1, first.output
        assert "replaced" in first.output, first.output
        second.wait_for("link check:")
        assert lh.proc.poll() is None, lh.output
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0, lh.output
        assert second.wait(timeout=10) == 1
        assert "ended the session: stopped by SIGTERM" in second.output
    assert LIBZMQ_ABORT not in lh.output
    assert "data holder 'dh1' joined" in lh.output and "data holder 'dh1' rejoined" in lh.output
    assert "a new connection with its key replaced the old one" in lh.output


def test_S5_a_data_holder_killed_and_restarted_at_once_takes_its_place(tmp_path):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh, first = label_holder_and_dh1(nodes, cfg)
        os.kill(first.proc.pid, signal.SIGKILL)
        second = nodes.start(cfg["dh1"])
        second.wait_for("link check:")
        time.sleep(FAST["peer"] + 1)  # past the peer timeout: the label holder still serves the new connection
        assert lh.proc.poll() is None, lh.output
        assert second.proc.poll() is None, second.output
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0, lh.output
    assert LIBZMQ_ABORT not in lh.output


def test_B5_a_dropped_connection_that_keeps_coming_back_gets_its_key_refused_for_now(tmp_path):
    """A process with dh1's key floods refused messages ([B4] closes it), and its DEALER keeps reconnecting and
    sending: the label holder refuses the key at the CURVE handshake for a while (ZAP status 300, [B5]), so each
    comeback costs a handshake, not the decryption of a queue of 1 MiB messages. An honest dh1 started meanwhile
    is told "for now", keeps trying and joins once the cooldown is over; the first dh1 is never disturbed."""
    import secrets

    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from vfl.node.keys import load_public_key, load_secret_key

    cfg = session(tmp_path, hold=60.0)
    keys = tmp_path / "keys"
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"], "-v")
        lh.wait_for("listening on")
        first = nodes.start(cfg["dh1"])
        first.wait_for("link check:")
        endpoint = lh.output.split("listening on ")[1].split()[0]
        ctx = zmq.Context()
        try:
            def dealer() -> tuple[zmq.Socket, zmq.Socket]:
                sock = ctx.socket(zmq.DEALER)
                sock.linger, sock.sndhwm = 0, 1000
                sock.setsockopt(zmq.ROUTING_ID, f"dh1/{secrets.token_hex(8)}".encode())
                sock.curve_publickey, sock.curve_secretkey = load_secret_key(keys / "dh1.key_secret")
                sock.curve_serverkey = load_public_key(keys / "bank.key")
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                sock.connect(endpoint)
                return sock, monitor

            hostile, _ = dealer()
            junk = [b"x" * 2**20]  # not a vfl signature: refused, 1 MiB a time from the [B4] budget
            deadline = time.monotonic() + 60
            while "came back: closed it again" not in lh.output and time.monotonic() < deadline:
                try:
                    hostile.send_multipart(junk, flags=zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.01)
            assert "came back: closed it again, and refusing its key" in lh.output, lh.output
            # a new connection with that key, during the cooldown: refused with ZAP status 500, "try again later"
            probe, monitor = dealer()
            assert monitor.poll(10_000), lh.output[-3000:]
            event = recv_monitor_message(monitor)
            assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 500, event
            probe.close(linger=0)
            monitor.close(linger=0)
            hostile.close(linger=0)
        finally:
            ctx.destroy(linger=0)
        second = nodes.start(cfg["dh1"])  # an honest restart of dh1 while its key may still be cooling down
        try:
            second.wait_for("link check:", timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlabel holder:\n{lh.output[-4000:]}") from None
        assert first.wait(timeout=20) == 1 and "replaced" in first.output, first.output
        assert lh.proc.poll() is None, lh.output
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0, lh.output
    assert LIBZMQ_ABORT not in lh.output and "internal error" not in lh.output
