"""The node under test: a label holder the kit starts itself, or an external one given on the command line."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth

from .peer import DEFAULT_LIMITS, SESSION_TYPES

REPO = Path(__file__).resolve().parents[2]

LH_PARTY = "bank"
RUN = "conformance-1"
MODEL = "conformance-model-v1"
HEARTBEAT_S = 1.0
PEER_TIMEOUT_S = 120.0  # longer than the whole kit: a party a failed test leaves READY must not kill the node
JOIN_TIMEOUT_S = 3600.0
#: [link_check].shape of the kit's node: it makes the session's largest message L (section 7) 2 MiB, so the ECHO cap
#: ([B3]) is known exactly and leaves room for the kit's large ECHOs
LINK_SHAPE = (512, 512)


def largest_message(session: dict, link_shape=None, psi_chunk_size=None) -> int:
    """Section 7: L = max(batch_size x max(cut_widths) x 8, prod(link_check.shape) x 8, chunk_size x 64, 65536)."""
    link = 0
    if link_shape is not None:
        link = 8
        for d in link_shape:
            link *= d
    psi = psi_chunk_size * 64 if session.get("psi") and psi_chunk_size else 0
    return max(session["batch_size"] * max(session["cut_widths"].values()) * 8, link, psi, 65536)

# Parties of the kit's own node. Roles let the tests spread their traffic (and the node's per-peer [R2] buckets)
# over several allow-listed keys; against an external node with fewer keys the roles share keys.
GENERAL = ["dh1", "dh2", "dh3"]
ROLES = {
    "main": "dh1",
    "alt": "dh2",
    "third": "dh3",
    "probe": "probe",
    "rate": "rate",
    "flood1": "flood1",
    "flood2": "flood2",
    "flood3": "flood3",
    "twice": "twice",  # a real data holder process started twice (finding 2 of issue 12)
}
IDLE_PARTIES = {t: "idle-" + t.lower().replace("_", "-") for t in sorted(SESSION_TYPES)}  # never used before their test
SPARE = "spare"  # allow-listed and expected, never connects: keeps the label holder from finishing
OUTSIDER = "outsider"  # allow-listed key whose party is NOT in cut_widths (for [H1])


@dataclass
class PartyKey:
    name: str
    public: bytes
    secret: bytes


@dataclass
class Target:
    address: str
    server_public: bytes
    run: str
    session: dict
    limits: dict
    parties: dict[str, PartyKey]  # allow-listed keys of parties in cut_widths that the kit may use
    lh_party: Optional[str] = None
    heartbeat_ms: Optional[int] = None
    peer_timeout_ms: Optional[int] = None
    outsider: Optional[PartyKey] = None
    proc: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None
    workdir: Optional[Path] = None
    external: bool = False
    dead_reason: Optional[str] = None  # an external target that stopped answering
    pristine: dict[str, str] = field(default_factory=dict)  # message type -> party never used before
    #: L of section 7 (the ECHO cap, [B3]); exact when the kit knows the node's [link_check] (and [psi]) settings
    largest_message: int = 65536
    largest_exact: bool = False

    def key(self, role_or_party: str) -> PartyKey:
        if role_or_party in self.parties:
            return self.parties[role_or_party]
        name = ROLES.get(role_or_party)
        if name in self.parties:
            return self.parties[name]
        # external target: roles share the keys given on the command line
        names = sorted(self.parties)
        order = list(ROLES)
        i = order.index(role_or_party) if role_or_party in order else 0
        return self.parties[names[i % len(names)]]

    def distinct(self, n: int) -> list[PartyKey]:
        """n different allow-listed parties, or skip."""
        import pytest

        general = [self.parties[p] for p in GENERAL if p in self.parties]
        if len(general) < n:
            general = list(self.parties.values())
        if len(general) < n:
            pytest.skip(f"needs {n} allow-listed party keys; the target was given {len(general)} (--client-key/--party)")
        return general[:n]

    def alive(self) -> Optional[str]:
        """None if the node looks alive, else a description of its death."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"node process exited with {rc}; log tail:\n{self.log_tail()}"

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    | " + ln for ln in lines[-n:])


