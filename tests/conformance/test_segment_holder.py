"""A live segment holder (PROTOCOL.md section 13, v1.10) between the kit's scripted label holder and inputs.

The node under test is ``vfl node --config seg1.toml`` (or ``--node-cmd``): segment holder ``seg1`` with one input,
``dh1``, in the session ``dh1 -> seg1 -> bank``, ``dh2 -> bank``. The kit binds a ROUTER with the label holder's key
where seg1 connects (the scripted label holder) and connects DEALERs with dh1's key to seg1's bind (the scripted
inputs); relays are built and checked with the kit's own [C3] code. Tests that end the session take a segment holder
of their own from a pool started at once (the node's start-up is mostly imports); the others share one.
"""

from __future__ import annotations

import random
import re
from typing import Optional

import numpy as np
import pytest

from . import cases as C
from .chain import (
    BATCH, DH1, DH2, LH, RUN, SEG, SESSION, WIDTH, SegmentHolderEnv, activations, hello_fields, lh_welcome_for,
)
from .peer import CODE_NAMES, CODES, PACER, Msg, Peer, config_digest, envelope, pack, routing_id
from .relay import DOWN, Channel, int64

T = 5.0  # how long to wait for an answer that must come (the node may be busy with its neighbours' start-up)
QUIET = 0.4  # how long to listen for an answer that must not come
POOL = 12  # the segment holders this module starts: one shared, one for each test that trains or ends its session
AHEAD = 4


class Pool:
    """Segment holders started ``AHEAD`` of the tests that take them, so one starts while the others run."""

    def __init__(self, tmp_path_factory, node_cmd, ctx):
        self.make = lambda: SegmentHolderEnv(tmp_path_factory.mktemp("vfl-seg"), node_cmd, ctx)
        self.envs = [self.make() for _ in range(AHEAD)]
        self.taken = 0
        self.shared: Optional[SegmentHolderEnv] = None

    def take(self) -> SegmentHolderEnv:
        assert self.taken < POOL, "the segment holder pool is too small: raise POOL"
        env = self.envs[self.taken]
        self.taken += 1
        if len(self.envs) < POOL:
            self.envs.append(self.make())
        return env

    def close(self) -> None:
        for env in self.envs:
            env.close()


@pytest.fixture(scope="module")
def pool(request, tmp_path_factory, ctx):
    opts = request.config.option
    if opts.target and not opts.node_cmd:
        pytest.skip("segment holder tests start a segment holder: give --node-cmd to test another implementation's")
    p = Pool(tmp_path_factory, opts.node_cmd, ctx)
    yield p
    p.close()


@pytest.fixture(scope="module")
def seg(pool) -> SegmentHolderEnv:
    """The shared segment holder: joined, never trained, its session never ended by a test."""
    env = pool.shared = pool.take()
    env.join()
    return env


@pytest.fixture
def own(pool) -> SegmentHolderEnv:
    """A segment holder of the test's own (the test may end its session)."""
    return pool.take()


@pytest.fixture(autouse=True)
def _seg_alive(pool):
    yield
    env = pool.shared
    if env is not None and env.proc.poll() is not None:
            pytest.fail(f"[R1] the shared segment holder exited with {env.proc.returncode}\n{env.log_text()[-3000:]}",
                        pytrace=False)


# ----------------------------------------------------------------------------------------------------------------
# helpers


