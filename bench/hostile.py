"""What an allow-listed hostile partner costs a label holder: memory, and the service its honest peers get.

Issue 12's figures, measured side by side in one run against a real ``python -m vfl node`` label holder on 127.0.0.1
(CurveZMQ on, the default ``[limits]`` and ``queue_bytes``), with raw pyzmq DEALERs holding real allow-listed keys:

1. ``header_8mb``: one peer sends a message whose header frame is 8 MB of msgpack (8 million empty maps) — the
   decoder refuses it (``TOO_LARGE``); before issue 12 the type peek unpacked it all.
   Reported: the label holder's peak RSS growth (``VmHWM`` from ``/proc``, reset before the phase), goal < 64 MiB.
2. ``flood``: a READY peer sends 700 ECHOs of 1 MiB and never reads. The label holder's ``[link_check]`` is set so
   that its largest session message, hence its ECHO cap, is 1 MiB: the ECHOs are valid and answered, and the
   replies pile up until the send budget ([B2]) drops the peer. Reported: peak RSS growth, goal <= ``queue_bytes`` +
   64 MiB, and what the hostile peer got back once it finally read.
3. ``junk``: a READY peer sends 700 ECHOs of 2 MiB (over the cap: each is refused) without reading, until its
   refused-bytes budget ([B4]) closes its connection. Same figures.
4. ``beside``: an honest READY peer's ECHO round trips per second (128x256 float32, the default link check) alone,
   while each attacker sends (from its own process, as a partner would: on a 2-core box the attacker's own CURVE
   encryption and the label holder's decryption of its traffic compete for the same cores), and after it was
   dropped; the ratios to "alone".

Usage: ``.venv/bin/python bench/hostile.py`` (about a minute; ``--before`` for a checkout older than issue 12).
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfl.launch.prepare import prepare_session  # noqa: E402 - after the sys.path fix-up
from vfl.node.config import load_config  # noqa: E402
from vfl.node.keys import generate_keypair, load_public_key, load_secret_key  # noqa: E402
from vfl.node.transport import largest_message_bytes  # noqa: E402
from vfl.protocol import Bye, Echo, Hello, Tensor, decode, encode  # noqa: E402
from vfl.protocol.codec import PROTOCOL_VERSION, SIGNATURE  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    from bench.wire import free_port as wire_free_port  # noqa: PLC0415 - the one free-port helper of the benches

    return wire_free_port()


MIB = 2**20
PARTIES = ["dh1", "dh2", "dh3", "dh4", "spare"]  # spare never connects: the session stays in READY for the whole bench
TIMEOUTS = {"heartbeat": 1.0, "peer": 600.0, "handshake": 60.0, "join": 3600.0, "progress": 3600.0}
HONEST_ROUNDS_S = 3.0
LH_LINK_SHAPE = (1024, 128)  # 8 bytes per element: 1 MiB, so 1 MiB ECHOs are valid and answered
#: ``--before``: routing id = party id, as before issue 12's [S1], to measure the old code the same way
LEGACY_ROUTING_ID = "--before" in sys.argv


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (``/proc/PID/stat``; 0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class RawPeer:
    """A data holder's DEALER with its real key, speaking through vfl's codec; it reads only when told to."""

    def __init__(self, ctx: zmq.Context, endpoint: str, cfg, *, rcvhwm: int = 1000):
        self.cfg = cfg
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = rcvhwm
        self.sock.sndhwm = 100_000
        rid = cfg.party if LEGACY_ROUTING_ID else f"{cfg.party}/{secrets.token_hex(8)}"
        self.sock.setsockopt(zmq.ROUTING_ID, rid.encode())
        public, secret = load_secret_key(cfg.secret_key)
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        (server,) = [load_public_key(p) for p in cfg.partners.values()]
        self.sock.curve_serverkey = server
        self.sock.connect(endpoint)

    def send(self, msg, block: bool = True) -> bool:
        try:
            self.sock.send_multipart(encode(msg), flags=0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_s: float):
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return decode(self.sock.recv_multipart(copy=False))

    def recv_app(self, timeout_s: float):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            m = self.recv(end - time.monotonic())
            if m is not None and m.TYPE != "HEARTBEAT":
                return m
        return None

    def hello(self) -> None:
        s = self.cfg.session
        self.send(Hello(version=PROTOCOL_VERSION, role="data_holder", party=self.cfg.party, run=self.cfg.run,
                        config=s.to_wire(), digest=s.digest))
        w = self.recv_app(30)
        if w is None or w.TYPE != "WELCOME":
            raise SystemExit(f"{self.cfg.party}: no WELCOME: {w}")

    def close(self) -> None:
        self.send(Bye(ok=True, reason="bench done"), block=False)
        self.sock.close(linger=100)


def honest_rate(peer: RawPeer, seconds: float) -> float:
    """ECHO round trips per second of the default link-check tensor."""
    arr = np.random.default_rng(0).standard_normal((128, 256), dtype=np.float32)
    n, seq, t0 = 0, 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        seq += 1
        peer.send(Echo(seq=seq, tensors=[Tensor("x", arr)]))
        while True:
            m = peer.recv(10)
            if m is None:
                raise SystemExit("honest peer: no ECHO_REPLY within 10 s")
            if m.TYPE == "ECHO_REPLY" and m.seq == seq:
                break
        n += 1
    return n / (time.monotonic() - t0)


def flood(peer: RawPeer, nbytes: int, count: int, give_up_s: float = 20.0) -> int:
    """Send ``count`` ECHOs of ``nbytes`` without reading, each retried until libzmq takes it (or ``give_up_s``
    passes with none taken: the label holder closed the connection and the queue is full); returns how many went."""
    arr = np.zeros(nbytes // 4, dtype=np.float32)
    sent, stuck_since = 0, time.monotonic()
    while sent < count and time.monotonic() - stuck_since < give_up_s:
        if peer.send(Echo(seq=sent, tensors=[Tensor("x", arr)]), block=False):
            sent, stuck_since = sent + 1, time.monotonic()
        else:
            time.sleep(0.001)
    return sent


def drain_summary(peer: RawPeer, seconds: float) -> dict[str, int]:
    seen: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frames = peer.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            time.sleep(0.01)
            continue
        try:
            m = decode(frames)
            key = m.TYPE if m.TYPE != "ERROR" else f"ERROR {m.code}"
        except Exception as exc:  # noqa: BLE001 - a summary, not a check
            key = type(exc).__name__
        seen[key] = seen.get(key, 0) + 1
    return seen


class PeakRss:
    """The peak RSS of a process over one phase: its ``VmHWM`` reset at the start (``clear_refs`` 5), so nothing that
    came before counts; where that is not allowed, ``VmRSS`` sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.base, self.peak = pid, rss(pid)["VmRSS"], 0
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss(self.pid)["VmRSS"])
            except (FileNotFoundError, KeyError):
                return

    def growth_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        now = rss(self.pid)
        self.peak = max(self.peak, now["VmRSS"], now["VmHWM"] if self.hwm else 0)
        return (self.peak - self.base) / MIB


