#!/usr/bin/env python
"""WAN benchmark: split training between real node processes through an emulated link, per RTT, bandwidth, window
and wire precision of the cut layer (issue 15).

    PYTHONPATH=. .venv/bin/python bench/wan.py            # the full grid: 108 timing cells (about 20 minutes here)
    PYTHONPATH=. .venv/bin/python bench/wan.py --quick    # 24 timing cells (about 5 minutes here)
    PYTHONPATH=. .venv/bin/python bench/wan.py --rtts 0,50 --mbits 0 --windows 8,auto --precisions float32

The model and data are ``bench/train.py``'s, reused by import: MNIST-shaped synthetic data (784 float32 features in
[0, 1) split 392/392 over the data holders ``dh1`` and ``dh2``, 10 classes, the label the argmax of a fixed random
linear map of the features, so it is learnable), bottoms 392->64 ReLU, top 128->500->10, batch 128, Adam lr 1e-3,
``[train].threads = 1``, CurveZMQ on, PSI first (not measured). Every node is a real ``python -m vfl node`` process.

Timing cells: RTT {0, 10, 50, 100 ms} x bandwidth {unlimited, 1000, 100 Mbit/s per direction} x window {1, 8,
"auto"} x precision {float32, bfloat16, int8} (``activation_precision`` = ``gradient_precision`` = that precision in
every party's ``[session]``; float32 writes neither key). ``--quick``: RTT {0, 50}, bandwidth {unlimited, 100},
every window, precision {float32, int8}, and fewer rows. In every timing cell (0 ms unlimited too) both data holders
connect through ``vfl.launch.link.LinkProxy`` (``--rtt-ms``, ``--mbit``), run by ``bench/train.py --proxy`` in a child
process; the label holder binds the real port. ``window = "auto"`` cells write ``max_window`` (``--max-window``,
default 16). All cells (timing, bytes and accuracy cells) run interleaved in one seeded random order, so a slow spell
of the shared machine does not fall on one value of one axis.

What each figure covers:

* ``samples/s``: ``bench/train.py``'s measure. The bench polls the label holder's ``metrics.jsonl`` and times the
  appearance of each epoch's line; samples/s = (epochs - 1) x rows / (time of the last epoch's line - time of the
  first's). So the first epoch (pipeline start-up, and with ``"auto"`` the probe: the label holder times its first
  steps at window 1, then announces the window) is not measured; start-up, PSI, save and exit are outside too.
  ``--epochs`` (default 3) epochs of ``--rows`` (default 8192; ``--quick`` 4096) rows, no validation rows.
* ``window``: the window the label holder recorded in ``metrics.jsonl`` (``"window"`` of the last epoch line; for
  a fixed window, that window).
* ``ceiling``: W x B / RTT (not shown at 0 ms), with the RTT the proxy really adds (64-byte round trips through it, median, measured
  before the cells), and W the chosen window.
* ``bytes/step (all)``: the bytes every node says it sent in its last log line (``... sent N bytes ...``: header and
  tensor frames, before CurveZMQ), summed over the three nodes and divided by the session's steps: setup (handshake,
  PSI, schedule) included, so it is only comparable between cells of the same rows and epochs.
* ``bytes_ratio_*`` (the goal figures, issue 15's "bytes per step vs float32, header included"): per precision, two
  extra sessions at window 8 without a proxy, of 2 and 3 epochs. Every node logs at exit the bytes it sent per
  message type (``sent by type: {"BACKWARD": N, ...}``, header and tensor frames, as the total); the step messages'
  bytes are the FORWARDs (activations up) and BACKWARDs (gradients down) of all three nodes, divided by the session's
  training steps (``step_bytes_per_step``, the median over both sessions); the ratio is that over float32's.
* ``bytes_ratio_*_session`` (shown next to them, not a goal): the earlier figure, the difference of the two sessions'
  whole sent bytes over one epoch's steps (``session_bytes_per_step``). Besides the step messages it counts each
  epoch's EPOCH order (int64 row indices, to each data holder), heartbeats of the extra seconds and any validation
  traffic, none of which shrink with the precision, so it is a little higher (int8: 0.2799 vs 0.2687).
* ``val acc``: accuracy cells, without a proxy, on real labels: scikit-learn's digits (1,797 rows) upsampled to
  28 x 28 (MNIST-shaped: dh1 the top 14 image rows, dh2 the bottom 14), 20 % of them validation rows, ``--acc-epochs``
  epochs (default 50: trained to convergence, so the figure is the final accuracy, not how fast a window gets
  there), the last epoch's ``val_accuracy`` of the label holder's ``metrics.jsonl``. Every accuracy cell runs once
  per seed k = 0 .. ``--acc-reps`` - 1 (default 5; ``--quick`` 2): seed k adds 100 k to every model and schedule seed
  (initialisation, epoch order, validation split; the rows stay the same). A session at a given seed and fixed window
  is deterministic (the data holders compute each FORWARD at a fixed point of the pipeline); ``"auto"`` sessions
  differ by the window they pick. Cells: every precision of the grid at ``window = "auto"``, float32 at window 1
  (exact synchronous SGD, the reference), and every other precision at window 1 too (``accuracy_delta_pp_w1``: the
  precision's own effect, without the window's). ``accuracy_delta_pp`` is paired by seed: the mean over seeds of
  (cell - reference at that seed), in percentage points (one validation row is about 0.28), with the per-seed
  differences in ``accuracy_delta_pp_seeds``. Why: at 20 epochs (240 steps) a pipelined run is still behind window 1
  (stale bottoms learn a little slower: float32 at window 3, -1.45 pp over 5 seeds), and one seed's spread (+-2 pp
  at window "auto") is larger than the goal; at 50 epochs the same 5 seeds give float32 "auto" +0.11 pp, window 3
  -0.06 pp.

JSON (the last line of stdout): ``pipeline_efficiency_50ms`` = samples/s at 50 ms / min(samples/s at 0 ms, W x B /
RTT) at W = 8, float32, unlimited bandwidth (goal >= 0.9); ``wan_retained_auto_50ms_100mbit`` = the best precision's
samples/s at W = "auto", 50 ms, 100 Mbit/s / float32's at W = 8, 0 ms, unlimited (goal >= 0.7);
``bytes_ratio_int8``, ``bytes_ratio_bf16`` (goals <= 0.27, <= 0.51; the step messages alone) and
``bytes_ratio_int8_session``, ``bytes_ratio_bf16_session`` (whole sessions, not goals), ``step_bytes_per_step`` and
``session_bytes_per_step`` per precision; ``accuracy_delta_pp`` per precision (``accuracy_delta_pp_seeds``: per
seed) and ``accuracy_delta_pp_max`` (goal: |delta| <= 0.5); ``goals`` with each goal's value and ``reached``; ``cells`` with
every cell's figures; ``proxy_check`` (what the relay reaches on loopback, unshaped and shaped, vs a direct
connection, so that the proxy is shown not to be the bottleneck); ``precision_available``. A figure whose cells
could not run is null, never estimated.

Precision: until the node knows ``activation_precision``/``gradient_precision`` (a config with them is refused with
an unknown-key error), only float32 runs; the other precisions' cells show "not available" and their figures are
null. Child processes: as ``bench/train.py`` (own process groups, PR_SET_PDEATHSIG, SIGTERM then SIGKILL on every
exit path, Ctrl-C and SIGTERM included); every wait is bounded, ``--budget-s`` skips the cells left once it is spent.
"""

