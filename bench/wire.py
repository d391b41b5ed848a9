#!/usr/bin/env python
"""Wire benchmark: round-trip throughput of float32 tensors between two real processes on 127.0.0.1.

Variants, all measured side by side in one run (repetitions interleaved, medians reported):

* ``bare``  - raw pyzmq: a DEALER sends the tensor's buffer as one frame (``copy=False``); a ROUTER echo process
  (this file, ``--echo-server``) sends the same frames back (``copy=False``). Same socket options as a vfl node.
* ``vfl``   - the client encodes ``Echo`` with ``vfl.protocol.encode`` and sends it with a ``vfl.node.Transport``
  DEALER after a real HELLO -> WELCOME handshake; the server is a real label-holder node process
  (``python -m vfl node --config ...``, configured by ``prepare_session``); the client decodes the ``ECHO_REPLY``
  with ``vfl.protocol.decode``. The session ends with BYE and the node must exit 0.

each with CurveZMQ ``on`` (``curve``) and ``off`` (``plain``), and one diagnostic variant, CurveZMQ off:

* ``codec`` - the ``vfl`` client (codec + ``Transport``, no handshake) against ``--echo-server`` in codec mode: it
  decodes every message with ``vfl.protocol.decode`` and answers with ``encode(EchoReply(...))``, with no node loop
  and no state machine. It splits vfl's cost into the codec's part (codec / bare) and the node's part (vfl / codec).

Throughput is MB/s (1 MB = 10^6 bytes) of ``payload bytes x 2 directions / round-trip time``. Every reply is checked
for its type/seq; its bytes are compared with what was sent in the untimed warm-up round and on the last timed round
of every batch (after the clock stops).

Usage:  .venv/bin/python bench/wire.py [--quick] [--reps N] [--batch-seconds S] [--profile]

The last line of stdout is one JSON object (built by ``summarise``); everything before it is for people.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _children import CLK_TCK, bench_main, die_with_parent  # noqa: E402
from vfl.launch.prepare import prepare_session  # noqa: E402 - after the sys.path fix-up
from vfl.node import load_config  # noqa: E402
from vfl.node.transport import (  # noqa: E402
    Transport,
    _received_frame,
    socket_options,
)
from vfl.protocol import (  # noqa: E402
    PROTOCOL_VERSION,
    Bye,
    Echo,
    EchoReply,
    Heartbeat,
    Hello,
    Limits,
    RemoteProtocolError,
    Tensor,
    Welcome,
    decode,
    encode,
)

HOST = "127.0.0.1"
SIZES: list[tuple[str, tuple[int, int]]] = [("128k", (128, 256)), ("1mib", (512, 512)), ("16mib", (4096, 1024))]
VARIANTS = ["bare_plain", "codec_plain", "vfl_plain", "bare_curve", "vfl_curve"]
DH_PARTY = "dh1"
TENSOR_NAME = "x"
MAX_TENSOR_BYTES = 64 * 2**20  # [limits].max_tensor_bytes of both nodes: room for the 16 MiB tensor
LH_LINK_SHAPE = (4096, 1024)  # the label holder's [link_check].shape: its ECHO cap (8 bytes per element) covers 16 MiB
RECV_TIMEOUT_MS = 30_000  # one round trip; a 16 MiB CURVE round trip takes well under a second
START_TIMEOUT_S = 30.0
SERVER_POLL_MS = 200  # the bare echo server wakes as often as a vfl node (runner.MAX_SLEEP_S)
NODE_TIMEOUTS = {"heartbeat": 10.0, "peer": 1800.0, "handshake": 60.0, "join": 600.0}  # longer than any run



# `vfl node` under cProfile. The node ends with os._exit (it skips torch's and libzmq's slow teardown), which would
# also skip cProfile's dump: write the profile first.
PROFILED_NODE = """
import cProfile, os, sys
out, sys.argv = sys.argv[1], ["vfl", *sys.argv[2:]]
prof, real_exit = cProfile.Profile(), os._exit
def _exit(code):
    prof.disable()
    prof.dump_stats(out)
    real_exit(code)
os._exit = _exit
from vfl.cli import main
prof.enable()
main()
"""


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------------ socket options


def node_socket_options(cfg: Any) -> dict[str, int]:
    """The options ``vfl.node.Transport`` sets on a node's socket (minus CURVE/identity), for the bare variant."""
    return socket_options(cfg)


