#!/usr/bin/env python
"""Scale benchmark (issue 16): a 10M x 10M PSI under a memory budget, then one epoch on a 10M-row data holder.

    PYTHONPATH=. .venv/bin/python bench/scale.py            # 10,000,000 x 10,000,000 IDs, 50 % shared
    PYTHONPATH=. .venv/bin/python bench/scale.py --quick    # 1,000,000 x 1,000,000, [psi].memory_mb = 256
    PYTHONPATH=. .venv/bin/python bench/scale.py --size 2000000 --memory-mb 512
    PYTHONPATH=. .venv/bin/python bench/scale.py --no-psi   # the training part alone (--no-train: the PSI part alone)

The PSI part is ``bench/psi.py``'s run, reused by import: two real ``python -m vfl psi`` processes (label holder
``bank``, data holder ``dh1``) on 127.0.0.1, CurveZMQ on, every core as PSI workers, string customer numbers,
``--overlap`` of them shared; outputs checked against Python's set intersection (same IDs, same order, row numbers
pointing at the IDs). ``--memory-mb`` is written to both parties' ``[psi].memory_mb`` (``--quick``: 256, so that the
buckets are exercised at 1M too; full: 1024, the node's default budget under ``buckets = "auto"``; ``--memory-mb 0``
runs the unbucketed PSI). While the nodes run, the bench samples
each node's process tree (node + PSI workers) and the run's folder.

Figures (last line of stdout, one JSON object): ``rows`` (IDs per party), ``psi_seconds`` (start of the label
holder's process to both processes exited 0), ``bound_ratio`` (``psi_seconds`` / the X25519 bound, as in
``bench/psi.py``: (2N hash-to-curve + 4N exchanges) x the per-op times measured in this run / cores),
``psi_peak_rss_mb_max`` (the larger party's peak: the sum of VmHWM over the node and every descendant process, so
workers included; an upper bound on the tree's simultaneous RSS, which is also reported), ``disk_mb`` (the most the
run's folder held beyond the two ID files: spilled PSI state, configs, logs, the aligned outputs), and ``goals``.

The training part is ``bench/train.py``'s memory session, reused by import (``run_rss``): a label holder and one data
holder of ``--rows`` rows (all shared) x ``--features`` (64) float32 features in Parquet, real ``vfl node``
processes, PSI first (with the same ``[psi].memory_mb``), then one whole epoch (bottom 64->64, top 64->500->10,
batch 128, window 8). ``train_rss_above_floor_mb``: the data holder's largest anonymous memory (RssAnon) from the
start of training to its exit, less that of a process that only imported what a node imports; file-backed pages
(the page cache, RssFile) are printed beside it and not counted. ``model_mb``: the bottom's weights, gradients,
Adam's two moments and one stashed copy per step in flight. ``train_disk_mb``: what the session left in its folder
(the feature file, checkpoints, segments). ``--no-train`` skips this part.

Goals on this 2-core box (issue 16): at 10M x 10M ``bound_ratio`` <= 1.3 and ``psi_peak_rss_mb_max`` <= 1536
(1.5 GiB); at ``--quick`` (1M, ``memory_mb`` 256) ``psi_peak_rss_mb_max`` <= 600; both: ``train_rss_above_floor_mb``
<= ``model_mb`` + 300.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psi as psibench  # noqa: E402  (bench/psi.py; sets single-threaded BLAS before numpy is imported)
import train as trainbench  # noqa: E402  (bench/train.py)

from _children import bench_main  # noqa: E402

FULL_ROWS = 10_000_000
QUICK_ROWS = 1_000_000
QUICK_MEMORY_MB = 256
FULL_MEMORY_MB = 1024  # the node's own budget under buckets = "auto": 10M x 10M does not fit one bucket in 1.5 GiB
GOALS = {
    "full": {"bound_ratio": ("<=", 1.3), "psi_peak_rss_mb_max": ("<=", 1536.0)},
    "quick": {"psi_peak_rss_mb_max": ("<=", 600.0)},
}


class BenchError(psibench.BenchError):
    pass


def psi_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace ``bench/psi.py``'s run reads, for this bench's PSI."""
    extra = {"memory_mb": args.memory_mb} if args.memory_mb else {}
    return argparse.Namespace(
        size=args.rows, quick=args.quick, overlap=args.overlap, workers=args.workers, chunk_size=args.chunk_size,
        ops=2000, reps=5, sample=args.sample, timeout=args.timeout, seed=args.seed, no_openmined=True,
        psi_extra=extra,
    )


