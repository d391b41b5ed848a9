"""Capture test for the PSI phase: what real `vfl psi` nodes put on the wire (PROTOCOL.md section 10).

Acceptance item: *no raw ID, and no plain hash of one, appears in any frame sent during PSI; every point a party
sends is on the main curve.*

A real label holder and two real data holders run `vfl psi` on 127.0.0.1. The data holders connect to a recording
TCP relay (tests/node/capture.py) that forwards to the label holder and keeps every byte of both directions of
each connection. CurveZMQ is OFF (``insecure = true``): with CURVE on, everything after the ZMTP handshake is
ciphertext, so a capture would show nothing about the PSI messages and prove nothing. The test checks that the
greetings name the ``NULL`` mechanism, i.e. that what it inspects really is the plaintext.

The captured streams are parsed as ZMTP 3.x and vfl envelopes with plain ``msgpack``/``numpy`` (not vfl's codec),
and the test asserts:

1. the PSI happened: each connection carries ``PSI_START``, ``PSI_ITEMS``, ``PSI_REPLY``, ``PSI_RESULT`` and
   ``PSI_ROWS`` with the chunking and counts the sets imply (a fresh ``psi_nonce`` per pair, no point sent twice);
   all three nodes exit 0 and write the same IDs in the same order, equal to the true intersection;
2. no raw ID occurs anywhere in the raw bytes of either direction: UTF-8 of every ID of every party, its vfl item
   encoding (``encode_ids``) and, for integer IDs, the 8-byte little- and big-endian forms;
3. no plain hash of an ID occurs: MD5, SHA-1, SHA-256, SHA-512, SHA3-256, BLAKE2b (in full and their first 16 / 32
   bytes) of each of those encodings, and the un-keyed hash-to-curve point ``H(item)`` (and its first 16 bytes)
   under every session domain, built from the ``psi_nonce`` that ``WELCOME`` carries in clear in insecure mode
   (computed by an independent implementation of the construction in PROTOCOL.md, cross-checked against
   ``vfl.psi.curve.hash_to_curve``) — so only exponentiated points travel;
4. every 32-byte point of every ``PSI_ITEMS`` tensor, both directions, is canonical (top bit clear, ``u < p``),
   on the main curve (Euler's criterion ``rhs^((p-1)/2) == 1``, computed here) and not of small order;
5. ``PSI_REPLY`` and ``PSI_RESULT`` tokens are ``uint8 [n, 16]`` and none equals the first 16 bytes of any captured
   point.

Positive controls run through the same search (the nonce, the config digest, the run id and captured points and
tokens are found), so a search that finds nothing is known to be able to find something.

Two sessions: string IDs (random 24-character strings, e-mail-like and non-ASCII strings) and integer IDs (a CSV
column of integers is read as ``int``, so integers need their own session).
"""

from __future__ import annotations

import csv
import hashlib
import random
import string
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from vfl.launch import prepare_session
from vfl.launch.prepare import free_port
from vfl.psi import encode_ids
from vfl.psi.curve import hash_domain, hash_to_curve

from .capture import ByteSearch, Envelope, TcpRelay, parse_zmtp, read_envelope
from .procs import Nodes

FAST = {"heartbeat": 0.3, "peer": 5.0, "handshake": 20.0, "join": 60.0, "progress": 30.0}
DATA_HOLDERS = ("dh1", "dh2")
PARTIES = ("bank", *DATA_HOLDERS)
CHUNK = 64
WAIT = 90.0