def apply_options(sock: zmq.Socket, opts: dict[str, int]) -> None:
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)


# ------------------------------------------------------------------------------------------------ bare echo server


def codec_echo(limits_spec: dict[str, int]) -> Any:
    """``--echo-server`` in codec mode: (routing id, frames) -> the frames of the ``ECHO_REPLY``, through the codec."""
    limits = Limits(**limits_spec)

    def answer(frames: list[zmq.Frame]) -> list[Any]:
        msg = decode(frames[1:], limits)  # a RemoteProtocolError ends the server: the bench only sends ECHOs
        if type(msg) is not Echo:
            raise BenchError(f"codec echo server: expected ECHO, got {msg.TYPE}")
        return [frames[0], *map(_received_frame, encode(EchoReply(seq=msg.seq, tensors=msg.tensors), limits))]

    return answer


def echo_server_main() -> int:
    """Child process: a ROUTER that sends every message straight back, zero-copy both ways (or through the codec)."""
    spec = json.loads(os.environ["VFL_BENCH_ECHO"])
    answer = codec_echo(spec["codec_limits"]) if spec.get("codec_limits") else None
    parent = os.getppid()
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    apply_options(sock, spec["options"])
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
    if spec["curve_secret"]:
        sock.curve_secretkey = spec["curve_secret"].encode()
        sock.curve_publickey = spec["curve_public"].encode()
        sock.curve_server = True
    sock.bind(spec["endpoint"])
    print("READY", flush=True)
    try:
        while not stop["flag"] and os.getppid() == parent:
            if not sock.poll(SERVER_POLL_MS):
                continue
            for _ in range(256):  # drain like the node does, then look at the stop flag again
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sock.send_multipart(frames if answer is None else answer(frames), copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()
    return 0


# ------------------------------------------------------------------------------------------------ child processes


class Child:
    """A child process whose output is drained by a thread (so a full pipe never blocks it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO,
            start_new_session=True,  # Ctrl-C reaches the bench only; the bench stops its children itself
            preexec_fn=die_with_parent,
        )
        self.pump: threading.Thread | None = None

    def start_pump(self) -> None:
        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

        self.pump = threading.Thread(target=pump, name=f"pump-{self.name}", daemon=True)
        self.pump.start()

    def cpu_s(self) -> float:
        """CPU time (user + system, all threads) the child has used so far, from /proc (clock-tick resolution)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    [{self.name}] {line}" for line in self.lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            time.sleep(0.1)  # let the pump collect the last lines
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            self.check_alive()
            time.sleep(0.02)
        raise BenchError(f"{self.name} did not print {text!r} within {timeout_s:g} s:\n{self.tail()}")

    def stop(self, grace_s: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``. Returns the exit code (None if it could not be reaped)."""
        p = self.proc
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(grace_s)
                except subprocess.TimeoutExpired:
                    return None
        if self.pump is not None:
            self.pump.join(1.0)
        return p.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_node_configs(out: Path, *, curve: bool) -> dict[str, Path]:
    """``prepare_session`` for one label holder + one data holder, plus the bench's [limits] (and insecure mode)."""

    configs = prepare_session(
        out, data_holders=[DH_PARTY], run="wirebench", port=free_port(), timeouts=dict(NODE_TIMEOUTS)
    )
    for path in configs.values():
        text = path.read_text(encoding="utf-8")
        if not curve:
            assert text.count("[keys]\n") == 1
            text = text.replace("[keys]\n", "[keys]\ninsecure = true\n")
        text += f"\n[limits]\nmax_tensor_bytes = {MAX_TENSOR_BYTES}\n"
        if path.stem != DH_PARTY:  # the label holder echoes at most its largest session message: room for 16 MiB
            text += f"\n[link_check]\nshape = {list(LH_LINK_SHAPE)}\n"
        path.write_text(text, encoding="utf-8")
    return configs


# ------------------------------------------------------------------------------------------------ clients


class Timing:
    """Optional per-phase timers (``--profile`` only; the measured loops do not use them)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.rounds = 0

    def add(self, key: str, dt: float) -> None:
        self.acc[key] = self.acc.get(key, 0.0) + dt


def wait_readable(sock: zmq.Socket, server: "Child", what: str) -> None:
    """Block until ``sock`` has a message: at most RECV_TIMEOUT_MS, checking each second that the server lives.

    On the hot path the first poll returns at once, so this costs one ``poll`` call per round trip, as before."""
    waited = 0
    while waited < RECV_TIMEOUT_MS:
        if sock.poll(min(1000, RECV_TIMEOUT_MS - waited)):
            return
        waited += 1000
        server.check_alive()
    raise BenchError(f"{what}: no reply within {RECV_TIMEOUT_MS} ms")


class BareClient:
    def __init__(self, endpoint: str, opts: dict[str, int], server_public: bytes | None, server: "Child"):
        self.server = server
        self.ctx = zmq.Context()
        s = self.ctx.socket(zmq.DEALER)
        apply_options(s, opts)
        s.setsockopt(zmq.ROUTING_ID, DH_PARTY.encode())
        if server_public is not None:
            public, secret = zmq.curve_keypair()
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_public
        s.connect(endpoint)
        self.sock = s

    def _recv(self) -> zmq.Frame:
        wait_readable(self.sock, self.server, "bare echo")
        return self.sock.recv(zmq.NOBLOCK, copy=False)

    def rounds(self, arr: np.ndarray, n: int) -> tuple[float, Any]:
        """``n`` timed round trips; returns (seconds, last reply)."""
        buf = arr.reshape(-1).view(np.uint8)
        sock, recv = self.sock, self._recv
        reply = None
        t0 = time.perf_counter()
        for _ in range(n):
            sock.send(buf, copy=False)
            reply = recv()
        return time.perf_counter() - t0, reply

    def rounds_profiled(self, arr: np.ndarray, n: int, timing: Timing) -> None:
        buf = arr.reshape(-1).view(np.uint8)
        pc = time.perf_counter
        for _ in range(n):
            t0 = pc()
            self.sock.send(buf, copy=False)
            t1 = pc()
            wait_readable(self.sock, self.server, "bare echo")
            t2 = pc()
            self.sock.recv(zmq.NOBLOCK, copy=False)
            t3 = pc()
            timing.add("send", t1 - t0)
            timing.add("wait (poll)", t2 - t1)
            timing.add("recv", t3 - t2)
            timing.rounds += 1

    @staticmethod
    def verify(arr: np.ndarray, reply: Any) -> None:
        got = np.frombuffer(reply, dtype=np.uint8)
        if not np.array_equal(got, arr.reshape(-1).view(np.uint8)):
            raise BenchError(f"bare: echoed bytes differ ({got.nbytes} bytes back, {arr.nbytes} sent)")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class VflClient:
    """A data holder speaking the protocol by hand: HELLO -> WELCOME, ECHO round trips, BYE. Codec + Transport."""

    def __init__(self, cfg: Any, node: Child):
        self.cfg = cfg
        self.node = node
        self.limits = cfg.limits
        self.transport = Transport(cfg)
        self.seq = 0
        self.heartbeats = 0

    def _recv_msg(self) -> Any:
        """The next message other than HEARTBEAT, decoded."""
        tr = self.transport
        for _ in range(1000):  # heartbeats queued while other variants ran are skipped, boundedly
            wait_readable(tr.socket, self.node, "vfl label holder")
            received = tr.recv()
            if received is None:
                continue
            try:
                msg = decode(received.frames, self.limits)
            except RemoteProtocolError as exc:
                raise BenchError(f"vfl: undecodable message from the label holder: {exc}") from None
            if isinstance(msg, Heartbeat):
                self.heartbeats += 1
                continue
            return msg
        raise BenchError("vfl: 1000 messages without a reply")

    def handshake(self) -> float:
        s = self.cfg.session
        hello = Hello(
            version=PROTOCOL_VERSION, role="data_holder", party=self.cfg.party, run=self.cfg.run,
            config=s.to_wire(), digest=s.digest,
        )
        t0 = time.perf_counter()
        self.transport.send(encode(hello, self.limits))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.node.check_alive()
            if self.transport.socket.poll(100):
                msg = self._recv_msg()
                if not isinstance(msg, Welcome):
                    raise BenchError(f"vfl: HELLO answered with {msg!r}")
                return time.perf_counter() - t0
            for ev in self.transport.monitor_events():
                if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise BenchError("vfl: the label holder refused our CURVE key")
        raise BenchError(f"vfl: no WELCOME within {START_TIMEOUT_S:g} s:\n{self.node.tail()}")

    def rounds(self, arr: np.ndarray, n: int) -> tuple[float, Any]:
        send, recv, limits = self.transport.send, self._recv_msg, self.limits
        seq = self.seq
        reply = None
        t0 = time.perf_counter()
        for _ in range(n):
            seq += 1
            send(encode(Echo(seq=seq, tensors=(Tensor(TENSOR_NAME, arr),)), limits))
            reply = recv()
            if type(reply) is not EchoReply or reply.seq != seq:
                raise BenchError(f"vfl: expected ECHO_REPLY seq {seq}, got {reply!r:.200}")
        elapsed = time.perf_counter() - t0
        self.seq = seq
        return elapsed, reply

    def rounds_profiled(self, arr: np.ndarray, n: int, timing: Timing) -> None:
        tr = self.transport
        pc = time.perf_counter
        for _ in range(n):
            self.seq += 1
            t0 = pc()
            frames = encode(Echo(seq=self.seq, tensors=(Tensor(TENSOR_NAME, arr),)), self.limits)
            t1 = pc()
            tr.send(frames)
            t2 = pc()
            wait_readable(tr.socket, self.node, "vfl label holder")
            t3 = pc()
            received = tr.recv()
            t4 = pc()
            msg = decode(received.frames, self.limits)
            t5 = pc()
            assert msg.seq == self.seq
            for k, dt in (("encode", t1 - t0), ("send", t2 - t1), ("wait (poll)", t3 - t2), ("recv", t4 - t3),
                          ("decode", t5 - t4)):
                timing.add(k, dt)
            timing.rounds += 1

    @staticmethod
    def verify(arr: np.ndarray, reply: Any) -> None:
        (t,) = reply.tensors
        if t.name != TENSOR_NAME or t.array.dtype != arr.dtype or t.array.shape != arr.shape:
            raise BenchError(f"vfl: ECHO_REPLY tensor is {t.name!r} {t.array.dtype}{t.array.shape}")
        if not np.array_equal(t.array.reshape(-1).view(np.uint8), arr.reshape(-1).view(np.uint8)):
            raise BenchError("vfl: ECHO_REPLY bytes differ from the ECHO's")

    def bye(self) -> None:
        self.transport.send(encode(Bye(ok=True, reason="wire bench done"), self.limits))

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------------------------------------ the benchmark


def header_overhead(arr: np.ndarray, seq: int) -> tuple[int, float]:
    frames = encode(Echo(seq=seq, tensors=(Tensor(TENSOR_NAME, arr),)))
    head = len(frames[0]) + len(frames[1])
    return head, head / arr.nbytes * 100


def mbps(nbytes: int, n: int, seconds: float) -> float:
    return 2 * nbytes * n / seconds / 1e6


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="vfl-wirebench-"))
    children: list[Child] = []
    clients: dict[str, Any] = {}
    result: dict[str, Any] = {}
    lh_exit: dict[str, int | None] = {}
    try:
        # -- configs and keys (nothing networked yet) --------------------------------------------------------------
        cfg_paths = {mode: write_node_configs(tmp / mode, curve=(mode == "curve")) for mode in ("plain", "curve")}
        lh_cfg = {mode: load_config(p["bank"]) for mode, p in cfg_paths.items()}
        dh_cfg = {mode: load_config(p[DH_PARTY]) for mode, p in cfg_paths.items()}
        bare_server_keys = zmq.curve_keypair()
        bare_ports = {mode: free_port() for mode in ("plain", "curve")}
        codec_endpoint = f"tcp://{HOST}:{free_port()}"

        # -- every child is forked before this process starts any thread (preexec_fn is then safe) ------------------
        for mode in ("plain", "curve"):
            argv = [sys.executable, "-m", "vfl", "node", "--config", str(cfg_paths[mode]["bank"])]
            if args.profile and mode == "plain":
                argv = [sys.executable, "-c", PROFILED_NODE, str(tmp / "label_holder_plain.prof"),
                        "node", "--config", str(cfg_paths[mode]["bank"])]
            children.append(Child(f"vfl-lh-{mode}", argv))
            spec = {
                "endpoint": f"tcp://{HOST}:{bare_ports[mode]}",
                "options": node_socket_options(lh_cfg[mode]),
                "curve_public": bare_server_keys[0].decode() if mode == "curve" else None,
                "curve_secret": bare_server_keys[1].decode() if mode == "curve" else None,
            }
            children.append(
                Child(f"bare-echo-{mode}", [sys.executable, str(Path(__file__).resolve()), "--echo-server"],
                      env={"VFL_BENCH_ECHO": json.dumps(spec)})
            )
            if mode == "plain":  # the codec-only echo: the plain label holder's socket options and limits
                lim = lh_cfg[mode].limits
                spec = {**spec, "endpoint": codec_endpoint, "codec_limits": {
                    "max_header_bytes": lim.max_header_bytes, "max_tensors": lim.max_tensors,
                    "max_tensor_bytes": lim.max_tensor_bytes}}
                children.append(
                    Child("codec-echo-plain", [sys.executable, str(Path(__file__).resolve()), "--echo-server"],
                          env={"VFL_BENCH_ECHO": json.dumps(spec)})
                )
        for c in children:
            c.start_pump()
        by_name = {c.name: c for c in children}
        for mode in ("plain", "curve"):
            by_name[f"vfl-lh-{mode}"].wait_for_line("listening on", START_TIMEOUT_S)
            by_name[f"bare-echo-{mode}"].wait_for_line("READY", START_TIMEOUT_S)
        by_name["codec-echo-plain"].wait_for_line("READY", START_TIMEOUT_S)

        # -- clients: vfl handshakes first, then the bare sockets with the same options as the vfl Transport ---------
        handshake_s = {}
        for mode in ("plain", "curve"):
            c = VflClient(dh_cfg[mode], by_name[f"vfl-lh-{mode}"])
            clients[f"vfl_{mode}"] = c
            handshake_s[mode] = c.handshake()
            opts = node_socket_options(dh_cfg[mode])
            for name, value in opts.items():  # the bare client must really mirror the node's socket
                actual = c.transport.socket.getsockopt(getattr(zmq, name))
                if actual != value:
                    raise BenchError(f"socket option {name}: Transport has {actual}, bench expected {value}")
            clients[f"bare_{mode}"] = BareClient(
                f"tcp://{HOST}:{bare_ports[mode]}", opts, bare_server_keys[0] if mode == "curve" else None,
                by_name[f"bare-echo-{mode}"],
            )
        # the codec-only variant: a data holder's Transport and codec, no handshake (its server is no node)
        clients["codec_plain"] = VflClient(dataclasses.replace(dh_cfg["plain"], endpoint=codec_endpoint),
                                           by_name["codec-echo-plain"])
        print(f"started 2 label-holder nodes + 3 echo servers (bare x 2, codec) on {HOST}; vfl handshakes "
              + ", ".join(f"{m} {s * 1000:.1f} ms" for m, s in handshake_s.items()), flush=True)

        rng = np.random.default_rng(12345)
        arrays = {label: rng.standard_normal(shape, dtype=np.float32) for label, shape in SIZES}
        for arr in arrays.values():
            assert arr.flags.c_contiguous and arr.dtype == np.dtype("<f4")

        # -- warm-up + calibration: rounds per batch so a batch lasts about --batch-seconds ------------------------
        n_rounds: dict[str, dict[str, int]] = {v: {} for v in VARIANTS}
        for label, _ in SIZES:
            arr = arrays[label]
            for v in VARIANTS:
                cl = clients[v]
                _, reply = cl.rounds(arr, 2)
                cl.verify(arr, reply)
                k, spent = 0, 0.0
                while spent < args.warmup_seconds and k < 10_000:
                    dt, _ = cl.rounds(arr, 1)
                    spent += dt
                    k += 1
                n_rounds[v][label] = max(args.min_rounds, min(args.max_rounds, round(args.batch_seconds * k / spent)))
        print("rounds per timed batch: " + "; ".join(
            f"{v} " + "/".join(str(n_rounds[v][lab]) for lab, _ in SIZES) for v in VARIANTS), flush=True)

        # -- interleaved repetitions -----------------------------------------------------------------------------
        samples: dict[str, dict[str, list[float]]] = {v: {lab: [] for lab, _ in SIZES} for v in VARIANTS}
        server_of = {v: by_name[{"vfl": "vfl-lh-", "bare": "bare-echo-", "codec": "codec-echo-"}[v.split("_")[0]]
                                + v.split("_")[1]] for v in VARIANTS}
        cpu = {v: {lab: [0.0, 0.0, 0] for lab, _ in SIZES} for v in VARIANTS}  # client s, server s, round trips
        verified = {v: {lab: 0 for lab, _ in SIZES} for v in VARIANTS}
        for rep in range(args.reps):
            for si, (label, _) in enumerate(SIZES):
                arr = arrays[label]
                k = (rep + si) % len(VARIANTS)
                order = VARIANTS[k:] + VARIANTS[:k]
                if rep % 2:
                    order.reverse()
                for v in order:
                    for c in children:
                        c.check_alive()
                    cl = clients[v]
                    _, reply = cl.rounds(arr, 1)  # untimed: catches up on anything queued, and is verified
                    cl.verify(arr, reply)
                    n = n_rounds[v][label]
                    server_cpu0, client_cpu0 = server_of[v].cpu_s(), time.process_time()
                    seconds, reply = cl.rounds(arr, n)
                    client_cpu1, server_cpu1 = time.process_time(), server_of[v].cpu_s()
                    acc = cpu[v][label]
                    acc[0] += client_cpu1 - client_cpu0
                    acc[1] += server_cpu1 - server_cpu0
                    acc[2] += n
                    cl.verify(arr, reply)  # after the clock stopped
                    verified[v][label] += 2
                    samples[v][label].append(mbps(arr.nbytes, n, seconds))
            line = "  ".join(
                f"{lab}: " + " ".join(f"{samples[v][lab][-1]:6.0f}" for v in VARIANTS) for lab, _ in SIZES
            )
            print(f"rep {rep + 1:2d}/{args.reps} MB/s ({' '.join(VARIANTS)}) {line}", flush=True)

        # -- optional profile: client-side phase timers, CURVE off ---------------------------------------------------
        profile_text = None
        if args.profile:
            profile_text = profile_client(clients, arrays, n_rounds)

        # -- orderly end of the two vfl sessions ---------------------------------------------------------------------
        for mode in ("plain", "curve"):
            clients[f"vfl_{mode}"].bye()
        for mode in ("plain", "curve"):
            p = by_name[f"vfl-lh-{mode}"].proc
            try:
                lh_exit[mode] = p.wait(15)
            except subprocess.TimeoutExpired:
                lh_exit[mode] = None
        heartbeats = {m: clients[f"vfl_{m}"].heartbeats for m in ("plain", "curve")}
        for cl in clients.values():
            cl.close()
        clients.clear()

        if args.profile:
            profile_text = (profile_text or "") + profile_server(tmp / "label_holder_plain.prof", by_name["vfl-lh-plain"])

        result = summarise(args, samples, n_rounds, verified, arrays, lh_exit, heartbeats, time.monotonic() - started)
        result["cpu_us_per_round_trip"] = {
            v: {lab: {"client": round(c / k * 1e6, 1), "server": round(sv / k * 1e6, 1)} for lab, (c, sv, k) in d.items()}
            for v, d in cpu.items()
        }
        result["_profile"] = profile_text
        return result
    finally:
        for cl in clients.values():
            try:
                cl.close()
            except Exception:  # noqa: BLE001 - cleaning up after a failure; the children go next regardless
                pass
        for c in children:
            code = c.stop()
            if code not in (0, None, -signal.SIGTERM) and not result:
                print(f"[{c.name}] exit {code}\n{c.tail()}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def profile_client(clients: dict[str, Any], arrays: dict[str, np.ndarray], n_rounds: dict) -> str:
    out = ["", "profile (client-side phase timers, CURVE off, mean microseconds per round trip):"]
    for label, _ in SIZES:
        arr = arrays[label]
        for v in ("bare_plain", "vfl_plain"):
            tm = Timing()
            clients[v].rounds_profiled(arr, 2, Timing())
            clients[v].rounds_profiled(arr, n_rounds[v][label], tm)
            parts = ", ".join(f"{k} {dt / tm.rounds * 1e6:.0f}" for k, dt in tm.acc.items())
            total = sum(tm.acc.values()) / tm.rounds * 1e6
            out.append(f"  {label:6s} {v:11s} total {total:7.0f}: {parts}")
    return "\n".join(out) + "\n"


def profile_server(path: Path, node: Child) -> str:
    import io
    import pstats

    if node.proc.wait(10) is None or not path.exists():
        return "profile: the label holder wrote no profile\n"
    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(25)
    return "\nprofile (label-holder node process, whole run incl. the CURVE-off sizes, by tottime):\n" + buf.getvalue()


def summarise(args, samples, n_rounds, verified, arrays, lh_exit, heartbeats, elapsed) -> dict[str, Any]:
    med = {v: {lab: statistics.median(samples[v][lab]) for lab, _ in SIZES} for v in VARIANTS}
    head_bytes, head_pct = header_overhead(arrays["128k"], 2**31)
    s: dict[str, Any] = {"bench": "vfl-wire", "quick": args.quick, "reps": args.reps, "profiled": args.profile}
    for mode, suffix in (("plain", ""), ("curve", "_curve")):
        for lab, _ in SIZES:
            s[f"codec_vs_bare_ratio_{lab}{suffix}"] = round(med[f"vfl_{mode}"][lab] / med[f"bare_{mode}"][lab], 4)
    for lab, _ in SIZES:  # the diagnostic split of vfl/bare: codec/bare x node/codec
        s[f"codec_only_vs_bare_ratio_{lab}"] = round(med["codec_plain"][lab] / med["bare_plain"][lab], 4)
        s[f"node_vs_codec_only_ratio_{lab}"] = round(med["vfl_plain"][lab] / med["codec_plain"][lab], 4)
    s["header_overhead_pct"] = round(head_pct, 4)
    s["header_bytes"] = head_bytes
    s["curve_cost_ratio"] = round(med["vfl_curve"]["1mib"] / med["vfl_plain"]["1mib"], 4)
    for lab, _ in SIZES:
        s[f"curve_cost_ratio_{lab}"] = round(med["vfl_curve"][lab] / med["vfl_plain"][lab], 4)
        s[f"curve_cost_ratio_bare_{lab}"] = round(med["bare_curve"][lab] / med["bare_plain"][lab], 4)
    s["paired_ratio_medians"] = {  # median over reps of the per-rep ratio (drift cancels); a cross-check
        **{f"codec_vs_bare_{lab}{suffix}": round(median_ratio(samples[f"vfl_{m}"][lab], samples[f"bare_{m}"][lab]), 4)
           for m, suffix in (("plain", ""), ("curve", "_curve"))
           for lab, _ in SIZES},
        **{f"codec_only_vs_bare_{lab}": round(median_ratio(samples["codec_plain"][lab], samples["bare_plain"][lab]), 4)
           for lab, _ in SIZES},
    }
    s["mbps_median"] = {v: {lab: round(x, 1) for lab, x in med[v].items()} for v in VARIANTS}
    s["mbps_samples"] = {v: {lab: [round(x, 1) for x in xs] for lab, xs in samples[v].items()} for v in VARIANTS}
    s["rounds_per_batch"] = n_rounds
    s["batches_per_cell"] = args.reps
    s["replies_byte_verified"] = verified
    s["tensor_bytes"] = {lab: int(arrays[lab].nbytes) for lab, _ in SIZES}
    s["label_holder_exit"] = lh_exit
    s["heartbeats_skipped"] = heartbeats
    s["goals"] = {
        "codec_vs_bare_ratio_1mib>=0.9": s["codec_vs_bare_ratio_1mib"] >= 0.9,
        "header_overhead_pct<=1": s["header_overhead_pct"] <= 1,
    }
    s["env"] = {
        "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
        "numpy": np.__version__, "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    s["elapsed_s"] = round(elapsed, 1)
    return s


def report(s: dict[str, Any]) -> None:
    med = s["mbps_median"]
    print()
    print(f"round-trip throughput, MB/s (10^6 B) = tensor bytes x 2 / RTT; median of {s['reps']} interleaved batches")
    print(f"  {'size':8s}" + "".join(f"{v:>13s}" for v in VARIANTS) + f"{'vfl/bare':>10s}{'vfl/bare':>10s}")
    print(f"  {'':8s}" + "".join(f"{'':>13s}" for _ in VARIANTS) + f"{'plain':>10s}{'curve':>10s}")
    for lab, shape in SIZES:
        print(
            f"  {lab:8s}" + "".join(f"{med[v][lab]:13.0f}" for v in VARIANTS)
            + f"{s[f'codec_vs_bare_ratio_{lab}']:10.3f}{s[f'codec_vs_bare_ratio_{lab}_curve']:10.3f}"
        )
    print(f"  (shapes: " + ", ".join(f"{lab} = float32 {shape[0]}x{shape[1]}" for lab, shape in SIZES) + ")")
    print(f"codec_vs_bare_ratio_1mib (CURVE off) = {s['codec_vs_bare_ratio_1mib']:.3f}   goal >= 0.9: "
          f"{'met' if s['goals']['codec_vs_bare_ratio_1mib>=0.9'] else 'NOT met'}")
    pr = s["paired_ratio_medians"]
    print("  paired per-rep ratio medians: " + ", ".join(f"{k} {v:.3f}" for k, v in pr.items()))
    print("diagnostic split, CURVE off: codec only / bare = " + ", ".join(
        f"{lab} {s[f'codec_only_vs_bare_ratio_{lab}']:.3f}" for lab, _ in SIZES)
        + ";  node / codec only = " + ", ".join(f"{lab} {s[f'node_vs_codec_only_ratio_{lab}']:.3f}" for lab, _ in SIZES))
    print(f"header_overhead_pct = {s['header_overhead_pct']:.4f} % ({s['header_bytes']} bytes of frames 0+1 for "
          f"{s['tensor_bytes']['128k']} tensor bytes)   goal <= 1: {'met' if s['goals']['header_overhead_pct<=1'] else 'NOT met'}")
    print("curve_cost_ratio (vfl CURVE on / off): " + ", ".join(
        f"{lab} {s[f'curve_cost_ratio_{lab}']:.3f}" for lab, _ in SIZES)
        + "   (bare: " + ", ".join(f"{lab} {s[f'curve_cost_ratio_bare_{lab}']:.3f}" for lab, _ in SIZES) + ")")
    cpu = s.get("cpu_us_per_round_trip")
    if cpu:
        print("CPU microseconds per round trip, client process + server process (all threads; less noise-sensitive "
              "than wall time; server from /proc ticks):")
        for lab, _ in SIZES:
            print(f"  {lab:8s}" + "".join(
                f"  {v} {cpu[v][lab]['client']:.0f}+{cpu[v][lab]['server']:.0f}" for v in VARIANTS))
    print(f"label-holder nodes exited {s['label_holder_exit']}; replies byte-checked per cell: "
          f"{s['replies_byte_verified']['vfl_plain']['1mib']}; load avg {s['env']['loadavg_1m']}; "
          f"{s['elapsed_s']:.0f} s in all")


def main() -> int:
    if "--echo-server" in sys.argv[1:]:
        return echo_server_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (about 20 s in all; the default run takes about 2.5 minutes)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions per size and variant")
    ap.add_argument("--batch-seconds", type=float, help="target duration of one timed batch")
    ap.add_argument("--profile", action="store_true",
                    help="also run the CURVE-off label holder under cProfile and time the client's phases")
    args = ap.parse_args()
    args.reps = args.reps or (5 if args.quick else 21)
    args.batch_seconds = args.batch_seconds or (0.15 if args.quick else 0.4)
    args.warmup_seconds = 0.1 if args.quick else 0.3
    args.min_rounds, args.max_rounds = 3, 5000
    if args.reps < 1 or args.batch_seconds <= 0:
        ap.error("--reps and --batch-seconds must be positive")

    def report_all(s: dict[str, Any]) -> None:
        profile_text = s.pop("_profile", None)
        report(s)
        if profile_text:
            print(profile_text)

    return bench_main("wire", lambda: run(args), report_all, BenchError)

if __name__ == "__main__":
    sys.exit(main())