def _goal(op: str, target: float, value: float | None) -> dict[str, Any]:
    ok = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"value": value, "goal": f"{op} {target:g}", "reached": ok}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_psi and args.no_train:
        raise BenchError("--no-psi and --no-train together leave nothing to run")
    if args.memory_mb and not memory_budget_known():
        raise BenchError("this vfl has no [psi].memory_mb (bucketed PSI, issue 16): run without --memory-mb "
                         "(and without --quick, which sets it) to measure the unbucketed PSI")
    if args.no_psi:
        return train_only(args)
    r = psibench.run(psi_args(args))
    train = None if args.no_train else run_training(args)
    mem = r["peak_rss_mb"]
    s: dict[str, Any] = {
        "bench": "vfl-scale",
        "quick": args.quick,
        "rows": args.rows,
        "overlap": args.overlap,
        "memory_mb": args.memory_mb,
        "psi_seconds": r["seconds"],
        "bound_seconds": r["bound_seconds"],
        "bound_ratio": r["bound_ratio"],
        "psi_peak_rss_mb": {name: v["sum"] for name, v in mem.items()},
        "psi_peak_rss_mb_max": max(v["sum"] for v in mem.values()),
        "psi_tree_rss_peak_mb": {name: v["tree_rss_peak"] for name, v in mem.items()},
        "disk_mb": r["disk_peak_mb"],
        "intersection": r["intersection"],
        "output_check": r["output_check"],
        "cpu_seconds": r["cpu_seconds"],
        "other_cpu_seconds_during_psi": r["other_cpu_seconds_during_psi"],
        "loadavg": r["loadavg"],
        "env": r["env"],
    }
    s["train_rss_above_floor_mb"] = None if train is None else train["rss_above_import_floor_mb"]
    s["model_mb"] = None if train is None else train["model_mb"]
    s["train_disk_mb"] = None if train is None else train["session_disk_mb"]
    s["train"] = train
    goals = GOALS["quick" if args.quick else "full"] if args.rows in (QUICK_ROWS, FULL_ROWS) else {}
    s["goals"] = {k: _goal(op, target, s[k]) for k, (op, target) in goals.items()}
    if train is not None:
        s["goals"]["train_rss_above_floor_mb"] = _goal("<=", round(train["model_mb"] + 300, 1),
                                                        train["rss_above_import_floor_mb"])
    return s


def train_only(args: argparse.Namespace) -> dict[str, Any]:
    """``--no-psi``: the training part alone (its session still aligns its rows with a PSI of its own)."""
    train = run_training(args)
    s: dict[str, Any] = {"bench": "vfl-scale", "quick": args.quick, "rows": args.rows, "memory_mb": args.memory_mb,
                         "train_rss_above_floor_mb": train["rss_above_import_floor_mb"], "model_mb": train["model_mb"],
                         "train_disk_mb": train["session_disk_mb"], "train": train}
    s["goals"] = {"train_rss_above_floor_mb": _goal("<=", round(train["model_mb"] + 300, 1),
                                                    train["rss_above_import_floor_mb"])}
    return s


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """``bench/train.py``'s memory session at ``--rows`` x ``--features``, one whole epoch."""
    import tempfile
    import shutil

    targs = argparse.Namespace(
        rss_rows=args.rows, rss_features=args.features, rss_epochs=1, rss_window=8, rss_train_seconds=0.0,
        rss_psi={"memory_mb": args.memory_mb} if args.memory_mb else None,
        rss_timeout=600 + 900 * args.rows / 1e6, sample=0.5, keep=False, wait_exit=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix="vfl-scale-train-"))
    try:
        floor = trainbench.baseline_rss(targs, tmp)
        r = trainbench.run_rss(targs, tmp, floor)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"training: {r['rows']:,} rows x {r['features']} features, 1 epoch in {r.get('training_seconds')} s; "
          f"RssAnon above the import floor {r['rss_above_import_floor_mb']} MiB (model {r['model_mb']} MiB), "
          f"RssFile peak {r['training_rss_file_peak_mb']} MiB; disk {r['session_disk_mb']} MiB", flush=True)
    return r


