"""A shaped TCP link on one machine: a relay that adds a round-trip delay and caps the bandwidth per direction.

Parties of a real run sit in different organisations, 10-100 ms apart behind 100 Mbit/s to 1 Gbit/s links. To see
what such a link does to a run without one, start the relay between the data holders and the label holder::

    vfl link-proxy --listen 127.0.0.1:6001 --target 127.0.0.1:6000 --rtt-ms 50 --mbit 100

and point the data holders' ``endpoint`` at ``tcp://127.0.0.1:6001`` while the label holder binds 6000. Each
direction is modelled as a link of ``mbit`` Mbit/s (a chunk occupies it for its size over the rate, the next one
waits its turn) followed by a propagation delay of half the RTT; order is kept and nothing is dropped. CurveZMQ runs
end to end through it: the relay only sees ciphertext. The timing model (:class:`LinkModel`) is pure, so its
guarantees are tested in memory; the relay threads only follow the times it gives.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass, field

from ..errors import SetupError

CHUNK = 1 << 16  # bytes read at once: at 100 Mbit/s a full chunk occupies the link for about 5 ms


class LinkError(SetupError):
    """The relay cannot start (a bad address, a port in use)."""


@dataclass
class LinkModel:
    """One direction of a link: ``rate`` bytes per second (0: unlimited), then ``delay`` seconds of propagation.

    ``deliver(n, now)`` says when a chunk of ``n`` bytes that arrived at ``now`` leaves the far end: it waits until
    the link is free, occupies it for ``n / rate`` seconds, then travels ``delay`` seconds. So chunks leave in order,
    none before ``now + delay``, and over any span the bytes delivered never exceed ``rate`` times the span plus one
    chunk."""

    delay: float = 0.0
    rate: float = 0.0
    free_at: float = field(default=0.0)

    def deliver(self, n: int, now: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + (n / self.rate if self.rate > 0 else 0.0)
        return self.free_at + self.delay


def parse_address(value: str, what: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LinkError(f"{what} {value!r} must be HOST:PORT, e.g. 127.0.0.1:6001")
    return host, int(port)


class LinkProxy:
    """The relay: every connection accepted on ``listen`` is joined to a new connection to ``target``, each
    direction through its own :class:`LinkModel`. ``start`` binds (raising ``LinkError``), ``stop`` closes all."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, rtt_ms: float = 0.0, mbit: float = 0.0):
        if rtt_ms < 0 or mbit < 0:
            raise LinkError(f"--rtt-ms and --mbit must be >= 0, got {rtt_ms} and {mbit}")
        self.listen, self.target = listen, target
        self.one_way_s = rtt_ms / 2000.0
        self.rate = mbit * 1e6 / 8  # bytes per second
        self.connections = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None

    @property
    def port(self) -> int:
        return self._server.getsockname()[1] if self._server is not None else self.listen[1]

    def start(self) -> "LinkProxy":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(self.listen)
        except OSError as exc:
            server.close()
            raise LinkError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {exc.strerror}; choose another "
                            "--listen port") from None
        server.listen(16)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets + ([self._server] if self._server is not None else []):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            self.connections += 1
            self._direction(client, upstream)
            self._direction(upstream, client)

    def _direction(self, src: socket.socket, dst: socket.socket) -> None:
        """A reader stamps each chunk with its delivery time (``LinkModel``); a writer sends it when that comes."""
        model = LinkModel(delay=self.one_way_s, rate=self.rate)
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        cond = threading.Condition()

        def reader() -> None:
            try:
                while True:
                    data = src.recv(CHUNK)
                    with cond:
                        queue.append((model.deliver(len(data), time.monotonic()), data))
                        cond.notify()
                    if not data:
                        return
            except OSError:
                with cond:
                    queue.append((time.monotonic(), b""))
                    cond.notify()

        def writer() -> None:
            try:
                while True:
                    with cond:
                        while not queue:
                            cond.wait()
                        due, data = queue.popleft()
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    if not data:
                        break
                    dst.sendall(data)
                    self.bytes += len(data)
            except OSError:
                pass
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

        threading.Thread(target=reader, name="link-read", daemon=True).start()
        threading.Thread(target=writer, name="link-write", daemon=True).start()


def serve(listen: str, target: str, rtt_ms: float, mbit: float, echo=print) -> None:
    """``vfl link-proxy``: run the relay until interrupted."""
    proxy = LinkProxy(parse_address(listen, "--listen"), parse_address(target, "--target"), rtt_ms=rtt_ms, mbit=mbit)
    with proxy:
        shaped = f"{mbit:g} Mbit/s per direction" if mbit else "unlimited bandwidth"
        echo(f"link proxy: {listen} -> {target}, RTT +{rtt_ms:g} ms, {shaped} (Ctrl-C stops it)")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            echo(f"link proxy: stopped after {proxy.connections} connection(s), {proxy.bytes} bytes relayed")