# --------------------------------------------------------------------------------------------------------------
# Local node
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(keydir: Path, names: list[str]) -> dict[str, PartyKey]:
    keydir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        pub_file, sec_file = zmq.auth.create_certificates(str(keydir), name)
        os.chmod(sec_file, stat.S_IRUSR | stat.S_IWUSR)
        public, secret = zmq.auth.load_certificate(sec_file)
        out[name] = PartyKey(name, public, secret)
    return out


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    path: Path,
    *,
    port: int,
    partners: list[str],
    cut_widths: dict[str, int],
    heartbeat: float = HEARTBEAT_S,
    peer: float = PEER_TIMEOUT_S,
    join: float = JOIN_TIMEOUT_S,
    limits: dict = DEFAULT_LIMITS,
    link_shape=LINK_SHAPE,
    queue_bytes: Optional[int] = None,
    session_extra: tuple[str, ...] = (),
    extra: str = "",
) -> None:
    lines = [
        'role = "label_holder"',
        f"party = {_toml_str(LH_PARTY)}",
        f"run = {_toml_str(RUN)}",
        f'endpoint = "tcp://127.0.0.1:{port}"',
        "",
        "[keys]",
        f'secret = "keys/{LH_PARTY}.key_secret"',
        "insecure = false",
        "",
        "[keys.partners]",
        *[f'{_toml_str(p)} = "keys/{p}.key"' for p in partners],
        "",
        "[session]",
        "batch_size = 32",
        "window = 2",
        f"model = {_toml_str(MODEL)}",
        *session_extra,
        "",
        "[session.cut_widths]",
        *[f"{_toml_str(p)} = {w}" for p, w in cut_widths.items()],
        "",
        "[timeouts]",
        f"heartbeat = {heartbeat!r}",
        f"peer = {peer!r}",
        f"join = {join!r}",
        "",
        "[limits]",
        *[f"{k} = {v}" for k, v in limits.items()],
        *([f"queue_bytes = {queue_bytes}"] if queue_bytes is not None else []),
        "",
        "[link_check]",
        f"shape = {list(link_shape)}",
        "",
        extra,
    ]
    path.write_text("\n".join(lines))


def node_command(template: Optional[str], config: Path) -> list[str]:
    if template:
        return [a.replace("{config}", str(config)) for a in shlex.split(template)]
    return [sys.executable, "-m", "vfl", "node", "--config", str(config)]