class Input:
    """One connection of input dh1 with its relayed session: ``up`` at dh1's end, ``down`` at the label holder's."""

    def __init__(self, env: SegmentHolderEnv, peer: Peer):
        self.env, self.peer = env, peer
        self.up = env.up_channel(peer)
        self.down = Channel(env.relay_key_at_lh(DH1), RUN, DH1, peer.routing_id.decode(), DOWN)

    @property
    def conn(self) -> str:
        return self.peer.routing_id.decode()

    def relay_up(self, inner: list[bytes]) -> list[bytes]:
        frames = self.up.wrap(inner)
        self.peer.send_raw(frames, pace=False)
        return frames

    def arrives_down(self, what: str) -> list[bytes]:
        """The next message at the scripted label holder is this connection's next RELAY; its inner frames."""
        m = self.env.lh.recv(T)
        assert m is not None, f"{what}: nothing reached the label holder within {T} s\n{self.env.log_text()[-2000:]}"
        return self.down.check(m, what)

    def relay_down(self, inner: list[bytes]) -> list[bytes]:
        frames = self.down.wrap(inner)
        self.env.lh.send(frames)
        return frames

    def arrives_up(self, what: str) -> list[bytes]:
        m = self.peer.recv_app(T)
        assert m is not None, f"{what}: nothing reached the input within {T} s\n{self.peer.history()}"
        return self.up.check(m, what)


def open_input(env: SegmentHolderEnv, what: str = "") -> Input:
    """A new connection of dh1 that says HELLO through the segment holder ([C4]: it becomes dh1's current one) and
    gets its WELCOME back through it."""
    q = Input(env, env.input(DH1))
    q.relay_up(envelope("HELLO", hello_fields(DH1)))
    inner = q.arrives_down(f"{what}: dh1's relayed HELLO")
    assert msg_type(inner) == "HELLO"
    q.relay_down(lh_welcome_for(DH1))
    assert msg_type(q.arrives_up(f"{what}: dh1's relayed WELCOME")) == "WELCOME"
    return q


def msg_type(frames: list[bytes]) -> Optional[str]:
    import msgpack

    return msgpack.unpackb(frames[1], raw=False, strict_map_key=False).get("type")


def lh_nothing(env: SegmentHolderEnv, what: str, duration: float = QUIET) -> None:
    m = env.lh.recv(duration)
    assert m is None, f"{what}: the segment holder sent downstream {m.summary()}"


def train(env: SegmentHolderEnv, q: Input, what: str) -> None:
    """The segment holder's SCHEDULE (rows 16: 12 training rows, 3 steps of 4; 4 for validation) and EPOCH 0, then
    the same for dh1, relayed through it: from then on dh1's FORWARDs are its segment's input ([C7])."""
    env.schedule()
    for inner in (envelope("SCHEDULE", {"epochs": 1, "first_epoch": 0, "first_step": 0, "rows": 16},
                           [("validation", int64(range(12, 16)))]),
                  envelope("EPOCH", {"epoch": 0, "first_step": 0}, [("order", int64(range(12)))])):
        q.relay_down(inner)
        assert msg_type(q.arrives_up(what)) == msg_type(inner)


def ended(env: SegmentHolderEnv, what: str) -> None:
    """[C7]: the segment holder ends its session: BYE {ok: false} downstream, exit 1."""
    bye = env.lh.expect("BYE", T, f"{what}: BYE downstream")
    assert bye.get("ok") is False, f"{what}: expected BYE {{ok: false}}, got {bye.summary()}"
    rc = env.wait(15.0)
    assert rc == 1, f"{what}: the segment holder must exit 1, got {rc}\n{env.log_text()[-3000:]}"


# ----------------------------------------------------------------------------------------------------------------
# [C5] its own session


def test_C5_segment_holder_says_HELLO_with_role_segment_holder(seg):
    """[C5], [S1], [S2]: the segment holder's first message downstream is HELLO with role segment_holder, its own
    party and run, version [1, 10], the session config (with `segments`) and its section 6 digest, on a routing id
    `seg1/<16 hex>`."""
    h = seg.hello
    assert re.fullmatch(rb"seg1/[0-9a-f]{16}", seg.lh.got[0][0]), f"[S1] routing id {seg.lh.got[0][0]!r}"
    assert seg.lh.got[0][1].type == "HELLO", "[S2] the first message must be HELLO"
    assert h.get("role") == "segment_holder", f"[C5] HELLO.role must be 'segment_holder': {h.summary()}"
    assert h.get("party") == SEG and h.get("run") == RUN and h.get("version") == [1, 10], h.summary()
    assert h.get("config") == SESSION, f"HELLO.config {h.get('config')} is not the session config {SESSION}"
    assert h.get("digest") == config_digest(SESSION)


