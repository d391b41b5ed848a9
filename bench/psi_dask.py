#!/usr/bin/env python
"""PSI on the local process pool vs on a Dask cluster (``[psi].cluster``), the same PSI side by side.

    PYTHONPATH=. .venv/bin/python bench/psi_dask.py             # 200,000 x 200,000 IDs, 50 % shared
    PYTHONPATH=. .venv/bin/python bench/psi_dask.py --quick     # 20,000 x 20,000
    PYTHONPATH=. .venv/bin/python bench/psi_dask.py --size 100000 --workers 2 --reps 2

One run:

1. draws two ID sets (``bench/psi.py``'s ``make_sets``: ``size`` distinct customer numbers each, ``overlap`` shared);
2. starts a Dask cluster on 127.0.0.1: ``dask scheduler`` and ``dask worker --nworkers W --nthreads 1`` (with its
   nanny, as a party would run it), each in its own process group, stopped on every exit path;
3. ``--reps`` times, alternately: the whole two-party PSI in this process (``vfl.psi.exchange.run_in_memory``, both
   parties' sans-I/O sessions, chunk size 65536) with both parties' crypto on ``PsiEngine(workers=W)`` (the local
   pool), then on ``PsiEngine(cluster=...)`` (the Dask cluster); the same keys and nonce both times, so the joint
   tokens and rows must be identical (checked), and equal to Python's set intersection;
4. measures the single-threaded cost of one hash-to-curve and one X25519 exchange (``bench/psi.py``'s
   ``measure_ops``) for the bound: (2 * size hash-to-curve + 4 * size exchanges) / W.

``local_seconds`` and ``cluster_seconds`` are the fastest repetition of each (the box is shared: see ``loadavg``);
``cluster_vs_local`` = cluster_seconds / local_seconds. Both runs use W worker processes on the same cores, so the
ratio is the price of going through Dask (scheduler round trips, pickling the items and results over TCP) rather
than a speed-up; the speed-up of a real cluster comes from the cores of other hosts. The last line of stdout is one
JSON object.
"""

from __future__ import annotations

import os

from _children import single_threaded_blas

_CALLER_ENV = single_threaded_blas()  # before numpy

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vfl.launch.prepare import free_port  # noqa: E402
from vfl.psi.cipher import PsiKey  # noqa: E402
from vfl.psi.engine import DEFAULT_TASK_ITEMS, PsiEngine, encode_ids  # noqa: E402
from vfl.psi.exchange import PsiReceiver, PsiSender, run_in_memory  # noqa: E402

from _children import GroupChild, bench_main, child_env  # noqa: E402
from psi import loadavg, make_sets, measure_ops  # noqa: E402

FULL_SIZE = 200_000
QUICK_SIZE = 20_000
START_TIMEOUT_S = 60.0


class BenchError(Exception):
    pass