# Curve25519, written out independently of vfl.psi.curve.
P = 2**255 - 19
A = 486662
H2C_SUITE = b"vfl/psi/h2c/curve25519-ti/v1"
# Canonical u-coordinates of the points of order 1, 2, 4, 8 on the curve and its twist (libsodium's blocklist).
SMALL_ORDER_U = {
    0,
    1,
    P - 1,
    int.from_bytes(bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"),
    int.from_bytes(bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little"),
}


# ------------------------------------------------------------------------------------------------ ID sets


def _split(rng: random.Random, pool: list) -> dict[str, list]:
    """300 IDs per party: 120 shared by all, 40 bank+dh1, 40 bank+dh2, 30 dh1+dh2 only, the rest private."""
    rng.shuffle(pool)
    it = iter(pool)
    take = lambda k: [next(it) for _ in range(k)]  # noqa: E731
    common, b1, b2, d12 = take(120), take(40), take(40), take(30)
    sets = {
        "bank": common + b1 + b2 + take(100),
        "dh1": common + b1 + d12 + take(110),
        "dh2": common + b2 + d12 + take(110),
    }
    for ids in sets.values():
        rng.shuffle(ids)
    return sets


def string_sets(rng: random.Random) -> dict[str, list[str]]:
    alnum = string.ascii_letters + string.digits
    rand = lambda k: "".join(rng.choice(alnum) for _ in range(k))  # noqa: E731
    first = ["amelia", "jonas", "fatima", "oliver", "mei", "santiago", "ingrid", "kwame", "leila", "tomasz"]
    last = ["novak", "okafor", "lindqvist", "fernandes", "tanaka", "müller", "haddad", "oconnell", "kowalski"]
    domains = ["northwind-bank.example", "contoso-mail.test", "fabrikam-retail.example"]
    pool: set[str] = set()
    while len(pool) < 700:
        kind = len(pool) % 3
        if kind == 0:
            pool.add(rand(24))
        elif kind == 1:
            pool.add(f"{rng.choice(first)}.{rng.choice(last)}.{rand(8).lower()}@{rng.choice(domains)}")
        else:
            pool.add(f"Zoë-李雷-Łukasz-{rand(20)}")
    return _split(rng, sorted(pool))


def integer_sets(rng: random.Random) -> dict[str, list[int]]:
    pool: set[int] = set()
    while len(pool) < 700:
        pool.add(rng.randrange(2**62, 2**63))  # 19 digits; 8 bytes with no structure to match by accident
    return _split(rng, sorted(pool))


# ------------------------------------------------------------------------------------------------ independent crypto


def on_main_curve(u: int) -> bool:
    """Euler's criterion: u^3 + A u^2 + u is a nonzero square mod p."""
    rhs = (u * u * u + A * u * u + u) % P
    return rhs != 0 and pow(rhs, (P - 1) // 2, P) == 1


def h2c_spec(item: bytes, run: str, nonce: bytes) -> bytes:
    """H(item) exactly as PROTOCOL.md section 10 states it (try-and-increment onto the main curve)."""
    r = run.encode()
    dst = H2C_SUITE + len(r).to_bytes(2, "big") + r + len(nonce).to_bytes(2, "big") + nonce
    for ctr in range(256):
        u = int.from_bytes(hashlib.sha512(dst + item + bytes([ctr])).digest(), "little") % P
        if on_main_curve(u) and u not in SMALL_ORDER_U:
            return u.to_bytes(32, "little")
    raise AssertionError("hash-to-curve failed 256 times")


def is_small_order(pt: bytes) -> bool:
    """A clamped X25519 scalar is a multiple of 8 (and < 8 * the subgroup order), so the product is all-zero --
    which ``cryptography`` refuses with ValueError -- exactly when the point's order divides 8."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(pt))
    except ValueError:
        return True
    return False


def preimages(value: object) -> list[bytes]:
    """The byte forms of an ID a careless implementation might send or hash."""
    (item,) = encode_ids([value])
    forms = [str(value).encode("utf-8"), item]
    if isinstance(value, int):
        forms += [value.to_bytes(8, "little"), value.to_bytes(8, "big")]
    return forms


def plain_hashes(data: bytes) -> list[bytes]:
    out = []
    for name in ("md5", "sha1", "sha256", "sha512", "sha3_256", "blake2b"):
        d = hashlib.new(name, data).digest()
        out += [d, d[:16]] + ([d[:32]] if len(d) > 32 else [])
    return out


# ------------------------------------------------------------------------------------------------ session


def write_session(tmp: Path, sets: dict[str, list], run: str) -> tuple[dict[str, Path], int]:
    data = {}
    for party, ids in sets.items():
        with open(tmp / f"{party}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["customer_id", "x"])
            w.writerows([i, 1.5] for i in ids)
        data[party] = {"path": f"{party}.csv", "id_column": "customer_id"}
    port = free_port()
    configs = prepare_session(
        tmp,
        data_holders=list(DATA_HOLDERS),
        run=run,
        port=port,
        timeouts=FAST,
        link_check={"rounds": 0},
        data=data,
        psi={"workers": 1, "chunk_size": CHUNK},
        insecure=True,
    )
    for path in configs.values():
        assert "insecure = true" in path.read_text()
    return configs, port


def point_at(config: Path, old_port: int, new_port: int) -> None:
    text = config.read_text(encoding="utf-8")
    old = f'endpoint = "tcp://127.0.0.1:{old_port}"'
    assert text.count(old) == 1, text
    config.write_text(text.replace(old, f'endpoint = "tcp://127.0.0.1:{new_port}"'), encoding="utf-8")


def read_aligned(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return [(int(r[0]), r[1]) for r in rows[1:]]


def run_captured(tmp: Path, sets: dict[str, list], run: str) -> tuple[dict, dict, TcpRelay]:
    configs, bank_port = write_session(tmp, sets, run)
    with TcpRelay(bank_port, lifetime=WAIT + 30) as relay:
        for dh in DATA_HOLDERS:
            point_at(configs[dh], bank_port, relay.port)
        with Nodes(tmp) as nodes:
            bank = nodes.start_command(["psi", "--config", str(configs["bank"])], "bank")
            bank.wait_for("[insecure]", timeout=30)
            procs = {"bank": bank}
            for dh in DATA_HOLDERS:
                procs[dh] = nodes.start_command(["psi", "--config", str(configs[dh])], dh)
            deadline = time.monotonic() + WAIT
            codes = {name: p.wait(timeout=max(1.0, deadline - time.monotonic())) for name, p in procs.items()}
            outputs = {name: p.output for name, p in procs.items()}
    return codes, outputs, relay


# ------------------------------------------------------------------------------------------------ the test


def by_type(messages: list[Envelope], kind: str) -> list[Envelope]:
    return [m for m in messages if m.type == kind]


def check_stream(chunks: list[Envelope], n_items: int | None, tensor: str, width: int | None) -> np.ndarray:
    """Chunks numbered 0.., only the last with last=true, sizes as section 10 says; returns the joined tensor."""
    assert [m.header["chunk"] for m in chunks] == list(range(len(chunks)))
    assert [m.header["last"] for m in chunks] == [False] * (len(chunks) - 1) + [True]
    arrays = [m.tensors[tensor] for m in chunks]
    for a in arrays:
        if width:
            assert a.dtype == np.uint8 and a.ndim == 2 and a.shape[1] == width, (a.dtype, a.shape)
        else:
            assert a.dtype == np.dtype("<u4") and a.ndim == 1, (a.dtype, a.shape)
    if n_items is not None:
        assert len(chunks) == max(1, -(-n_items // CHUNK))
        assert [len(a) for a in arrays[:-1]] == [CHUNK] * (len(arrays) - 1)
    return np.concatenate(arrays)


@pytest.mark.parametrize("kind", ["strings", "integers"])
def test_psi_wire_carries_no_id_no_plain_hash_and_only_main_curve_points(tmp_path, kind):
    rng = random.Random(f"psi-capture-{kind}")
    sets = string_sets(rng) if kind == "strings" else integer_sets(rng)
    run = f"psi-capture-{kind}"
    codes, outputs, relay = run_captured(tmp_path, sets, run)

    # ---- 1. the PSI happened, and all three agree on the true intersection
    assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, outputs
    assert not relay.errors, relay.errors
    expected = set(sets["bank"]) & set(sets["dh1"]) & set(sets["dh2"])
    aligned = {p: read_aligned(tmp_path / f"{p}-aligned.csv") for p in PARTIES}
    orders = {p: [i for _, i in rows] for p, rows in aligned.items()}
    assert orders["bank"] == orders["dh1"] == orders["dh2"]
    assert len(orders["bank"]) == len(expected) == 120
    assert set(orders["bank"]) == {str(i) for i in expected}
    for p, rows in aligned.items():
        assert all(str(sets[p][r]) == i for r, i in rows)

    assert len(relay.connections) == len(DATA_HOLDERS), [(c.index, len(c.c2s), len(c.s2c)) for c in relay.connections]
    sessions: dict[str, dict] = {}
    for conn in relay.connections:
        streams = {"c2s": parse_zmtp(conn.c2s), "s2c": parse_zmtp(conn.s2c)}
        for d, z in streams.items():
            assert z.mechanism == b"NULL", f"{d}: mechanism {z.mechanism!r}: the capture would be ciphertext"
            assert {name for name, _ in z.commands} <= {b"READY", b"PING", b"PONG"}, z.commands
        c2s = [read_envelope(m) for m in streams["c2s"].messages]
        s2c = [read_envelope(m) for m in streams["s2c"].messages]
        assert c2s[-1].type == "BYE" and c2s[-1].header["ok"] is True, c2s[-1].header  # left normally
        (hello,) = by_type(c2s, "HELLO")
        (welcome,) = by_type(s2c, "WELCOME")
        sessions[hello.header["party"]] = {"conn": conn, "c2s": c2s, "s2c": s2c, "hello": hello, "welcome": welcome}
    assert sorted(sessions) == list(DATA_HOLDERS)

    all_points: list[bytes] = []
    all_tokens: list[bytes] = []
    nonces: dict[str, bytes] = {}
    for dh, s in sessions.items():
        c2s, s2c = s["c2s"], s["s2c"]
        for kind_, msgs in (("PSI_START", c2s), ("PSI_START", s2c), ("PSI_ITEMS", c2s), ("PSI_ITEMS", s2c),
                            ("PSI_REPLY", s2c), ("PSI_RESULT", c2s), ("PSI_ROWS", s2c)):
            assert by_type(msgs, kind_), f"{dh}: no {kind_} in the capture"
        assert {m.type for m in c2s} <= {"HELLO", "HEARTBEAT", "PSI_START", "PSI_ITEMS", "PSI_RESULT", "BYE"}
        assert {m.type for m in s2c} <= {"WELCOME", "HEARTBEAT", "PSI_START", "PSI_ITEMS", "PSI_REPLY", "PSI_ROWS"}
        nonce_hex = s["welcome"].header["psi_nonce"]
        assert len(nonce_hex) == 32 and int(nonce_hex, 16) >= 0
        nonces[dh] = bytes.fromhex(nonce_hex)

        (dh_start,) = by_type(c2s, "PSI_START")
        (lh_start,) = by_type(s2c, "PSI_START")
        assert dh_start.header["n_items"] == len(sets[dh]) and lh_start.header["n_items"] == len(sets["bank"])
        dh_points = check_stream(by_type(c2s, "PSI_ITEMS"), len(sets[dh]), "points", 32)
        lh_points = check_stream(by_type(s2c, "PSI_ITEMS"), len(sets["bank"]), "points", 32)
        replies = check_stream(by_type(s2c, "PSI_REPLY"), len(sets[dh]), "tokens", 16)
        results = by_type(c2s, "PSI_RESULT")
        result_tokens = check_stream(results, None, "tokens", 16)
        positions = np.concatenate([m.tensors["positions"] for m in results])
        rows = check_stream(by_type(s2c, "PSI_ROWS"), None, "positions", None)
        pairwise = set(sets["bank"]) & set(sets[dh])
        assert len(result_tokens) == len(positions) == len(pairwise)  # L learns the pairwise size, as PRIVACY.md says
        assert len(set(positions.tolist())) == len(positions) and positions.max() < len(sets["bank"])
        res = [bytes(t) for t in result_tokens]
        assert res == sorted(res) and len(set(res)) == len(res)
        assert set(res) <= {bytes(t) for t in replies}
        assert len(rows) == len(expected)
        for arr in (dh_points, lh_points):
            pts = [bytes(p) for p in arr]
            assert len(set(pts)) == len(pts), f"{dh}: repeated point in a PSI_ITEMS stream"
            all_points += pts
        all_tokens += [bytes(t) for t in replies] + res
    assert len(set(nonces.values())) == len(nonces), "the label holder reused a psi_nonce across pairs"
    assert len(set(all_points)) == len(all_points), "the same point travelled in two streams"
    assert len(all_points) == sum(len(sets[dh]) + len(sets["bank"]) for dh in DATA_HOLDERS)

    raw = [bytes(c.c2s) for c in relay.connections] + [bytes(c.s2c) for c in relay.connections]
    search = ByteSearch(raw)

    # positive controls: the search finds what is known to be there
    controls = [run.encode(), *(n.hex().encode() for n in nonces.values())]
    controls += [s["hello"].header["digest"].encode() for s in sessions.values()]
    controls += all_points[:: max(1, len(all_points) // 50)] + all_tokens[:: max(1, len(all_tokens) // 50)]
    assert search.found(controls) == list(dict.fromkeys(controls))
    assert search.found([b"\x00not-in-the-capture\x00"]) == []

    every_id = list(dict.fromkeys(i for p in PARTIES for i in sets[p]))

    # ---- 2. no raw ID, in any form, anywhere in either direction
    raw_forms = [f for i in every_id for f in preimages(i)]
    assert all(len(f) >= 8 for f in raw_forms)
    leaked = search.found(raw_forms)
    assert not leaked, f"{len(leaked)} raw ID form(s) on the wire, e.g. {leaked[:3]!r}"

    # ---- 3. no plain hash of an ID, and no un-keyed hash-to-curve point
    hashes = [h for f in raw_forms for h in plain_hashes(f)]
    leaked = search.found(hashes)
    assert not leaked, f"{len(leaked)} plain hash(es) of IDs on the wire, e.g. {[h.hex() for h in leaked[:3]]}"

    items = encode_ids(every_id)
    unkeyed: list[bytes] = []
    for nonce in [*nonces.values(), b""]:
        domain = hash_domain(run, nonce)
        for item in items:
            h = h2c_spec(item, run, nonce)
            assert h == hash_to_curve(item, domain), f"vfl's hash_to_curve differs from PROTOCOL.md for {item!r}"
            unkeyed += [h, h[:16]]
    leaked = search.found(unkeyed)
    assert not leaked, f"{len(leaked)} un-keyed H(item) value(s) on the wire: points are not exponentiated"
    assert not set(all_points) & set(unkeyed[::2])

    # ---- 4. every point sent is canonical, on the main curve and not of small order
    for pt in all_points:
        assert len(pt) == 32 and not pt[31] & 0x80, pt.hex()
        u = int.from_bytes(pt, "little")
        assert u < P, pt.hex()
        assert on_main_curve(u), f"point on the twist: {pt.hex()}"
        assert u not in SMALL_ORDER_U and not is_small_order(pt), f"small-order point: {pt.hex()}"

    # ---- 5. tokens are 16 bytes and are not truncated points
    assert all(len(t) == 16 for t in all_tokens)
    prefixes = {p[:16] for p in all_points}
    assert not prefixes & set(all_tokens), "a token equals the first 16 bytes of a point sent in clear"
