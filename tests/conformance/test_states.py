"""Section 9: the label holder's per-data-holder state table ([T1]) and [R1] (refused/unexpected/malformed
messages change no state)."""

from __future__ import annotations

import numpy as np
import pytest

from . import cases as C
from .kit import next_key, next_seq
from .peer import CODES, SIGNATURE, config_digest, envelope, pack

U = CODES["UNEXPECTED_MESSAGE"]
MTYPES = ["HELLO", "ECHO", "HEARTBEAT", "BYE", "ERROR", "WELCOME", "ECHO_REPLY"]

# state -> message -> (answer, next state); answer: a type, an error code, or None (no answer)
IDLE_ROW = {
    "HELLO": ("WELCOME", "READY"),
    "ECHO": (U, "IDLE"),
    "HEARTBEAT": (U, "IDLE"),
    "BYE": (U, "IDLE"),
    "ERROR": (None, "IDLE"),
    "WELCOME": (U, "IDLE"),
    "ECHO_REPLY": (U, "IDLE"),
}
TABLE = {
    "IDLE": IDLE_ROW,
    "READY": {
        "HELLO": ("WELCOME", "READY"),
        "ECHO": ("ECHO_REPLY", "READY"),
        "HEARTBEAT": (None, "READY"),
        "BYE": (None, "DONE"),
        "ERROR": (None, "READY"),
        "WELCOME": (U, "READY"),
        "ECHO_REPLY": (U, "READY"),
    },
    "DONE": IDLE_ROW,  # "as in IDLE" / error UNEXPECTED_MESSAGE
}


def valid_message(kit, party: str, mtype: str, seq: int) -> list[bytes]:
    """A well-formed message of each type, as a data holder could send it."""
    t = [("x", np.arange(4, dtype=np.float32))]
    if mtype == "HELLO":
        return kit.hello_frames(party)
    if mtype == "ECHO":
        return envelope("ECHO", {"seq": seq}, t)
    if mtype == "HEARTBEAT":
        return envelope("HEARTBEAT")
    if mtype == "BYE":
        return envelope("BYE", {"ok": True, "reason": "conformance kit"})
    if mtype == "ERROR":
        return envelope("ERROR", {"code": CODES["BAD_FIELD"], "message": "conformance kit: a valid ERROR",
                                  "ref": "WELCOME"})
    if mtype == "WELCOME":
        return envelope("WELCOME", {"version": [1, 0], "party": party, "run": kit.target.run,
                                    "digest": "0" * 64, "heartbeat_ms": 1000, "peer_timeout_ms": 10000,
                                    "data_holders": [party]})
    if mtype == "ECHO_REPLY":
        return envelope("ECHO_REPLY", {"seq": seq}, t)
    raise ValueError(mtype)


@pytest.mark.parametrize("mtype", MTYPES)
@pytest.mark.parametrize("state", list(TABLE))
def test_T1_label_holder_state_table(kit, state, mtype):
    """[T1]: each message type in each state of the label holder's table gets the tabled answer and leaves the
    party in the tabled state. IDLE uses a party that never connected before (bundled node only; DONE, which
    behaves "as in IDLE", covers the row against an external node)."""
    answer, after = TABLE[state][mtype]
    if state == "IDLE":
        party = kit.target.pristine.get(mtype)
        if party is None:
            pytest.skip("needs a party that has never connected (only with the bundled node)")
        p = kit.peer(key=kit.target.parties[party])
    else:
        p = kit.peer(key=next_key(kit))
        kit.to_state(p, state, what=f"[T1] {state}")
    seq = next_seq()
    what = f"[T1] {mtype} in {state}"
    p.send_raw(valid_message(kit, p.party, mtype, seq), pace=answer == U)
    if mtype == "BYE":
        p.maybe_ready = False
    if answer == "WELCOME":
        kit.check_welcome(p.expect("WELCOME", kit.T, what))
    elif answer == "ECHO_REPLY":
        r = p.expect("ECHO_REPLY", kit.T, what)
        assert r.get("seq") == seq
    elif answer is not None:
        e = p.expect_error(answer, kit.T, what)
        ref = e.get("ref")
        assert ref is None or ref == mtype, f"{what}: ERROR.ref must name the answered type {mtype}, got {ref!r}"
    # [M2]/"—"/"→ DONE": no answer. The state probe below also proves that: its answer must come first.
    if after == "READY":
        kit.assert_ready(p, f"{what}: afterwards")
        kit.bye(p)
    else:
        kit.assert_not_ready(p, f"{what}: afterwards")