def main() -> int:
    with TemporaryDirectory(prefix="vfl-hostile-") as tmp:
        out = Path(tmp)
        configs = prepare_session(out, data_holders=PARTIES, run="hostile", port=free_port(), timeouts=TIMEOUTS)
        with open(configs["bank"], "a") as fh:  # the label holder's largest message (and ECHO cap) is then 1 MiB
            fh.write(f"\n[link_check]\nshape = {list(LH_LINK_SHAPE)}\n")
        lh_cfg = load_config(configs["bank"])
        log = open(out / "bank.log", "wb")
        lh = subprocess.Popen([sys.executable, "-m", "vfl", "node", "--config", str(configs["bank"])],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ctx = zmq.Context()
        result: dict = {"queue_bytes": lh_cfg.queue_bytes, "echo_cap_bytes": largest_message_bytes(lh_cfg)}
        try:
            endpoint = f"tcp://{HOST}:{lh_cfg.endpoint.rsplit(':', 1)[1]}"
            honest = RawPeer(ctx, endpoint, load_config(configs["dh1"]))
            honest.hello()
            result["rss_start_mib"] = rss(lh.pid)["VmRSS"] / MIB
            result["honest_rt_per_s_alone"] = honest_rate(honest, HONEST_ROUNDS_S)

            # 2 + 3. a peer that sends 700 ECHOs of 1 MiB (valid: within the ECHO cap) and never reads, from its own
            # process as a partner would, while the honest one keeps doing round trips
            for name, party, nbytes in (("flood", "dh3", MIB), ("junk", "dh4", 2 * MIB)):
                peak = PeakRss(lh.pid)
                attacker = subprocess.Popen(
                    [sys.executable, __file__, "--attack", str(configs[party]), endpoint, str(nbytes), "700"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                if attacker.stdout.readline().strip() != "ready":
                    raise SystemExit(f"attacker {party}: no WELCOME")
                result[f"honest_rt_per_s_beside_{name}"] = honest_rate(honest, HONEST_ROUNDS_S)
                result[f"{name}_taken"] = json.loads(attacker.stdout.readline())  # it is done sending
                time.sleep(1.0)  # the label holder works through what it already received
                result[f"{name}_rss_growth_mib"] = peak.growth_mib()
                result[f"honest_rt_per_s_after_{name}"] = honest_rate(honest, HONEST_ROUNDS_S)
                attacker.stdin.write("drain\n")
                attacker.stdin.flush()
                result[f"{name}_attacker_got"] = json.loads(attacker.stdout.readline())
                attacker.wait(30)
                alone = result["honest_rt_per_s_alone"]
                result[f"beside_{name}_vs_alone_ratio"] = result[f"honest_rt_per_s_beside_{name}"] / alone
                result[f"after_{name}_vs_alone_ratio"] = result[f"honest_rt_per_s_after_{name}"] / alone
            result["flood_rss_goal_mib"] = lh_cfg.queue_bytes / MIB + 64

            # 1. an 8 MB header frame
            big = RawPeer(ctx, endpoint, load_config(configs["dh2"]))
            big.hello()
            peak = PeakRss(lh.pid)
            # 8 MB of msgpack that unpacks into 8 million empty dicts (about 70x its size, unbounded)
            big.sock.send_multipart([SIGNATURE, msgpack.packb({"type": "ECHO", "pad": [{}] * (8 * 10**6)})])
            reply = big.recv_app(30)
            result["header_8mb_reply"] = f"ERROR {reply.code}" if reply is not None and reply.TYPE == "ERROR" else str(reply)
            time.sleep(0.5)
            result["header_8mb_rss_growth_mib"] = peak.growth_mib()
            big.close()
            result["honest_rt_per_s_end"] = honest_rate(honest, 1.0)
            result["label_holder_alive"] = lh.poll() is None
            honest.close()
        except SystemExit as exc:  # a peer got no answer: report it with the label holder's state and log
            result["failed"] = str(exc)
            result["label_holder_alive"] = lh.poll() is None
        finally:
            os.killpg(lh.pid, signal.SIGTERM)
            try:
                result["label_holder_exit"] = lh.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(lh.pid, signal.SIGKILL)
                result["label_holder_exit"] = "killed"
            log.close()
            ctx.destroy(linger=0)
            tail = (out / "bank.log").read_text(errors="replace").splitlines()[-12:]
        if "--no-training" not in sys.argv:  # 5. a real training session, alone and beside mallory, interleaved
            result.update(training_figures(out))
        for key, value in result.items():
            print(f"{key:32} {value:.2f}" if isinstance(value, float) else f"{key:32} {value}")
        print("label holder log (tail):", *tail, sep="\n  ")
        print(json.dumps(result))
    return 0


def training_figures(out: Path) -> dict:
    """Interleaved training sessions (``--training-runs``, default 4), every other one beside mallory."""
    result: dict = {}
    n = int(sys.argv[sys.argv.index("--training-runs") + 1]) if "--training-runs" in sys.argv else 4
    runs = [training_run(out / f"train-{i}", attack=i % 2 == 1) for i in range(2 * (n // 2))]
    alone = [r["epoch_2_to_last_s"] for r in runs if not r["attack"]]
    beside = [r["epoch_2_to_last_s"] for r in runs if r["attack"]]
    result["training_runs"] = runs
    result["training_epoch_s_alone"] = alone
    result["training_epoch_s_beside_mallory"] = beside
    # samples/s is rows / time: the ratio of the mean epoch times, inverted
    result["training_samples_per_s_beside_vs_alone"] = (sum(alone) / len(alone)) / (sum(beside) / len(beside))
    cpu = {kind: [r["epoch_2_to_last_cpu_s"]["bank"] for r in runs if r["attack"] == kind] for kind in (False, True)}
    result["training_bank_cpu_s_alone"], result["training_bank_cpu_s_beside_mallory"] = cpu[False], cpu[True]
    result["training_bank_cpu_beside_vs_alone"] = (sum(cpu[True]) / len(cpu[True])) / (sum(cpu[False]) / len(cpu[False]))
    return result


# ------------------------------------------------------------------------------------------- training beside an attack

TRAIN_ROWS, TRAIN_EPOCHS = 30_000, 5


def write_training_session(out: Path, port: int) -> dict[str, Path]:
    """bank (labels) + dh1 + dh2 (features) over the same synthetic people; plus ``mallory``, a key on the label
    holder's allow-list that is in no session: a partner of another project, say."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(TRAIN_ROWS, 12)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(12, 3)), axis=1)
    ids = [f"p{i:06d}" for i in range(TRAIN_ROWS)]
    out.mkdir(parents=True)
    for name, header, cols in (("bank", ["label"], [y]), ("dh1", [f"a{j}" for j in range(5)], list(x[:, :5].T)),
                               ("dh2", [f"b{j}" for j in range(7)], list(x[:, 5:].T))):
        lines = ["id," + ",".join(header)] + [
            ids[i] + "," + ",".join(repr(float(c[i])) if c.dtype.kind == "f" else str(int(c[i])) for c in cols)
            for i in range(TRAIN_ROWS)
        ]
        (out / f"{name}.csv").write_text("\n".join(lines) + "\n")
    opt = {"kind": "sgd", "lr": 0.05, "momentum": 0.5}
    model = str(out / "model")
    tables = {
        "bank": {"model": {"top": {"widths": [16, 3]}, "seed": 3},
                 "train": {"task": "multiclass", "epochs": TRAIN_EPOCHS, "validation_fraction": 0.2, "seed": 5,
                           "optimizer": opt, "output": model}},
        "dh1": {"model": {"bottom": {"widths": [16, 8]}, "seed": 1}, "train": {"optimizer": opt, "output": model}},
        "dh2": {"model": {"bottom": {"widths": [16, 8]}, "seed": 2}, "train": {"optimizer": opt, "output": model}},
    }
    data = {"bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
            "dh1": {"path": "dh1.csv", "id_column": "id"}, "dh2": {"path": "dh2.csv", "id_column": "id"}}
    configs = prepare_session(out, data_holders=["dh1", "dh2"], run="hostile-train", port=port, link_check={"rounds": 0},
                              data=data, psi={"workers": 1}, tables=tables, cut_width=8, batch_size=64, window=2,
                              timeouts={"heartbeat": 1.0, "peer": 30.0, "progress": 120.0})
    generate_keypair(out / "keys", "mallory")
    text = configs["bank"].read_text()
    assert "[keys.partners]\n" in text
    configs["bank"].write_text(text.replace("[keys.partners]\n", '[keys.partners]\nmallory = "keys/mallory.key"\n', 1))
    return configs


def training_run(out: Path, attack: bool) -> dict:
    """One training session; with ``attack``, mallory floods 1 MiB ECHOs without reading from epoch 1 on.

    Returns the seconds of epochs 2..E (the attack's span) and what the attacker managed to send."""
    port = free_port()
    configs = write_training_session(out, port)
    endpoint = f"tcp://{HOST}:{port}"
    procs = {name: subprocess.Popen([sys.executable, "-m", "vfl", "node", "--config", str(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for name, path in configs.items()}
    done_at: dict[int, float] = {}
    cpu_at: dict[int, dict[str, float]] = {}  # CPU seconds of every node when the label holder logged an epoch done
    lines: list[str] = []

    def watch() -> None:
        for line in procs["bank"].stdout:
            lines.append(line)
            if " of %d done" % TRAIN_EPOCHS in line and "epoch " in line:
                epoch = int(line.split("epoch ")[1].split(" of")[0])
                done_at[epoch] = time.monotonic()
                cpu_at[epoch] = {name: cpu_seconds(p.pid) for name, p in procs.items()}

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for name in ("dh1", "dh2"):  # their output is not needed; keep their pipes drained
        threading.Thread(target=procs[name].stdout.read, daemon=True).start()
    # mallory's process starts with the session in both kinds of run (its Python start-up costs the box the same), and
    # only in an attack run is it told to go: connect and flood
    attacker = subprocess.Popen(
        [sys.executable, __file__, "--mallory", str(out / "keys" / "mallory.key_secret"), str(out / "keys" / "bank.key"),
         endpoint],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    got: dict = {"attack": attack}
    try:
        end = time.monotonic() + 300
        while 1 not in done_at and time.monotonic() < end and procs["bank"].poll() is None:
            time.sleep(0.01)
        if attack:
            attacker.stdin.write("go\n")
            attacker.stdin.flush()
        codes = {name: p.wait(max(1.0, end - time.monotonic())) for name, p in procs.items()}
        watcher.join(5)
        attacker.stdin.write("stop\n")
        attacker.stdin.flush()
        got.update(json.loads(attacker.stdout.readline()))
        attacker.wait(30)
        got["exit_codes"] = codes
        got["epoch_2_to_last_s"] = done_at[TRAIN_EPOCHS] - done_at[1]
        # the nodes' own CPU over the same span: less at the mercy of whatever else the shared box runs than wall time
        got["epoch_2_to_last_cpu_s"] = {name: round(cpu_at[TRAIN_EPOCHS][name] - cpu_at[1][name], 3) for name in procs}
        got["closed_mallory"] = sum("mallory" in x and "closed its connection" in x for x in lines)
        got["internal_errors"] = sum("internal error" in x or "Traceback" in x for x in lines)
    finally:
        for p in [*procs.values(), attacker]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return got


def mallory_main(secret: str, server: str, endpoint: str) -> int:
    """``--mallory``: an allow-listed key in no session. On ``go`` it sends 1 MiB ECHOs, never reading, until told to
    stop; told ``stop`` first, it never connects."""
    if sys.stdin.readline().strip() != "go":
        print(json.dumps({"mallory_sent_mib": 0}), flush=True)
        return 0
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger, sock.rcvhwm, sock.sndhwm = 0, 1, 1000
    sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.setsockopt(zmq.ROUTING_ID, f"mallory/{secrets.token_hex(8)}".encode())
    sock.curve_publickey, sock.curve_secretkey = load_secret_key(secret)
    sock.curve_serverkey = load_public_key(server)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint)
    frames = encode(Echo(seq=0, tensors=[Tensor("x", np.zeros(MIB // 4, dtype=np.float32))]))
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    sent = connections = 0
    cpu0 = os.times()
    while not stop.is_set():
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            sent += 1
        except zmq.Again:  # its queue is full: libzmq sends on by itself, and a spinning retry would only take
            time.sleep(0.05)  # CPU from the nodes on this shared box, which a partner on its own host never does
        while monitor.poll(0):
            monitor.recv_multipart()
            connections += 1
    cpu = os.times()
    print(json.dumps({"mallory_sent_mib": sent, "mallory_connections": connections,
                      "mallory_cpu_s": round(cpu.user + cpu.system - cpu0.user - cpu0.system, 3)}), flush=True)
    sock.close(linger=0)
    ctx.destroy(linger=0)
    return 0


def attack_main(config: str, endpoint: str, nbytes: int, count: int) -> int:
    """``--attack``: the hostile partner, in its own process. Sends ``count`` ECHOs of ``nbytes`` without reading
    (retrying each until its libzmq takes it), then drains what came back when told."""
    ctx = zmq.Context()
    hostile = RawPeer(ctx, endpoint, load_config(config), rcvhwm=1)
    hostile.sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    hostile.hello()
    print("ready", flush=True)
    print(json.dumps(flood(hostile, nbytes, count)), flush=True)
    sys.stdin.readline()
    print(json.dumps(drain_summary(hostile, 3.0)), flush=True)
    hostile.sock.close(linger=0)
    ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    if "--mallory" in sys.argv:
        i = sys.argv.index("--mallory")
        sys.exit(mallory_main(sys.argv[i + 1], sys.argv[i + 2], sys.argv[i + 3]))
    if "--attack" in sys.argv:
        i = sys.argv.index("--attack")
        sys.exit(attack_main(sys.argv[i + 1], sys.argv[i + 2], int(sys.argv[i + 3]), int(sys.argv[i + 4])))
    if "--training-only" in sys.argv:
        with TemporaryDirectory(prefix="vfl-hostile-") as tmp:
            figures = training_figures(Path(tmp))
        for key, value in figures.items():
            print(f"{key:32} {value}")
        print(json.dumps(figures))
        sys.exit(0)
    sys.exit(main())
