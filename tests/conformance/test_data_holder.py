"""The data holder's side, with the kit as a raw label holder (a CURVE ROUTER written from the spec):
[S1]/[S2] (its HELLO), [L3] (handshake timeout, refused key), [H7] (ERROR to HELLO is final), [L1] (it heartbeats
a silent label holder at the announced heartbeat_ms) and its state table [T1].

These start the node under test as a data holder (``--node-cmd`` or the bundled ``python -m vfl node``); against
an external ``--target`` without ``--node-cmd`` they are skipped (there is no data holder to start)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from .peer import CODES, DH_TO_LH, Msg, config_digest, envelope, parse
from .target import MODEL, RUN, dh_config, make_keys, node_command, start_node

DH = "dh1"
LH = "bank"
RID_PATTERN = re.compile(re.escape(DH.encode()) + rb"/[0-9a-f]{16}")  # [S1]
SESSION = {"cut_widths": {DH: 8, "dh2": 16}, "batch_size": 32, "window": 2, "model": MODEL}
PSI_SESSION = {**SESSION, "psi": True}


class RawLabelHolder:
    """A ROUTER, CURVE server, bound on 127.0.0.1. deny_all: a ZAP handler that refuses every client key."""

    def __init__(self, ctx: zmq.Context, server, deny_dir: Optional[Path] = None, allowed_types=DH_TO_LH):
        self.allowed_types = allowed_types  # what the node connecting to it may send
        self.auth = None
        if deny_dir is not None:
            self.auth = ThreadAuthenticator(ctx)
            self.auth.start()
            deny_dir.mkdir(exist_ok=True)
            self.auth.configure_curve(domain="*", location=str(deny_dir))  # an empty allow-list
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.curve_server = True
        self.sock.curve_secretkey = server.secret
        self.sock.curve_publickey = server.public
        self.sock.zap_domain = b"vfl"
        self.sock.sndtimeo = 2000
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.got: list[tuple[bytes, Msg]] = []
        self.rid: Optional[bytes] = None

    def recv(self, timeout: float, skip_heartbeats: bool = True) -> Optional[Msg]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return None
            rid, *frames = self.sock.recv_multipart()
            m = parse(frames, allowed_types=self.allowed_types)
            self.got.append((rid, m))
            self.rid = rid
            assert not m.problems, f"the data holder sent a malformed message: {m.problems}"
            if m.type == "HEARTBEAT" and skip_heartbeats:
                continue
            return m

    def expect(self, type_: str, timeout: float, what: str = "") -> Msg:
        m = self.recv(timeout)
        assert m is not None, f"{what}: expected {type_} from the data holder, got nothing within {timeout} s"
        assert m.type == type_, f"{what}: expected {type_} from the data holder, got {m.summary()}"
        return m

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.rid, *frames])

    def welcome(self, heartbeat_ms: int = 1000, peer_timeout_ms: int = 20000, session: dict = SESSION,
                **over) -> None:
        """A WELCOME for ``session``; ``over`` replaces fields (a value of None leaves the field out)."""
        fields = {"version": [1, 0], "party": LH, "run": RUN, "digest": config_digest(session),
                  "heartbeat_ms": heartbeat_ms, "peer_timeout_ms": peer_timeout_ms,
                  "data_holders": sorted(session["cut_widths"])}
        if session.get("psi"):
            fields["psi_nonce"] = "0123456789abcdef" * 2
        fields.update(over)
        self.send(envelope("WELCOME", {k: v for k, v in fields.items() if v is not None}))

    def answer_echo(self, m: Msg) -> None:
        self.send(envelope("ECHO_REPLY", {"seq": m.get("seq")},
                           [(n, np.frombuffer(b, dtype=_np_dtype(d)).reshape(s)) for n, d, s, b in m.tensors]))

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def _np_dtype(name):
    from .peer import DTYPES

    return DTYPES[name]


class DataHolderEnv:
    def __init__(self, workdir: Path, node_cmd: Optional[str]):
        self.workdir = workdir
        self.node_cmd = node_cmd
        self.keys = make_keys(workdir / "keys", [LH, DH])
        self.procs: list[subprocess.Popen] = []
        self.n = 0

    def start(self, port: int, *, handshake: float = 10.0, rounds: int = 2, hold: float = 0.0,
              shape=(4, 8), psi: bool = False) -> tuple[subprocess.Popen, Path]:
        """A data holder of SESSION (PSI_SESSION with psi, its IDs 0..49)."""
        self.n += 1
        cfg = self.workdir / f"dh-{self.n}.toml"
        if psi:
            (self.workdir / "ids.csv").write_text("id\n" + "".join(f"{i}\n" for i in range(50)))
        cfg.write_text(dh_config(party=DH, run=RUN, port=port, secret=f"keys/{DH}.key_secret", lh_party=LH,
                                 lh_key=f"keys/{LH}.key", session=PSI_SESSION if psi else SESSION,
                                 handshake=handshake, rounds=rounds, hold=hold, shape=shape, ids="ids.csv"))
        log = self.workdir / f"dh-{self.n}.log"
        proc = start_node(node_command(self.node_cmd, cfg), log, self.workdir)
        self.procs.append(proc)
        return proc, log

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.fixture(scope="module")
def dh_env(request, tmp_path_factory):
    opts = request.config.option
    if opts.target and not opts.node_cmd:
        pytest.skip("data holder tests start a data holder: give --node-cmd to test another implementation's")
    env = DataHolderEnv(tmp_path_factory.mktemp("vfl-dh"), opts.node_cmd)
    yield env
    env.cleanup()


@pytest.fixture
def lh_ctx():
    c = zmq.Context()  # its own context: a ZAP handler must not see the kit's other sockets
    yield c
    c.destroy(linger=0)


def _wait(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _finish_link_check(lh: RawLabelHolder, proc, log, rounds: int, what: str) -> None:
    for i in range(rounds):
        lh.answer_echo(lh.expect("ECHO", 5.0, f"{what}: link check ECHO #{i + 1}"))
    bye = lh.expect("BYE", 10.0, f"{what}: BYE after the link check")
    assert bye.get("ok") is True, f"{what}: BYE after a successful link check must be ok: true, got {bye.summary()}"
    rc = _wait(proc, 10.0)
    assert rc == 0, f"{what}: the data holder must exit 0 after BYE {{ok: true}}, got {rc}\n{_log(log)[-2000:]}"


# ----------------------------------------------------------------------------------------------------------------


def test_S2_data_holder_HELLO_is_conformant_and_session_completes(dh_env, lh_ctx):
    """[S1] routing id = `<party id>/<16 lowercase hex>`; [S2] first message HELLO with version [1, 0], role data_holder, party, run,
    the config it was given and the section 6 digest of it; then WELCOME -> link check ECHOs ([E4] frames checked)
    -> BYE {ok: true} -> exit 0."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, rounds=2)
        m = lh.recv(10.0, skip_heartbeats=False)
        assert m is not None, f"no message from the data holder within 10 s\n{_log(log)[-2000:]}"
        assert RID_PATTERN.fullmatch(lh.rid), f"[S1] routing id must be {DH!r}/<16 lowercase hex>, got {lh.rid!r}"
        assert m.type == "HELLO", f"[S2] the first message must be HELLO, got {m.summary()}"
        version = m.get("version")
        assert isinstance(version, list) and len(version) == 2 and version[0] == 1, version
        assert m.get("role") == "data_holder" and m.get("party") == DH and m.get("run") == RUN
        assert m.get("config") == SESSION, f"HELLO config {m.get('config')} is not the session config {SESSION}"
        assert m.get("digest") == config_digest(SESSION), (
            f"section 6: HELLO digest {m.get('digest')!r} is not sha256(canonical msgpack) = {config_digest(SESSION)!r}"
        )
        lh.welcome()
        _finish_link_check(lh, proc, log, 2, "happy path")
    finally:
        lh.close()


