#!/usr/bin/env python
"""PSI benchmark: `vfl psi` end to end between two real node processes on 127.0.0.1, CurveZMQ on.

    .venv/bin/python bench/psi.py                 # 1,000,000 x 1,000,000 IDs, 50 % shared (about 7 minutes)
    .venv/bin/python bench/psi.py --quick         # 100,000 x 100,000 (about a minute)
    .venv/bin/python bench/psi.py --size 300000 --overlap 0.3 --workers 2 --no-openmined

One run does, in this order:

1. writes two ID files of ``size`` distinct string customer numbers (``C0123456789``) each, ``overlap`` of them
   shared, into a temporary folder, and computes the true intersection with Python sets;
2. times ``python -c "import ..."`` of the modules a node loads (the interpreter + import part of a node's start-up);
3. measures, single-threaded in this process, the microseconds per hash-to-curve, per X25519 exchange and per
   on-curve check (the same calls the engine's workers make), a few thousand operations per repetition;
4. starts a label holder (``bank``) and a data holder (``dh1``), each ``python -m vfl psi --config NAME.toml --out
   NAME-aligned.csv`` with configs from ``prepare_session`` (CurveZMQ on, long timeouts), and waits for both to exit.
   While they run it samples, every ``--sample`` seconds, each node's process tree (the node and its descendants: the
   forkserver, the PSI workers, the resource tracker): ``VmHWM``/``VmRSS`` from ``/proc/PID/status`` and CPU time
   from ``/proc/PID/stat``; and it notes the moment each known log line first appears;
5. checks both output files list the same IDs in the same order, that this is the true intersection, and that every
   row number points at that ID in the party's own file;
6. measures the per-operation costs again (the bound uses the median of all repetitions, before and after);
7. runs openmined-psi on the same two sets, both sides in this process and thread (RAW mode: exact).

``seconds`` is the wall time from starting the label holder's process to both processes having exited 0.
``items_per_s`` = 2 * size / seconds (the IDs of both parties). ``bound_seconds`` = (2 * size hash-to-curve + 4 * size
X25519 exchanges) * the measured microseconds / cores: each party hashes its own items and exponentiates them once,
and exponentiates the peer's items once. The last line of stdout is one JSON object; everything before it is for
people. Child processes are stopped on every exit path (their whole process group), also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import os

from _children import single_threaded_blas

_CALLER_ENV = single_threaded_blas()  # before numpy; children get the caller's settings back (see _child_env)

import argparse  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey  # noqa: E402

import vfl  # noqa: E402
from vfl.launch.prepare import prepare_session  # noqa: E402
from vfl.psi import curve  # noqa: E402
from vfl.psi.engine import DEFAULT_TASK_ITEMS, encode_ids  # noqa: E402

from _children import (  # noqa: E402
    CLK_TCK, GroupChild, bench_main, child_env, die_with_parent, process_kind, read_text, sample_tree,
)

LABEL_HOLDER = "bank"
DATA_HOLDER = "dh1"
PARTIES = (LABEL_HOLDER, DATA_HOLDER)
ID_COLUMN = "customer_id"
RUN_ID = "psibench"
FULL_SIZE = 1_000_000
QUICK_SIZE = 100_000
NODE_TIMEOUTS = {"heartbeat": 1.0, "peer": 120.0, "handshake": 120.0, "join": 600.0, "progress": 900.0}
GOAL_SECONDS_1M = 90.0
GOAL_BOUND_RATIO = 1.3
GOAL_VS_OPENMINED = 2.5
GOAL_RSS_MB = 1024.0
IMPORTS = "import vfl.cli, vfl.node, vfl.node.alignment, vfl.node.runner, vfl.psi, vfl.protocol, pyarrow.csv"


# Log lines (vfl/node/runner.py, vfl/protocol/*_holder.py) whose first appearance marks a phase, per party.
MARKERS: dict[str, dict[str, str]] = {
    LABEL_HOLDER: {
        "ready": "listening on",  # logged by NodeRunner.run, after the ID file was read and checked
        # "PSI with data holder 'dh1': it has N IDs": on the data holder's PSI_START, but written (and our PSI_START
        # sent) only after the node's first blocking work() call, i.e. after our first chunk is computed
        "psi_start": "it has",
        "pairwise_done": "shared IDs",  # "PSI with data holder 'dh1': K shared IDs" (PSI_RESULT checked)
        "aligned": "rows aligned:",
        "written": "aligned IDs to",
        "finished": "(exit ",
    },
    DATA_HOLDER: {
        "ready": "connecting to",
        # WELCOME received; written (and PSI_START sent) only after the first chunk of its stream is computed
        "joined": "joined label holder",
        "pairwise_done": "IDs shared with the label holder",  # intersection computed, PSI_RESULT sent
        "aligned": "rows aligned:",
        "written": "aligned IDs to",
        "finished": "(exit ",
    },
}


class BenchError(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------- data


def make_sets(size: int, overlap: float, seed: int) -> tuple[list[str], list[str]]:
    """Two lists of ``size`` distinct customer numbers each, ``round(size * overlap)`` of them in both, shuffled."""
    shared = round(size * overlap)
    total = 2 * size - shared
    rng = np.random.default_rng(seed)
    pool = np.empty(0, dtype=np.int64)
    for _ in range(20):  # bounded: each round nearly always suffices (collisions among 10^10 values are rare)
        pool = np.unique(np.concatenate([pool, rng.integers(0, 10**10, size=total + 1000, dtype=np.int64)]))
        if len(pool) >= total:
            break
    else:
        raise BenchError("could not draw enough distinct customer numbers")
    pool = rng.permutation(pool)[:total]
    bank = np.concatenate([pool[:shared], pool[shared:size]])
    dh = np.concatenate([pool[:shared], pool[size:total]])
    rng.shuffle(bank)
    rng.shuffle(dh)
    return [f"C{v:010d}" for v in bank.tolist()], [f"C{v:010d}" for v in dh.tolist()]


def write_ids(path: Path, ids: list[str], seed: int) -> None:
    """``customer_id,balance`` CSV (one numeric column besides the IDs, as a real table would have)."""
    cents = np.random.default_rng(seed).integers(0, 10**7, size=len(ids)).tolist()
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(f"{ID_COLUMN},balance\n")
        fh.writelines(f"{i},{c // 100}.{c % 100:02d}\n" for i, c in zip(ids, cents))


def read_aligned(path: Path) -> tuple[list[int], list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if header != ["row", ID_COLUMN]:
            raise BenchError(f"{path.name}: unexpected header {header}")
        rows, ids = [], []
        for r in reader:
            rows.append(int(r[0]))
            ids.append(r[1])
    return rows, ids


def check_outputs(out: dict[str, Path], sets: dict[str, list[str]], truth: set[str]) -> dict[str, Any]:
    """Both files: same IDs in the same order, equal to the true intersection, row numbers pointing at those IDs."""
    got = {p: read_aligned(out[p]) for p in PARTIES}
    (b_rows, b_ids), (d_rows, d_ids) = got[LABEL_HOLDER], got[DATA_HOLDER]
    same_order = b_ids == d_ids
    exact = len(b_ids) == len(truth) and len(set(b_ids)) == len(b_ids) and set(b_ids) == truth
    rows_ok = all(sets[p][r] == i for p in PARTIES for r, i in zip(*got[p]))
    return {
        "intersection": len(b_ids),
        "intersection_dh1": len(d_ids),
        "same_ids_same_order": same_order,
        "equals_true_intersection": exact,
        "row_numbers_point_at_the_ids": rows_ok,
        "ok": same_order and exact and rows_ok,
        "order_is_not_sorted": b_ids != sorted(b_ids),
    }


# ------------------------------------------------------------------------------------------------- per-op costs


def measure_ops(items: list[bytes], reps: int) -> dict[str, list[float]]:
    """Microseconds per op, single-threaded, ``len(items)`` ops per repetition; the calls the PSI workers make."""
    domain = curve.hash_domain(RUN_ID, os.urandom(16))
    key = X25519PrivateKey.generate()
    frompub, exchange, h2u = X25519PublicKey.from_public_bytes, key.exchange, curve._hash_to_u
    n = len(items)
    out: dict[str, list[float]] = {"hash_to_curve_us": [], "exchange_us": [], "on_curve_check_us": []}
    for _ in range(reps):
        base = hashlib.sha512(domain)
        t = time.perf_counter()
        pts = [h2u(base, it).to_bytes(32, "little") for it in items]  # = worker.hash_encrypt_task minus the exchange
        out["hash_to_curve_us"].append((time.perf_counter() - t) / n * 1e6)

        t = time.perf_counter()
        enc = [exchange(frompub(u)) for u in pts]  # = cipher.encrypt_joined's loop
        out["exchange_us"].append((time.perf_counter() - t) / n * 1e6)

        joined = b"".join(enc)
        t = time.perf_counter()  # = cipher.encrypt_joined's check_curve part, per engine task
        for lo in range(0, n, DEFAULT_TASK_ITEMS):
            hi = min(n, lo + DEFAULT_TASK_ITEMS)
            us = [int.from_bytes(joined[i * 32 : i * 32 + 32], "little") for i in range(lo, hi)]
            if curve.first_off_curve(us) is not None:
                raise BenchError("an encrypted hash-to-curve point is off the curve")
        out["on_curve_check_us"].append((time.perf_counter() - t) / n * 1e6)
    return out


# ------------------------------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    return child_env(_CALLER_ENV, str(REPO))


class Party(GroupChild):
    """One node process: its log file, its process tree's memory and CPU, and when its log lines appeared."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, t0: float):
        super().__init__(name, argv, log, cwd, t0, _child_env())
        self.lines: list[str] = []
        self.marks: dict[str, float] = {}
        self.tree_rss_peak_kb = 0
        self.cpu_samples: list[tuple[float, float, float]] = []  # (t, main CPU s, children CPU s)
        self.left_over = False  # processes of its group still alive after the node exited on its own

    def poll_log(self, now: float) -> None:
        for line in self.read_lines():
            self.lines.append(line)
            for mark, text in MARKERS[self.name].items():
                if mark not in self.marks and text in line:
                    self.marks[mark] = now - self.t0

    def sample(self, now: float) -> None:
        """Walk the process tree once: per process the latest CPU time and VmHWM; the tree's current total RSS."""
        rss_total = sum(rss for _, _, rss in sample_tree(self.proc.pid, self.procs))
        self.tree_rss_peak_kb = max(self.tree_rss_peak_kb, rss_total)
        main_cpu = sum(r["cpu"] for r in self.procs.values() if r["main"])
        kids_cpu = sum(r["cpu"] for r in self.procs.values() if not r["main"])
        self.cpu_samples.append((now - self.t0, main_cpu, kids_cpu))

    def memory(self) -> dict[str, Any]:
        main = sum(r["hwm_kb"] for r in self.procs.values() if r["main"]) / 1024
        kids = [r for r in self.procs.values() if not r["main"]]
        kids_mb = sum(r["hwm_kb"] for r in kids) / 1024
        return {
            "main": round(main, 1),
            "children": round(kids_mb, 1),
            "sum": round(main + kids_mb, 1),
            "children_count": len(kids),
            "children_max": round(max((r["hwm_kb"] for r in kids), default=0) / 1024, 1),
            "tree_rss_peak": round(self.tree_rss_peak_kb / 1024, 1),
        }

    def cpu(self) -> dict[str, float]:
        main = sum(r["cpu"] for r in self.procs.values() if r["main"])
        kids = sum(r["cpu"] for r in self.procs.values() if not r["main"])
        return {"main": round(main, 2), "children": round(kids, 2), "sum": round(main + kids, 2)}

    def wire_bytes(self) -> dict[str, int] | None:
        for line in reversed(self.lines):
            m = re.search(r"sent (\d+) bytes, received (\d+) bytes", line)
            if m:
                return {"sent": int(m.group(1)), "received": int(m.group(2))}
        return None

    def tail(self, n: int = 20) -> str:
        lines = self.lines + ([self._partial.decode("utf-8", "replace")] if self._partial else [])
        return "\n".join(f"    [{self.name}] {line}" for line in lines[-n:])

    def stop(self) -> int | None:
        """End the node and everything in its process group (SIGTERM, then SIGKILL). Returns the exit code."""
        exited_on_its_own = self.proc.poll() is not None
        if self.end_group(reap_wait_s=3.0) and exited_on_its_own:
            self.left_over = True
        return self.proc.returncode