def memory_budget_known() -> bool:
    """Does the node's config loader know ``[psi].memory_mb``?"""
    from vfl.node import config

    return "memory_mb" in config._SCHEMA["psi"]


def report(s: dict[str, Any]) -> None:
    print()
    if "psi_seconds" in s:
        print(f"scale: PSI {s['rows']:,} x {s['rows']:,} ({s['overlap']:.0%} shared), [psi].memory_mb "
              f"{s['memory_mb'] or 'none (no buckets)'}: {s['psi_seconds']:.1f} s, bound {s['bound_seconds']:.1f} s, "
              f"ratio {s['bound_ratio']:.3f}; peak RSS (node + workers, sum of VmHWM) "
              + ", ".join(f"{k} {v:.0f} MiB" for k, v in s["psi_peak_rss_mb"].items())
              + f"; disk {s['disk_mb']:.0f} MiB; intersection {s['intersection']:,}; load {s['loadavg']}")
    if s["train"] is not None:
        tr = s["train"]
        print(f"scale: training {tr['rows']:,} x {tr['features']}, one epoch: {tr.get('training_seconds')} s; "
              f"RssAnon above the import floor {s['train_rss_above_floor_mb']} MiB, model {s['model_mb']} MiB, "
              f"RssFile peak {tr['training_rss_file_peak_mb']} MiB; its folder {s['train_disk_mb']} MiB")
    for k, g in s["goals"].items():
        state = {True: "reached", False: "MISSED", None: "not measured"}[g["reached"]]
        print(f"  {k:<24} {state:<12} {g['value']} (goal {g['goal']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} IDs per party, memory_mb {QUICK_MEMORY_MB}")
    ap.add_argument("--rows", type=int, help=f"IDs per party (default {FULL_ROWS:,}; --quick {QUICK_ROWS:,})")
    ap.add_argument("--overlap", type=float, default=0.5, help="share of each party's IDs the other has too")
    ap.add_argument("--memory-mb", type=int,
                    help=f"[psi].memory_mb of both nodes (--quick: {QUICK_MEMORY_MB}, full: {FULL_MEMORY_MB}; 0: no buckets)")
    ap.add_argument("--workers", type=int, default=0, help="[psi].workers of both nodes (0: every core)")
    ap.add_argument("--chunk-size", type=int, default=65536, help="[psi].chunk_size of both nodes")
    ap.add_argument("--sample", type=float, default=0.25, help="seconds between samples of the node processes")
    ap.add_argument("--timeout", type=float, help="give up after this many seconds (default 300 + 300 per million)")
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--features", type=int, default=64, help="features of the training part's data holder")
    ap.add_argument("--no-train", action="store_true", help="the PSI part only")
    ap.add_argument("--no-psi", action="store_true", help="the training part only")
    args = ap.parse_args()
    args.rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    if args.memory_mb is None:
        args.memory_mb = QUICK_MEMORY_MB if args.quick else FULL_MEMORY_MB
    args.timeout = args.timeout or 300 + 300 * args.rows / 1e6
    if args.rows < 2 or not 0 < args.overlap <= 1 or args.workers < 0 or args.memory_mb < 0:
        ap.error("need --rows >= 2, 0 < --overlap <= 1, --workers >= 0, --memory-mb >= 0")
    if not 0.01 <= args.sample <= 1:
        ap.error("--sample must be in [0.01, 1]")
    return bench_main("scale", lambda: run(args), report, BenchError,
                      "child processes stopped, temporary files removed")


if __name__ == "__main__":
    sys.exit(main())