def test_L3_data_holder_gives_up_without_WELCOME(dh_env, lh_ctx):
    """[L3]: no WELCOME within the handshake timeout (1.5 s) -> non-zero exit, not much earlier or later."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, handshake=1.5)
        lh.expect("HELLO", 10.0)
        t = time.monotonic()
        rc = _wait(proc, 1.5 + 5.0)
        took = time.monotonic() - t
        assert rc is not None, "[L3] the data holder did not give up within handshake + 5 s"
        assert rc != 0, f"[L3] giving up on the handshake must be a non-zero exit, got 0\n{_log(log)[-2000:]}"
        assert took >= 1.0, f"[L3] gave up after {took:.2f} s, before its 1.5 s handshake timeout"
    finally:
        lh.close()


def test_L3_data_holder_reports_a_refused_key_as_such(dh_env, lh_ctx, tmp_path):
    """[L3]: the label holder's ZAP handler refuses the data holder's key -> the data holder exits non-zero within
    its handshake timeout and says its key was refused (not just "timeout"). Three data holders are started at
    once: how a node sees the refusal can depend on timing (before or after its HELLO is queued)."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH], deny_dir=tmp_path / "allow-nobody")
    try:
        runs = [dh_env.start(lh.port, handshake=2.0) for _ in range(3)]
        deadline = time.monotonic() + 2.0 + 8.0  # + start-up of three Python processes on a busy 2-core box
        problems = []
        for i, (proc, log) in enumerate(runs):
            rc = _wait(proc, max(0.1, deadline - time.monotonic()))
            text = _log(log)
            words = ("refused", "rejected", "denied", "not allowed", "allow-list", "allow list", "zap", "authenticat")
            if rc is None:
                problems.append(f"data holder #{i + 1} did not exit within its 2 s handshake timeout + 8 s "
                                f"(still running); its output:\n{text[-1500:]}")
            elif rc == 0:
                problems.append(f"data holder #{i + 1} exited 0; its output:\n{text[-1500:]}")
            elif not any(w in text.lower() for w in words):
                problems.append(f"data holder #{i + 1} (exit {rc}) does not say that its key was refused; its "
                                f"output:\n{text[-1500:]}")
        assert not problems, "[L3] refused key:\n" + "\n".join(problems)
        assert lh.recv(0.05) is None
    finally:
        lh.close()