def read_cpu_stat() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in (read_text("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, steal / CLK_TCK, sum(fields[:8]) / CLK_TCK


def run_nodes(args: argparse.Namespace, tmp: Path, configs: dict[str, Path], out: dict[str, Path]) -> dict[str, Any]:
    """Start both nodes, sample them until both exit (or the deadline), stop them in every case."""
    parties: dict[str, Party] = {}
    stat0 = read_cpu_stat()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    try:
        for name in PARTIES:  # label holder first, as an operator would
            argv = [sys.executable, "-m", "vfl", "psi", "--config", str(configs[name]), "--out", str(out[name])]
            parties[name] = Party(name, argv, tmp / f"{name}.log", tmp, t0)
        first_failure: float | None = None
        disk_peak, disk_at = 0, 0.0
        while True:
            now = time.monotonic()
            if now - disk_at >= 1.0:  # a walk of the folder, once a second: cheap next to the nodes' sampling
                disk_peak, disk_at = max(disk_peak, folder_bytes(tmp)), now
            for p in parties.values():
                p.poll_log(now)
                if p.alive():
                    p.sample(now)
                elif p.exit_time is None:
                    p.exit_time = now - t0
                    p.sample(now)  # its workers may still be shutting down
                    if p.proc.returncode != 0 and first_failure is None:
                        first_failure = now
            if all(p.exit_time is not None for p in parties.values()):
                break
            if now > deadline:
                raise BenchError(
                    f"the nodes did not finish within --timeout {args.timeout:g} s:\n"
                    + "\n".join(p.tail() for p in parties.values())
                )
            if first_failure is not None and now > first_failure + 60:
                break  # one node failed; give the other a minute to notice, then stop it
            time.sleep(args.sample)
        wall = max(p.exit_time or args.timeout for p in parties.values())
        disk_peak = max(disk_peak, folder_bytes(tmp))  # the aligned outputs, written last
    finally:
        codes = {name: p.stop() for name, p in parties.items()}
    stat1 = read_cpu_stat()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    for p in parties.values():
        p.poll_log(time.monotonic())
    if any(c != 0 for c in codes.values()):
        raise BenchError(f"exit codes {codes}:\n" + "\n".join(p.tail() for p in parties.values()))
    ours = sum(p.cpu()["sum"] for p in parties.values())
    bench_cpu = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    return {
        "parties": parties,
        "seconds": wall,
        "exit_codes": codes,
        "machine_busy_cpu_s": stat1[0] - stat0[0],
        "steal_cpu_s": stat1[1] - stat0[1],
        "other_cpu_s": max(0.0, stat1[0] - stat0[0] - ours - bench_cpu),
        "bench_cpu_s": bench_cpu,
        "disk_peak_bytes": disk_peak,
    }


def folder_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` now (files that vanish while it walks count 0)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------------------------- openmined


def run_openmined(server_ids: list[str], client_ids: list[str]) -> dict[str, Any]:
    """openmined-psi, both sides in this thread: the client (data holder's set) learns the intersection (RAW: exact)."""
    import private_set_intersection.python as psi

    fpr = 1e-9
    t = time.perf_counter()
    client = psi.client.CreateWithNewKey(True)
    server = psi.server.CreateWithNewKey(True)
    t_req = time.perf_counter()
    request = client.CreateRequest(client_ids)
    t_setup = time.perf_counter()
    setup = server.CreateSetupMessage(fpr, len(client_ids), server_ids, psi.DataStructure.RAW)
    t_proc = time.perf_counter()
    response = server.ProcessRequest(request)
    t_get = time.perf_counter()
    got = client.GetIntersection(setup, response)
    t_end = time.perf_counter()
    return {
        "seconds": t_end - t,
        "phases": {
            "client_create_request": round(t_setup - t_req, 2),
            "server_setup_message": round(t_proc - t_setup, 2),
            "server_process_request": round(t_get - t_proc, 2),
            "client_get_intersection": round(t_end - t_get, 2),
        },
        "indices": got,
        "fpr": fpr,
        "data_structure": "RAW",
    }


# ------------------------------------------------------------------------------------------------- analysis


def timeline(parties: dict[str, Party], end: float, step: float) -> list[list[float]]:
    """Per ``step`` seconds: CPU cores used by each party's main process and by its children (workers)."""

    def at(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
        best = (0.0, 0.0)
        for ts, m, k in samples:  # samples are in time order; take the last one at or before t
            if ts > t:
                break
            best = (m, k)
        return best

    rows = []
    t = 0.0
    prev = {n: (0.0, 0.0) for n in parties}
    while t < end - step / 10:  # no sliver of a bucket at the end
        t1 = min(end, t + step)
        row = [round(t1, 1)]
        for n, p in parties.items():
            cur = at(p.cpu_samples, t1)
            row += [round((cur[0] - prev[n][0]) / (t1 - t), 2), round((cur[1] - prev[n][1]) / (t1 - t), 2)]
            prev[n] = cur
        rows.append(row)
        t = t1
    return rows


def overlap_stats(rows: list[list[float]], start: float, end: float, cores: int) -> dict[str, float]:
    """Within [start, end]: share of buckets where both parties used >= 0.25 core, and the CPU use of each."""
    sel = [r for r in rows if start < r[0] <= end + 1e-9]
    if not sel:
        return {}
    both = sum(1 for r in sel if r[1] + r[2] >= 0.25 and r[3] + r[4] >= 0.25)
    bank = statistics.fmean(r[1] + r[2] for r in sel)
    dh = statistics.fmean(r[3] + r[4] for r in sel)
    return {
        "both_busy_fraction": round(both / len(sel), 3),
        "bank_cores_mean": round(bank, 2),
        "dh1_cores_mean": round(dh, 2),
        "utilisation": round((bank + dh) / cores, 3),
    }


def goal(ok: bool | None, value: Any, target: str) -> dict[str, Any]:
    return {"ok": ok, "value": value, "goal": target}


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------------ main run


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.size
    cores = os.cpu_count() or 1
    workers = args.workers or len(os.sched_getaffinity(0))
    load = {"start": loadavg()}
    if not str(Path(vfl.__file__).resolve()).startswith(str(REPO)):
        raise BenchError(f"vfl is imported from {vfl.__file__}, not from {REPO}")
    tmp = Path(tempfile.mkdtemp(prefix="vfl-psi-bench-"))
    try:
        # 1. data
        t = time.perf_counter()
        bank_ids, dh_ids = make_sets(n, args.overlap, args.seed)
        sets = {LABEL_HOLDER: bank_ids, DATA_HOLDER: dh_ids}
        for i, (name, ids) in enumerate(sets.items()):
            write_ids(tmp / f"{name}.csv", ids, args.seed + 1 + i)
        truth = set(bank_ids) & set(dh_ids)
        file_mb = {name: round((tmp / f"{name}.csv").stat().st_size / 2**20, 1) for name in PARTIES}
        inputs_bytes = folder_bytes(tmp)
        print(f"data: {n:,} x {n:,} IDs, {len(truth):,} shared ({args.overlap:.0%}), files {file_mb} MiB, "
              f"written in {time.perf_counter() - t:.1f} s to {tmp}", flush=True)

        # 2. the interpreter + import part of a node's start-up
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True, env=_child_env(), timeout=120,
                       stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        import_s = time.perf_counter() - t

        # 3. per-op costs
        op_items = encode_ids(bank_ids[: args.ops])
        ops_before = measure_ops(op_items, args.reps)
        print("per op before: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in ops_before.items()),
              flush=True)

        # 4. the PSI
        configs = prepare_session(
            tmp,
            data_holders=[DATA_HOLDER],
            run=RUN_ID,
            timeouts=dict(NODE_TIMEOUTS),
            link_check={"rounds": 0},
            data={name: {"path": f"{name}.csv", "id_column": ID_COLUMN} for name in PARTIES},
            psi={"workers": args.workers, "chunk_size": args.chunk_size, **getattr(args, "psi_extra", {})},
        )
        out = {name: tmp / f"{name}-aligned.csv" for name in PARTIES}
        load["before_psi"] = loadavg()
        print(f"running vfl psi: {LABEL_HOLDER} + {DATA_HOLDER}, workers {workers} each, CurveZMQ on ...", flush=True)
        res = run_nodes(args, tmp, configs, out)
        load["after_psi"] = loadavg()
        parties: dict[str, Party] = res["parties"]
        seconds = res["seconds"]
        print(f"vfl psi finished in {seconds:.2f} s", flush=True)
        for p in parties.values():
            kinds = sorted({process_kind(r["cmd"]) for r in p.procs.values() if not r["main"]})
            n_kids = sum(1 for r in p.procs.values() if not r["main"])
            print(f"  {p.name}: {n_kids} descendant processes seen ({', '.join(kinds)})"
                  + ("; SOME WERE STILL ALIVE AFTER IT EXITED" if p.left_over else "") + "; its log:")
            for line in p.lines:
                print(f"    {line}")

        # 5. outputs
        check = check_outputs(out, sets, truth)
        if not check["ok"]:
            raise BenchError(f"wrong PSI output: {check}")

        # 6. per-op costs again; the bound uses the median over every repetition
        ops_after = measure_ops(op_items, args.reps)
        ops = {k: statistics.median(ops_before[k] + ops_after[k]) for k in ops_before}
        # reading + checking the IDs, in this process, for the start-up split (after the run: no interference)
        from vfl.node import load_config
        from vfl.node.alignment import load_ids

        t = time.perf_counter()
        load_ids(load_config(configs[LABEL_HOLDER]))
        read_ids_s = time.perf_counter() - t

        # 7. openmined-psi
        om = None
        if not args.no_openmined:
            print("running openmined-psi on the same sets (one thread) ...", flush=True)
            load["before_openmined"] = loadavg()
            om = run_openmined(bank_ids, dh_ids)
            found = {dh_ids[i] for i in om.pop("indices")}
            om["intersection"] = len(found)
            om["exact"] = found == truth
            print(f"openmined-psi finished in {om['seconds']:.2f} s ({om['phases']})", flush=True)
        load["end"] = loadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- figures
    bound = (2 * n * ops["hash_to_curve_us"] + 4 * n * ops["exchange_us"]) / 1e6 / cores
    bound_check = bound + 2 * n * ops["on_curve_check_us"] / 1e6 / cores
    bank, dh = parties[LABEL_HOLDER], parties[DATA_HOLDER]
    m = {name: p.marks for name, p in parties.items()}
    startup = {name: round(p.marks.get("ready", float("nan")), 2) for name, p in parties.items()}
    # the exchange starts when both nodes are ready (IDs read; the handshake takes milliseconds). Not the "joined"
    # line: the runner logs it only after the data holder's first chunk is computed (see the README)
    psi_from = max(startup.values())
    aligned_at = m[LABEL_HOLDER].get("aligned", seconds)
    step = 0.5 if seconds < 60 else 1.0
    rows = timeline(parties, seconds, step)
    mem = {name: p.memory() for name, p in parties.items()}
    cpu = {name: p.cpu() for name, p in parties.items()}
    size_ratio = FULL_SIZE / n
    result: dict[str, Any] = {
        "bench": "psi",
        "quick": args.quick,
        "size": n,
        "overlap": args.overlap,
        "workers": workers,
        "cores": cores,
        "chunk_size": args.chunk_size,
        "seconds": round(seconds, 2),
        "items_per_s": round(2 * n / seconds),
        "items_per_s_definition": "2 * size / seconds (the IDs of both parties per second of wall time)",
        "startup_seconds": startup,
        "import_seconds": round(import_s, 2),
        "read_ids_seconds": round(read_ids_s, 2),
        "psi_exchange_seconds": round(aligned_at - psi_from, 2),
        "finish_seconds": round(seconds - aligned_at, 2),
        "phase_marks_s": {name: {k: round(v, 2) for k, v in marks.items()} for name, marks in m.items()},
        "exit_s": {name: round(p.exit_time or float("nan"), 2) for name, p in parties.items()},
        "bound_seconds": round(bound, 2),
        "bound_ratio": round(seconds / bound, 3),
        "bound_ops": {"hash_to_curve": 2 * n, "exchange": 4 * n},
        "bound_with_curve_check_seconds": round(bound_check, 2),
        "bound_ratio_with_curve_check": round(seconds / bound_check, 3),
        "exchange_bound_ratio": round((aligned_at - psi_from) / bound, 3),
        # CPU the nodes used (all processes) / the bound's CPU: above 1 = work beyond the raw ops (imports, sorting,
        # I/O, IPC); less sensitive to other load than the wall-time ratio
        "cpu_vs_bound_ratio": round(sum(c["sum"] for c in cpu.values()) / (bound * cores), 3),
        **{k: round(v, 2) for k, v in ops.items()},
        "op_samples_us": {k: [round(x, 2) for x in ops_before[k] + ops_after[k]] for k in ops},
        "ops_per_rep": len(op_items),
        "legendre_backend": curve.LEGENDRE_BACKEND,
        "peak_rss_mb": mem,
        # the most the run's folder held beyond the two ID files, sampled with the nodes: configs, keys, logs, any
        # spilled PSI state, the aligned outputs
        "disk_peak_mb": round(max(0, res["disk_peak_bytes"] - inputs_bytes) / 2**20, 1),
        "cpu_seconds": cpu,
        "cpu_overlap_during_exchange": overlap_stats(rows, psi_from, aligned_at, cores),
        "intersection": check["intersection"],
        "expected_intersection": len(truth),
        "output_check": check,
        "wire_bytes": {name: p.wire_bytes() for name, p in parties.items()},
        "exit_codes": res["exit_codes"],
        "processes_left_after_exit": {name: p.left_over for name, p in parties.items()},
        "loadavg": load,
        "other_cpu_seconds_during_psi": round(res["other_cpu_s"], 1),
        "steal_cpu_seconds_during_psi": round(res["steal_cpu_s"], 1),
        "bench_cpu_seconds_during_psi": round(res["bench_cpu_s"], 2),
        "timeline_step_s": step,
        "timeline": rows,
        "timeline_columns": ["t_s", "bank_main_cores", "bank_children_cores", "dh1_main_cores", "dh1_children_cores"],
    }
    if om is not None:
        result.update(
            openmined_seconds=round(om["seconds"], 2),
            vs_openmined_ratio=round(om["seconds"] / seconds, 3),
            openmined=om,
        )
    secs_1m = seconds if n == FULL_SIZE else None
    result["goals"] = {
        "seconds_1m_le_90": goal(None if secs_1m is None else secs_1m <= GOAL_SECONDS_1M,
                                 round(secs_1m if secs_1m is not None else seconds * size_ratio, 1),
                                 "<= 90 s at 1M x 1M" + ("" if secs_1m is not None else " (value: linear extrapolation)")),
        "vs_openmined_ratio_ge_2.5": goal(None if om is None else result["vs_openmined_ratio"] >= GOAL_VS_OPENMINED,
                                          result.get("vs_openmined_ratio"), ">= 2.5"),
        "bound_ratio_le_1.3": goal(result["bound_ratio"] <= GOAL_BOUND_RATIO, result["bound_ratio"], "<= 1.3"),
        "rss_le_1gib_per_party": goal(all(v["sum"] <= GOAL_RSS_MB for v in mem.values()),
                                      {k: v["sum"] for k, v in mem.items()}, "<= 1024 MiB per party (main + children)"),
    }
    result["env"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "argv": sys.argv[1:],
    }
    return result


def report(r: dict[str, Any]) -> None:
    n = r["size"]
    print()
    print(f"PSI {n:,} x {n:,} ({r['overlap']:.0%} shared), {r['workers']} workers per party, {r['cores']} cores, "
          f"load average {r['loadavg']}")
    print(f"  wall time           : {r['seconds']:.2f} s   ({r['items_per_s']:,} items/s = 2N / s)")
    print(f"  start-up (ready)    : bank {r['startup_seconds'][LABEL_HOLDER]:.2f} s, dh1 "
          f"{r['startup_seconds'][DATA_HOLDER]:.2f} s (imports alone {r['import_seconds']:.2f} s; reading + checking "
          f"one ID file in-process {r['read_ids_seconds']:.2f} s)")
    print(f"  exchange            : {r['psi_exchange_seconds']:.2f} s (both ready -> bank rows aligned); "
          f"writing + exit {r['finish_seconds']:.2f} s")
    print(f"  per op (median)     : hash-to-curve {r['hash_to_curve_us']:.2f} us, X25519 {r['exchange_us']:.2f} us, "
          f"on-curve check {r['on_curve_check_us']:.2f} us ({r['legendre_backend']})")
    print(f"  bound               : {r['bound_seconds']:.2f} s = (2N h2c + 4N exch) / {r['cores']} cores -> ratio "
          f"{r['bound_ratio']:.3f} (exchange part alone {r['exchange_bound_ratio']:.3f}; with on-curve checks "
          f"{r['bound_with_curve_check_seconds']:.2f} s, ratio {r['bound_ratio_with_curve_check']:.3f}); CPU used / "
          f"bound CPU {r['cpu_vs_bound_ratio']:.3f}")
    if "openmined_seconds" in r:
        print(f"  openmined-psi       : {r['openmined_seconds']:.2f} s -> vfl is {r['vs_openmined_ratio']:.2f}x faster"
              f" (intersection {r['openmined']['intersection']:,}, exact {r['openmined']['exact']})")
    for name in PARTIES:
        mem, cpu = r["peak_rss_mb"][name], r["cpu_seconds"][name]
        print(f"  {name:<5} peak RSS     : main {mem['main']:.0f} MiB + {mem['children_count']} children "
              f"{mem['children']:.0f} MiB = {mem['sum']:.0f} MiB (tree RSS peak {mem['tree_rss_peak']:.0f} MiB); "
              f"CPU main {cpu['main']:.1f} s, children {cpu['children']:.1f} s")
    print(f"  CPU during exchange : {r['cpu_overlap_during_exchange']}")
    print(f"  other load          : {r['other_cpu_seconds_during_psi']:.1f} CPU s by other processes during the PSI, "
          f"steal {r['steal_cpu_seconds_during_psi']:.1f} s, bench sampler {r['bench_cpu_seconds_during_psi']:.2f} s")
    print(f"  intersection        : {r['intersection']:,} (expected {r['expected_intersection']:,}); "
          f"outputs check {r['output_check']['ok']}")
    print("  timeline (cores used; bank main/children | dh1 main/children):")
    for t, bm, bc, dm, dc in r["timeline"]:
        print(f"    {t:7.1f} s  bank {bm:4.2f} {bc:4.2f} | dh1 {dm:4.2f} {dc:4.2f}")
    print("  goals:")
    for k, g in r["goals"].items():
        print(f"    {k:<28} {'met' if g['ok'] else ('n/a' if g['ok'] is None else 'MISSED')}: {g['value']} "
              f"(goal {g['goal']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, help=f"IDs per party (default {FULL_SIZE:,}; --quick: {QUICK_SIZE:,})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE:,} IDs per party")
    ap.add_argument("--overlap", type=float, default=0.5, help="share of each party's IDs the other has too")
    ap.add_argument("--workers", type=int, default=0, help="[psi].workers of both nodes (0: every core)")
    ap.add_argument("--chunk-size", type=int, default=65536, help="[psi].chunk_size of both nodes")
    ap.add_argument("--ops", type=int, default=2000, help="operations per micro-benchmark repetition")
    ap.add_argument("--reps", type=int, default=5, help="micro-benchmark repetitions before and after the PSI")
    ap.add_argument("--sample", type=float, default=0.05, help="seconds between samples of the node processes")
    ap.add_argument("--timeout", type=float, help="give up on the nodes after this many seconds "
                    "(default 120 + 900 per million IDs)")
    ap.add_argument("--seed", type=int, default=20240501)
    ap.add_argument("--no-openmined", action="store_true", help="skip openmined-psi")
    args = ap.parse_args()
    args.size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE)
    args.timeout = args.timeout or 120 + 900 * args.size / 1e6
    if args.size < 2 or not 0 < args.overlap <= 1 or args.workers < 0 or args.ops < 8 or args.reps < 1:
        ap.error("need --size >= 2, 0 < --overlap <= 1, --workers >= 0, --ops >= 8, --reps >= 1")
    if not 0.01 <= args.sample <= 1:
        ap.error("--sample must be in [0.01, 1]")
    if threading.active_count() != 1:
        print("warning: the bench has threads; preexec_fn is not fork-safe then", file=sys.stderr)

    return bench_main("psi", lambda: run(args), report, BenchError, "child processes stopped, temporary files removed")

if __name__ == "__main__":
    sys.exit(main())