def start_cluster(tmp: Path, workers: int, t0: float) -> tuple[str, list[GroupChild]]:
    """``dask scheduler`` + ``dask worker --nworkers W --nthreads 1`` on loopback; returns (address, processes)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = child_env(_CALLER_ENV, str(REPO))
    py = sys.executable
    procs = [GroupChild("scheduler", [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                                      address.rsplit(":", 1)[1], "--no-dashboard"], tmp / "scheduler.log", tmp, t0,
                        env)]
    wait_for(procs[0], "Scheduler at:", 1)
    procs.append(GroupChild("workers", [py, "-m", "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                                        "--nworkers", str(workers), "--nthreads", "1", "--no-dashboard",
                                        "--local-directory", str(tmp / "dask")], tmp / "workers.log", tmp, t0, env))
    wait_for(procs[1], "Registered to:", workers)
    return address, procs


def wait_for(child: GroupChild, text: str, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = 0
    while time.monotonic() < deadline:
        seen += sum(text in line for line in child.read_lines())
        if seen >= count:
            return
        if not child.alive():
            raise BenchError(f"{child.name} exited {child.proc.returncode}: see {child.log_path}")
        time.sleep(0.05)
    raise BenchError(f"{child.name}: {count} x {text!r} not seen within {START_TIMEOUT_S:g} s ({child.log_path})")


def one_psi(engine: PsiEngine, bank: list[bytes], dh: list[bytes], keys: tuple[PsiKey, PsiKey], chunk: int):
    s = PsiSender(dh, engine=engine, run_id="dask-bench", nonce=b"bench", chunk_size=chunk, key=keys[0])
    r = PsiReceiver(bank, engine=engine, run_id="dask-bench", nonce=b"bench", chunk_size=chunk, key=keys[1])
    t = time.perf_counter()
    run_in_memory(s, r)
    return time.perf_counter() - t, s, r


def run(args: argparse.Namespace) -> dict[str, Any]:
    n, w = args.size, args.workers
    load = {"start": loadavg()}
    bank_ids, dh_ids = make_sets(n, args.overlap, args.seed)
    truth = set(bank_ids) & set(dh_ids)
    bank, dh = encode_ids(bank_ids), encode_ids(dh_ids)
    keys = (PsiKey.generate(), PsiKey.generate())
    print(f"data: {n:,} x {n:,} IDs, {len(truth):,} shared; {w} worker processes either way", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vfl-psi-dask-"))
    t0 = time.monotonic()
    procs: list[GroupChild] = []
    times: dict[str, list[float]] = {"local": [], "cluster": []}
    try:
        address, procs = start_cluster(tmp, w, t0)  # before any thread of ours exists (preexec_fn, forkserver)
        print(f"cluster: scheduler {address}, {w} workers, started in {time.monotonic() - t0:.1f} s", flush=True)
        ref = None
        with PsiEngine(workers=w, task_items=args.task_items) as local, \
                PsiEngine(cluster=address, task_items=args.task_items, cluster_timeout=120) as cluster:
            local.start()
            cluster.start()
            for rep in range(args.reps):
                for name, eng in (("local", local), ("cluster", cluster)):
                    secs, s, r = one_psi(eng, bank, dh, keys, args.chunk_size)
                    times[name].append(secs)
                    got = (s.tokens.tobytes(), r.tokens.tobytes(), s.rows.tobytes(), r.rows.tobytes())
                    if ref is None:
                        ref = got
                        shared = [dh_ids[i] for i in s.rows.tolist()]
                        if set(shared) != truth or len(shared) != len(truth):
                            raise BenchError("the intersection is not the true one")
                        if shared != [bank_ids[i] for i in r.rows.tolist()]:
                            raise BenchError("the parties' orders differ")
                    elif got != ref:
                        raise BenchError(f"{name} run {rep + 1} gave other tokens or rows than the first run")
                    print(f"  rep {rep + 1}: {name:<7} {secs:7.2f} s  (load {loadavg()})", flush=True)
            load["end"] = loadavg()
    finally:
        for p in reversed(procs):
            p.end_group(reap_wait_s=3.0)
    ops = measure_ops(bank[: args.ops], 3)
    h2c, exch = statistics.median(ops["hash_to_curve_us"]), statistics.median(ops["exchange_us"])
    bound = (2 * n * h2c + 4 * n * exch) / 1e6 / w
    local_s, cluster_s = min(times["local"]), min(times["cluster"])
    return {
        "bench": "psi_dask",
        "size": n,
        "overlap": args.overlap,
        "intersection": len(truth),
        "workers": w,
        "task_items": args.task_items,
        "chunk_size": args.chunk_size,
        "reps": args.reps,
        "local_seconds": round(local_s, 2),
        "cluster_seconds": round(cluster_s, 2),
        "cluster_vs_local": round(cluster_s / local_s, 3),
        "local_seconds_all": [round(x, 2) for x in times["local"]],
        "cluster_seconds_all": [round(x, 2) for x in times["cluster"]],
        "bound_seconds": round(bound, 2),
        "local_bound_ratio": round(local_s / bound, 3),
        "cluster_bound_ratio": round(cluster_s / bound, 3),
        "hash_to_curve_us": round(h2c, 2),
        "exchange_us": round(exch, 2),
        "identical_tokens_and_rows": True,
        "loadavg": load,
        "cpus": os.cpu_count(),
    }


def report(r: dict[str, Any]) -> None:
    print(f"PSI {r['size']:,} x {r['size']:,} ({r['intersection']:,} shared), {r['workers']} worker processes, "
          f"best of {r['reps']}:")
    print(f"  {'':<22}{'local pool':>12}{'Dask cluster':>14}")
    print(f"  {'seconds':<22}{r['local_seconds']:>12.2f}{r['cluster_seconds']:>14.2f}")
    print(f"  {'/ bound':<22}{r['local_bound_ratio']:>12.3f}{r['cluster_bound_ratio']:>14.3f}")
    print(f"  cluster / local = {r['cluster_vs_local']:.3f}; bound {r['bound_seconds']:.2f} s; identical tokens and "
          f"rows: {r['identical_tokens_and_rows']}; load {r['loadavg']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, help=f"IDs per party (default {FULL_SIZE:,}; --quick: {QUICK_SIZE:,})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE:,} IDs per party")
    ap.add_argument("--overlap", type=float, default=0.5, help="share of each party's IDs the other has too")
    ap.add_argument("--workers", type=int, default=0, help="worker processes, local and on the cluster (0: every core)")
    ap.add_argument("--task-items", type=int, default=DEFAULT_TASK_ITEMS, help="items per engine task")
    ap.add_argument("--chunk-size", type=int, default=65536, help="rows per PSI stream chunk")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each (alternating)")
    ap.add_argument("--ops", type=int, default=2000, help="operations per micro-benchmark repetition")
    ap.add_argument("--seed", type=int, default=20240501)
    args = ap.parse_args()
    args.size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE)
    args.workers = args.workers or len(os.sched_getaffinity(0))
    if args.size < 2 or not 0 < args.overlap <= 1 or args.workers < 1 or args.reps < 1 or args.ops < 8:
        ap.error("need --size >= 2, 0 < --overlap <= 1, --workers >= 0, --reps >= 1, --ops >= 8")
    if threading.active_count() != 1:
        print("warning: the bench has threads; preexec_fn is not fork-safe then", file=sys.stderr)
    return bench_main("psi_dask", lambda: run(args), report, BenchError, "cluster processes stopped")


if __name__ == "__main__":
    sys.exit(main())