def test_H7_data_holder_treats_ERROR_to_HELLO_as_final(dh_env, lh_ctx):
    """[H7]: ERROR CONFIG_MISMATCH (with diff) in answer to HELLO -> the data holder reports code, message and
    diff, and exits non-zero (right away, not at its handshake timeout)."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, handshake=30.0)
        lh.expect("HELLO", 10.0)
        lh.send(envelope("ERROR", {"code": CODES["CONFIG_MISMATCH"], "ref": "HELLO",
                                   "message": "config differs: batch_size: label holder has 64, data holder has 32",
                                   "diff": {"batch_size": [64, 32]}}))
        rc = _wait(proc, 5.0)
        text = _log(log)
        assert rc is not None, f"[H7] the data holder did not exit within 5 s of ERROR to its HELLO\n{text[-2000:]}"
        assert rc != 0, f"[H7] exit code must be non-zero, got 0\n{text[-2000:]}"
        assert "CONFIG_MISMATCH" in text or "10" in text, f"[H7] the code is not reported:\n{text[-2000:]}"
        assert "batch_size" in text and "64" in text and "32" in text, f"[H7] the diff is not reported:\n{text[-2000:]}"
    finally:
        lh.close()


def test_L1_data_holder_heartbeats_at_the_announced_interval(dh_env, lh_ctx):
    """[L1]: heartbeat_ms is the label holder's setting, announced in WELCOME (here 300 ms, the data holder's own
    config says 1 s): a READY data holder that has sent nothing for 300 ms sends HEARTBEAT."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, rounds=1, hold=1.3)
        lh.expect("HELLO", 10.0)
        lh.welcome(heartbeat_ms=300)
        lh.answer_echo(lh.expect("ECHO", 5.0))
        t = time.monotonic()
        beats = []
        while len(beats) < 2 and time.monotonic() - t < 1.5:
            m = lh.recv(1.5 - (time.monotonic() - t), skip_heartbeats=False)
            if m is None:
                break
            if m.type == "HEARTBEAT":
                beats.append(time.monotonic() - t)
        assert len(beats) == 2, f"[L1] expected 2 HEARTBEATs within 1.5 s at heartbeat_ms = 300, got {beats}"
        assert beats[0] <= 0.6 + 0.2 and beats[1] - beats[0] <= 0.6 + 0.2, f"[L1] HEARTBEATs at {beats} s"
        bye = lh.expect("BYE", 5.0)
        assert bye.get("ok") is True
        assert _wait(proc, 10.0) == 0
    finally:
        lh.close()


# ----------------------------------------------------------------------------------------------------------------
# The data holder's table: CONNECTING and READY rows (WELCOME/ERROR in CONNECTING are the tests above).

U = CODES["UNEXPECTED_MESSAGE"]


