"""Section 6 (handshake [H1]-[H6]), section 4 [V2], section 2 [S1]/[S2]."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest

from .kit import next_key
from .peer import config_digest, pack


def test_S1_dealer_with_routing_id_completes_handshake(kit):
    """[S1]: a DEALER with ROUTING_ID = `<party id>/<16 hex>` connects to the label holder's ROUTER and is welcomed."""
    p = kit.peer("main")
    kit.handshake(p)
    kit.bye(p)


def test_S2_first_message_not_HELLO_is_unexpected(kit):
    """[S2]/[T1]: a new connection whose first message is ECHO (not HELLO) gets UNEXPECTED_MESSAGE; its HELLO
    afterwards still works."""
    p = kit.peer(key=next_key(kit))
    p.send("ECHO", {"seq": 1})
    p.expect_error("UNEXPECTED_MESSAGE", kit.T, "ECHO before HELLO")
    kit.handshake(p)
    kit.bye(p)


def test_H5_valid_hello_gets_WELCOME(kit):
    """[H5]: WELCOME with version [1, 0], the label holder's party, the run, the config digest, heartbeat_ms,
    peer_timeout_ms, data_holders (all checked in kit.check_welcome); then the peer is READY."""
    p = kit.peer("main")
    w = kit.handshake(p)
    assert w.get("version") == [1, 0], f"HELLO [1, 0] must get WELCOME version [1, 0], got {w.get('version')}"
    assert p.party in w.get("data_holders"), f"WELCOME data_holders {w.get('data_holders')} lacks {p.party}"
    kit.assert_ready(p, "[H5] after WELCOME")
    kit.bye(p)


def test_H5_higher_minor_version_is_negotiated_down(kit):
    """Section 4: the session runs at min(minor_dh, minor_lh); a v1.0 label holder answers [1, 7] with [1, m],
    m <= 7."""
    p = kit.peer(key=next_key(kit))
    w = kit.handshake(p, version=[1, 7])
    assert w.get("version")[0] == 1 and w.get("version")[1] <= 7
    kit.bye(p)


def test_H5_digest_is_canonical_so_config_key_order_does_not_matter(kit):
    """Section 6: the digest is over the canonical encoding (keys sorted); the HELLO's own map order is free."""
    cfg = kit.session
    rev = {k: cfg[k] for k in sorted(cfg, reverse=True)}
    rev["cut_widths"] = {k: cfg["cut_widths"][k] for k in sorted(cfg["cut_widths"], reverse=True)}
    p = kit.peer(key=next_key(kit))
    kit.handshake(p, config=rev, digest=config_digest(cfg), what="HELLO with reverse-ordered config maps")
    kit.bye(p)


# ----------------------------------------------------------------------------------------------------------------


