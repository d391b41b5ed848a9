"""Benchmark the PSI core: per-op costs and a full two-party exchange in one process, measured in one run.

    .venv/bin/python bench/psi_core.py [--n 100000] [--workers 2] [--openmined]

Prints microseconds per X25519 exchange, per hash-to-curve and per on-curve check, then the end-to-end time of an
n x n exchange (both parties in this process, sharing one engine) against the raw bound

    raw = (2n * hash + 4n * exchange + 2n * check) / workers

(each party hashes its own n items, encrypts them and encrypts the peer's n points; with verify_curve each party
checks the peer's n points are on the curve). The two vCPUs of this VM are not independent (two processes each run
~1.3x slower than one alone), so the bench also measures the exchange with ``workers`` processes at once and reports
the bound scaled by that slow-down. Other load on the machine skews everything: run it on a quiet box, more than once.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey  # noqa: E402

from vfl.psi import curve  # noqa: E402
from vfl.psi.engine import PsiEngine, encode_ids  # noqa: E402
from vfl.psi.exchange import PsiReceiver, PsiSender, run_in_memory  # noqa: E402


def per_op_us(n: int) -> dict[str, float]:
    domain = curve.hash_domain("bench", b"nonce")
    items = encode_ids([f"user-{i:09d}" for i in range(n)])
    t = time.perf_counter()
    joined = curve.hash_to_curve_many(items, domain)
    h2c = (time.perf_counter() - t) / n * 1e6

    key = X25519PrivateKey.generate()
    pts = [joined[i * 32 : i * 32 + 32] for i in range(n)]
    frompub, exchange = X25519PublicKey.from_public_bytes, key.exchange
    t = time.perf_counter()
    for u in pts:
        exchange(frompub(u))
    exch = (time.perf_counter() - t) / n * 1e6

    ints = [int.from_bytes(u, "little") for u in pts]
    batch = 2048  # the engine's default task size: the on-curve check runs per task
    t = time.perf_counter()
    for lo in range(0, n, batch):
        assert curve.first_off_curve(ints[lo : lo + batch]) is None
    check = (time.perf_counter() - t) / n * 1e6

    leg, rhs = curve.legendre, curve.curve_rhs
    m = max(1, n // 4)
    t = time.perf_counter()
    for u in ints[:m]:
        leg(rhs(u))
    exact = (time.perf_counter() - t) / m * 1e6

    t = time.perf_counter()
    for u in ints[: max(1, n // 20)]:
        pow(rhs(u), (curve.P - 1) // 2, curve.P)
    euler = (time.perf_counter() - t) / max(1, n // 20) * 1e6
    return {
        "exchange_us": exch,
        "hash_to_curve_us": h2c,
        "on_curve_check_us": check,
        "legendre_us": exact,
        "euler_pow_us": euler,
    }


def _exchange_loop(n: int) -> float:
    key = X25519PrivateKey.generate()
    pts = [X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(64)]
    frompub, exchange = X25519PublicKey.from_public_bytes, key.exchange
    t = time.perf_counter()
    for i in range(n):
        exchange(frompub(pts[i & 63]))
    return (time.perf_counter() - t) / n * 1e6


def parallel_exchange_us(workers: int, n: int) -> float:
    """us per exchange while ``workers`` processes run the same loop at once (cores of this VM are not independent)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_exchange_loop, [100] * workers))  # warm up
        return sum(pool.map(_exchange_loop, [n] * workers)) / workers


def full_exchange(n: int, workers: int, chunk: int, verify_curve: bool) -> dict[str, float]:
    half = n // 2
    xs = encode_ids([f"user-{i:09d}" for i in range(n)])
    ys = encode_ids([f"user-{i:09d}" for i in range(half, half + n)])
    with PsiEngine(workers=workers) as engine:
        engine.start()
        t = time.perf_counter()
        s = PsiSender(xs, engine=engine, run_id="bench", nonce=b"1", chunk_size=chunk, verify_curve=verify_curve)
        r = PsiReceiver(ys, engine=engine, run_id="bench", nonce=b"1", chunk_size=chunk, verify_curve=verify_curve)
        rows_s, rows_r = run_in_memory(s, r)
        elapsed = time.perf_counter() - t
    assert len(rows_s) == n - half, len(rows_s)
    assert all(xs[a] == ys[b] for a, b in zip(rows_s.tolist(), rows_r.tolist()))
    return {"elapsed_s": elapsed, "intersection": len(rows_s)}