def test_C5_segment_holder_refuses_a_WELCOME_with_psi_nonce(own):
    """[C5] / [W1]: a segment holder runs no PSI, so a WELCOME with psi_nonce gets ERROR BAD_FIELD naming it, then
    BYE {ok: false}, exit 1."""
    own.lh.recv(60.0)  # its HELLO
    own.welcome(psi_nonce="ab" * 16)
    err = own.lh.expect("ERROR", T, "[C5] answer to a WELCOME with psi_nonce")
    assert err.get("code") == CODES["BAD_FIELD"] and "psi_nonce" in err.get("message"), err.summary()
    ended(own, "[C5] psi_nonce")


def test_C5_segment_holder_refuses_a_SCHEDULE_without_rows(own):
    """[C5]: in a session with segment holders SCHEDULE carries rows; a segment holder answers one without it with
    ERROR BAD_FIELD and ends the session (BYE {ok: false}, exit 1)."""
    own.join()
    own.schedule(rows=None)
    err = own.lh.expect("ERROR", T, "[C5] answer to a SCHEDULE without rows")
    assert err.get("code") == CODES["BAD_FIELD"] and "rows" in err.get("message"), err.summary()
    ended(own, "[C5] SCHEDULE without rows")


def test_C5_segment_holder_checks_EPOCH_positions_against_rows(own):
    """[C5]: the positions of SCHEDULE and EPOCH are checked against rows: an EPOCH whose order names row 16 of 16
    aligned rows gets an ERROR (BAD_TENSOR, as a data holder answers it) and ends the session."""
    own.join()
    own.lh.send(envelope("SCHEDULE", {"epochs": 1, "first_epoch": 0, "first_step": 0, "rows": 16},
                         [("validation", int64(range(12, 16)))]))
    own.lh.send(envelope("EPOCH", {"epoch": 0, "first_step": 0}, [("order", int64([*range(11), 16]))]))
    err = own.lh.expect("ERROR", T, "[C5] answer to an EPOCH beyond rows")
    assert err.get("code") == CODES["BAD_TENSOR"], err.summary()
    ended(own, "[C5] EPOCH beyond rows")


# ----------------------------------------------------------------------------------------------------------------
# [C4] relays pass unchanged; nothing else from an input


def test_C4_an_inputs_RELAY_goes_downstream_unchanged(seg):
    """[C4]: a RELAY of the input itself is forwarded downstream with the same party, conn, seq and mac and the same
    tensors (names, dtypes, shapes, bytes), so its MAC still verifies at the label holder ([C3]); an unknown header
    key may be dropped, nothing else changes."""
    q = open_input(seg, "[C4]")
    inner = envelope("ECHO", {"seq": 77}, [("x", np.arange(6, dtype="<f8").reshape(2, 3)),
                                           ("y", np.array([1, 0, 1], dtype="?"))])
    sent = q.relay_up(inner)
    m = seg.lh.recv(T)
    assert m is not None, "[C4] the input's RELAY was not forwarded"
    import msgpack

    want = msgpack.unpackb(sent[1], raw=False)
    for k in ("party", "conn", "seq", "mac"):
        assert m.get(k) == want[k], f"[C4] RELAY.{k} changed on the way: {m.get(k)!r} != {want[k]!r}"
    assert [t[:3] for t in m.tensors] == [(d["name"], d["dtype"], d["shape"]) for d in want["tensors"]]
    assert [t[3] for t in m.tensors] == sent[2:], "[C4] the relayed bytes changed on the way"
    assert q.down.check(m, "[C4]") == inner


