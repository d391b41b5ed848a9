"""The session config's `segments` (PROTOCOL.md section 13): well-formedness, digests, and the topology queries every
node derives its neighbours from."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.protocol.chain import Chain, Segment
from vfl.protocol.errors import ErrorCode, RemoteProtocolError
from vfl.protocol.session import SessionConfig

WIDTHS = {"dh1": 4, "dh2": 4, "dh3": 3}


def config(segments=None, **kw) -> SessionConfig:
    base = dict(cut_widths=WIDTHS, batch_size=8, window=1, model="m", psi=True, train=True)
    base.update(kw)
    return SessionConfig(segments=segments or {}, **base)


def wire(segments) -> dict:
    return {**config().to_wire(), "segments": segments}


def test_a_config_without_segments_keeps_its_1_9_digest_and_wire():
    c = config()
    assert "segments" not in c.to_wire()
    assert c.digest == SessionConfig(cut_widths=WIDTHS, batch_size=8, window=1, model="m", psi=True,
                                     train=True).digest


def test_segments_round_trip_the_wire_and_change_the_digest():
    c = config({"s1": Segment(("dh2", "dh1"), 6), "s2": Segment(("s1", "dh3"), 5, "concat")})
    back = SessionConfig.from_wire(c.to_wire())
    assert back == c and back.digest == c.digest != config().digest
    assert back.segments["s1"].inputs == ("dh2", "dh1")  # the concatenation order is kept


@pytest.mark.parametrize("segments, why", [
    ({"dh1": {"inputs": ["dh2"], "width": 3, "combine": "concat"}}, "also a data holder"),
    ({"s1": {"inputs": ["nobody"], "width": 3, "combine": "concat"}}, "neither a data holder"),
    ({"s1": {"inputs": [], "width": 3, "combine": "concat"}}, "at least one"),
    ({"s1": {"inputs": ["dh1"], "width": 0, "combine": "concat"}}, "width"),
    ({"s1": {"inputs": ["dh1"], "width": True, "combine": "concat"}}, "width"),
    ({"s1": {"inputs": ["dh1"], "width": 3, "combine": "max"}}, "combine"),
    ({"s1": {"inputs": ["dh1", "dh3"], "width": 3, "combine": "sum"}}, "equal widths"),
    ({"s1": {"inputs": ["dh1"], "width": 3, "combine": "concat"},
      "s2": {"inputs": ["dh1"], "width": 3, "combine": "concat"}}, "both"),
    ({"s1": {"inputs": ["s2"], "width": 3, "combine": "concat"},
      "s2": {"inputs": ["s1"], "width": 3, "combine": "concat"}}, "cycle"),
    ({"s1": {"inputs": ["s1"], "width": 3, "combine": "concat"}}, "cycle"),
    ({"s1": {"inputs": ["dh1"], "width": 3}}, "exactly inputs, width and combine"),
    ({"s1": {"inputs": "dh1", "width": 3, "combine": "concat"}}, "list of party ids"),
    ({}, "non-empty"),
    ([], "non-empty"),
])
def test_H3_a_malformed_segments_map_is_bad_field(segments, why):
    with pytest.raises(RemoteProtocolError) as err:
        SessionConfig.from_wire(wire(segments))
    assert err.value.code == ErrorCode.BAD_FIELD and why in str(err.value), str(err.value)


def test_segments_need_train():
    with pytest.raises(ValueError, match="need train"):
        config({"s1": Segment(("dh1",), 3)}, train=False)


def test_the_topology_queries():
    chain = Chain(WIDTHS, {"s1": Segment(("dh1", "dh2"), 6), "s2": Segment(("s1",), 5)})
    assert chain.downstream("dh1") == "s1" and chain.downstream("s1") == "s2" and chain.downstream("s2") is None
    assert chain.downstream("dh3") is None
    assert chain.inputs(None) == ("dh3", "s2")  # the label holder's: every party that feeds no segment holder
    assert chain.input_widths(None) == {"dh3": 3, "s2": 5}
    assert chain.route("dh1") == ("s1", "s2") and chain.route("dh3") == ()
    assert chain.lh_hop("dh2") == "s2" and chain.lh_hop("dh3") == "dh3"
    assert chain.upstream("s2") == ("s1", "dh1", "dh2")
    assert chain.hop_towards("s2", "dh2") == "s1" and chain.hop_towards("s1", "dh3") is None
    assert chain.relayed("s1") and not chain.relayed("s2") and not chain.relayed("dh3")


@st.composite
def forests(draw):
    """A random valid chain: segment holders added one at a time, each fed by some parties nobody feeds yet."""
    free = list(WIDTHS)
    segments: dict[str, Segment] = {}
    for i in range(draw(st.integers(1, 4))):
        if not free:
            break
        k = draw(st.integers(1, len(free)))
        picked = draw(st.permutations(free))[:k]
        name = f"s{i}"
        segments[name] = Segment(tuple(picked), draw(st.integers(1, 9)))
        free = [p for p in free if p not in picked] + [name]
    return segments


@given(forests())
@settings(max_examples=60, deadline=None)
def test_every_party_of_a_valid_chain_reaches_the_label_holder_once(segments):
    c = config(segments)
    chain = c.chain
    assert SessionConfig.from_wire(c.to_wire()) == c
    roots = set(chain.inputs(None))
    for p in c.parties:
        route = chain.route(p)
        assert len(set(route)) == len(route) and p not in route  # no cycle
        assert chain.lh_hop(p) in roots
        for hop in route:
            assert p in chain.upstream(hop)
    # every party feeds exactly one place: a segment holder or the label holder
    fed = [p for s in segments.values() for p in s.inputs]
    assert sorted(fed + list(roots)) == sorted(c.parties)
