"""Segment chains (PROTOCOL.md section 13): the kit's scripted neighbours of a live node in a chain.

One session shape for every chain test: ``dh1 -> seg1 -> bank`` and ``dh2 -> bank``, so there is a party behind a
segment holder (dh1), one that feeds the label holder directly (dh2), and a segment holder that feeds it directly
(seg1). A test starts ONE real node of it (the segment holder, the label holder or dh1) and plays its neighbours with
raw sockets: a ROUTER bound where the node connects (``RawLabelHolder`` of ``test_data_holder``, a CURVE server
with the key the node pins), DEALERs (``peer.Peer``) that connect where it binds. Relays are built and checked
with the kit's own [C3] implementation (``relay.py``) from the keys the kit generated.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np
import zmq

from .peer import DOWN_OF_HOP, UP_OF_HOP, Msg, Peer, config_digest, envelope, routing_id
from .relay import UP, Channel, int64, relay_key
from .target import PartyKey, _toml_str, free_port, make_keys, node_command, start_node, stop_node
from .test_data_holder import RawLabelHolder

LH, SEG, DH1, DH2 = "bank", "seg1", "dh1", "dh2"
RUN = "conformance-chain"
MODEL = "conformance-chain-v1"
BATCH, WINDOW, WIDTH = 4, 2, 4
SESSION = {
    "cut_widths": {DH1: WIDTH, DH2: WIDTH},
    "batch_size": BATCH,
    "window": WINDOW,
    "model": MODEL,
    "psi": True,
    "train": True,
    "segments": {SEG: {"inputs": [DH1], "width": WIDTH, "combine": "concat"}},
}
N_IDS = 40
PEER_TIMEOUT_S = 120.0  # longer than any test: a scripted neighbour that is quiet must not be declared lost


def _session_toml() -> str:
    seg = SESSION["segments"][SEG]
    return f"""[session]
batch_size = {BATCH}
window = {WINDOW}
model = {_toml_str(MODEL)}
psi = true
train = true
[session.cut_widths]
{DH1} = {WIDTH}
{DH2} = {WIDTH}
[session.segments.{SEG}]
inputs = [{_toml_str(DH1)}]
width = {seg['width']}
combine = "concat"
[timeouts]
heartbeat = 1.0
peer = {PEER_TIMEOUT_S!r}
join = 3600.0
"""


def node_toml(role: str, party: str, *, endpoint: str, partners: list[str], bind: Optional[str] = None,
              body: str = "") -> str:
    head = [f"role = {_toml_str(role)}", f"party = {_toml_str(party)}", f"run = {_toml_str(RUN)}",
            f"endpoint = {_toml_str(endpoint)}"]
    if bind:
        head.append(f"bind = {_toml_str(bind)}")
    partners_toml = "\n".join(f"{_toml_str(p)} = \"keys/{p}.key\"" for p in partners)
    return "\n".join(head) + f"""

[keys]
secret = "keys/{party}.key_secret"
[keys.partners]
{partners_toml}

{_session_toml()}{body}"""


class ChainNode:
    """One real node of the chain session in ``workdir`` (keys for every party, its config, its process)."""

    def __init__(self, workdir: Path, node_cmd: Optional[str], keys: Optional[dict[str, PartyKey]] = None,
                 name: str = "node"):
        """``keys``: the key pairs of another node in the same ``workdir`` (several real nodes of one session)."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.keys: dict[str, PartyKey] = keys or make_keys(workdir / "keys", [LH, SEG, DH1, DH2])
        self.node_cmd = node_cmd
        self.proc: Optional[subprocess.Popen] = None
        self.log = workdir / f"{name}.log"

    def relay_key(self, party: str) -> bytes:
        """The relay key of ``party`` and the label holder, computed at the party's end ([C3])."""
        return relay_key(self.keys[party].secret, self.keys[LH].public, run=RUN, party=party, label_holder=LH)

    def relay_key_at_lh(self, party: str) -> bytes:
        return relay_key(self.keys[LH].secret, self.keys[party].public, run=RUN, party=party, label_holder=LH)

    def start(self, role: str, party: str, config: str) -> None:
        path = self.workdir / f"{party}.toml"
        path.write_text(config)
        self.proc = start_node(node_command(self.node_cmd, path), self.log, self.workdir)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_node(self.proc, grace=5.0)

    def dealer(self, ctx: zmq.Context, address: str, server: str, party: str, rid: Optional[bytes] = None) -> Peer:
        """A DEALER with ``party``'s key (routing id ``rid``, else a fresh one of ``party``, [S1]) connected to the
        node at ``address`` whose CURVE server key is ``server``'s; it may receive what a chain node sends upstream."""
        key = self.keys[party]
        rid = rid or routing_id(party)
        p = Peer(ctx, address, server_public=self.keys[server].public, public=key.public, secret=key.secret,
                 routing_id=rid, label=f"{party} {rid.decode()}")
        p.allowed_types = DOWN_OF_HOP
        p.party = party  # type: ignore[attr-defined]
        return p