@pytest.mark.parametrize("refusal", ["V2", "H3_role", "H3_digest", "H3_config", "H4_run", "H4_config"])
def test_R1_refused_hello_in_READY_leaves_the_session_as_it_was(kit, refusal):
    """Table, READY row: "[H6] -> READY (a refused HELLO leaves the session as it was, [R1])": after the refusal
    the party is still READY (its ECHO is answered) and a valid HELLO restarts it as usual."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    bad_cfg = {**kit.session, "batch_size": "32"}
    over, code = {
        "V2": (dict(version=[2, 0]), "UNSUPPORTED_VERSION"),
        "H3_role": (dict(role="label_holder"), "BAD_FIELD"),
        "H3_digest": (dict(digest="0" * 64), "BAD_FIELD"),
        "H3_config": (dict(config=bad_cfg, digest=config_digest(bad_cfg)), "BAD_FIELD"),
        "H4_run": (dict(run=kit.target.run + "-other"), "CONFIG_MISMATCH"),
        "H4_config": (dict(config={**kit.session, "window": kit.session["window"] + 5}), "CONFIG_MISMATCH"),
    }[refusal]
    p.send_raw(kit.hello_frames(p.party, **over))
    p.expect_error(code, kit.T, f"refused HELLO ({refusal}) in READY")
    kit.assert_ready(p, f"[R1] after a refused HELLO ({refusal}) in READY")
    kit.handshake(p, what="valid HELLO after the refusal")
    kit.bye(p)


def test_S4_identity_mismatched_hello_in_READY_is_otherwise_ignored(kit):
    """[S4]/[R1]: "a HELLO whose party is not that id likewise" = answered IDENTITY_MISMATCH "and otherwise
    ignored": the READY session of the sender is untouched."""
    a, b = kit.target.distinct(2)
    p = kit.peer(key=a)
    kit.handshake(p)
    p.send_raw(kit.hello_frames(b.name))
    p.expect_error("IDENTITY_MISMATCH", kit.T, "HELLO with another party's id in READY")
    kit.assert_ready(p, "[S4] otherwise ignored")
    kit.bye(p)


# ----------------------------------------------------------------------------------------------------------------


MALFORMED_HELLOS = {
    "missing_run": lambda kit, party: [SIGNATURE, pack({k: v for k, v in {"type": "HELLO", **kit.hello_fields(party)}
                                                         .items() if k != "run"})],
    "version_bool": lambda kit, party: [SIGNATURE, pack({"type": "HELLO", **kit.hello_fields(party),
                                                         "version": [True, False]})],
    "with_tensor": lambda kit, party: [SIGNATURE, pack({"type": "HELLO", **kit.hello_fields(party),
                                                        "tensors": [C.d("a", "uint8", [1])]}), b"\x01"],
    "bad_signature": lambda kit, party: [b"VFL/X", pack({"type": "HELLO", **kit.hello_fields(party)})],
}


@pytest.mark.parametrize("which", list(MALFORMED_HELLOS))
def test_R1_malformed_HELLO_in_READY_changes_nothing(kit, which):
    """[R1]: a HELLO that fails section 3 is not a HELLO the handshake sees: the READY session stays."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    p.send_raw(MALFORMED_HELLOS[which](kit, p.party))
    e = p.recv_app(kit.T)
    assert e is not None and e.type == "ERROR", f"a malformed HELLO must get an ERROR, got {e and e.summary()}"
    kit.assert_ready(p, f"[R1] after a malformed HELLO ({which}) in READY")
    kit.bye(p)


def test_R1_unexpected_and_refused_messages_of_one_party_do_not_touch_another(kit):
    """[R1]: party A is READY; party B sends unexpected, malformed and refused messages; A's session is intact,
    and B is still not READY."""
    a, b = kit.target.distinct(2)
    pa = kit.peer(key=a)
    kit.handshake(pa)
    pb = kit.peer(key=b)
    for frames, code in [
        (envelope("ECHO", {"seq": 1}), "UNEXPECTED_MESSAGE"),
        (kit.hello_frames(b.name, run="nope"), "CONFIG_MISMATCH"),
        (kit.hello_frames(a.name), "IDENTITY_MISMATCH"),
        ([SIGNATURE, b"\xc1"], "BAD_HEADER"),
        (envelope("BYE", {"ok": False, "reason": "x"}), "UNEXPECTED_MESSAGE"),
    ]:
        pb.send_raw(frames)
        pb.expect_error(code, kit.T, f"from {b.name}")
    kit.assert_ready(pa, f"{a.name} after {b.name}'s refused messages")
    kit.assert_not_ready(pb, f"{b.name} after its refused messages")
    kit.bye(pa)


def test_R1_unexpected_messages_in_READY_keep_READY(kit):
    """[R1]: WELCOME and ECHO_REPLY in READY are errors that change nothing, even many in a row."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    for i in range(10):
        p.send_raw(valid_message(kit, p.party, "ECHO_REPLY" if i % 2 else "WELCOME", i))
        p.expect_error("UNEXPECTED_MESSAGE", kit.T, "unexpected in READY")
    kit.assert_ready(p, "[R1] after 10 unexpected messages")
    kit.bye(p)


def test_P3_PSI_START_in_a_session_without_PSI_is_UNEXPECTED_MESSAGE(kit):
    """[P3]: the bundled node's session has no `psi` flag, so a well-formed PSI_START in READY is refused and the
    session stays READY."""
    p = kit.peer()
    kit.handshake(p)
    p.send("PSI_START", {"n_items": 10, "chunk_size": 10})
    p.expect_error("UNEXPECTED_MESSAGE", kit.T, "[P3] PSI_START without psi in the session config")
    kit.assert_ready(p, "[R1] after the refused PSI_START")
    kit.close(p)