def test_C4_a_downstream_RELAY_goes_to_the_inputs_current_connection(seg):
    """[C4], [S5]: a relayed HELLO on a new connection of the input makes that one its current connection: a RELAY
    from downstream for the input goes there (not to the old one), and relays from the old connection are
    dropped."""
    old = open_input(seg, "[C4] old connection")
    new = open_input(seg, "[C4] new connection")
    new.relay_down(envelope("ECHO_REPLY", {"seq": 5}, [("z", np.arange(3, dtype="<i4"))]))
    got = new.arrives_up("[C4] downstream RELAY to the current connection")
    assert msg_type(got) == "ECHO_REPLY"
    old.peer.expect_nothing(QUIET, "[C4] the replaced connection must get nothing")
    old.relay_up(envelope("ECHO", {"seq": 1}))
    lh_nothing(seg, "[C4] a RELAY from the replaced connection must be dropped")
    new.relay_up(envelope("ECHO", {"seq": 2}))
    assert msg_type(new.arrives_down("[C4] the current connection is still forwarded")) == "ECHO"


def test_C4_a_downstream_RELAY_for_a_party_not_behind_it_goes_nowhere(seg):
    """[C4]: only a RELAY for a party behind the segment holder is sent upstream: one for dh2 (which feeds the label
    holder directly) or a stranger reaches no input, and the segment holder goes on."""
    q = open_input(seg, "[C4] downstream RELAY for another party")
    for party in (DH2, "mallory"):
        ch = Channel(seg.relay_key_at_lh(DH1), RUN, party, f"{party}/{'1' * 16}", DOWN)
        seg.lh.send(ch.wrap(envelope("ECHO_REPLY", {"seq": 1})))
    q.peer.expect_nothing(QUIET, "[C4] a RELAY for a party not behind the segment holder")
    q.relay_down(envelope("ECHO_REPLY", {"seq": 2}))
    assert msg_type(q.arrives_up("[C4] the input's own RELAY still arrives")) == "ECHO_REPLY"


@pytest.mark.parametrize("party", [DH2, SEG, LH, "mallory"])
def test_C4_a_RELAY_for_a_party_not_behind_the_input_is_IDENTITY_MISMATCH(seg, party):
    """[C4]: a RELAY whose party is neither the input nor behind it (a party feeding the label holder directly, the
    segment holder itself, the label holder, a stranger) gets ERROR IDENTITY_MISMATCH and is not forwarded, even
    with an authentic MAC of that party's relay key where the kit has one."""
    q = open_input(seg, "[C4]")
    if party in (DH2, SEG):
        ch = Channel(seg.relay_key(party), RUN, party, f"{party}/{'0' * 16}", "up")
        frames = ch.wrap(envelope("HELLO", hello_fields(party)))
    else:
        frames = q.up.wrap(envelope("ECHO", {"seq": 1}), advance=False)
        frames = [frames[0], pack({**_header(frames), "party": party}), *frames[2:]]
    q.peer.send_raw(frames)
    q.peer.expect_error("IDENTITY_MISMATCH", T, f"[C4] RELAY for {party}")
    lh_nothing(seg, f"[C4] a RELAY for {party} must not be forwarded")


def _header(frames: list[bytes]) -> dict:
    import msgpack

    return msgpack.unpackb(frames[1], raw=False)


PLAIN = {  # what an input must not send a segment holder in the clear (it goes as RELAY, or is not an input's)
    "HELLO": lambda: envelope("HELLO", hello_fields(DH1)),
    "HEARTBEAT": lambda: envelope("HEARTBEAT"),
    "ECHO": lambda: envelope("ECHO", {"seq": 1}),
    "BYE": lambda: envelope("BYE", {"ok": False, "reason": "conformance kit"}),
    "PSI_START": lambda: envelope("PSI_START", {"n_items": 10, "chunk_size": 10}),
    "CHECKPOINT_DONE": lambda: envelope("CHECKPOINT_DONE", {"step": 0, "digest": "0" * 64}),
    "ROLLBACK": lambda: envelope("ROLLBACK", {"step": 0}),
    "TRAINING_DONE": lambda: envelope("TRAINING_DONE", {"epochs": 1, "keep_step": 0, "keep_epoch": 0}),
    "BACKWARD": lambda: envelope("BACKWARD", {"step": 0}, [("gradient", activations())]),
    "WELCOME": lambda: lh_welcome_for(DH1),
}