def _msg(kind: str) -> list[bytes]:
    t = [("x", np.arange(3, dtype=np.float32))]
    return {
        "WELCOME": envelope("WELCOME", {"version": [1, 0], "party": LH, "run": RUN, "digest": config_digest(SESSION),
                                        "heartbeat_ms": 1000, "peer_timeout_ms": 20000, "data_holders": [DH]}),
        "ECHO_REPLY": envelope("ECHO_REPLY", {"seq": 987654321}, t),
        "HEARTBEAT": envelope("HEARTBEAT"),
        "HELLO": envelope("HELLO", {"version": [1, 0], "role": "data_holder", "party": "dh2", "run": RUN,
                                    "config": SESSION, "digest": config_digest(SESSION)}),
        "ECHO": envelope("ECHO", {"seq": 5}, t),
        "ERROR": envelope("ERROR", {"code": CODES["BAD_FIELD"], "message": "conformance kit: a valid ERROR"}),
        "BYE_not_ok": envelope("BYE", {"ok": False, "reason": "conformance kit says goodbye"}),
    }[kind]


DH_TABLE = {
    ("CONNECTING", "ECHO_REPLY"): U,
    ("CONNECTING", "HEARTBEAT"): U,
    ("CONNECTING", "HELLO"): U,
    ("CONNECTING", "ECHO"): U,
    ("CONNECTING", "BYE_not_ok"): "CLOSED",
    ("READY", "WELCOME"): U,
    ("READY", "ECHO_REPLY"): U,  # an unknown seq
    ("READY", "HEARTBEAT"): None,
    ("READY", "HELLO"): U,
    ("READY", "ECHO"): U,
    ("READY", "ERROR"): None,  # log
    ("READY", "BYE_not_ok"): "CLOSED",
}


@pytest.mark.parametrize("state,kind", list(DH_TABLE), ids=[f"{s}-{k}" for s, k in DH_TABLE])
def test_T1_data_holder_state_table(dh_env, lh_ctx, state, kind):
    """[T1] for the data holder: the tabled answer (error UNEXPECTED_MESSAGE, nothing, or CLOSED: a BYE
    {ok: false} makes it exit non-zero with the reason); after an error or nothing the session goes on normally
    (WELCOME accepted in CONNECTING; link check, BYE {ok: true}, exit 0 in READY)."""
    want = DH_TABLE[(state, kind)]
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    what = f"data holder, {kind} in {state}"
    try:
        proc, log = dh_env.start(lh.port, rounds=1, hold=0.4 if state == "READY" else 0.0)
        lh.expect("HELLO", 10.0, what)
        if state == "READY":
            lh.welcome()
            lh.answer_echo(lh.expect("ECHO", 5.0, what))  # the link check is done; it holds READY for 0.4 s
        lh.send(_msg(kind))
        if want == "CLOSED":
            rc = _wait(proc, 5.0)
            assert rc is not None and rc != 0, f"{what}: must exit non-zero, got {rc}"
            assert "conformance kit says goodbye" in _log(log), f"{what}: the reason is not reported"
            return
        if want == U:
            e = lh.expect("ERROR", 3.0, what)
            assert e.get("code") == U, f"{what}: expected ERROR UNEXPECTED_MESSAGE, got {e.summary()}"
        if state == "CONNECTING":
            lh.welcome()
            _finish_link_check(lh, proc, log, 1, what)
        else:
            bye = lh.expect("BYE", 5.0, what)  # nothing else (no ERROR for HEARTBEAT / ERROR) before its BYE
            assert bye.get("ok") is True, f"{what}: {bye.summary()}"
            assert _wait(proc, 10.0) == 0, f"{what}: exit code {proc.returncode}\n{_log(log)[-2000:]}"
    finally:
        lh.close()


# ----------------------------------------------------------------------------------------------------------------
# [S1] fresh routing ids, [S5] REPLACED, [W1] what a data holder checks in WELCOME


def test_S1_data_holder_routing_id_is_fresh_for_every_socket(dh_env, lh_ctx):
    """[S1]: two data holders with one config (one party, one key) connect with two different routing ids, each
    `<party>/<16 lowercase hex>`."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        runs = [dh_env.start(lh.port, handshake=30.0) for _ in range(2)]
        rids = set()
        for _ in runs:
            lh.expect("HELLO", 10.0, "[S2]")
            assert RID_PATTERN.fullmatch(lh.rid), f"[S1] routing id {lh.rid!r}"
            rids.add(lh.rid)
            lh.send(envelope("ERROR", {"code": CODES["UNKNOWN_PARTY"], "message": "conformance kit", "ref": "HELLO"}))
        assert len(rids) == 2, f"[S1] two sockets of one party must have two routing ids, got {rids}"
        for proc, log in runs:
            assert _wait(proc, 10.0) not in (None, 0), f"[H7] {_log(log)[-1500:]}"
    finally:
        lh.close()


def test_S5_data_holder_stops_on_ERROR_REPLACED(dh_env, lh_ctx):
    """[S5]: a READY data holder that receives ERROR REPLACED stops with a non-zero exit and its log says it was
    replaced."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, rounds=0, hold=60.0)
        lh.expect("HELLO", 10.0)
        lh.welcome()
        lh.recv(0.3)  # let it act on the WELCOME (it has nothing to send but HEARTBEATs)
        lh.send(envelope("ERROR", {"code": CODES["REPLACED"],
                                   "message": "this connection was replaced by a newer connection with the same key"}))
        rc = _wait(proc, 10.0)
        text = _log(log)
        assert rc not in (None, 0), f"[S5] exit code after ERROR REPLACED must be non-zero, got {rc}\n{text[-2000:]}"
        assert "replaced" in text.lower(), f"[S5] the log must say the data holder was replaced:\n{text[-2000:]}"
    finally:
        lh.close()


