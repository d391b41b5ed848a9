"""ZeroMQ sockets for the two roles, set up as PROTOCOL.md sections 2 and 7 require.

The label holder binds a ROUTER that is a CURVE server; a ZAP handler (pyzmq's ``ThreadAuthenticator``) lets in only
the partners' public keys, and every received message carries the client's key as its ``User-Id``, which we map to a
party id — that, not the routing id a peer chose, is who the peer is. Data holders connect a DEALER whose routing id
is ``<party>/<16 random hex>``, fresh for each socket ([S1]): a restarted data holder is a new connection that the
label holder's session layer switches to ([S5]), never one that libzmq hands a live routing id over to. That is why
``ROUTER_HANDOVER`` is off: with it, any allow-listed key could take over another party's routing id (and so its
traffic), and two connections racing for one routing id end the process in a libzmq assertion. Without it, libzmq
ignores a second connection that claims a routing id in use. Sends and receives are zero-copy for large frames.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..errors import SetupError
from .config import NodeConfig
from .keys import load_public_key, load_secret_key
from ..protocol.routing import new_routing_id, party_of

ZAP_DOMAIN = "vfl"
HWM_MIN, HWM_MAX = 16, 100_000
MAX_CONNECTIONS = 4096  # routing id -> TCP connection entries kept for ``disconnect``
LINGER_MS = 2_000  # flush BYE and ERROR on close, but never hang on exit
TERM_GRACE_S = 3.0
#: data holder monitor events: the label holder refused our key ([L3]), a CURVE failure, and a dropped connection ([J1])
MONITORED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED

log = logging.getLogger("vfl.transport")

# Plain ints: pyzmq's enum flags cost a Python-level enum operation (about 0.5-1.5 us) at every use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def hwm_for(queue_bytes: int, largest_message_bytes: int) -> int:
    """High-water marks count messages; size them from a byte budget and the largest message of the session."""
    return max(HWM_MIN, min(HWM_MAX, queue_bytes // max(1, largest_message_bytes)))


#: bytes per ID in the largest PSI message (a reply carries two 32-byte points per item)
PSI_BYTES_PER_ITEM = 64


def largest_message_bytes(cfg: NodeConfig) -> int:
    """The largest message this session will carry: a cut-layer batch, a PSI chunk, or the link-check tensor.

    It sizes the high-water marks (a peer's queue holds at most ``queue_bytes`` of such messages), the label holder's
    ECHO cap (an ECHO may not be larger, so an echo cannot overrun that budget) and the frame limit below.
    """
    s = cfg.session
    widths = [*s.cut_widths.values(), *(seg.width for seg in s.segments.values())]  # v1.10: a segment's too
    activations = s.batch_size * max(widths) * 8
    link = 1
    for d in cfg.link_check.shape:
        link *= d
    psi = cfg.psi.chunk_size * PSI_BYTES_PER_ITEM if s.psi else 0
    return max(activations, link * 8, psi, 64 * 1024)


#: the node's own per-peer queue (what libzmq cannot take yet) is at most this, and at most 1/16 of queue_bytes
OUTBOX_MAX_BYTES = 32 * 2**20


def outbox_bytes(cfg: NodeConfig) -> int:
    """[B2]: the node's queue for one peer. libzmq's send high-water mark gets the rest of ``queue_bytes``, so all
    that is waiting to go to one peer, in libzmq and in the node, stays within ``queue_bytes``."""
    return min(OUTBOX_MAX_BYTES, max(1, cfg.queue_bytes // 16))


#: a peer's PSI chunk may be larger than ours: [psi].chunk_size is at most 2^20 rows of 32 bytes per tensor
PSI_MAX_TENSOR_BYTES = (1 << 20) * 32
#: below this a frame is never dropped by libzmq: oversized messages get the decoder's ERROR TOO_LARGE instead
FRAME_LIMIT_FLOOR = 16 * 2**20


def order_bytes(cfg: NodeConfig, rows: int) -> int:
    """The largest row-position tensor a data holder of ``rows`` rows receives: an ``EPOCH``'s order (or a
    ``SCHEDULE``'s validation rows) names each aligned row at most once, as int64, and the aligned rows are at most
    this party's own. 0 at a label holder, and in a session that does not train: it receives no such message."""
    return 8 * rows if cfg.session.train and not cfg.is_label_holder else 0


def frame_limit(cfg: NodeConfig, rows: int = 0) -> int:
    """``ZMQ_MAXMSGSIZE``: the largest frame libzmq accepts before it drops the connection (PROTOCOL.md section 7).

    libzmq assembles a whole multipart message before the node sees its first frame, so this bound times the
    frame count (``2 + max_tensors``) is what one message can cost before the decoder runs. Derived from what the
    session can legitimately carry (twice its largest message, a peer's largest PSI chunk, a data holder's epoch
    order over its ``rows``), with a floor so that a merely oversized message still gets a readable ``ERROR``,
    never more than ``[limits]`` allows. Without the epoch order, a data holder of more than 4.2M rows had its
    connection dropped by libzmq at the first ``EPOCH`` (33.6 MB at 4.2M training rows), and rejoined in a loop.
    """
    need = max(2 * largest_message_bytes(cfg), FRAME_LIMIT_FLOOR, PSI_MAX_TENSOR_BYTES if cfg.session.psi else 0,
               order_bytes(cfg, rows))
    return min(cfg.limits.max_frame_bytes, need + cfg.limits.max_header_bytes)


def socket_options(cfg: NodeConfig, rows: int = 0) -> dict[str, int]:
    """The options of a node's socket (besides CURVE and the routing id), by ``zmq`` constant name.

    - ``SNDHWM``: what libzmq may hold for one peer, the send budget minus the node's own queue ([B2]).
    - ``RCVHWM``: a hostile peer's messages can be as large as the frame limit, not just the session's largest, so
      the receive queue is sized so that a full one of the largest frames still fits the byte budget ([B1]).
    - No ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``): with them libzmq 4.3.5 aborts the whole process ("Assertion
      failed: !_io_error (src/stream_engine_base.cpp:310)") when a connection whose receive queue is full closes,
      which any partner can arrange (zeromq/libzmq#4841). Dead peers are found by the protocol's own heartbeats
      ([L1], [L2]); TCP keepalive closes a dead TCP connection underneath.
    """
    t = cfg.timeouts
    return {
        "SNDHWM": hwm_for(cfg.queue_bytes - outbox_bytes(cfg), largest_message_bytes(cfg)),
        "RCVHWM": hwm_for(cfg.queue_bytes, frame_limit(cfg, rows)),
        "MAXMSGSIZE": frame_limit(cfg, rows),
        "LINGER": LINGER_MS,
        "TCP_KEEPALIVE": 1,
        "TCP_KEEPALIVE_IDLE": max(1, int(t.peer)),
        "TCP_KEEPALIVE_INTVL": max(1, int(t.heartbeat)),
        "TCP_KEEPALIVE_CNT": 3,
    }


#: [B5] a key refused for now gets ZAP status 500 ("try again later"), not 300: libzmq answers 300 with silence and
#: leaves the client's handshake hanging for its handshake interval (30 s), and 400 means "not allowed, ever"
COOLING = b"cooling down"
COOLING_STATUS = b"500"


class _AllowList:
    """ZAP credentials provider: a CURVE client may connect iff its key is a partner's and is not cooling down."""

    def __init__(self, keys: dict[bytes, str]):
        self.keys = keys
        #: z85 key -> monotonic time until which its handshakes are refused ([B5]); written by the node's thread,
        #: read by the ZAP thread (one dict assignment or lookup at a time: atomic under the GIL)
        self.cooling: dict[bytes, float] = {}

    def verdict(self, key: bytes) -> bytes:
        """``OK``, ``COOLING`` or ``Unknown key`` for a z85 client key."""
        if key not in self.keys:
            log.warning("refused a CURVE client with a key not on the allow-list: %s", key.decode("ascii", "replace"))
            return b"Unknown key"
        until = self.cooling.get(key)
        if until is not None:
            if time.monotonic() < until:
                return COOLING
            self.cooling.pop(key, None)
        return b"OK"


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with one answer its callbacks cannot give: status 500 (try again later, [B5]) for a key that
    is cooling down, so that the data holder knows to keep trying. Overrides the two methods that pick the answer."""

    def __init__(self, ctx: zmq.Context, allow: _AllowList):
        super().__init__(ctx, log=logging.getLogger("vfl.zap"))
        self.allow_list = allow

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        if domain != ZAP_DOMAIN:
            return False, b"Unknown domain"
        reason = self.allow_list.verdict(z85.encode(client_key))
        return reason == b"OK", reason

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        if status_text == COOLING:
            status_code = COOLING_STATUS
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


@dataclass
class Received:
    """One message: its routing id (label holder only), the authenticated party (None if unknown), its frames."""

    routing_id: bytes
    identity: str | None
    frames: Sequence[Any]


class Transport:
    """Owns the context, the socket, the authenticator and the monitor of one node."""

    def __init__(self, cfg: NodeConfig, rows: int = 0, *, server: bool | None = None, endpoint: str | None = None,
                 partners: dict | None = None):
        """``rows``: this party's own row count (its frame bound must fit an ``EPOCH`` over them, ``order_bytes``).

        By default the node's one socket: the label holder's ROUTER on its endpoint, allowing its partners' keys,
        or a data holder's DEALER to its endpoint, pinning its server partner's key. A segment holder (v1.10) has
        both: ``server=True`` with its ``bind`` and its inputs as ``partners``, and a DEALER to its downstream."""
        self.cfg = cfg
        self.server = cfg.is_label_holder if server is None else server
        self.target = endpoint or cfg.endpoint
        if partners is None:
            partners = cfg.partners if self.server or cfg.insecure else {
                cfg.server_partner: cfg.partners[cfg.server_partner]}
        self.rows = rows
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.allow_list: _AllowList | None = None
        self.monitor: zmq.Socket | None = None
        self.partner_by_key: dict[bytes, str] = {}
        #: label holder: routing id -> (descriptor, peer address) of the TCP connection its messages came on
        self._connections: OrderedDict[bytes, tuple[int, Any]] = OrderedDict()
        if not cfg.insecure:
            self._keypair = load_secret_key(cfg.secret_key)
            self.partner_by_key = {load_public_key(path): name for name, path in partners.items()}
        if not self.server:
            self.socket = self._dealer()
            self.endpoint = self.target
            return
        sock = self._socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # see the module docstring: [S5] replaces, libzmq never hands over
        if not cfg.insecure:
            self.allow_list = _AllowList(self.partner_by_key)
            self.auth = _Authenticator(self.ctx, self.allow_list)
            self.auth.start()
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
        try:
            sock.bind(self.target)
        except zmq.ZMQError as exc:
            self.socket = sock
            self.close(linger_ms=0)  # the authenticator's thread and the context too: nothing was sent
            raise bind_error(cfg, exc) from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.socket = sock

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        for name, value in socket_options(self.cfg, self.rows).items():
            sock.setsockopt(getattr(zmq, name), value)
        if not self.cfg.insecure:
            sock.curve_publickey, sock.curve_secretkey = self._keypair
        return sock

    def _dealer(self) -> zmq.Socket:
        """A data holder's DEALER with a fresh routing id ([S1]), its monitor, connected to the label holder."""
        sock = self._socket(zmq.DEALER)
        self.routing_id = new_routing_id(self.cfg.party)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if not self.cfg.insecure:
            (server_key,) = self.partner_by_key
            sock.curve_serverkey = server_key
        self.monitor = sock.get_monitor_socket(MONITORED)
        sock.connect(self.target)
        return sock

    def reconnect(self) -> None:
        """Data holder ([J1]): drop the socket (and whatever it still queues) and connect a fresh one.

        The new socket has a new routing id, so the label holder sees a new connection even while it still holds
        the old one (half-open, or not yet noticed as closed): libzmq's ROUTER would ignore a second connection
        with a routing id in use. The caller must poll ``poll_items()`` again.
        """
        assert not self.server
        self._close_monitor()
        self.socket.close(linger=0)
        self.socket = self._dealer()

    # ------------------------------------------------------------------------------------------------ I/O

    def send(self, frames: list[Any], to: bytes | None = None) -> None:
        """Send one message without blocking.

        Raises ``zmq.Again`` when it cannot be queued now (no connection yet, or the peer's queue is full: try again
        later) and ``zmq.ZMQError`` EHOSTUNREACH when the label holder's peer is gone. libzmq queues multipart
        messages atomically: if the first frame is taken, all are.
        """
        # Frame by frame rather than send_multipart: that re-checks every part's type and builds an enum flag per
        # frame. libzmq still queues the message atomically: once the first frame is taken, the rest are.
        send = self.socket.send
        if to is not None:
            send(to, _MORE_NOBLOCK)
        last = len(frames) - 1
        for i, f in enumerate(frames):
            send(_received_frame(f), _NOBLOCK if i == last else _MORE_NOBLOCK, copy=False)

    def has_input(self) -> bool:
        """A message is waiting (cheaper than a receive that fails)."""
        return bool(self.socket.getsockopt(_EVENTS) & _POLLIN)

    def recv(self) -> Received | None:
        """One message if one is waiting, else None. Never blocks."""
        sock = self.socket
        if not sock.getsockopt(_EVENTS) & _POLLIN:
            return None
        try:
            frame = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames = [frame]
        while frame.more:  # the rest of a multipart message is already here: libzmq delivers it whole
            frame = sock.recv(_NOBLOCK, copy=False)
            frames.append(frame)
        if self.server:
            routing_id = frames[0].bytes
            self._note_connection(routing_id, frames[0])
            frames = frames[1:]
        else:
            routing_id = b""
        return Received(routing_id=routing_id, identity=self._identity(routing_id, frames), frames=frames)

    def _note_connection(self, routing_id: bytes, frame: zmq.Frame) -> None:
        """Remember which TCP connection (descriptor and peer address) a routing id's messages arrive on."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        known = self._connections.get(routing_id)
        if known is not None and known[0] == fd:
            return
        try:
            with socket.socket(fileno=os.dup(fd)) as conn:
                peer = conn.getpeername()
        except OSError:
            return
        self._connections[routing_id] = (fd, peer)
        self._connections.move_to_end(routing_id)
        while len(self._connections) > MAX_CONNECTIONS:
            self._connections.popitem(last=False)

    def disconnect(self, routing_id: bytes) -> bool:
        """Close one peer's TCP connection (PROTOCOL.md [B2]); True if it was closed.

        A ROUTER has no call for this, so we shut the connection down on a duplicate of its descriptor: libzmq
        then sees the connection end and cleans up after it as after any peer that went away. The descriptor is
        only touched if it still leads to the same peer address (a descriptor number can be reused).
        """
        known = self._connections.pop(routing_id, None)
        if known is None:
            return False
        fd, peer = known
        try:
            conn = socket.socket(fileno=os.dup(fd))
        except OSError:
            return False
        with conn:
            try:
                if conn.getpeername() != peer:
                    return False
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        return True

    def refuse_key(self, routing_id: bytes, seconds: float) -> None:
        """Refuse the CURVE handshakes of the key behind ``routing_id`` for ``seconds`` ([B5]).

        The session layer only asks this for a routing id whose party prefix it has checked against the key ([S4]),
        so the party's key is the connection's, even when the connection itself is already gone."""
        if self.allow_list is None:
            return
        party = party_of(routing_id)
        until = time.monotonic() + seconds
        for key, name in self.partner_by_key.items():
            if name == party:
                self.allow_list.cooling[key] = until

    def _identity(self, routing_id: bytes, frames: list[zmq.Frame]) -> str | None:
        if not self.server:
            return None  # a data holder's one peer is pinned by its CURVE server key
        if self.cfg.insecure:
            return party_of(routing_id)
        if not frames:
            return None
        try:
            user_id = frames[0].get("User-Id")
        except zmq.ZMQError:
            return None
        if user_id is None:
            return None
        return self.partner_by_key.get(user_id.encode() if isinstance(user_id, str) else user_id)

    def poll_items(self) -> list[zmq.Socket]:
        return [s for s in (self.socket, self.monitor) if s is not None]

    def monitor_events(self) -> list[dict]:
        """Pending monitor events (data holder): e.g. the label holder's ZAP handler refusing our key."""
        events = []
        while self.monitor is not None:
            try:
                events.append(recv_monitor_message(self.monitor, zmq.NOBLOCK))
            except zmq.Again:
                break
        return events

    def _close_monitor(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self, linger_ms: int = LINGER_MS) -> bool:
        """``linger_ms``: how long libzmq may keep delivering queued messages (BYE, ERROR) after we close."""
        self._close_monitor()
        self.socket.close(linger=linger_ms)
        if self.auth is not None:
            self.auth.stop()
        # libzmq's shutdown has been seen to stall on a loaded machine after a refused CURVE handshake: never let
        # it keep a finished node alive. True when it finished in time.
        done = threading.Thread(target=self.ctx.term, name="zmq-term", daemon=True)
        done.start()
        done.join(linger_ms / 1000 + TERM_GRACE_S)
        if done.is_alive():
            log.warning("libzmq did not shut down within %.0f s; exiting anyway", linger_ms / 1000 + TERM_GRACE_S)
            return False
        return True


def _received_frame(buf: Any) -> Any:
    """A numpy view that covers a whole received ``zmq.Frame`` -> that Frame, else ``buf`` unchanged.

    Sending the Frame itself lets libzmq share the message by reference count. Sending a view of it would make pyzmq
    wrap it in a new zero-copy frame whose release wakes pyzmq's garbage-collector thread (a GIL hand-off per
    message) — the main per-message cost of answering an ECHO, measured by bench/wire.py.
    """
    if type(buf) is not np.ndarray:
        return buf
    base = buf.base
    while type(base) is np.ndarray:
        base = base.base
    if type(base) is memoryview and isinstance(base.obj, zmq.Frame) and base.nbytes == buf.nbytes:
        return base.obj
    return buf


# ------------------------------------------------------------------------------------------------ bind errors


class EndpointError(SetupError):
    """The label holder cannot listen on its ``endpoint`` (taken by another process, not an address of this
    machine, a privileged port). A problem on this machine (exit 2), never a peer's fault."""


def bind_error(cfg: NodeConfig, exc: zmq.ZMQError) -> EndpointError:
    """The error for a failed ``bind``: the endpoint, the cause, and the ``endpoint`` key of the config to change."""
    endpoint = cfg.endpoint
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    key = f"`endpoint` in {cfg.path} (and in every data holder's config)"
    if exc.errno == errno.EADDRINUSE:
        why = (f"another process already listens on port {port} (a label holder still running? "
               f"`ss -ltnp 'sport = :{port}'` shows which); stop it, or change {key}")
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = (f"{host} is not an address of this machine; change {key} to one of its addresses "
               f"(tcp://0.0.0.0:{port} listens on all of them)")
    elif exc.errno == errno.EACCES:
        why = f"not allowed to listen on port {port} (ports below 1024 need root); choose another port in {key}"
    else:
        why = f"{exc.strerror}; check {key}"
    return EndpointError(f"{cfg.path}: cannot listen on {endpoint}: {why}")