@pytest.mark.parametrize("kind", list(PLAIN))
def test_C4_a_plain_message_of_an_input_is_UNEXPECTED_MESSAGE(seg, kind):
    """[C4]: anything an input sends in the clear but FORWARD, EVAL_FORWARD and ERROR gets ERROR
    UNEXPECTED_MESSAGE (ref: its type) and goes nowhere; the input's relayed session goes on."""
    q = open_input(seg, f"[C4] {kind}")
    q.peer.send_raw(PLAIN[kind]())
    err = q.peer.expect_error("UNEXPECTED_MESSAGE", T, f"[C4] plain {kind} from an input")
    assert err.get("ref") in (None, kind), err.summary()
    lh_nothing(seg, f"[C4] a plain {kind} must not be forwarded")
    q.relay_up(envelope("ECHO", {"seq": 3}))
    assert msg_type(q.arrives_down(f"[C4] after a plain {kind}")) == "ECHO"


@pytest.mark.parametrize("kind", ["FORWARD", "EVAL_FORWARD"])
@pytest.mark.parametrize("connection", ["never_said_HELLO", "replaced"])
def test_C4_a_cut_layer_on_a_connection_that_is_not_current_is_UNEXPECTED_MESSAGE(seg, kind, connection):
    """[C4]: a FORWARD or EVAL_FORWARD on a connection of the input that has not said HELLO through the segment
    holder (or whose HELLO a newer connection's replaced) gets ERROR UNEXPECTED_MESSAGE, and the session goes on."""
    if connection == "never_said_HELLO":
        p = seg.input(DH1)
    else:
        p = open_input(seg, "[C4] old").peer
        open_input(seg, "[C4] new")
    fields = {"step": 0} if kind == "FORWARD" else {"epoch": 0, "batch": 0}
    p.send(kind, fields, [("activations", activations())])
    p.expect_error("UNEXPECTED_MESSAGE", T, f"[C4] {kind} on a connection that is not current")
    lh_nothing(seg, f"[C4] {kind} on a connection that is not current")
    assert seg.proc.poll() is None, "[C4] the session must go on"


S4_MESSAGES = {  # what dh1's key sends on a routing id of dh2 -> the answer ([M2]: an ERROR gets none)
    "relayed_HELLO": "IDENTITY_MISMATCH",
    "bad_signature": "IDENTITY_MISMATCH",
    "bad_header": "IDENTITY_MISMATCH",
    "ERROR": None,
    "malformed_ERROR": None,
}


@pytest.mark.parametrize("which", list(S4_MESSAGES))
def test_S4_a_routing_id_of_another_party_is_IDENTITY_MISMATCH_whatever_else_is_wrong(seg, which):
    """[S4] on the segment holder's input side (section 2: [S3]-[S5] apply there): a message on a routing id whose
    party is not the one its key belongs to gets ERROR IDENTITY_MISMATCH, before a section 3 failure is answered;
    an ERROR (well-formed or not) gets nothing ([M2])."""
    p = seg.input(DH1, rid=routing_id(DH2))  # dh1's key, dh2's routing id (fresh: libzmq ignores one in use)
    q = Input(seg, p)
    frames = {
        "relayed_HELLO": lambda: q.up.wrap(envelope("HELLO", hello_fields(DH1))),
        "bad_signature": lambda: [b"XXXXX", b"\xc1"],
        "bad_header": lambda: [b"VFL/1", b"\xc1"],
        "ERROR": lambda: envelope("ERROR", {"code": 6, "message": "conformance kit"}),
        "malformed_ERROR": lambda: [b"VFL/1", pack({"type": "ERROR", "code": "6", "message": "x"})],
    }[which]()
    p.send_raw(frames)
    if S4_MESSAGES[which] is None:
        p.send_raw(envelope("HEARTBEAT"))  # the probe: its IDENTITY_MISMATCH must be the first answer
        err = p.expect_error("IDENTITY_MISMATCH", T, f"[M2] {which} on routing id dh2/...: only the probe is answered")
        assert err.get("ref") in (None, "HEARTBEAT"), f"[M2] {which} was answered: {err.summary()}"
    else:
        p.expect_error(S4_MESSAGES[which], T, f"[S4] {which} on routing id dh2/...")
    lh_nothing(seg, "[S4] nothing goes downstream")


