"""The shaped link (`vfl link-proxy`, vfl.launch.link): its timing model in memory, the relay on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.launch.link import LinkError, LinkModel, LinkProxy, parse_address


@settings(max_examples=300, deadline=None)
@given(
    delay=st.floats(0, 0.2),
    mbit=st.sampled_from([0.0, 1.0, 100.0, 1000.0]),
    chunks=st.lists(st.tuples(st.floats(0, 0.05), st.integers(0, 1 << 16)), min_size=1, max_size=60),
)
def test_the_model_keeps_order_adds_the_delay_and_never_exceeds_the_rate(delay, mbit, chunks):
    rate = mbit * 1e6 / 8
    model = LinkModel(delay=delay, rate=rate)
    now, arrivals, sizes, out = 0.0, [], [], []
    for gap, n in chunks:
        now += gap
        arrivals.append(now)
        sizes.append(n)
        out.append(model.deliver(n, now))
    assert out == sorted(out)  # in order
    assert all(d >= a + delay - 1e-12 for a, d in zip(arrivals, out))  # never before the propagation delay
    if rate:  # chunks i..j all crossed the link after chunk i arrived: at most rate bytes per second
        for i in range(len(out)):
            for j in range(i, len(out)):
                assert out[j] - delay >= arrivals[i] + sum(sizes[i:j + 1]) / rate - 1e-9


def test_an_idle_link_passes_a_chunk_after_its_transfer_time_plus_the_delay():
    model = LinkModel(delay=0.025, rate=12.5e6)  # 100 Mbit/s, 50 ms RTT
    assert model.deliver(125_000, 10.0) == pytest.approx(10.0 + 0.01 + 0.025)
    assert model.deliver(125_000, 10.0) == pytest.approx(10.0 + 0.02 + 0.025)  # queued behind the first
    assert model.deliver(1, 100.0) == pytest.approx(100.0 + 0.025 + 1 / 12.5e6)  # idle again


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(10)
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread


def test_the_relay_carries_every_byte_both_ways_in_order_and_passes_the_close_on():
    srv, thread = _echo_server()
    payload = os.urandom(3 << 20)
    with srv, LinkProxy(("127.0.0.1", 0), srv.getsockname(), rtt_ms=4, mbit=1000) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            c.settimeout(10)
            sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)), daemon=True)
            sender.start()
            got = bytearray()
            for _ in range(100_000):  # bounded: the echo ends with the close the relay passes on
                data = c.recv(1 << 16)
                if not data:
                    break
                got += data
            sender.join(10)
        thread.join(10)
        assert bytes(got) == payload and proxy.connections == 1 and proxy.bytes == 2 * len(payload)


def test_bad_addresses_and_a_busy_port_are_clear_errors():
    for bad in ("6001", "host:", "127.0.0.1:0", "127.0.0.1:70000", ":80"):
        with pytest.raises(LinkError, match="must be HOST:PORT"):
            parse_address(bad, "--listen")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(LinkError, match="cannot listen on 127.0.0.1:.*choose another --listen port"):
            LinkProxy(taken.getsockname(), ("127.0.0.1", 9)).start()


def test_vfl_link_proxy_names_a_bad_address_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "vfl", "link-proxy", "--listen", "nope", "--target",
                           "127.0.0.1:6000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "vfl link-proxy: --listen 'nope' must be HOST:PORT, e.g. 127.0.0.1:6001" in done.stderr