# ----------------------------------------------------------------------------------------------------------------
# A live segment holder between a scripted label holder and scripted inputs


class SegmentHolderEnv(ChainNode):
    """A real segment holder ``seg1``: its downstream is the kit's ROUTER (bound with the label holder's key), its
    bind the kit's inputs connect to."""

    def __init__(self, workdir: Path, node_cmd: Optional[str], ctx: zmq.Context):
        super().__init__(workdir, node_cmd)
        self.ctx = ctx
        self.lh = RawLabelHolder(ctx, self.keys[LH], allowed_types=UP_OF_HOP)
        self.bind = f"tcp://127.0.0.1:{free_port()}"
        self.inputs: list[Peer] = []
        self.start("segment_holder", SEG, node_toml(
            "segment_holder", SEG, endpoint=f"tcp://127.0.0.1:{self.lh.port}", bind=self.bind,
            partners=[DH1, LH], body='[model]\nsegment = {widths = [4]}\n[train]\noutput = "m"\n'
                                     "[link_check]\nrounds = 0\n"))
        self.hello: Optional[Msg] = None

    def welcome(self, **over) -> None:
        fields = {"version": [1, 10], "party": LH, "run": RUN, "digest": config_digest(SESSION),
                  "heartbeat_ms": 1000, "peer_timeout_ms": int(PEER_TIMEOUT_S * 1000),
                  "data_holders": sorted(SESSION["cut_widths"]), "instance": "ab" * 16}
        fields.update(over)
        self.lh.send(envelope("WELCOME", {k: v for k, v in fields.items() if v is not None}))

    def join(self, timeout: float = 60.0) -> Msg:
        """HELLO from the segment holder, WELCOME from the kit. Returns its HELLO."""
        self.hello = self.lh.recv(timeout)
        assert self.hello is not None, f"no HELLO from the segment holder within {timeout} s\n{self.log_text()[-3000:]}"
        self.welcome()
        return self.hello

    def schedule(self, rows: Optional[int] = 16, n_val: int = 4) -> None:
        """SCHEDULE (rows: the aligned row count, [C5]) and EPOCH 0: steps 0.. of BATCH rows each."""
        fields = {"epochs": 1, "first_epoch": 0, "first_step": 0}
        if rows is not None:
            fields["rows"] = rows
        n = rows or 16
        self.lh.send(envelope("SCHEDULE", fields, [("validation", int64(range(n - n_val, n)))]))
        if rows is not None:
            self.lh.send(envelope("EPOCH", {"epoch": 0, "first_step": 0}, [("order", int64(range(n - n_val)))]))

    def input(self, party: str = DH1, rid: Optional[bytes] = None) -> Peer:
        """A DEALER with ``party``'s key connected to the segment holder's bind ([C1]: pinning seg1's key)."""
        p = self.dealer(self.ctx, self.bind, SEG, party, rid)
        self.inputs.append(p)
        return p

    def up_channel(self, p: Peer, party: Optional[str] = None) -> Channel:
        """The relayed session of ``party`` (default: the input's own) on ``p``'s connection, the party's end."""
        party = party or p.party  # type: ignore[attr-defined]
        return Channel(self.relay_key(party), RUN, party, p.routing_id.decode(), UP)

    def close(self) -> None:
        for p in self.inputs:
            p.close()
        self.stop()
        self.lh.close()