# ----------------------------------------------------------------------------------------------------------------
# [E1], [M2], [R1] on the input side


E1_CASES = [c for group in (C.C1, C.C2, C.C3_VERSION, C.C3_SIGNATURE, C.C4, C.C5, C.C6, C.C7, C.C8, C.C9, C.C10,
                            C.C11, C.C12, C.C13, C.C14, C.ORDERING) for c in group if c.code is not None]


def test_E1_a_malformed_message_from_an_input_gets_the_code_of_its_first_failing_check(seg):
    """[E1] on the segment holder's input side: every catalogued malformed message (section 3 checks 1-14 and their
    order) from an input's current connection is answered with ERROR carrying the code of its first failing check;
    [M2]: a malformed ERROR gets nothing. Then the input's relayed session still passes ([R1])."""
    q = open_input(seg, "[E1]")
    ctx = C.Ctx(DH1, RUN, SESSION, {"max_header_bytes": 65536, "max_tensors": 64, "max_tensor_bytes": 268435456})
    problems = []
    for case in E1_CASES:
        q.peer.send_raw(case.build(ctx), pace=True)
        m = q.peer.recv_app(T)
        if m is None or m.type != "ERROR" or m.code != case.code:
            problems.append(f"{case.id}: expected ERROR {case.code} ({CODE_NAMES[case.code]}), "
                            f"got {m.summary() if m else 'nothing'}")
    for case in C.M2_MALFORMED_ERRORS:
        q.peer.send_raw(case.build(ctx), pace=True)
    q.relay_up(envelope("ECHO", {"seq": 9}))  # the probe: its RELAY is the next thing anyone hears
    q.peer.expect_nothing(QUIET, "[M2] a malformed ERROR must not be answered")
    assert msg_type(q.arrives_down("[R1] after the malformed messages")) == "ECHO"
    lh_nothing(seg, "[E1] nothing of the malformed messages goes downstream", 0.05)
    assert not problems, "[E1] on the input side:\n  " + "\n  ".join(problems)


def test_R1_garbage_from_an_input_never_stops_the_segment_holder(seg):
    """[R1]: 400 random multipart messages (random frame counts, lengths, bytes, and mutations of valid RELAYs and
    FORWARDs) from an input, unpaced; the segment holder stays up, forwards nothing of it, and still passes the
    input's next relay."""
    rng = random.Random(1017)
    q = open_input(seg, "[R1]")
    valid = [q.up.wrap(envelope("ECHO", {"seq": 1}), advance=False), envelope("FORWARD", {"step": 0},
                                                                           [("activations", activations())])]
    for _ in range(400):
        r = rng.random()
        if r < 0.4:
            frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 6))]
        else:
            frames = [bytearray(f) for f in rng.choice(valid)]
            f = rng.randrange(len(frames))
            if frames[f]:
                for _ in range(rng.randrange(1, 4)):
                    frames[f][rng.randrange(len(frames[f]))] = rng.randrange(256)
            frames = [bytes(x) for x in frames]
        q.peer.send_raw(frames, pace=False)
    PACER.drained(q.peer.pace_key)
    q.peer.drain(1.2)  # the answers (as many as its [R2] budget allows), and the budget refills
    assert seg.proc.poll() is None, f"[R1] the segment holder exited with {seg.proc.returncode}"
    q.relay_up(envelope("ECHO", {"seq": 4}))
    got = seg.lh.recv(T)
    assert got is not None and got.type == "RELAY", f"[R1] the input's relay after the garbage: {got and got.summary()}"
    # the mutated copies of a valid RELAY carry seq 1 of this connection: forwarded, they would still fail at the
    # label holder's MAC check ([C3]); what matters here is that the session goes on
    while got is not None and got.get("seq") != q.up.next_send - 1:
        got = seg.lh.recv(0.2)
    assert got is not None, "[R1] the input's relay after the garbage did not arrive"