def openmined(n: int) -> dict[str, float] | None:
    try:
        import private_set_intersection.python as psi
    except ImportError:
        return None
    half = n // 2
    xs = [f"user-{i:09d}" for i in range(n)]
    ys = [f"user-{i:09d}" for i in range(half, half + n)]
    t = time.perf_counter()
    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(1e-9, len(xs), ys, psi.DataStructure.RAW)
    response = server.ProcessRequest(client.CreateRequest(xs))
    got = client.GetIntersection(setup, response)
    elapsed = time.perf_counter() - t
    assert len(got) == n - half
    return {"openmined_elapsed_s": elapsed, "openmined_items_per_s": 2 * n / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="items per party (half of them shared)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--ops", type=int, default=20_000, help="items for the per-op measurements")
    ap.add_argument("--no-verify-curve", action="store_true", help="skip the on-curve check of received points")
    ap.add_argument("--openmined", action="store_true", help="also time openmined-psi on the same sets")
    args = ap.parse_args()
    verify = not args.no_verify_curve

    ops = per_op_us(args.ops)
    print(f"legendre backend      : {curve.LEGENDRE_BACKEND}")
    print(f"X25519 exchange       : {ops['exchange_us']:.1f} us")
    print(f"hash-to-curve         : {ops['hash_to_curve_us']:.1f} us  (Euler pow would be {ops['euler_pow_us']:.0f} us"
          " per Legendre)")
    print(f"on-curve check        : {ops['on_curve_check_us']:.1f} us per point, batched "
          f"(one Legendre symbol: {ops['legendre_us']:.1f} us)")
    par = parallel_exchange_us(args.workers, args.ops)
    print(f"X25519 exchange with {args.workers} processes at once: {par:.1f} us each "
          f"(x{par / ops['exchange_us']:.2f} vs one)")

    full = full_exchange(args.n, args.workers, args.chunk, verify)
    n = args.n
    raw = (2 * n * ops["hash_to_curve_us"] + 4 * n * ops["exchange_us"]
           + (2 * n * ops["on_curve_check_us"] if verify else 0)) / 1e6 / args.workers
    raw_par = raw * par / ops["exchange_us"]
    items_per_s = 2 * n / full["elapsed_s"]
    print(f"full exchange {n} x {n} (workers={args.workers}, verify_curve={verify}): {full['elapsed_s']:.2f} s, "
          f"{items_per_s:,.0f} items/s (both sets)")
    print(f"raw bound {raw:.2f} s (ratio {full['elapsed_s'] / raw:.2f}); with the measured parallel slow-down "
          f"{raw_par:.2f} s (ratio {full['elapsed_s'] / raw_par:.2f})")
    # extrapolation to 1M x 1M from this run's numbers
    est_1m = full["elapsed_s"] * 1_000_000 / n
    print(f"linear extrapolation to 1M x 1M: {est_1m:.0f} s")

    result = {
        "bench": "psi_core",
        "n": n,
        "workers": args.workers,
        "verify_curve": verify,
        "legendre_backend": curve.LEGENDRE_BACKEND,
        **{k: round(v, 2) for k, v in ops.items()},
        "elapsed_s": round(full["elapsed_s"], 2),
        "items_per_s": round(items_per_s),
        "raw_bound_s": round(raw, 2),
        "ratio_to_raw": round(full["elapsed_s"] / raw, 3),
        "exchange_us_parallel": round(par, 2),
        "raw_bound_parallel_s": round(raw_par, 2),
        "ratio_to_raw_parallel": round(full["elapsed_s"] / raw_par, 3),
        "extrapolated_1m_s": round(est_1m, 1),
    }
    if args.openmined:
        om = openmined(n)
        if om is None:
            print("openmined-psi: not installed")
        else:
            print(f"openmined-psi {n} x {n}, one thread: {om['openmined_elapsed_s']:.2f} s")
            result.update({k: round(v, 2) for k, v in om.items()})
            result["speedup_vs_openmined"] = round(om["openmined_elapsed_s"] / full["elapsed_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