def hello_fields(party: str, role: str = "data_holder") -> dict:
    return {"version": [1, 10], "role": role, "party": party, "run": RUN, "config": SESSION,
            "digest": config_digest(SESSION)}


def lh_welcome_for(party: str) -> list[bytes]:
    """The label holder's WELCOME to a data holder of the chain session."""
    return envelope("WELCOME", {"version": [1, 10], "party": LH, "run": RUN, "digest": config_digest(SESSION),
                                "heartbeat_ms": 1000, "peer_timeout_ms": 120000,
                                "data_holders": sorted(SESSION["cut_widths"]), "psi_nonce": "cd" * 16})


def activations(rows: int = BATCH, width: int = WIDTH, dtype="<f4") -> np.ndarray:
    return (np.arange(rows * width, dtype=dtype).reshape(rows, width) / 10).astype(dtype)


def wait_for(pred, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ----------------------------------------------------------------------------------------------------------------
# A live label holder with a scripted segment holder feeding it


class LabelHolderEnv(ChainNode):
    """A real label holder ``bank`` of the chain session (its labels: ids 0..N_IDS-1), bound on a free port."""

    def __init__(self, workdir: Path, node_cmd: Optional[str], ctx: zmq.Context):
        super().__init__(workdir, node_cmd, name=LH)
        self.ctx = ctx
        (workdir / "bank.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(N_IDS)))
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.peers: list[Peer] = []
        self.start("label_holder", LH, node_toml(
            "label_holder", LH, endpoint=self.address, partners=[DH1, DH2, SEG],
            body='[data]\npath = "bank.csv"\nid_column = "id"\nlabel_column = "label"\nfeatures = []\n'
                 '[psi]\noutput = "bank-aligned.csv"\nworkers = 1\n[model]\ntop = {widths = [4, 1]}\n'
                 '[train]\ntask = "binary"\nepochs = 1\noutput = "m"\n'))

    def peer(self, party: str, rid: Optional[bytes] = None) -> Peer:
        """A DEALER with ``party``'s key connected to the label holder."""
        p = self.dealer(self.ctx, self.address, LH, party, rid)
        self.peers.append(p)
        return p

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.stop()


# ----------------------------------------------------------------------------------------------------------------
# A live data holder behind a scripted segment holder


DH_BODY = ('[data]\npath = "dh1.csv"\nid_column = "id"\n[psi]\noutput = "dh1-aligned.csv"\nworkers = 1\n'
           '[model]\nbottom = {widths = [4]}\n[train]\noutput = "m"\n'
           '[link_check]\nrounds = 1\nshape = [2, 3]\ndtype = "float32"\n')


class DataHolderEnv(ChainNode):
    """A real data holder (``dh1``: its downstream is the kit's ROUTER ``hop``, bound with seg1's key; ``dh2``: it
    connects to the label holder at ``endpoint``)."""

    def __init__(self, workdir: Path, node_cmd: Optional[str], ctx: zmq.Context, *, party: str = DH1,
                 endpoint: Optional[str] = None, keys: Optional[dict[str, PartyKey]] = None):
        super().__init__(workdir, node_cmd, keys, name=party)
        (workdir / f"{party}.csv").write_text("id,a,b\n" + "".join(f"{i},{i * 0.5},{i % 3}\n" for i in range(N_IDS)))
        self.hop = None
        if party == DH1:
            self.hop = RawLabelHolder(ctx, self.keys[SEG], allowed_types=UP_OF_HOP)
            endpoint = f"tcp://127.0.0.1:{self.hop.port}"
        self.start("data_holder", party, node_toml("data_holder", party, endpoint=endpoint,
                                                   partners=[SEG, LH] if party == DH1 else [LH],
                                                   body=DH_BODY.replace("dh1", party)))

    def close(self) -> None:
        self.stop()
        if self.hop is not None:
            self.hop.close()