def start_node(cmd: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            cmd, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
    finally:
        log.close()


def stop_node(proc: subprocess.Popen, grace: float = 10.0) -> Optional[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds. Returns the exit code seen after SIGTERM (None if killed)."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return None


def build_local(workdir: Path, node_cmd: Optional[str]) -> Target:
    """Keys, config and (not yet started) process description for the kit's own label holder."""
    pristine = dict(IDLE_PARTIES)
    expected = GENERAL + [v for v in ROLES.values() if v not in GENERAL] + list(pristine.values()) + [SPARE]
    keys = make_keys(workdir / "keys", [LH_PARTY, *expected, OUTSIDER])
    cut_widths = {p: (16 if p == "dh2" else 8) for p in expected}
    session = {"cut_widths": cut_widths, "batch_size": 32, "window": 2, "model": MODEL}
    port = free_port()
    write_config(workdir / "node.toml", port=port, partners=expected + [OUTSIDER], cut_widths=cut_widths)
    return Target(
        address=f"tcp://127.0.0.1:{port}",
        server_public=keys[LH_PARTY].public,
        run=RUN,
        session=session,
        limits=dict(DEFAULT_LIMITS),
        parties={p: keys[p] for p in expected if p != SPARE},
        lh_party=LH_PARTY,
        heartbeat_ms=int(HEARTBEAT_S * 1000),
        peer_timeout_ms=int(PEER_TIMEOUT_S * 1000),
        outsider=keys[OUTSIDER],
        log_path=workdir / "node.log",
        workdir=workdir,
        pristine=pristine,
        largest_message=largest_message(session, LINK_SHAPE),
        largest_exact=True,
    )


def _hello_probe(target: Target, ctx: zmq.Context, key: PartyKey):
    """A fresh connection with ``key`` that has sent its HELLO (with the target's session)."""
    from .peer import Peer, config_digest, routing_id

    p = Peer(ctx, target.address, server_public=target.server_public, public=key.public, secret=key.secret,
             routing_id=routing_id(key.name), limits=target.limits)
    p.send("HELLO", {"version": [1, 0], "role": "data_holder", "party": key.name, "run": target.run,
                     "config": target.session, "digest": config_digest(target.session)})
    return p


def wait_ready(target: Target, ctx: zmq.Context, timeout: float = 60.0) -> None:
    """Wait until the node completes a handshake (it may take a while to import its dependencies)."""
    key = target.key("probe")
    deadline = time.monotonic() + timeout
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        dead = target.alive()
        if dead:
            raise RuntimeError(f"the node under test did not start: {dead}")
        p = _hello_probe(target, ctx, key)
        try:
            end = min(deadline, time.monotonic() + 2.0)
            while time.monotonic() < end:
                m = p.recv_app(end - time.monotonic())
                if m is None:
                    break
                if m.type == "WELCOME":
                    p.send("BYE", {"ok": True, "reason": "conformance kit: startup probe"})
                    time.sleep(0.05)
                    return
                if m.type == "ERROR":
                    raise RuntimeError(f"the node refused the kit's startup HELLO: {m.summary()}\n{target.log_tail()}")
        finally:
            p.close()
    raise RuntimeError(f"the node did not answer a HELLO within {timeout} s\n{target.log_tail()}")


def wait_answering(target: Target, ctx: zmq.Context, timeout: float = 60.0) -> None:
    """Wait until the node answers the outsider's HELLO with UNKNOWN_PARTY ([H1]): alive, and no session touched
    (a BYE from a READY probe would end a PSI session, [P9])."""
    key = target.outsider
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = target.alive()
        if dead:
            raise RuntimeError(f"the node under test did not start: {dead}")
        p = _hello_probe(target, ctx, key)
        try:
            m = p.recv_app(min(2.0, max(0.0, deadline - time.monotonic())))
            if m is not None and m.type == "ERROR" and m.code == 12:
                return
            if m is not None:
                raise RuntimeError(f"the node answered the outsider's HELLO with {m.summary()}\n{target.log_tail()}")
        finally:
            p.close()
    raise RuntimeError(f"the node did not answer a HELLO within {timeout} s\n{target.log_tail()}")


def start_own_node(
    workdir: Path,
    node_cmd: Optional[str],
    ctx: zmq.Context,
    *,
    data_holders: list[str],
    link_shape=LINK_SHAPE,
    queue_bytes: Optional[int] = None,
    psi: Optional[dict] = None,
    peer: float = PEER_TIMEOUT_S,
    session_strings: Optional[dict] = None,
) -> Target:
    """A label holder of a test's own (fresh keys, a free port), for tests that end its session or need settings
    the shared node does not have. ``data_holders`` (plus a ``spare`` that never connects) are its session;
    ``psi``: the session has ``psi: true`` and these ``[psi]`` settings (the node's own IDs are 0..99);
    ``session_strings``: more string keys of the session config, written into its ``[session]`` table as they are
    (e.g. the 1.6 ``activation_precision``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    expected = list(data_holders) + [SPARE]
    keys = make_keys(workdir / "keys", [LH_PARTY, *expected, OUTSIDER])
    cut_widths = {p: 8 for p in expected}
    session = {"cut_widths": cut_widths, "batch_size": 32, "window": 2, "model": MODEL}
    session_extra: tuple[str, ...] = ()
    extra = ""
    if psi is not None:
        session["psi"] = True
        session_extra = ("psi = true",)
        (workdir / "ids.csv").write_text("id\n" + "".join(f"{i}\n" for i in range(100)))
        extra = "\n".join(["[data]", 'path = "ids.csv"', 'id_column = "id"', "", "[psi]",
                           *[f"{k} = {v!r}" for k, v in psi.items()], ""])
    for key, value in (session_strings or {}).items():
        session[key] = value
        session_extra += (f"{key} = {_toml_str(value)}",)
    for _attempt in range(3):  # the free port may be taken between choosing and binding it
        port = free_port()
        write_config(workdir / "node.toml", port=port, partners=expected + [OUTSIDER], cut_widths=cut_widths,
                     peer=peer, link_shape=link_shape, queue_bytes=queue_bytes, session_extra=session_extra,
                     extra=extra)
        t = Target(
            address=f"tcp://127.0.0.1:{port}",
            server_public=keys[LH_PARTY].public,
            run=RUN,
            session=session,
            limits=dict(DEFAULT_LIMITS),
            parties={p: keys[p] for p in data_holders},
            lh_party=LH_PARTY,
            heartbeat_ms=int(HEARTBEAT_S * 1000),
            peer_timeout_ms=int(peer * 1000),
            outsider=keys[OUTSIDER],
            log_path=workdir / "node.log",
            workdir=workdir,
            largest_message=largest_message(session, link_shape, (psi or {}).get("chunk_size", 65536)),
            largest_exact=True,
        )
        t.proc = start_node(node_command(node_cmd, workdir / "node.toml"), t.log_path, workdir)
        try:
            wait_answering(t, ctx)
            return t
        except RuntimeError as exc:
            last = exc
            stop_node(t.proc, grace=2.0)
    raise RuntimeError(f"could not start a label holder of the test's own: {last}")


def dh_config(
    *, party: str, run: str, port: int, secret: str, lh_party: str, lh_key: str, session: dict,
    handshake: float = 10.0, rounds: int = 2, hold: float = 0.0, shape=(4, 8), peer: float = 20.0,
    ids: Optional[str] = None,
) -> str:
    """A data holder's node config (paths relative to the config file's folder). With ``session["psi"]``, ``ids`` is
    its CSV of IDs (column ``id``)."""
    cw = "\n".join(f"{_toml_str(k)} = {v}" for k, v in session["cut_widths"].items())
    psi = "psi = true\n" if session.get("psi") else ""
    data = f'\n[data]\npath = {_toml_str(ids)}\nid_column = "id"\n' if session.get("psi") else ""
    return f"""role = "data_holder"
party = {_toml_str(party)}
run = {_toml_str(run)}
endpoint = "tcp://127.0.0.1:{port}"

[keys]
secret = {_toml_str(secret)}

[keys.partners]
{_toml_str(lh_party)} = {_toml_str(lh_key)}

[session]
batch_size = {session['batch_size']}
window = {session['window']}
model = {_toml_str(session['model'])}
{psi}
[session.cut_widths]
{cw}

[timeouts]
heartbeat = 1.0
peer = {peer!r}
handshake = {handshake!r}

[link_check]
rounds = {rounds}
shape = {list(shape)}
dtype = "float32"
hold = {hold!r}
{data}"""


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in bytes, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak_memory(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/<pid>/clear_refs); False if not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# External node
# --------------------------------------------------------------------------------------------------------------


def build_external(opts) -> Target:
    import pytest

    if not (opts.target_key and opts.client_key and opts.party and opts.session):
        pytest.exit("--target needs --target-key, --client-key, --party and --session", returncode=2)
    if len(opts.client_key) != len(opts.party):
        pytest.exit("give one --party per --client-key, in the same order", returncode=2)
    server_public, _ = zmq.auth.load_certificate(opts.target_key)
    parties = {}
    for name, path in zip(opts.party, opts.client_key):
        public, secret = zmq.auth.load_certificate(path)
        if secret is None:
            pytest.exit(f"--client-key {path} holds no secret key", returncode=2)
        parties[name] = PartyKey(name, public, secret)
    doc = tomllib.loads(Path(opts.session).read_text())
    session = doc.get("session", doc)
    session = {k: session[k] for k in ("cut_widths", "batch_size", "window", "model")}
    run = opts.run or doc.get("run")
    if not run:
        pytest.exit("the --session file needs a top-level `run` (or pass --run)", returncode=2)
    limits = dict(DEFAULT_LIMITS)
    limits.update(doc.get("limits", {}))
    timeouts = doc.get("timeouts", {})
    link = doc.get("link_check", {}).get("shape") if "session" in doc else None
    return Target(
        address=opts.target,
        server_public=server_public,
        run=run,
        session=session,
        limits=limits,
        parties=parties,
        lh_party=doc.get("party") if "session" in doc else None,
        heartbeat_ms=int(timeouts["heartbeat"] * 1000) if "heartbeat" in timeouts else None,
        peer_timeout_ms=int(timeouts["peer"] * 1000) if "peer" in timeouts else None,
        external=True,
        # without the node's [link_check] the kit knows only a lower bound of L (the node's default shape counts too)
        largest_message=largest_message(session, link, doc.get("psi", {}).get("chunk_size", 65536)),
        largest_exact=link is not None,
    )