# ----------------------------------------------------------------------------------------------------------------
# [C7] the input's FORWARDs are checked as the label holder checks them


def _fw(step: int, acts=None) -> tuple[str, dict, np.ndarray]:
    return "FORWARD", {"step": step}, activations() if acts is None else acts


C7_VIOLATIONS = {  # name -> (the input's cut-layer messages in order, the expected code)
    "out_of_order": ([_fw(1)], "UNEXPECTED_MESSAGE"),
    "beyond_the_window": ([_fw(0), _fw(1), _fw(2)], "UNEXPECTED_MESSAGE"),
    "wrong_width": ([_fw(0, activations(width=WIDTH + 1))], "BAD_TENSOR"),
    "wrong_rows": ([_fw(0, activations(rows=BATCH - 1))], "BAD_TENSOR"),
    "EVAL_FORWARD_outside_a_validation": ([("EVAL_FORWARD", {"epoch": 0, "batch": 0}, activations())],
                                          "UNEXPECTED_MESSAGE"),
}


@pytest.mark.parametrize("which", list(C7_VIOLATIONS))
def test_C7_a_bad_cut_layer_from_an_input_gets_ERROR_and_ends_the_session(own, which):
    """[C7] ([X2], [X5], [X6]): an input's FORWARD out of step order, beyond the window (2) or with a shape other
    than [len(batch), its width], or an EVAL_FORWARD before the input could be validating (the BACKWARD of the
    epoch's last step not sent to it), gets ERROR (UNEXPECTED_MESSAGE, BAD_TENSOR) to that input, and the segment
    holder ends its session: BYE {ok: false} downstream, exit 1. The FORWARDs before it are its segment's input:
    each one gives one FORWARD downstream of the segment's width."""
    forwards, code = C7_VIOLATIONS[which]
    own.join()
    q = open_input(own, f"[C7] {which}")
    train(own, q, f"[C7] {which}")
    for i, (kind, fields, acts) in enumerate(forwards):
        step = fields.get("step")
        q.peer.send(kind, fields, [("activations", acts)])
        if i < len(forwards) - 1:
            f = own.lh.expect("FORWARD", T, f"[C7] {which}: the segment holder's FORWARD {step}")
            assert f.get("step") == step and f.tensors[0][:3] == ("activations", "float32", [BATCH, WIDTH]), f.summary()
    q.peer.expect_error(code, T, f"[C7] {which}")
    ended(own, f"[C7] {which}")


def _forward(env: SegmentHolderEnv, q: Input, step: int, what: str) -> Msg:
    """dh1's FORWARD(step) in, the segment holder's FORWARD(step) of its segment's width out."""
    q.peer.send("FORWARD", {"step": step}, [("activations", activations())])
    f = env.lh.expect("FORWARD", T, f"{what}: the segment holder's FORWARD {step}")
    assert f.get("step") == step and f.tensors[0][:3] == ("activations", "float32", [BATCH, WIDTH]), f.summary()
    return f