from __future__ import annotations

import train as tb  # first: it makes BLAS single-threaded before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

RTTS_MS = (0, 10, 50, 100)
MBITS = (0, 1000, 100)  # 0: unlimited
WINDOWS = ("1", "8", "auto")
PRECISIONS = ("float32", "bfloat16", "int8")
QUICK = {"rtts": (0, 50), "mbits": (0, 100), "windows": WINDOWS, "precisions": ("float32", "int8")}
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "int8"}
GOALS = {"pipeline_efficiency_50ms": (">=", 0.9), "wan_retained_auto_50ms_100mbit": (">=", 0.7),
         "bytes_ratio_int8": ("<=", 0.27), "bytes_ratio_bf16": ("<=", 0.51), "accuracy_delta_pp_max": ("<=", 0.5)}
SENT = re.compile(r"\(exit (-?\d+); sent (\d+) bytes, received (\d+) bytes\)$")
BY_TYPE = re.compile(r"sent by type: (\{.*\})$")  # logged by every node just before its SENT line
STEP_TYPES = ("FORWARD", "BACKWARD")  # a training step's messages: activations up, gradients down
ORDER_SEED = 15
ACC_SEED_STEP = 100  # accuracy session k adds 100 k to every model and schedule seed (bench/train.py SEEDS)


class BenchError(tb.BenchError):
    pass


# ---------------------------------------------------------------------------------------------------------- cells


def cell_name(c: dict) -> str:
    if c["kind"] == "time":
        return f"{c['rtt']}ms-{c['mbit'] or 'unl'}-w{c['window']}-{SHORT[c['precision']]}"
    if c["kind"] == "bytes":
        return f"bytes-{SHORT[c['precision']]}-e{c['epochs']}"
    return f"acc-w{c['window']}-{SHORT[c['precision']]}"


