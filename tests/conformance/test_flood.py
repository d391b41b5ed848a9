"""[R1]/[E1]/[R2]/[S3] under load: thousands of malformed messages (seeded generator), and a hypothesis property
test of "one defect -> its code"."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from . import cases as C
from .peer import CODES, DTYPES, SESSION_TYPES, SIGNATURE, TYPES, pack

FLOOD_N = 2400
CATALOGUE = [c for group in (C.C1, C.C2, C.C3_VERSION, C.C3_SIGNATURE, C.C4, C.C5, C.C6, C.C7, C.C8, C.C9,
                             C.C10, C.C11, C.C12, C.C13, C.C14, C.ORDERING, C.M2_MALFORMED_ERRORS)
             for c in group if c.id != "one_MiB_header"]
FLOOD_TYPES = sorted(SESSION_TYPES - {"HELLO"}) + ["FOO", "", "PSI_START", "FORWARD", "echo", "HELLO ", "ERROR\x00"]
FIELD_NAMES = ["seq", "ok", "reason", "code", "message", "ref", "diff", "version", "party", "run", "config",
               "digest", "heartbeat_ms", "peer_timeout_ms", "data_holders", "role", "x"]


def _obj(rng: random.Random, depth: int = 0):
    k = rng.randrange(11 if depth < 3 else 7)
    if k == 0:
        return rng.choice([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if k == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 12)))
    if k == 2:
        return rng.randbytes(rng.randrange(0, 16))
    if k == 3:
        return rng.choice([None, True, False])
    if k == 4:
        return rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan")])
    if k == 5:
        return rng.choice(FLOOD_TYPES + list(DTYPES) + ["uint16", "data_holder"])
    if k == 6:
        return rng.choice([[1, 0], [2, 0], [True, 0], [1], []])
    if k in (7, 8):
        return [_obj(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(FIELD_NAMES + ["name", "dtype", "shape"]): _obj(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def _descs(rng: random.Random):
    out = []
    for i in range(rng.randrange(0, 6)):
        dt = rng.choice(list(DTYPES) + ["uint16", "complex64", 5, None]) if rng.random() < 0.3 else rng.choice(list(DTYPES))
        shape = [rng.choice([0, 1, 2, 3, 7, 2**31, 2**62, -1]) if rng.random() < 0.2 else rng.randrange(0, 5)
                 for _ in range(rng.randrange(0, 4 if rng.random() < 0.9 else 10))]
        name = f"t{i}" if rng.random() < 0.9 else rng.choice(["", "t0", 5, "n" * 65])
        d = {"name": name, "dtype": dt, "shape": shape}
        if rng.random() < 0.05:
            d.pop(rng.choice(["name", "dtype", "shape"]))
        out.append(d)
    return out


def _frames_for(rng: random.Random, descs):
    frames = []
    for d in descs:
        try:
            n = DTYPES[d["dtype"]].itemsize * math.prod(d["shape"])
        except Exception:  # noqa: BLE001
            n = rng.randrange(0, 16)
        if not 0 <= n <= 4096:
            n = rng.randrange(0, 16)
        if rng.random() < 0.3:
            n = max(0, n + rng.choice([-1, 1, 3]))
        frames.append(rng.randbytes(n))
    if rng.random() < 0.2:
        frames = frames[:-1] if frames and rng.random() < 0.5 else frames + [b""]
    return frames


def _random_header(rng: random.Random) -> dict:
    h = {}
    if rng.random() < 0.92:
        h["type"] = rng.choice(FLOOD_TYPES) if rng.random() < 0.85 else _obj(rng, 2)
    if rng.random() < 0.6:
        h["tensors"] = _descs(rng) if rng.random() < 0.85 else _obj(rng, 2)
    for _ in range(rng.randrange(0, 5)):
        h[rng.choice(FIELD_NAMES)] = _obj(rng)
    return h


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    k = rng.randrange(6)
    if k == 0 and len(frames) > 1 and frames[1]:  # flip bytes in the header
        h = bytearray(frames[1])
        for _ in range(rng.randrange(1, 4)):
            h[rng.randrange(len(h))] = rng.randrange(256)
        frames[1] = bytes(h)
    elif k == 1 and len(frames) > 1:  # truncate the header
        frames[1] = frames[1][: rng.randrange(len(frames[1]) + 1)]
    elif k == 2:  # drop a frame
        frames.pop(rng.randrange(len(frames)))
    elif k == 3:  # add a frame
        frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randrange(0, 40)))
    elif k == 4:  # another signature
        frames[0] = rng.choice([b"VFL/2", b"VFL/", b"vfl/1", rng.randbytes(rng.randrange(0, 9)), b"VFL/1\x00"])
    else:  # header appended junk
        if len(frames) > 1:
            frames[1] += rng.randbytes(rng.randrange(1, 4))
    if frames == []:
        frames = [b""]
    return frames


def _valid_non_hello(rng: random.Random) -> list[bytes]:
    t = rng.choice(["ECHO", "BYE", "HEARTBEAT", "WELCOME", "ECHO_REPLY", "ERROR"])
    h = {"type": t, "tensors": []}
    if t in ("ECHO", "ECHO_REPLY"):
        h["seq"] = rng.randrange(0, 1000)
        descs = [{"name": "a", "dtype": "float32", "shape": [rng.randrange(0, 5)]}]
        h["tensors"] = descs
        return [SIGNATURE, pack(h), bytes(4 * descs[0]["shape"][0])]
    if t == "BYE":
        h.update(ok=True, reason="x")
    if t == "ERROR":
        h.update(code=6, message="x")
    if t == "WELCOME":
        h.update(C.WELCOME_OK)
    return [SIGNATURE, pack(h)]


def flood_messages(rng: random.Random, ctx: C.Ctx, n: int) -> list[list[bytes]]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.30:
            out.append(rng.choice(CATALOGUE).build(ctx))
        elif r < 0.45:
            out.append([rng.randbytes(rng.randrange(0, 48)) for _ in range(rng.randrange(1, 72))])
        elif r < 0.65:
            out.append(_mutate(rng, _valid_non_hello(rng) if rng.random() < 0.5 else rng.choice(CATALOGUE).build(ctx)))
        elif r < 0.90:
            h = _random_header(rng)
            descs = h.get("tensors") if isinstance(h.get("tensors"), list) else []
            descs = [d for d in descs if isinstance(d, dict)]
            out.append([SIGNATURE if rng.random() < 0.9 else b"VFL/3", pack(h), *_frames_for(rng, descs)])
        elif r < 0.97:
            out.append(_mutate(rng, _mutate(rng, _valid_non_hello(rng))))
        else:  # odd sizes: deep nesting, oversize header, many frames
            k = rng.randrange(3)
            if k == 0:
                out.append([SIGNATURE, b"\x82\xa4type\xa4ECHO\xa1x" + b"\x91" * rng.randrange(100, 5000) + b"\xc0"])
            elif k == 1:
                out.append([SIGNATURE, rng.randbytes(ctx.max_header + rng.randrange(1, 100))])
            else:
                out.append([SIGNATURE, pack({"type": "ECHO", "seq": 1})] + [b"\x00"] * rng.randrange(60, 130))
    return out


def test_R1_flood_of_malformed_messages(kit, seed):
    """[R1]: >= 2,000 malformed messages (catalogue cases, random frames, random headers, mutations) from three
    allow-listed parties plus an unlisted-key and a NULL-mechanism connection. Afterwards: the node is alive, a
    valid peer completes HELLO/WELCOME and an ECHO round trip, every flood party is still served. Every answer is
    a well-formed ERROR with a code in 1..15 (never TIMEOUT/INTERNAL for garbage), at most [R2]'s budget per
    party, and the unauthenticated connections got nothing ([S3]/[R3])."""
    rng = random.Random(seed)
    keys = []
    for r in ("flood1", "flood2", "flood3"):
        k = kit.target.key(r)
        if k.name not in [x.name for x in keys]:
            keys.append(k)
    if kit.target.external:
        time.sleep(1.1)
    peers = [kit.peer(key=k) for k in keys]
    pub, _sec = zmq.curve_keypair()
    intruder = kit.peer(key=keys[0], public=pub, secret=_sec, routing_id=b"intruder")
    nullpeer = kit.peer(key=keys[0], curve=False, routing_id=keys[0].name.encode())
    ctxs = [C.Ctx(k.name, kit.target.run, kit.session, kit.target.limits) for k in keys]
    msgs = flood_messages(rng, ctxs[0], FLOOD_N)
    senders = peers + [intruder, nullpeer]
    intruder.label, nullpeer.label = "unlisted-key", "no-curve"
    replies = {id(p): [] for p in senders}

    def collect(timeout: float):
        got = False
        for p in senders:
            for _ in range(1000):
                m = p.recv(timeout if not got else 0)
                if m is None:
                    break
                got = True
                replies[id(p)].append(m)
        return got

    t0 = time.monotonic()
    for i, frames in enumerate(msgs):
        j = i % 10
        p = intruder if j == 8 else nullpeer if j == 9 else peers[j % len(peers)]
        p.send_raw(frames, pace=False, note=f"flood #{i}", block=p in peers)
        if i % 100 == 99:
            collect(0)
    t_sent = time.monotonic()
    deadline = t_sent + 10.0
    t_last = t_sent
    while time.monotonic() < deadline:
        if not collect(0.6):
            break
        t_last = time.monotonic()
    for p in peers:
        kit.drained(p)

    dead = kit.target.alive()
    assert dead is None, f"[R1] the node died in the flood (seed {seed}): {dead}"
    problems = []
    for p in (intruder, nullpeer):
        if replies[id(p)]:
            problems.append(f"[S3]/[R3] unauthenticated connection {p.label} got {len(replies[id(p)])} answers, "
                            f"e.g. {replies[id(p)][0].summary()}")
    per_party: dict[str, int] = {}
    for p in peers:
        for m in replies[id(p)]:
            if m.type != "ERROR":
                problems.append(f"non-ERROR answer to garbage: {m.summary()}")
            elif not (1 <= (m.code or 0) <= 15):
                problems.append(f"ERROR code outside 1..15: {m.summary()}")
            elif m.code in (CODES["TIMEOUT"], CODES["INTERNAL"]):
                problems.append(f"ERROR {m.code} to a malformed message (the node failed on it): {m.summary()}")
        per_party[p.label] = per_party.get(p.label, 0) + len(replies[id(p)])
    for label, count in per_party.items():
        allowed = 100 + math.ceil(100 * (t_last - t0)) + 5
        if count > allowed:
            problems.append(f"[R2] {label} got {count} ERRORs within {t_last - t0:.2f} s (at most {allowed})")
    for p in senders:
        problems.extend(p.violations[:5])
        p.violations.clear()
    print(f"flood: {len(msgs)} messages in {t_sent - t0:.2f} s, answers per party {per_party} within "
          f"{t_last - t0:.2f} s, unauthenticated answers {len(replies[id(intruder)]) + len(replies[id(nullpeer)])}")
    assert not problems, f"flood (seed {seed}, {len(msgs)} messages):\n  " + "\n  ".join(problems[:30])
    assert sum(per_party.values()) > 0, "[E1] no ERROR at all for the flood"

    time.sleep(max(0.0, 1.1 - (time.monotonic() - t_last)))
    kit.assert_healthy(f"after the flood (seed {seed})")
    for p in senders:
        p.close()
    for k in keys:
        q = kit.peer(key=k)
        kit.handshake(q, what=f"flood party {k.name} after the flood")
        kit.echo(q, [("big", np.arange(1 << 16, dtype=np.float64))], what=f"flood party {k.name} ECHO")
        kit.bye(q)


# ----------------------------------------------------------------------------------------------------------------


def _prod(shape):
    return math.prod(shape) if shape else 1


@st.composite
def single_defect(draw, max_header, max_tensor):
    """An ECHO (sent in READY) with exactly one defect; returns (frames, expected code, description)."""
    kind = draw(st.sampled_from(["signature", "version", "long_version", "few_frames", "header_not_map", "type_not_str",
                                 "unknown_type", "bad_dtype", "frame_count", "too_large", "byte_count",
                                 "seq_type", "tensors_on_heartbeat"]))
    if kind == "signature":
        sig = draw(st.binary(max_size=12).filter(lambda b: not b.startswith(b"VFL/")))
        return [sig, pack(C.echo())], CODES["BAD_SIGNATURE"], f"signature {sig!r}", kind
    if kind == "version":  # VFL/ + 1-3 digits naming another major version
        v = draw(st.integers(0, 999).filter(lambda v: v != 1))
        return [b"VFL/%d" % v, pack(C.echo())], CODES["UNSUPPORTED_VERSION"], f"VFL/{v}", kind
    if kind == "long_version":  # 4 or more digits: not a vfl signature
        v = draw(st.integers(1000, 10**12))
        return [b"VFL/%d" % v, pack(C.echo())], CODES["BAD_SIGNATURE"], f"VFL/{v}", kind
    if kind == "few_frames":
        f = draw(st.binary(max_size=40))
        return [f], CODES["BAD_FRAMING"], f"one frame {f!r}", kind
    if kind == "header_not_map":
        obj = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.none(), st.booleans(),
                             st.floats(allow_nan=False), st.binary(max_size=10),
                             st.lists(st.integers(0, 9), max_size=5)))
        return [SIGNATURE, pack(obj)], CODES["BAD_HEADER"], f"header {obj!r}", kind
    if kind == "type_not_str":
        t = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.none(), st.booleans(), st.binary(max_size=8),
                           st.lists(st.text(max_size=3), max_size=2), st.floats(allow_nan=False)))
        return [SIGNATURE, pack({**C.echo(), "type": t})], CODES["BAD_FIELD"], f"type {t!r}", kind
    if kind == "unknown_type":
        t = draw(st.text(max_size=24).filter(lambda s: s not in TYPES))
        return [SIGNATURE, pack({"type": t})], CODES["UNKNOWN_TYPE"], f"type {t!r}", kind
    if kind == "bad_dtype":
        dt = draw(st.text(max_size=12).filter(lambda s: s not in DTYPES))
        return C.msg(C.echo(C.d("a", dt, [1])), bytes(8)), CODES["BAD_TENSOR"], f"dtype {dt!r}", kind
    if kind == "frame_count":
        nd = draw(st.integers(0, 5))
        nf = draw(st.integers(0, 6).filter(lambda k: k != nd))
        return (C.msg(C.echo(*[C.d(f"t{i}", "uint8", [1]) for i in range(nd)]), *[b"\x01"] * nf),
                CODES["BAD_FRAMING"], f"{nd} tensors, {nf} frames", kind)
    if kind == "too_large":
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(1, 2**40), min_size=1, max_size=8)
                     .filter(lambda s: _prod(s) * DTYPES[dt].itemsize > max_tensor))
        return C.msg(C.echo(C.d("a", dt, shape)), b""), CODES["TOO_LARGE"], f"{dt}{shape}", kind
    if kind == "byte_count":
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
        n = _prod(shape) * DTYPES[dt].itemsize
        k = draw(st.integers(0, n + 16).filter(lambda k: k != n))
        return C.msg(C.echo(C.d("a", dt, shape)), bytes(k)), CODES["BAD_TENSOR"], f"{dt}{shape} with {k} bytes", kind
    if kind == "seq_type":
        seq = draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**63, 2**64 - 1), st.booleans(),
                             st.text(max_size=5), st.floats(allow_nan=False), st.none(),
                             st.lists(st.integers(0, 3), max_size=2)))
        return C.msg(C.echo(seq=seq)), CODES["BAD_FIELD"], f"seq {seq!r}", kind
    dt = draw(st.sampled_from(sorted(DTYPES)))
    return (C.msg({"type": "HEARTBEAT", "tensors": [C.d("a", dt, [1])]}, bytes(DTYPES[dt].itemsize)),
            CODES["BAD_TENSOR"], f"HEARTBEAT with a {dt} tensor", kind)


def test_E1_property_one_defect_gets_its_code(kit):
    """[E1] as a property (hypothesis, derandomized, no shrinking to bound the time): an otherwise valid ECHO
    from a READY peer with one random defect gets the ERROR of the check that defect fails, and the session
    stays READY. All mismatches are collected and reported per defect class."""
    peers = []
    for k in [kit.target.key("main"), kit.target.key("alt"), kit.target.key("third")]:
        if k.name not in [p.party for p in peers]:
            p = kit.peer(key=k)
            kit.handshake(p)
            peers.append(p)
    lim = kit.target.limits
    counter = iter(range(10**9))
    failures: dict[str, list[str]] = {}
    tried: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(single_defect(lim["max_header_bytes"], lim["max_tensor_bytes"]))
    def prop(example):
        frames, code, desc, kind = example
        if sum(map(len, failures.values())) >= 25:
            return  # enough evidence; do not spend kit.T per further silent mismatch
        tried[kind] = tried.get(kind, 0) + 1
        p = peers[next(counter) % len(peers)]
        p.send_raw(frames)
        m = p.recv_app(kit.T)
        if m is None or m.type != "ERROR" or m.code != code:
            got = m.summary() if m else "nothing"
            failures.setdefault(kind, []).append(f"{desc}: expected ERROR {code}, got {got}")

    prop()
    for p in peers:
        kit.assert_ready(p, "after the property test")
        kit.bye(p)
    assert not failures, "[E1] one defect -> its code, mismatches per class (examples tried per class: " + \
        f"{tried}):\n" + "\n".join(f"  {k}: {len(v)} x, e.g. " + "; ".join(v[:3]) for k, v in failures.items())