def test_H6_second_hello_in_READY_restarts_the_session(kit):
    """[H6]: HELLO from a READY party (same connection) gets a fresh WELCOME; the party stays READY."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    kit.echo(p)
    kit.handshake(p, what="[H6] second HELLO")
    kit.assert_ready(p, "[H6] after the second WELCOME")
    kit.bye(p)


def test_H6_restarted_data_holder_on_a_new_connection(kit):
    """[H6] + [S5]: a data holder that restarts (new DEALER with a fresh routing id, same key, old socket still
    open) is welcomed again and served on the new connection; the old connection gets ERROR REPLACED."""
    key = next_key(kit)
    old = kit.peer(key=key)
    kit.handshake(old)
    new = kit.peer(key=key)
    kit.handshake(new, what="[H6] HELLO from the restarted data holder")
    old.expect_error("REPLACED", kit.T, "[S5] the replaced connection")
    kit.assert_ready(new, "[H6] restarted data holder")
    old.maybe_ready = False
    kit.bye(new)


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [[2, 0], [0, 1], [3, 7], [2**62, 0]], ids=lambda v: f"{v[0]}.{v[1]}"[:12])
def test_V2_hello_with_other_major_gets_UNSUPPORTED_VERSION(kit, version):
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, version=version))
    p.expect_error("UNSUPPORTED_VERSION", kit.T, f"[V2] HELLO version {version}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")
    kit.close(p)
    kit.assert_healthy("after [V2]")


@pytest.mark.parametrize("role", ["label_holder", "", "DATA_HOLDER", "data_holder "])
def test_H3_role_not_data_holder_gets_BAD_FIELD(kit, role):
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, role=role))
    p.expect_error("BAD_FIELD", kit.T, f"[H3] HELLO role {role!r}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


def _noncanonical_digest(cfg):
    rev = {k: cfg[k] for k in sorted(cfg, reverse=True)}
    return hashlib.sha256(pack(rev)).hexdigest()


BAD_DIGESTS = {
    "zeros": lambda cfg: "0" * 64,
    "uppercase": lambda cfg: config_digest(cfg).upper(),
    "truncated": lambda cfg: config_digest(cfg)[:63],
    "empty": lambda cfg: "",
    "of_unsorted_encoding": _noncanonical_digest,
    "sha1": lambda cfg: hashlib.sha1(pack({k: cfg[k] for k in sorted(cfg)})).hexdigest(),
    "of_other_config": lambda cfg: config_digest({**cfg, "batch_size": cfg["batch_size"] + 1}),
}


@pytest.mark.parametrize("bad", BAD_DIGESTS, ids=list(BAD_DIGESTS))
def test_H3_digest_not_of_own_config_gets_BAD_FIELD(kit, bad):
    p = kit.peer(key=next_key(kit))
    digest = BAD_DIGESTS[bad](kit.session)
    assert digest != config_digest(kit.session)
    p.send_raw(kit.hello_frames(p.party, digest=digest))
    p.expect_error("BAD_FIELD", kit.T, f"[H3] HELLO digest {bad}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


def _malformed_configs(cfg):
    first = sorted(cfg["cut_widths"])[0]
    out = {}
    for k in ("cut_widths", "batch_size", "window", "model"):
        out[f"missing_{k}"] = {kk: v for kk, v in cfg.items() if kk != k}
    out["batch_size_str"] = {**cfg, "batch_size": "32"}
    out["batch_size_bool"] = {**cfg, "batch_size": True}
    out["batch_size_negative"] = {**cfg, "batch_size": -32}
    out["batch_size_float"] = {**cfg, "batch_size": 32.0}
    out["window_nil"] = {**cfg, "window": None}
    out["model_int"] = {**cfg, "model": 5}
    out["cut_widths_list"] = {**cfg, "cut_widths": list(cfg["cut_widths"])}
    out["cut_width_str"] = {**cfg, "cut_widths": {**cfg["cut_widths"], first: "8"}}
    out["cut_width_bool"] = {**cfg, "cut_widths": {**cfg["cut_widths"], first: True}}
    out["cut_width_float"] = {**cfg, "cut_widths": {**cfg["cut_widths"], first: 8.0}}
    for name, privacy in _MALFORMED_PRIVACY.items():  # version 1.5: a hostile data holder's defence map
        out[f"privacy_{name}"] = {**cfg, "psi": True, "train": True, "privacy": privacy}
    return out


#: a session config's ``privacy`` map that is not well formed (section 6): each, in a config that trains, is
#: BAD_FIELD; ``test_H3_session_config_limits`` has the well-formed control (CONFIG_MISMATCH)
_MALFORMED_PRIVACY = {
    "nested": {"defence": "marvell", "sumkl": {"sumkl": {"sumkl": 4.0}}},
    "nested_defence": {"defence": {"defence": "marvell"}, "sumkl": 4.0},
    "huge_defence_name": {"defence": "m" * 20_000},
    "many_keys": {"defence": "marvell", "sumkl": 4.0, **{f"k{i}": 1.0 for i in range(2_000)}},
    "nan": {"defence": "marvell", "sumkl": float("nan")},
    "infinite": {"defence": "gradient_noise", "clip": float("inf"), "sigma": 1.0},
    "bool": {"defence": "label_dp", "epsilon": True},
    "unknown_defence": {"defence": "rot13"},
    "none_defence": {"defence": "none"},
    "not_a_map": ["marvell", 4.0],
    "empty": {},
}


@pytest.mark.parametrize("which", list(_malformed_configs({"cut_widths": {"a": 1}, "batch_size": 1, "window": 1,
                                                           "model": "m"})))
def test_H3_malformed_session_config_gets_BAD_FIELD(kit, which):
    """[H3]: a config that is not a well-formed session config (with its own, correct digest) gets BAD_FIELD."""
    cfg = _malformed_configs(copy.deepcopy(kit.session))[which]
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, config=cfg, digest=config_digest(cfg)))
    p.expect_error("BAD_FIELD", kit.T, f"[H3] HELLO config {which}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


# ----------------------------------------------------------------------------------------------------------------


def test_H2_hello_party_other_allow_listed_party_gets_IDENTITY_MISMATCH(kit):
    """[H2]/[S4]: the key (and routing id) of party A, HELLO party = B (another expected party)."""
    a, b = kit.target.distinct(2)
    p = kit.peer(key=a)
    p.send_raw(kit.hello_frames(b.name))
    p.expect_error("IDENTITY_MISMATCH", kit.T, f"[H2] HELLO party {b.name!r} from {a.name!r}'s key")
    kit.assert_not_ready(p, "[R1] sender after refused HELLO")
    q = kit.peer(key=b)
    kit.assert_not_ready(q, f"[S4] {b.name} must not have become READY")
    kit.close(p)
    kit.assert_healthy("after [H2]")


@pytest.mark.parametrize("party", ["nobody", "outsider", "UPPERCASE-OWN-ID"])
def test_H2_hello_party_not_the_key_identity_gets_IDENTITY_MISMATCH(kit, party):
    """[H2] is checked before [H1]: a party id that is not the authenticated one gets IDENTITY_MISMATCH even if
    it is unknown."""
    key = next_key(kit)
    if party == "UPPERCASE-OWN-ID":
        party = key.name.upper()
    p = kit.peer(key=key)
    p.send_raw(kit.hello_frames(party))
    p.expect_error("IDENTITY_MISMATCH", kit.T, f"[H2] HELLO party {party!r} from {key.name!r}'s key")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


def test_H1_allow_listed_party_outside_session_gets_UNKNOWN_PARTY(kit):
    """[H1]: a key on the allow-list whose party is not in cut_widths: HELLO (party = its own id) gets
    UNKNOWN_PARTY, also after a retry, and the node keeps serving."""
    o = kit.target.outsider
    if o is None:
        pytest.skip("needs an allow-listed key whose party is not in the session (only with the bundled node)")
    p = kit.peer(key=o)
    p.send_raw(kit.hello_frames(o.name))
    p.expect_error("UNKNOWN_PARTY", kit.T, "[H1] HELLO from an allow-listed party not in cut_widths")
    p.send_raw(kit.hello_frames(o.name))
    p.expect_error("UNKNOWN_PARTY", kit.T, "[H1] the same HELLO again")
    p.send("ECHO", {"seq": 1})
    p.expect_error("UNEXPECTED_MESSAGE", kit.T, "[T1] unknown party stays IDLE: ECHO is unexpected")
    kit.close(p)
    kit.assert_healthy("after [H1]")


# ----------------------------------------------------------------------------------------------------------------


def _paths(diff, *parts):
    """diff keys naming the field path ``parts`` (written a.b, a/b, a[b], ...)."""
    out = []
    for k in diff:
        toks = [t for t in re.split(r"[.\[\]/'\" ]+", str(k)) if t]
        if toks == list(parts):
            out.append(k)
    return out


def _assert_mismatch(err, expected: dict, lh_cfg: dict, dh_cfg: dict):
    """[H4]: message lists 'path: label holder has X, data holder has Y' for every differing field, and the diff
    map holds path -> [X, Y]. ``expected``: path tuple -> (lh value, dh value) (None: absent on that side)."""
    msg, diff = err.get("message"), err.get("diff")
    assert type(diff) is dict, f"[H4] CONFIG_MISMATCH must carry a diff map, got {diff!r}"
    used = set()
    for parts, (lh, dh) in expected.items():
        keys = _paths(diff, *parts)
        if not keys and parts[0] == "cut_widths" and _paths(diff, "cut_widths"):
            # accepted: the whole cut_widths map reported as one field
            keys = _paths(diff, "cut_widths")
            assert diff[keys[0]] == [lh_cfg["cut_widths"], dh_cfg["cut_widths"]], f"[H4] diff {diff}"
            used.update(keys)
            continue
        assert len(keys) == 1, f"[H4] diff must have one entry for {'.'.join(parts)}; diff = {diff}"
        k = keys[0]
        used.add(k)
        v = diff[k]
        assert type(v) is list and len(v) == 2, f"[H4] diff[{k!r}] must be [label holder's, data holder's]: {v!r}"
        if lh is not None:
            assert v[0] == lh, f"[H4] diff[{k!r}][0] must be the label holder's value {lh!r}, got {v[0]!r}"
        if dh is not None:
            assert v[1] == dh, f"[H4] diff[{k!r}][1] must be the data holder's value {dh!r}, got {v[1]!r}"
        m = re.search(re.escape(str(k)) + r": label holder has (.*?), data holder has (.*)", msg)
        assert m, f"[H4] message must list '{k}: label holder has X, data holder has Y'; message = {msg!r}"
        if lh is not None:
            assert str(lh) in msg.split(f"{k}: label holder has", 1)[1], f"[H4] message lacks {lh!r}: {msg!r}"
        if dh is not None:
            assert str(dh) in msg.split(f"{k}: label holder has", 1)[1], f"[H4] message lacks {dh!r}: {msg!r}"
    extra = set(diff) - used
    assert not extra, f"[H4] diff lists fields that do not differ: {extra}"


def _mismatches(kit):
    cfg = kit.session
    first = sorted(cfg["cut_widths"])[0]
    w = cfg["cut_widths"][first]
    drop = sorted(cfg["cut_widths"])[-1]
    run = kit.target.run
    return {
        "run": (run + "-other", cfg, {("run",): (run, run + "-other")}),
        "batch_size": (run, {**cfg, "batch_size": cfg["batch_size"] * 2},
                       {("batch_size",): (cfg["batch_size"], cfg["batch_size"] * 2)}),
        "window": (run, {**cfg, "window": cfg["window"] + 1}, {("window",): (cfg["window"], cfg["window"] + 1)}),
        "model": (run, {**cfg, "model": "other-model"}, {("model",): (cfg["model"], "other-model")}),
        "cut_width_value": (run, {**cfg, "cut_widths": {**cfg["cut_widths"], first: w + 1}},
                            {("cut_widths", first): (w, w + 1)}),
        "cut_widths_party_missing": (
            run, {**cfg, "cut_widths": {k: v for k, v in cfg["cut_widths"].items() if k != drop}},
            {("cut_widths", drop): (cfg["cut_widths"][drop], None)}),
        "cut_widths_extra_party": (run, {**cfg, "cut_widths": {**cfg["cut_widths"], "zz-extra": 4}},
                                   {("cut_widths", "zz-extra"): (None, 4)}),
        "everything": (run + "-x", {**cfg, "batch_size": cfg["batch_size"] + 1, "model": "m2",
                                    "cut_widths": {**cfg["cut_widths"], first: w + 2}},
                       {("run",): (run, run + "-x"), ("batch_size",): (cfg["batch_size"], cfg["batch_size"] + 1),
                        ("model",): (cfg["model"], "m2"), ("cut_widths", first): (w, w + 2)}),
    }


@pytest.mark.parametrize("which", ["run", "batch_size", "window", "model", "cut_width_value",
                                   "cut_widths_party_missing", "cut_widths_extra_party", "everything"])
def test_H4_config_mismatch_gets_CONFIG_MISMATCH_with_readable_diff(kit, which):
    run, cfg, expected = _mismatches(kit)[which]
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, run=run, config=cfg, digest=config_digest(cfg)))
    err = p.expect_error("CONFIG_MISMATCH", kit.T, f"[H4] {which}")
    _assert_mismatch(err, expected, kit.session, cfg)
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


# ----------------------------------------------------------------------------------------------------------------
# The order [V2], [H3], [H2], [H1], [H4]


def _order_cases(kit, key, other):
    cfg = kit.session
    bad_run = kit.target.run + "-other"
    return {
        "V2_before_H3": (dict(party=key.name, version=[2, 0], role="label_holder"), "UNSUPPORTED_VERSION"),
        "V2_before_H4": (dict(party=key.name, version=[2, 0], run=bad_run), "UNSUPPORTED_VERSION"),
        "H3_before_H2": (dict(party=other, role="label_holder"), "BAD_FIELD"),
        "H3_before_H4": (dict(party=key.name, run=bad_run, digest="0" * 64), "BAD_FIELD"),
        "H2_before_H1": (dict(party="nobody-such"), "IDENTITY_MISMATCH"),
        "H2_before_H4": (dict(party=other, run=bad_run), "IDENTITY_MISMATCH"),
        "H3_malformed_config_before_H4": (
            dict(party=key.name, run=bad_run, config={**cfg, "window": "2"},
                 digest=config_digest({**cfg, "window": "2"})), "BAD_FIELD"),
    }


@pytest.mark.parametrize("which", ["V2_before_H3", "V2_before_H4", "H3_before_H2", "H3_before_H4", "H2_before_H1",
                                   "H2_before_H4", "H3_malformed_config_before_H4"])
def test_V2_H3_H2_H1_H4_apply_in_this_order(kit, which):
    key = next_key(kit)
    other = next(n for n in sorted(kit.session["cut_widths"]) if n != key.name)
    over, code = _order_cases(kit, key, other)[which]
    party = over.pop("party")
    p = kit.peer(key=key)
    p.send_raw(kit.hello_frames(party, **over))
    p.expect_error(code, kit.T, f"HELLO check order: {which}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


def test_H1_before_H4_unknown_party_with_wrong_run(kit):
    o = kit.target.outsider
    if o is None:
        pytest.skip("needs an allow-listed key whose party is not in the session (only with the bundled node)")
    p = kit.peer(key=o)
    p.send_raw(kit.hello_frames(o.name, run=kit.target.run + "-other"))
    p.expect_error("UNKNOWN_PARTY", kit.T, "[H1] before [H4]")


# ----------------------------------------------------------------------------------------------------------------
# Section 6: the limits of a well-formed session config. Past a limit: BAD_FIELD ([H3]); at the limit the config is
# well formed, only not the label holder's: CONFIG_MISMATCH ([H4]).


def _parties(n: int) -> dict:
    return {f"p{i:02d}": 8 for i in range(n)}


def _limit_configs(cfg: dict) -> dict:
    first = sorted(cfg["cut_widths"])[0]
    cw = cfg["cut_widths"]
    return {  # name -> (config, expected code)
        "cut_widths_no_party": ({**cfg, "cut_widths": {}}, "BAD_FIELD"),
        "cut_widths_65_parties": ({**cfg, "cut_widths": _parties(65)}, "BAD_FIELD"),
        "cut_widths_64_parties": ({**cfg, "cut_widths": _parties(64)}, "CONFIG_MISMATCH"),
        "cut_widths_1_party": ({**cfg, "cut_widths": {first: cw[first]}}, "CONFIG_MISMATCH"),
        "cut_width_0": ({**cfg, "cut_widths": {**cw, first: 0}}, "BAD_FIELD"),
        "cut_width_1": ({**cfg, "cut_widths": {**cw, first: 1}}, "CONFIG_MISMATCH"),
        "cut_width_1048577": ({**cfg, "cut_widths": {**cw, first: 1_048_577}}, "BAD_FIELD"),
        "cut_width_1048576": ({**cfg, "cut_widths": {**cw, first: 1_048_576}}, "CONFIG_MISMATCH"),
        "cut_widths_party_not_an_id": ({**cfg, "cut_widths": {**cw, "bad/id": 8}}, "BAD_FIELD"),
        "cut_widths_party_65_chars": ({**cfg, "cut_widths": {**cw, "p" * 65: 8}}, "BAD_FIELD"),
        "model_empty": ({**cfg, "model": ""}, "BAD_FIELD"),
        "model_257_chars": ({**cfg, "model": "m" * 257}, "BAD_FIELD"),
        "model_256_chars": ({**cfg, "model": "m" * 256}, "CONFIG_MISMATCH"),
        "model_1_char": ({**cfg, "model": "m"}, "CONFIG_MISMATCH"),
        "batch_size_0": ({**cfg, "batch_size": 0}, "BAD_FIELD"),
        "window_0": ({**cfg, "window": 0}, "BAD_FIELD"),
        "batch_size_1": ({**cfg, "batch_size": 1}, "CONFIG_MISMATCH"),
        "psi_false": ({**cfg, "psi": False}, "BAD_FIELD"),
        "train_false": ({**cfg, "train": False}, "BAD_FIELD"),
        "psi_int": ({**cfg, "psi": 1}, "BAD_FIELD"),
        # 1.6: window "auto" with max_window 1..1024; max_window only with "auto"
        "window_auto": ({**cfg, "window": "auto", "max_window": 16}, "CONFIG_MISMATCH"),
        "window_auto_max_1024": ({**cfg, "window": "auto", "max_window": 1024}, "CONFIG_MISMATCH"),
        "window_auto_max_1025": ({**cfg, "window": "auto", "max_window": 1025}, "BAD_FIELD"),
        "window_auto_max_0": ({**cfg, "window": "auto", "max_window": 0}, "BAD_FIELD"),
        "window_other_string": ({**cfg, "window": "fast"}, "BAD_FIELD"),
        "max_window_with_a_fixed_window": ({**cfg, "max_window": 4}, "BAD_FIELD"),
        "privacy_well_formed": ({**cfg, "psi": True, "train": True, "privacy": {"defence": "marvell", "sumkl": 4.0}},
                                "CONFIG_MISMATCH"),
        "privacy_without_train": ({**cfg, "privacy": {"defence": "max_norm"}}, "BAD_FIELD"),
    }


@pytest.mark.parametrize("which", list(_limit_configs({"cut_widths": {"a": 1}, "batch_size": 1, "window": 1,
                                                       "model": "m"})))
def test_H3_session_config_limits(kit, which):
    """Section 6: cut_widths names 1 to 64 data holders (party ids), each width 1 to 1,048,576; batch_size and window
    at least 1; model 1 to 256 characters; psi and train, when present, true. Past a limit a HELLO (with its config's
    own digest) gets BAD_FIELD; at the limit, CONFIG_MISMATCH (well formed, but not the label holder's)."""
    cfg, code = _limit_configs(copy.deepcopy(kit.session))[which]
    if cfg == kit.session:
        pytest.skip("the target's own session config is at this limit")
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, config=cfg, digest=config_digest(cfg)))
    p.expect_error(code, kit.T, f"[H3]/[H4] HELLO config {which}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")
