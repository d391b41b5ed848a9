"""The session config's ``privacy`` map (PROTOCOL.md §6), in memory: absent means none (every older digest stays),
present it is part of the digest, a peer's malformed map is its BAD_FIELD, and a different defence or parameter is a
CONFIG_MISMATCH whose diff names ``privacy.defence`` / ``privacy.<param>``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfl.privacy.spec import PrivacySpec
from vfl.protocol import ErrorCode, Hello, LabelHolderMachine, RemoteProtocolError, Send, SessionConfig, digest_of
from vfl.protocol import encode
from vfl.protocol.psi_phase import PsiPlan

RUN = "run-1"
BASE = dict(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True, train=True)
MARVELL = PrivacySpec.from_table({"defence": "marvell", "sumkl": 4.0})

#: the digest of BASE as every version before 1.5 computed it: a session without a defence must keep it
V14_DIGEST = digest_of({"cut_widths": {"alice": 8}, "batch_size": 32, "window": 1, "model": "m1", "psi": True,
                        "train": True})


def cfg(privacy: PrivacySpec = PrivacySpec(), **over) -> SessionConfig:
    return SessionConfig(**{**BASE, **over}, privacy=privacy)


def test_no_defence_is_absent_from_the_wire_and_keeps_the_digest():
    config = cfg()
    assert "privacy" not in config.to_wire()
    assert config.digest == V14_DIGEST
    assert SessionConfig(**BASE).digest == V14_DIGEST  # the default is none


def test_a_defence_is_on_the_wire_as_a_map_of_floats_and_changes_the_digest():
    config = cfg(MARVELL)
    assert config.to_wire()["privacy"] == {"defence": "marvell", "sumkl": 4.0}
    assert type(config.to_wire()["privacy"]["sumkl"]) is float
    assert config.digest != V14_DIGEST
    assert cfg(PrivacySpec.from_table({"defence": "marvell", "sumkl": 2})).digest != config.digest


SPECS = st.sampled_from([
    PrivacySpec(),
    PrivacySpec.from_table({"defence": "max_norm"}),
    MARVELL,
    PrivacySpec.from_table({"defence": "label_dp", "epsilon": 0.5}),
    PrivacySpec.from_table({"defence": "gradient_noise", "clip": 2.0, "sigma": 0.0}),
])


@given(SPECS)
def test_wire_round_trip(spec):
    config = cfg(spec)
    back = SessionConfig.from_wire(config.to_wire())
    assert back == config and back.privacy == spec and back.digest == config.digest


@pytest.mark.parametrize("privacy", [
    None,  # present but empty: absent is how "none" is said
    {"defence": "none"},
    "marvell",
    ["marvell", 4.0],
    {"sumkl": 4.0},  # no defence named
    {"defence": "rot13"},
    {"defence": "marvell"},  # its parameter missing: the wire carries every parameter
    {"defence": "marvell", "sumkl": "4"},
    {"defence": "marvell", "sumkl": True},
    {"defence": "marvell", "sumkl": -1.0},
    {"defence": "marvell", "sumkl": float("nan")},
    {"defence": "marvell", "sumkl": 4.0, "epsilon": 1.0},  # a key this defence does not take
    {"defence": "max_norm", "\x1b[31mred": 1.0},
])
def test_a_peers_malformed_privacy_map_is_BAD_FIELD_naming_the_field(privacy):
    wire = {**cfg().to_wire(), "privacy": privacy}
    with pytest.raises(RemoteProtocolError) as info:
        SessionConfig.from_wire(wire)
    assert info.value.code == ErrorCode.BAD_FIELD
    assert "HELLO.config.privacy" in info.value.detail
    assert "\x1b" not in info.value.detail  # a peer's text comes back escaped


def test_a_SessionConfig_refuses_a_privacy_that_is_not_a_spec():
    with pytest.raises(ValueError, match="privacy"):
        SessionConfig(**BASE, privacy={"defence": "marvell"})


def test_a_defence_needs_training():
    with pytest.raises(ValueError, match="needs train = true"):
        SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", privacy=MARVELL)
    wire = {**SessionConfig(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1").to_wire(),
            "privacy": MARVELL.to_wire()}
    with pytest.raises(RemoteProtocolError) as info:
        SessionConfig.from_wire(wire)
    assert info.value.code == ErrorCode.BAD_FIELD


# ------------------------------------------------------------------------------------------------ the handshake


def label_holder(config: SessionConfig) -> LabelHolderMachine:
    return LabelHolderMachine(party="bank", run=RUN, config=config, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                              join_timeout_s=60.0, psi=PsiPlan(items=[], engine=None))


def answer(lh: LabelHolderMachine, theirs: SessionConfig | dict):
    wire = theirs if isinstance(theirs, dict) else theirs.to_wire()
    hello = Hello(version=(1, 5), role="data_holder", party="alice", run=RUN, config=wire, digest=digest_of(wire))
    frames = [bytes(memoryview(f).cast("B")) for f in encode(hello)]
    (msg,) = [o.message for o in lh.receive(b"alice", "alice", frames, 0.0) if isinstance(o, Send)]
    return msg


@pytest.mark.parametrize("ours, theirs, diff", [
    (MARVELL, PrivacySpec(), {"privacy.defence": ["marvell", "none"], "privacy.sumkl": [4.0, "<missing>"]}),
    (PrivacySpec(), MARVELL, {"privacy.defence": ["none", "marvell"], "privacy.sumkl": ["<missing>", 4.0]}),
    (MARVELL, PrivacySpec.from_table({"defence": "marvell", "sumkl": 1.0}), {"privacy.sumkl": [4.0, 1.0]}),
    (MARVELL, PrivacySpec.from_table({"defence": "max_norm"}),
     {"privacy.defence": ["marvell", "max_norm"], "privacy.sumkl": [4.0, "<missing>"]}),
])
def test_a_different_defence_or_parameter_is_CONFIG_MISMATCH_naming_it(ours, theirs, diff):
    err = answer(label_holder(cfg(ours)), cfg(theirs))
    assert err.code == ErrorCode.CONFIG_MISMATCH
    assert err.diff == diff
    first = next(iter(diff))
    assert f"{first}: label holder has {diff[first][0]!r}, data holder has {diff[first][1]!r}" in err.message


def test_the_same_defence_is_welcomed():
    assert answer(label_holder(cfg(MARVELL)), cfg(MARVELL)).TYPE == "WELCOME"


def test_a_peers_garbage_privacy_in_its_hello_is_BAD_FIELD():
    wire = {**cfg().to_wire(), "privacy": {"defence": "marvell", "sumkl": "lots"}}
    err = answer(label_holder(cfg(MARVELL)), wire)
    assert err.code == ErrorCode.BAD_FIELD and "privacy" in err.message