def test_C7_a_BACKWARD_sends_each_input_its_gradient_before_what_comes_after_it(own):
    """[C7], [C6]: on BACKWARD(s) from downstream the segment holder sends its input BACKWARD(s) with the gradient
    of that input's cut layer (float32 [len(batch), its width], finite), and it sends it before it forwards the
    RELAY the label holder sent right after the BACKWARD (so dh1 has BACKWARD(k-1) before its CHECKPOINT k)."""
    own.join()
    q = open_input(own, "[C7] BACKWARD")
    train(own, q, "[C7] BACKWARD")
    _forward(own, q, 0, "[C7] BACKWARD")
    grad = np.full((BATCH, WIDTH), 0.25, dtype="<f4")
    own.lh.send(envelope("BACKWARD", {"step": 0}, [("gradient", grad)]))
    q.relay_down(envelope("CHECKPOINT", {"step": 1, "epoch": 0}))
    b = q.peer.expect("BACKWARD", T, "[C7] the input's BACKWARD(0)")
    assert b.get("step") == 0 and b.tensors[0][:3] == ("gradient", "float32", [BATCH, WIDTH]), b.summary()
    assert np.isfinite(np.frombuffer(b.tensors[0][3], dtype="<f4")).all()
    assert msg_type(q.arrives_up("[C6] the relayed CHECKPOINT after the BACKWARD")) == "CHECKPOINT"


def test_C7_after_a_ROLLBACK_an_inputs_stale_FORWARDs_are_dropped_until_it_echoes(own):
    """[C7]: after its own ROLLBACK the segment holder drops the input's FORWARDs of the abandoned pipeline (no
    ERROR, the session goes on) until the input echoes its ROLLBACK upward through it; after the new SCHEDULE the
    input's FORWARD(0) is its segment's input again."""
    own.join()
    q = open_input(own, "[C7] ROLLBACK")
    train(own, q, "[C7] ROLLBACK")
    _forward(own, q, 0, "[C7] ROLLBACK")
    own.lh.send(envelope("ROLLBACK", {"step": 0}))
    echo = own.lh.expect("ROLLBACK", T, "[X8] the segment holder's own ROLLBACK echo")
    assert echo.get("step") == 0
    q.relay_down(envelope("ROLLBACK", {"step": 0}))
    assert msg_type(q.arrives_up("[C7] the input's relayed ROLLBACK")) == "ROLLBACK"
    q.peer.send("FORWARD", {"step": 1}, [("activations", activations())])  # sent before it saw the ROLLBACK
    q.peer.expect_nothing(QUIET, "[C7] a stale FORWARD after ROLLBACK is dropped, not refused")
    lh_nothing(own, "[C7] a stale FORWARD after ROLLBACK", 0.05)
    assert own.proc.poll() is None, "[C7] a stale FORWARD must not end the session"
    q.relay_up(envelope("ROLLBACK", {"step": 0}))
    assert msg_type(q.arrives_down("[C7] the input's ROLLBACK echo, forwarded")) == "ROLLBACK"
    train(own, q, "[C7] the new pipeline")
    _forward(own, q, 0, "[C7] the new pipeline")


def test_C9_a_segment_holder_that_rejoins_downstream_closes_its_inputs_connections(own):
    """[C9], [J1]: when the label holder names another instance in a HEARTBEAT (it restarted), the segment holder
    rejoins on a fresh downstream connection (HELLO on a new routing id) and closes its inputs' connections, whose
    relayed sessions were lost with its own: the input's connection is dropped, and a RELAY for it from downstream
    goes nowhere until the input says HELLO again."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    own.join()
    first_rid = own.lh.rid
    q = open_input(own, "[C9]")
    monitor = q.peer.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        own.lh.send(envelope("HEARTBEAT", {"instance": "cd" * 16}))
        hello = own.lh.expect("HELLO", T, "[J1] the segment holder's HELLO after the label holder restarted")
        assert own.lh.rid != first_rid, f"[J1] the rejoin must come on a fresh connection: {own.lh.rid!r}"
        assert hello.get("role") == "segment_holder"
        assert monitor.poll(int(T * 1000)), "[C9] the input's connection was not closed"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        q.peer.sock.disable_monitor()
        monitor.close(linger=0)
    own.welcome(instance="cd" * 16)
    q.relay_down(envelope("ECHO_REPLY", {"seq": 1}))
    q.peer.expect_nothing(QUIET, "[C9] a RELAY for an input that has not said HELLO since the rejoin")
    again = open_input(own, "[C9] the input rejoins through it")
    assert again.peer is not q.peer