def plan(args) -> list[dict]:
    cells = [{"kind": "time", "rtt": r, "mbit": m, "window": w, "precision": p, "epochs": args.epochs}
             for p in args.precisions for r in args.rtts for m in args.mbits for w in args.windows]
    cells += [{"kind": "bytes", "window": "8", "precision": p, "epochs": e} for p in PRECISIONS for e in (2, 3)]
    acc = [("1", p) for p in args.precisions] + [("auto", p) for p in args.precisions]
    cells += [{"kind": "acc", "window": w, "precision": p, "epochs": args.acc_epochs, "seed": k} for w, p in acc
              for k in range(args.acc_reps)]
    for c in cells:
        c["name"] = cell_name(c)
    random.Random(ORDER_SEED).shuffle(cells)
    return cells


def set_session_keys(path: Path, window: str, precision: str, max_window: int) -> None:
    """The cell's ``[session]`` keys in one party's config: window, max_window (auto only), the precisions (not for
    float32, so those cells are exactly today's sessions)."""
    text = path.read_text(encoding="utf-8")
    lines = [f"window = {json.dumps(window) if window == 'auto' else int(window)}"]
    if window == "auto":
        lines.append(f"max_window = {max_window}")
    if precision != "float32":
        lines += [f'activation_precision = "{precision}"', f'gradient_precision = "{precision}"']
    new, n = re.subn(r"(?m)^window = .*$", "\n".join(lines), text, count=1)
    if n != 1:
        raise BenchError(f"{path.name}: no window line in [session]")
    path.write_text(new, encoding="utf-8")


def precision_available(tmp: Path, data_dir: Path) -> tuple[bool, str]:
    """Does the node accept ``activation_precision``? A config with it, read by the node's own config loader (what
    ``vfl node`` does first)."""
    from vfl.node.config import load_config
    from vfl.errors import SetupError

    out = tmp / "precision-probe"
    configs = tb.session_configs(out, data_dir, window=8, epochs=2, holders=tb.DATA_HOLDERS, port=tb.free_port(),
                                 proxy_port=None, psi_workers=1)
    set_session_keys(configs["dh1"], "8", "int8", 16)
    try:
        load_config(configs["dh1"])
    except SetupError as exc:
        named = [line.strip() for line in str(exc).splitlines() if "_precision" in line]
        if named:
            return False, named[0][:200]
        raise BenchError(f"the precision probe config was refused for another reason: {exc}") from None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return True, "accepted"