W1_BAD = {  # name -> (WELCOME field overrides, field the ERROR must name, psi session)
    "major_2": (lambda minor: {"version": [2, 0]}, "version", False),
    "minor_above_its_own": (lambda minor: {"version": [1, minor + 1]}, "version", False),
    "run_other": (lambda minor: {"run": RUN + "-other"}, "run", False),
    "digest_other": (lambda minor: {"digest": config_digest({**SESSION, "batch_size": 64})}, "digest", False),
    "data_holders_reordered": (lambda minor: {"data_holders": ["dh2", DH]}, "data_holders", False),
    "data_holders_without_itself": (lambda minor: {"data_holders": ["dh2"]}, "data_holders", False),
    "data_holders_one_more": (lambda minor: {"data_holders": [DH, "dh2", "dh3"]}, "data_holders", False),
    "psi_nonce_without_psi": (lambda minor: {"psi_nonce": "ab" * 16}, "psi_nonce", False),
    "psi_nonce_missing": (lambda minor: {"psi_nonce": None}, "psi_nonce", True),
    "psi_nonce_31_hex": (lambda minor: {"psi_nonce": "a" * 31}, "psi_nonce", True),
    "psi_nonce_uppercase": (lambda minor: {"psi_nonce": "AB" * 16}, "psi_nonce", True),
}


@pytest.mark.parametrize("which", list(W1_BAD))
def test_W1_data_holder_refuses_a_bad_WELCOME(dh_env, lh_ctx, which):
    """[W1]: version [1, m] with m at most the data holder's own minor (its HELLO's), its own run and digest,
    data_holders its session's list in order with itself in it, psi_nonce 32 lowercase hex exactly when psi: a WELCOME
    that breaks one gets ERROR BAD_FIELD naming the field, then BYE {ok: false}, and the data holder exits 1."""
    over, field, psi = W1_BAD[which]
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, rounds=1, psi=psi)
        hello = lh.expect("HELLO", 10.0)
        lh.welcome(session=PSI_SESSION if psi else SESSION, **over(hello.get("version")[1]))
        err = lh.expect("ERROR", 5.0, f"[W1] {which}: the data holder's answer to the bad WELCOME")
        assert err.get("code") == CODES["BAD_FIELD"], f"[W1] {which}: expected BAD_FIELD, got {err.summary()}"
        assert field in err.get("message"), f"[W1] {which}: the ERROR must name {field!r}: {err.get('message')!r}"
        bye = lh.expect("BYE", 5.0, f"[W1] {which}: BYE after the ERROR")
        assert bye.get("ok") is False, f"[W1] {which}: BYE must be ok: false, got {bye.summary()}"
        rc = _wait(proc, 10.0)
        assert rc == 1, f"[W1] {which}: exit code must be 1, got {rc}\n{_log(log)[-2000:]}"
    finally:
        lh.close()


def test_W1_data_holder_accepts_a_good_WELCOME_with_psi_nonce(dh_env, lh_ctx):
    """Control for [W1]: in a PSI session, a WELCOME with a 32-hex psi_nonce is accepted: the data holder goes on
    (its link check ECHO, then PSI_START, [P2])."""
    lh = RawLabelHolder(lh_ctx, dh_env.keys[LH])
    try:
        proc, log = dh_env.start(lh.port, rounds=1, psi=True)
        lh.expect("HELLO", 10.0)
        lh.welcome(session=PSI_SESSION)
        lh.answer_echo(lh.expect("ECHO", 5.0, "[W1] the link check after a good WELCOME"))
        lh.expect("PSI_START", 5.0, "[P2] PSI_START after a good WELCOME")
    finally:
        lh.close()