def run_cell(args, tmp: Path, c: dict, data_dir: Path, acc_dir: Path, rep: int) -> dict[str, Any]:
    out = tmp / (f"{c['name']}-rep{rep}" + (f"-seed{c['seed']}" if "seed" in c else ""))
    port = tb.free_port()
    via_proxy = c["kind"] == "time"
    proxy_port = tb.free_port() if via_proxy else None
    rows = DIGITS_ROWS if c["kind"] == "acc" else args.rows
    configs = tb.session_configs(out, acc_dir if c["kind"] == "acc" else data_dir, window=8, epochs=c["epochs"],
                                 holders=tb.DATA_HOLDERS, port=port, proxy_port=proxy_port, psi_workers=1,
                                 validation_fraction=args.acc_validation if c["kind"] == "acc" else 0.0,
                                 seed_offset=ACC_SEED_STEP * c.get("seed", 0))
    for path in configs.values():
        set_session_keys(path, c["window"], c["precision"], args.max_window)
    steps_per_epoch = -(-int(rows * (1 - (args.acc_validation if c["kind"] == "acc" else 0.0))) // tb.BATCH)
    steps = steps_per_epoch * c["epochs"]
    rtt_s = c.get("rtt", 0) / 1000
    timeout = 180 + steps * (rtt_s + 0.05) * 3
    session = tb.Session(args, out, configs, delay_ms=c.get("rtt"), port=port, proxy_port=proxy_port,
                         mbit=float(c.get("mbit", 0)))
    info = session.run(timeout)
    metrics = [json.loads(x) for x in (out / tb.MODEL_DIR / "metrics.jsonl").read_text().splitlines() if x.strip()]
    sent, by_type = {}, {}
    for name, node in session.nodes.items():
        m = next((SENT.search(line) for _, line in reversed(node.lines) if SENT.search(line)), None)
        sent[name] = int(m.group(2)) if m else None
        m = next((BY_TYPE.search(line) for _, line in reversed(node.lines) if BY_TYPE.search(line)), None)
        by_type[name] = json.loads(m.group(1)) if m else None
    res: dict[str, Any] = {"session_seconds": info["seconds"], "sent_bytes": sent, "sent_by_type": by_type,
                           "steps": steps, "steps_per_epoch": steps_per_epoch,
                           "window_chosen": metrics[-1].get("window", None if c["window"] == "auto" else int(c["window"]))}
    if None not in sent.values():
        res["bytes_per_step_all"] = round(sum(sent.values()) / steps, 1)
    if None not in by_type.values():
        # the step messages alone (every party's FORWARDs and BACKWARDs, headers included) per training step
        res["step_bytes"] = sum(t.get(k, 0) for t in by_type.values() for k in STEP_TYPES)
        res["step_bytes_per_step"] = round(res["step_bytes"] / steps, 1)
    if c["kind"] == "time":
        res.update(tb.measure(session, c["epochs"], rows))
    elif c["kind"] == "acc":
        res["val_accuracy"] = metrics[-1].get("val_accuracy")
        res["seed"] = c["seed"]
        res["train_loss"] = metrics[-1].get("train_loss")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------------------- digits


DIGITS_ROWS = 1797  # scikit-learn's bundled digits


def write_digits_main(spec: dict) -> int:
    """Child process: scikit-learn's digits (8 x 8, 0..16) upsampled (nearest) to 28 x 28 in [0, 1]: MNIST-shaped
    rows with real labels. dh1 holds image rows 0-13 (392 pixels), dh2 rows 14-27, the label holder the label; string
    IDs, each party its own row order, as ``bench/train.py`` writes its data."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(28) * 8 // 28
    images = (d.images[:, idx][:, :, idx] / 16.0).astype(np.float32).reshape(len(d.images), tb.FEATURES)
    y = d.target.astype(np.int64)
    n = len(y)
    rng = np.random.default_rng(spec["seed"])
    ids = np.array([f"D{v:06d}" for v in rng.choice(10**6, size=n, replace=False).tolist()], dtype=object)
    out = Path(spec["dir"])
    out.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(n)
    tb._write_parquet(out / "bank.parquet", ids[order].tolist(), {"label": y[order]})
    lo = 0
    for party, width in zip(tb.DATA_HOLDERS, tb.SPLIT):
        rows = rng.permutation(n)
        tb._write_parquet(out / f"{party}.parquet", ids[rows].tolist(),
                          {f"px{lo + j}": np.ascontiguousarray(images[rows, lo + j]) for j in range(width)})
        lo += width
    print(json.dumps({"rows": n}))
    return 0


# ---------------------------------------------------------------------------------------------------------- proxy check


def pump(a: socket.socket, b: socket.socket, nbytes: int, timeout_s: float) -> float:
    """Send ``nbytes`` from ``a`` to ``b`` and ``nbytes`` from ``b`` to ``a`` at once (one thread, non-blocking);
    returns the seconds until both arrived."""
    chunk = memoryview(b"\0" * (1 << 16))
    for s in (a, b):
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    left_send = {a: nbytes, b: nbytes}
    left_recv = {a: nbytes, b: nbytes}
    for s in (a, b):
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    t0 = time.perf_counter()
    try:
        while any(left_recv.values()):
            if time.perf_counter() - t0 > timeout_s:
                raise BenchError(f"proxy check: {nbytes} bytes each way did not arrive within {timeout_s:g} s")
            for key, ev in sel.select(1.0):
                s = key.fileobj
                if ev & selectors.EVENT_READ and left_recv[s]:
                    try:
                        got = s.recv(1 << 16)
                    except BlockingIOError:
                        got = None
                    if got == b"":
                        raise BenchError("proxy check: the connection closed")
                    if got:
                        left_recv[s] -= len(got)
                if ev & selectors.EVENT_WRITE and left_send[s]:
                    try:
                        left_send[s] -= s.send(chunk[:min(len(chunk), left_send[s])])
                    except BlockingIOError:
                        pass
                if not left_send[s]:
                    sel.modify(s, selectors.EVENT_READ)
        return time.perf_counter() - t0
    finally:
        sel.close()


def proxy_check(tmp: Path, nbytes: int, shaped_mbit: float) -> dict[str, Any]:
    """MB/s (10^6 bytes, both directions together) on loopback: direct, through the relay unshaped, and shaped."""
    out: dict[str, Any] = {"bytes_each_way": nbytes}
    for variant, mbit in (("direct", None), ("proxy_unshaped", 0.0), (f"proxy_{shaped_mbit:g}mbit", shaped_mbit)):
        n = nbytes if not mbit else int(min(nbytes, mbit * 1e6 / 8 * 1.5))  # about 1.5 s at the cap
        with tb.relay_pair(tmp, f"proxy-check-{variant}", None if mbit is None else 0, mbit or 0.0) as (cli, conn):
            secs = pump(cli, conn, n, 120)
        out[variant] = {"mb_per_s": round(2 * n / secs / 1e6, 1), "seconds": round(secs, 3), "bytes_each_way": n}
        if mbit:
            out[variant]["cap_mb_per_s_per_direction"] = round(mbit * 1e6 / 8 / 1e6, 2)
            out[variant]["mb_per_s_per_direction"] = round(n / secs / 1e6, 2)
    return out


# ---------------------------------------------------------------------------------------------------------- run


def run(args) -> dict[str, Any]:
    started = time.monotonic()
    with tb.bench_folder("vfl-wanbench-", args.keep) as (tmp, revision):
        data_dir, acc_dir = tmp / "data", tmp / "acc-data"
        w = tb.run_helper(args, "--write-data", {"kind": "mnist", "dir": str(data_dir), "rows": args.rows,
                                                 "seed": tb.SEEDS["data"]}, tmp, 300)
        print(f"timing data: {args.rows:,} MNIST-shaped rows written in {w['seconds']:.1f} s", flush=True)
        w = tb.run_helper(args, "--write-digits", {"dir": str(acc_dir), "seed": tb.SEEDS["data"]}, tmp, 120, __file__)
        print(f"accuracy data: scikit-learn's digits, {w['rows']:,} rows upsampled to 28 x 28, top half of each "
              f"image at dh1, bottom half at dh2", flush=True)
        available, why = precision_available(tmp, data_dir)
        print(f"wire precision keys: {'accepted' if available else 'not available (' + why + ')'}", flush=True)
        check = proxy_check(tmp, args.check_bytes, min([m for m in args.mbits if m] or [100]))
        print("relay check (both directions at once, MB/s): " + ", ".join(
            f"{k} {v['mb_per_s']:.0f}" for k, v in check.items() if isinstance(v, dict)), flush=True)
        rtt = {str(r): tb.proxy_rtt_ms(args, tmp, r, 20) for r in args.rtts}
        print("relay RTT, 64 bytes (median ms): " + ", ".join(f"{k} set: {v['median']:.2f}" for k, v in rtt.items()),
              flush=True)
        cells = plan(args)
        results: dict[str, dict[str, Any]] = {}
        for rep in range(args.reps):
            order = cells if rep % 2 == 0 else list(reversed(cells))
            for i, c in enumerate(order):
                name = c["name"]
                rec = results.setdefault(name, {**c, "runs": []})
                if c["precision"] != "float32" and not available:
                    rec["status"] = "not available"
                    continue
                if time.monotonic() - started > args.budget_s:
                    rec.setdefault("status", "not run (--budget-s spent)")
                    continue
                r = run_cell(args, tmp, c, data_dir, acc_dir, rep)
                rec["runs"].append(r)
                rec["status"] = "ok"
                shown = (f"{r['samples_per_s']:8.0f} samples/s" if "samples_per_s" in r else
                         f"val acc {r['val_accuracy']:.4f}" if r.get("val_accuracy") is not None else "")
                print(f"[{i + 1}/{len(order)} rep {rep + 1}] {name:<22} window {r['window_chosen']!s:>3}  {shown}  "
                      f"{r.get('bytes_per_step_all', float('nan')):9.0f} B/step (all)  session {r['session_seconds']:.1f} s"
                      f"  (elapsed {time.monotonic() - started:.0f} s)", flush=True)
        s = summarise(args, results, rtt, check, available, why)
        s["vfl_revision"] = revision
        s["elapsed_s"] = round(time.monotonic() - started, 1)
        return s


def _mean(rec: dict | None, key: str) -> float | None:
    vals = [r[key] for r in (rec or {}).get("runs", []) if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _med(rec: dict | None, key: str) -> float | None:
    vals = [r[key] for r in (rec or {}).get("runs", []) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _goal(name: str, value: float | None) -> dict[str, Any]:
    op, target = GOALS[name]
    reached = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"value": value, "goal": f"{op} {target}", "reached": reached}


def summarise(args, results, rtt, check, available, why) -> dict[str, Any]:
    def cell(rtt_ms, mbit, window, precision):
        return results.get(cell_name({"kind": "time", "rtt": rtt_ms, "mbit": mbit, "window": window,
                                      "precision": precision}))

    s: dict[str, Any] = {"bench": "vfl-wan", "quick": args.quick}
    # pipeline efficiency at 50 ms, W = 8, float32, unlimited
    eff = None
    base8 = _med(cell(0, 0, "8", "float32"), "samples_per_s")
    at50 = _med(cell(50, 0, "8", "float32"), "samples_per_s")
    rtt50 = (rtt.get("50") or {}).get("median")
    if base8 and at50 and rtt50:
        ceiling = 8 * tb.BATCH / (rtt50 / 1000)
        eff = round(at50 / min(base8, ceiling), 4)
        s["pipeline_efficiency_50ms_detail"] = {"samples_per_s_50ms": round(at50), "samples_per_s_0ms": round(base8),
                                                "ceiling_w8": round(ceiling), "rtt_ms_measured": rtt50}
    s["pipeline_efficiency_50ms"] = eff
    # retained at W = auto, 50 ms, 100 Mbit/s (best precision) vs float32 W = 8, 0 ms, unlimited
    best = None
    for p in args.precisions:
        v = _med(cell(50, 100, "auto", p), "samples_per_s")
        if v is not None and (best is None or v > best[1]):
            best = (p, v)
    s["wan_retained_auto_50ms_100mbit"] = round(best[1] / base8, 4) if best and base8 else None
    s["wan_retained_best_precision"] = best[0] if best else None
    # bytes per step, from the two bytes cells of each precision: the goal figure is the step messages alone
    # (FORWARD + BACKWARD of every node, headers included, per training step, from the nodes' "sent by type" lines);
    # the session figure (the 2- and 3-epoch sessions' whole sent bytes, their difference over one epoch's steps)
    # also counts each epoch's EPOCH orders, heartbeats and any validation traffic, and is kept next to it
    step: dict[str, float | None] = {}
    session_diff: dict[str, float | None] = {}
    for p in PRECISIONS:
        lo, hi = results.get(f"bytes-{SHORT[p]}-e2"), results.get(f"bytes-{SHORT[p]}-e3")
        vals = [r["step_bytes_per_step"] for rec in (lo, hi) for r in (rec or {}).get("runs", [])
                if r.get("step_bytes_per_step") is not None]
        step[p] = round(statistics.median(vals), 1) if vals else None
        a, b = _med(lo, "bytes_per_step_all"), _med(hi, "bytes_per_step_all")
        if a is None or b is None:
            session_diff[p] = None
            continue
        spe = hi["runs"][0]["steps_per_epoch"]
        total_lo = statistics.median(sum(r["sent_bytes"].values()) for r in lo["runs"])
        total_hi = statistics.median(sum(r["sent_bytes"].values()) for r in hi["runs"])
        session_diff[p] = round((total_hi - total_lo) / spe, 1)
    s["step_bytes_per_step"] = step
    s["session_bytes_per_step"] = session_diff
    for p, key in (("int8", "bytes_ratio_int8"), ("bfloat16", "bytes_ratio_bf16")):
        f32, f32_session = step.get("float32"), session_diff.get("float32")
        s[key] = round(step[p] / f32, 4) if step.get(p) and f32 else None
        s[key + "_session"] = (round(session_diff[p] / f32_session, 4)
                               if session_diff.get(p) and f32_session else None)
    # accuracy at W = auto vs float32 at W = 1, paired by seed: the mean over seeds of (cell - reference) at one seed
    ref = results.get("acc-w1-f32")
    deltas, per_seed = {}, {}
    for p in args.precisions:
        deltas[p], per_seed[p] = paired_delta_pp(results.get(f"acc-wauto-{SHORT[p]}"), ref)
    s["accuracy_delta_pp"] = deltas
    s["accuracy_delta_pp_seeds"] = per_seed
    # diagnostic: the precision alone, at window 1 (float32's window-1 run is the reference itself)
    s["accuracy_delta_pp_w1"] = {p: paired_delta_pp(results.get(f"acc-w1-{SHORT[p]}"), ref)[0]
                                 for p in args.precisions if p != "float32"}
    known = [abs(v) for v in deltas.values() if v is not None]
    s["accuracy_delta_pp_max"] = max(known) if known else None
    s["val_accuracy"] = {name: _mean(rec, "val_accuracy") for name, rec in results.items() if rec["kind"] == "acc"}
    s["goals"] = {k: _goal(k, s[k]) for k in GOALS}
    s["reached"] = {k: g["reached"] for k, g in s["goals"].items()}
    s["precision_available"] = available
    if not available:
        s["precision_unavailable_reason"] = why
    s["cells"] = {name: {"status": rec.get("status"), "samples_per_s": _med(rec, "samples_per_s"),
                         "window": rec["runs"][-1]["window_chosen"] if rec["runs"] else None,
                         "bytes_per_step_all": _med(rec, "bytes_per_step_all"),
                         "step_bytes_per_step": _med(rec, "step_bytes_per_step"),
                         "val_accuracy": _mean(rec, "val_accuracy"),
                         "val_accuracy_runs": [r["val_accuracy"] for r in rec["runs"] if "val_accuracy" in r],
                         "samples_per_s_runs": [round(r["samples_per_s"], 1) for r in rec["runs"] if "samples_per_s" in r],
                         "other_load_cores": [r.get("other_load_cores") for r in rec["runs"]],
                         "cpu_ms_per_step": rec["runs"][-1].get("cpu_ms_per_step") if rec["runs"] else None}
                  for name, rec in sorted(results.items())}
    s["proxy_rtt_ms"] = rtt
    s["proxy_check"] = check
    s["setup"] = {"rows": args.rows, "epochs": args.epochs, "acc_rows": DIGITS_ROWS, "acc_reps": args.acc_reps, "acc_epochs": args.acc_epochs,
                  "acc_validation": args.acc_validation, "batch": tb.BATCH, "max_window": args.max_window,
                  "rtts_ms": list(args.rtts), "mbits": list(args.mbits), "windows": list(args.windows),
                  "precisions": list(args.precisions), "reps": args.reps, "split": list(tb.SPLIT), "cut": tb.CUT,
                  "top": tb.TOP_WIDTHS, "curve": True, "order_seed": ORDER_SEED}
    s["env"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    return s


def paired_delta_pp(rec: dict | None, ref: dict | None) -> tuple[float | None, list[float]]:
    """Mean over the seeds both cells ran of (accuracy - reference accuracy) in percentage points, and the per-seed
    differences. Pairing by seed removes the spread between initialisations and validation splits, which is larger
    than the effect measured (one validation row is 0.28 pp)."""
    def by_seed(r: dict | None) -> dict[int, float]:
        acc: dict[int, list[float]] = {}
        for run in (r or {}).get("runs", []):
            if run.get("val_accuracy") is not None:
                acc.setdefault(run["seed"], []).append(run["val_accuracy"])
        return {k: statistics.fmean(v) for k, v in acc.items()}
    a, b = by_seed(rec), by_seed(ref)
    diffs = [round((a[k] - b[k]) * 100, 3) for k in sorted(a.keys() & b.keys())]
    return (round(statistics.fmean(diffs), 3) if diffs else None), diffs


def report(s: dict[str, Any]) -> None:
    setup = s["setup"]
    print()
    print(f"samples/s (epochs 2..{setup['epochs']} of {setup['rows']:,} rows, batch {setup['batch']}; through the relay; "
          "CurveZMQ on); bytes/step (all) = every node's sent bytes / steps, setup included")
    print(f"{'precision':<9} {'RTT ms':>6} {'Mbit/s':>6} {'W':>5} {'chosen':>6} {'samples/s':>10} {'ceiling':>9} "
          f"{'B/step (all)':>12}  other load")
    rtt = s["proxy_rtt_ms"]
    for p in setup["precisions"]:
        for r in setup["rtts_ms"]:
            for m in setup["mbits"]:
                for w in setup["windows"]:
                    name = cell_name({"kind": "time", "rtt": r, "mbit": m, "window": w, "precision": p})
                    c = s["cells"].get(name, {})
                    bw = f"{m}" if m else "unl"
                    if c.get("samples_per_s") is None:
                        print(f"{p:<9} {r:>6} {bw:>6} {w:>5} {'':>6} {c.get('status') or 'not run':>10}")
                        continue
                    chosen = c["window"]
                    measured = (rtt.get(str(r)) or {}).get("median") or 0
                    ceiling = (f"{chosen * setup['batch'] / (measured / 1000):9.0f}" if r and measured and chosen
                               else f"{'-':>9}")
                    load = ", ".join(f"{x:.2f}" for x in c["other_load_cores"] if x is not None)
                    print(f"{p:<9} {r:>6} {bw:>6} {w:>5} {chosen!s:>6} {c['samples_per_s']:10.0f} {ceiling} "
                          f"{c['bytes_per_step_all']:12.0f}  {load}")
    shown = lambda v: "not available" if v is None else f"{v:,.0f}"  # noqa: E731
    print("step messages' bytes per step (FORWARD + BACKWARD, all nodes, headers included; W = 8, no relay): "
          + ", ".join(f"{p} {shown(v)}" for p, v in s["step_bytes_per_step"].items())
          + f"; ratio to float32: int8 {s['bytes_ratio_int8']}, bfloat16 {s['bytes_ratio_bf16']}")
    print("whole-session bytes per step (3-epoch minus 2-epoch sessions' sent bytes / one epoch's steps: EPOCH "
          "orders and heartbeats too): " + ", ".join(f"{p} {shown(v)}" for p, v in s["session_bytes_per_step"].items())
          + f"; ratio to float32: int8 {s['bytes_ratio_int8_session']}, bfloat16 {s['bytes_ratio_bf16_session']}")
    print(f"validation accuracy (digits as 28 x 28, {setup['acc_rows']:,} rows, {setup['acc_validation']:.0%} "
          f"validation, {setup['acc_epochs']} epochs, mean of {setup['acc_reps']} seeds, no relay): " + ", ".join(
              f"{k} {'not available' if v is None else f'{v:.4f}'}" for k, v in s["val_accuracy"].items()))
    print("accuracy delta vs float32 at window 1, pp, per seed (window auto): " + "; ".join(
        f"{p} {s['accuracy_delta_pp'][p]} = mean of {d}" for p, d in s["accuracy_delta_pp_seeds"].items()))
    c = s["proxy_check"]
    print("relay check, MB/s both directions together: " + ", ".join(
        f"{k} {v['mb_per_s']:.0f}" for k, v in c.items() if isinstance(v, dict)))
    print("goals:")
    for k, g in s["goals"].items():
        state = {True: "reached", False: "MISSED", None: "not measured"}[g["reached"]]
        print(f"  {k:<32} {state:<12} {g['value']} (goal {g['goal']})")
    print(f"{s['elapsed_s']:.0f} s in all; load avg {s['env']['loadavg_1m']}")


def _list(text: str, kind, allowed=None) -> tuple:
    vals = tuple(kind(x) for x in text.split(",") if x)
    if allowed is not None and set(vals) - set(allowed):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, allowed))}")
    return vals


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-digits":
        return write_digits_main(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="RTT 0,50 x unlimited,100 Mbit/s x every window x float32,int8")
    ap.add_argument("--rtts", type=lambda t: _list(t, int), help="added RTTs in ms (default 0,10,50,100)")
    ap.add_argument("--mbits", type=lambda t: _list(t, int), help="bandwidth caps, 0 = unlimited (default 0,1000,100)")
    ap.add_argument("--windows", type=lambda t: _list(t, str, WINDOWS), help="default 1,8,auto")
    ap.add_argument("--precisions", type=lambda t: _list(t, str, PRECISIONS), help="default float32,bfloat16,int8")
    ap.add_argument("--rows", type=int, help="rows of the timing cells (default 8192; --quick 4096)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the timing cells (the first is not measured)")
    ap.add_argument("--acc-epochs", type=int, default=50, help="epochs of the accuracy cells (digits)")
    ap.add_argument("--acc-reps", type=int, help="seeds of every accuracy cell, one session each, paired with the reference (default 5; --quick 2)")
    ap.add_argument("--acc-validation", type=float, default=0.2, help="validation fraction of the accuracy cells")
    ap.add_argument("--max-window", type=int, default=16, help="[session].max_window of the \"auto\" cells")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of every cell (odd ones in reverse order)")
    ap.add_argument("--check-bytes", type=int, default=64 << 20, help="bytes each way of the relay check")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="skip the cells left after this many seconds")
    ap.add_argument("--sample", type=float, default=0.25, help="seconds between memory samples of the nodes")
    ap.add_argument("--wait-exit", action="store_true", help="wait for every node to exit on its own")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs, data)")
    args = ap.parse_args()
    q = QUICK if args.quick else {"rtts": RTTS_MS, "mbits": MBITS, "windows": WINDOWS, "precisions": PRECISIONS}
    args.rtts = args.rtts or q["rtts"]
    args.mbits = args.mbits or q["mbits"]
    args.windows = args.windows or q["windows"]
    args.precisions = args.precisions or q["precisions"]
    if "float32" not in args.precisions:
        args.precisions = ("float32", *args.precisions)  # every ratio is against float32
    args.rows = args.rows or (4096 if args.quick else 8192)
    args.acc_reps = args.acc_reps or (2 if args.quick else 5)
    if args.epochs < 2 or args.rows < 2 * tb.BATCH or args.reps < 1 or not 0 < args.acc_validation < 1:
        ap.error("need --epochs >= 2, --rows >= 256, --reps >= 1, 0 < --acc-validation < 1")
    return tb.bench_main("wan", lambda: run(args), report, tb.BenchError,
                         "child processes stopped, temporary files removed")


if __name__ == "__main__":
    sys.exit(main())
