#!/usr/bin/env python
"""Segment chain throughput (issue 17): the 3-tier ``vfl demo chain`` against the 2-tier split of the same model and
against the same model trained centrally in one process, side by side in one run.

    PYTHONPATH=. .venv/bin/python bench/chain.py             # 3 rounds at the demo's 30 epochs (about 3-5 minutes)
    PYTHONPATH=. .venv/bin/python bench/chain.py --quick     # 1 round of 5 epochs (about a minute)
    PYTHONPATH=. .venv/bin/python bench/chain.py --rounds 5 --keep runs/chain-bench

The model is the demo's (``vfl.launch.demo.prepare_demo("chain")``, read back from the configs it writes, so the
bench follows the demo if it changes): scikit-learn's bundled digits, 64 standardised pixels at ``dh1`` with the
bottom 64 -> 128 (ReLU), 128 -> 640 (ReLU) at the segment holder ``seg1``, 640 -> 10 at the label holder ``bank``;
SGD lr 0.03 everywhere, batch 32, window 2, 25 % validation, ``keep = "best"``, CurveZMQ on, ``[train].threads`` 1
(the default) on every node. Three variants, interleaved A B C A B C ... (``--rounds``):

* ``chain`` (A): the demo's three real node processes (label holder, segment holder, data holder), started by the
  local launcher (``vfl.launch.local.launch``) exactly as ``vfl demo chain`` does;
* ``split`` (B): the same model on two tiers: ``dh1`` with the same bottom, the label holder with the segment and
  the top as one top (128 -> 640 -> 10, ReLU between), no segment holder; same data files (the demo's, seed 0),
  same run id and ``[train].seed`` (hence the same canonical order, split and batches), same optimizer, two real
  processes through the same launcher. Only the initial weights differ: the merged top is one MLP seeded from
  the label holder's ``[model].seed``, where A and C seed the segment and the top apart;
* ``central`` (C): ``vfl.train.central.train_central`` on the same aligned rows (the IDs both parties' files hold)
  and the same schedule (``make_schedule`` over ``vfl.node.training.canonical_order``, as the label holder draws
  it), features standardised on the training rows as ``dh1`` does, with the composed model (bottom 64 -> 128, top
  ``nn.Sequential(segment 128 -> 640, top 640 -> 10)``, the nodes' seeds), in a child process with
  ``torch.set_num_threads(1)``, as each node has.

A and B run the demo's defaults otherwise, so the label holder's label-leakage audit (on by default) runs in both,
on the gradients it sends (to ``seg1`` in A, to ``dh1`` in B); C has none.

Figures of one run (all from the same definitions for every variant):

* ``samples_per_s``: training samples / seconds of the training phase. For A and B the label holder's own measure
  (``summary.json`` ``train_samples_per_second``: from its first step to its last, validation passes and
  checkpoints inside the phase included); for C the sum over epochs of the steps plus the validation pass (there is
  nothing to checkpoint). ``step_samples_per_s``: the same samples over the steps alone (A and B:
  ``train_step_samples_per_second``; C: the ``train_central`` calls alone).
* ``wall_s``: the whole run: A and B from starting the first node process to the last one's exit (start-up and
  imports, PSI, training, the final save, interpreter teardown), C from starting its child process to its exit
  (imports, reading the CSVs, training).
* ``cpu_us_per_sample``: CPU time (user + system, all threads) over the training phase per training sample, of
  every node process together (A, B: read from /proc when the label holder's ``training on`` and ``training
  throughput`` lines reach the launcher) or of the central child (``time.process_time()`` over its epochs). On a
  shared box it is steadier than wall time; ``chain_vs_*_cpu_ratio`` is the chain's ÷ the other's (above 1: the
  chain costs more CPU per sample).
* ``val_accuracy``: the validation accuracy of the kept epoch (the lowest validation loss, as ``keep = "best"``
  chooses; for A and B ``summary.json`` ``final``), and ``val_accuracy_last`` of the last epoch.

Output: one line per run, a table of medians, and as the last line one JSON object: ``chain_samples_per_s``,
``split_samples_per_s``, ``central_samples_per_s`` (medians over rounds), ``chain_vs_split_ratio`` and
``chain_vs_central_ratio`` (of those medians), ``paired_chain_vs_split_ratio`` and ``paired_chain_vs_central_ratio``
(medians of the per-round ratios, a cross-check), the same for the steps alone (``*_step_samples_per_s``,
``*_step_ratio``), ``*_wall_s`` and ``*_cpu_us_per_sample`` (medians), ``chain_vs_*_cpu_ratio``,
``*_val_accuracy`` and ``*_val_accuracy_last`` (per run and median),
``chain_val_accuracy_ok`` (the chain's kept accuracy >= 0.95 in every round; only judged at the demo's epochs),
``runs`` (every run's figures), ``epochs``, ``rounds``, ``central_threads``, ``node_threads``, ``quick``,
``loadavg`` (before and after) and ``wall_s`` of the bench.

The box is shared (2 cores): read the medians and the paired ratios, and compare variants only within one run. The
launcher stops every node on every exit path (SIGTERM, then SIGKILL); the central child runs in its own session with
PR_SET_PDEATHSIG and is killed if the bench stops. Every wait is bounded (``--timeout`` per run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _children import bench_main, die_with_parent, proc_children, proc_sample, read_text  # noqa: E402

VARIANTS = ("chain", "split", "central")
NODE_THREADS = 1  # [train].threads of every node: the default, the demo does not set it
CENTRAL_THREADS = 1
ACCURACY_GOAL = 0.95
QUICK_EPOCHS = 5


class BenchError(Exception):
    pass


# -------------------------------------------------------------------------------------------------- the sessions


def _toml(path: Path) -> dict:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def prepare_chain(folder: Path, epochs: int | None) -> dict[str, Path]:
    """A: the demo as ``vfl demo chain`` writes it (``epochs``: None for the demo's own)."""
    from vfl.launch.demo import prepare_demo

    return prepare_demo("chain", folder, epochs=epochs).configs


def prepare_split(folder: Path, epochs: int | None) -> dict[str, Path]:
    """B: the demo's files, keys and settings, re-prepared without the segment holder: its segment becomes the
    first layers of the label holder's top. Everything else is read back from the demo's own configs."""
    from vfl.launch.demo import model_name
    from vfl.launch.prepare import LABEL_HOLDER, prepare_session

    demo = prepare_chain(folder, epochs)
    cfg = {name: _toml(path) for name, path in demo.items()}
    (segment_holder,) = [n for n, c in cfg.items() if c["role"] == "segment_holder"]
    (holder,) = [n for n, c in cfg.items() if c["role"] == "data_holder"]
    lh, seg, dh = cfg[LABEL_HOLDER], cfg[segment_holder], cfg[holder]
    seg_spec, top_spec = seg["model"]["segment"], lh["model"]["top"]
    # the segment's layers, its final ReLU included, then the top's: an MLP top has ReLU between its layers
    plain = set(seg_spec) <= {"widths", "final_activation"} and set(top_spec) <= {"widths"}
    if not (plain and seg_spec.get("final_activation")):
        raise BenchError(f"the demo's segment {seg_spec} / top {top_spec} are not plain MLPs this bench can merge")
    top = {"widths": [*seg_spec["widths"], *top_spec["widths"]]}
    tables = {LABEL_HOLDER: {"model": {**lh["model"], "top": top}, "train": lh["train"]},
              holder: {"model": dh["model"], "train": dh["train"]}}
    widths = dict(lh["session"]["cut_widths"])
    os.unlink(demo[segment_holder])
    for key in (folder / "keys").glob(f"{segment_holder}.key*"):
        key.unlink()
    return prepare_session(
        folder,
        data_holders=[holder],
        run=lh["run"],  # the same run id and [train].seed: the same canonical order, split and batches
        cut_widths=widths,
        batch_size=lh["session"]["batch_size"],
        window=lh["session"]["window"],
        model=model_name("chain-split", tables, widths),
        link_check=dh.get("link_check"),
        data={LABEL_HOLDER: lh["data"], holder: dh["data"]},
        psi={k: v for k, v in lh["psi"].items() if k != "output"},
        tables=tables,
    )


class PhaseCpu:
    """The launcher's output stream (it calls ``write`` under its lock for every prefixed node line): writes the
    lines to the run's log and, when the label holder logs the start of training (``training on ...``) and its
    throughput line at the end, reads the CPU time of every node process from /proc. The difference is each node's
    CPU over the training phase, up to the delay of a line through the launcher's pipe."""

    def __init__(self, fh, label_holder: str):
        self.fh = fh
        self.prefix = f"{label_holder} "
        self.marks: list[dict[str, float]] = []

    def write(self, text: str) -> None:
        self.fh.write(text)
        marks = (" training on ", "training throughput:")
        if text.startswith(self.prefix) and "| " in text and any(m in text for m in marks):
            self.marks.append(self.snapshot())

    def flush(self) -> None:
        self.fh.flush()

    @staticmethod
    def snapshot() -> dict[str, float]:
        cpu = {}
        for pid in proc_children(os.getpid()):
            argv = (read_text(f"/proc/{pid}/cmdline") or "").split("\0")
            got = proc_sample(pid)
            if "--config" in argv and got is not None:
                cpu[Path(argv[argv.index("--config") + 1]).stem] = got[1]
        return cpu

    def phase(self) -> dict[str, float] | None:
        if len(self.marks) != 2 or set(self.marks[0]) != set(self.marks[1]):
            return None
        return {n: round(self.marks[1][n] - self.marks[0][n], 2) for n in self.marks[0]}


def run_session(name: str, folder: Path, epochs: int | None, timeout_s: float) -> dict:
    from vfl.launch.local import launch
    from vfl.launch.plot import load_metrics
    from vfl.launch.prepare import LABEL_HOLDER

    configs = (prepare_chain if name == "chain" else prepare_split)(folder, epochs)
    with open(folder / "launcher.log", "w", encoding="utf-8") as fh:
        out = PhaseCpu(fh, LABEL_HOLDER)
        t0 = time.monotonic()
        result = launch(list(configs.items()), out=out, colour=False, timeout_s=timeout_s, record=folder)
        wall = time.monotonic() - t0
    if result.failed:
        tail = "".join(result.logs.get(result.failed[0], [])[-15:])
        raise BenchError(f"{name}: {', '.join(result.failed)} failed; logs in {folder}/logs\n{tail}")
    s = dict(result.summary or {})
    if not s.get("train_samples") or not s.get("train_seconds") or not s.get("train_step_seconds"):
        raise BenchError(f"{name}: the label holder logged no training throughput; see {folder}/logs")
    # the summary gives no rate over less than a second (a --quick run on an idle box): the bench wants one anyway
    s["train_samples_per_second"] = s.get("train_samples_per_second") or round(s["train_samples"] / s["train_seconds"], 1)
    s["train_step_samples_per_second"] = (s.get("train_step_samples_per_second")
                                          or round(s["train_samples"] / s["train_step_seconds"], 1))
    epochs_seen = load_metrics(folder / "model" / "metrics.jsonl")
    cpu = out.phase()
    if cpu is None:
        raise BenchError(f"{name}: could not read the nodes' CPU time at the start and end of training")
    return {
        "cpu_s": cpu,
        "cpu_us_per_sample": round(sum(cpu.values()) / s["train_samples"] * 1e6, 1),
        "samples_per_s": s["train_samples_per_second"],
        "step_samples_per_s": s["train_step_samples_per_second"],
        "train_samples": s["train_samples"],
        "train_seconds": s["train_seconds"],
        "wall_s": round(wall, 2),
        "psi_s": s.get("psi_seconds"),
        "aligned_rows": s.get("aligned_rows"),
        "epochs": s["epochs"],
        "kept_epoch": s["kept_epoch"],
        "val_accuracy": s["final"].get("val_accuracy"),
        "val_accuracy_last": epochs_seen[-1].get("val_accuracy") if epochs_seen else None,
        "parties": s.get("parties"),
        "traffic_bytes": {p: t["sent_bytes"] for p, t in (s.get("traffic") or {}).items()},
    }


# ---------------------------------------------------------------------------------------------------------- central


def _read_csv(path: Path, id_column: str) -> tuple[list[str], list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    i = head.index(id_column)
    return [r[i] for r in body], [h for j, h in enumerate(head) if j != i], [[v for j, v in enumerate(r) if j != i]
                                                                             for r in body]


def central_main(spec: dict) -> int:
    """Child process: the composed model trained centrally on the demo's aligned rows and schedule, timed per epoch
    (the ``train_central`` call, then the validation pass)."""
    import numpy as np
    import torch
    from torch import nn

    from vfl.launch.prepare import LABEL_HOLDER
    from vfl.node.training import canonical_order
    from vfl.train.central import ComposedModel, OptimizerSpec, make_schedule, predict, train_central
    from vfl.train.data import Standardizer, encode_labels
    from vfl.train.metrics import evaluate
    from vfl.train.models import Combiner, build_model

    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    cfg = {p.stem: _toml(p) for p in folder.glob("*.toml")}
    lh = cfg[LABEL_HOLDER]
    (seg_name,) = [n for n, c in cfg.items() if c["role"] == "segment_holder"]
    (dh_name,) = [n for n, c in cfg.items() if c["role"] == "data_holder"]
    seg, dh = cfg[seg_name], cfg[dh_name]
    t, sess = lh["train"], lh["session"]

    lh_ids, _, lh_rows = _read_csv(folder / lh["data"]["path"], lh["data"]["id_column"])
    dh_ids, _, dh_rows = _read_csv(folder / dh["data"]["path"], dh["data"]["id_column"])
    label_at = {k: r[0] for k, r in zip(lh_ids, lh_rows)}  # the label holder's only column is the label
    dh_at = {k: i for i, k in enumerate(dh_ids)}
    ids = [k for k in lh_ids if k in dh_at]  # what the PSI aligns; the canonical order does not depend on this order
    ids = [ids[i] for i in canonical_order(ids, t["seed"], lh["run"])]
    x = np.array([[float(v) for v in dh_rows[dh_at[k]]] for k in ids], dtype=np.float32)
    y, encoding = encode_labels([int(label_at[k]) for k in ids], t["task"])
    schedule = make_schedule(len(ids), sess["batch_size"], spec["epochs"], t["seed"], t["validation_fraction"])
    if dh["data"].get("standardize"):
        x = Standardizer.fit(x, schedule.train).transform(x)

    cut = sess["cut_widths"][dh_name]
    width = sess["segments"][seg_name]["width"]
    bottom = build_model(x.shape[1], dh["model"]["bottom"], out_features=cut, seed=dh["model"]["seed"])
    middle = build_model(cut, seg["model"]["segment"], out_features=width, seed=seg["model"]["seed"])
    top = build_model(width, lh["model"]["top"], out_features=encoding.n_classes, seed=lh["model"]["seed"] + 1)
    composed_top = nn.Sequential(middle, top)
    opts = {p: OptimizerSpec.from_dict(c["train"]["optimizer"]) for p, c in cfg.items()}
    if len({json.dumps(c["train"]["optimizer"], sort_keys=True) for c in cfg.values()}) != 1:
        raise BenchError("the parties' optimizers differ; one optimizer over segment and top would not be the same")
    features = [x]
    model = ComposedModel([bottom], composed_top, Combiner([cut]))  # the same modules, trained in place, to validate
    step_s, val_s, history = [], [], []
    samples = 0
    c0 = time.process_time()
    for e in range(spec["epochs"]):
        t0 = time.perf_counter()
        train_central(features, y, [bottom], composed_top, combiner=Combiner([cut]), task=t["task"],
                      schedule=[schedule.epochs[e]], bottom_optimizers=opts[dh_name], top_optimizer=opts[LABEL_HOLDER],
                      copy_models=False)
        t1 = time.perf_counter()
        out = predict(model, features, schedule.validation)
        metrics = evaluate(t["task"], out, y[schedule.validation])
        val_s.append(time.perf_counter() - t1)
        step_s.append(t1 - t0)
        samples += sum(len(b) for b in schedule.epochs[e])
        history.append({"val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]})
    cpu = time.process_time() - c0
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    print(json.dumps({"samples": samples, "cpu_s": cpu, "step_seconds": step_s, "val_seconds": val_s,
                      "history": history,
                      "kept_epoch": best + 1, "threads": torch.get_num_threads(), "rows": len(ids),
                      "train_rows": int(schedule.train.size)}))
    return 0


def run_central(folder: Path, epochs: int, timeout_s: float) -> dict:
    """C in its own process, on the data and configs of ``folder`` (a prepared chain demo)."""
    spec = json.dumps({"folder": str(folder), "epochs": epochs, "threads": CENTRAL_THREADS})
    env = {**os.environ, "PYTHONPATH": _repo_first()}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--central", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=die_with_parent)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"central: no result within {timeout_s:g} s") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"central: exit {proc.returncode}:\n{stderr[-3000:]}")
    got = json.loads(stdout.strip().splitlines()[-1])
    phase = sum(got["step_seconds"]) + sum(got["val_seconds"])
    kept = got["history"][got["kept_epoch"] - 1]
    return {
        "cpu_s": {"central": round(got["cpu_s"], 2)},
        "cpu_us_per_sample": round(got["cpu_s"] / got["samples"] * 1e6, 1),
        "samples_per_s": round(got["samples"] / phase, 1),
        "step_samples_per_s": round(got["samples"] / sum(got["step_seconds"]), 1),
        "train_samples": got["samples"],
        "train_seconds": round(phase, 3),
        "wall_s": round(wall, 2),
        "epochs": len(got["history"]),
        "kept_epoch": got["kept_epoch"],
        "val_accuracy": kept["val_accuracy"],
        "val_accuracy_last": got["history"][-1]["val_accuracy"],
        "threads": got["threads"],
        "aligned_rows": got["rows"],
    }


# -------------------------------------------------------------------------------------------------------- the bench


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _repo_first() -> str:
    """PYTHONPATH with this checkout first: the node processes and the central child run the code the bench reads."""
    return os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    os.environ["PYTHONPATH"] = _repo_first()  # the launcher passes its environment on to every node
    load_before = _loadavg()
    epochs = QUICK_EPOCHS if args.quick else args.epochs  # None: the demo's own
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vfl-chain-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"chain bench: {args.rounds} round(s), epochs {epochs or 'the demo default'}, load {load_before}; "
          f"nodes [train].threads = {NODE_THREADS}, central torch.set_num_threads({CENTRAL_THREADS})", flush=True)
    try:
        for r in range(args.rounds):
            chain_folder = None
            for name in VARIANTS:
                folder = tmp / f"{name}-r{r + 1}"
                shutil.rmtree(folder, ignore_errors=True)
                if name == "central":
                    # the chain run's own files and configs: the same aligned rows, schedule and specs
                    res = run_central(chain_folder, runs["chain"][-1]["epochs"], args.timeout)
                else:
                    res = run_session(name, folder, epochs, args.timeout)
                    if name == "chain":
                        chain_folder = folder
                runs[name].append(res)
                same = {k: res[k] for k in ("aligned_rows", "train_samples")}
                if same != {k: runs["chain"][-1][k] for k in same}:
                    raise BenchError(f"round {r + 1}: {name} trained on {same}, the chain on "
                                     f"{ {k: runs['chain'][-1][k] for k in same} }: not the same rows")
                print(f"round {r + 1} {name:<7}  {res['samples_per_s']:>9,.0f} samples/s  steps alone "
                      f"{res['step_samples_per_s']:>9,.0f}  wall {res['wall_s']:6.1f} s  CPU "
                      f"{res['cpu_us_per_sample']:6.0f} us/sample {res['cpu_s']}  val acc "
                      f"{res['val_accuracy']:.4f} (epoch {res['kept_epoch']}; last {res['val_accuracy_last']:.4f})",
                      flush=True)
            if not args.keep:
                for name in VARIANTS:
                    shutil.rmtree(tmp / f"{name}-r{r + 1}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return summarise(args, runs, epochs, load_before, time.monotonic() - began)


def summarise(args, runs: dict[str, list[dict]], epochs: int | None, load_before, elapsed: float) -> dict:
    s: dict = {}
    for name, rs in runs.items():
        for key in ("samples_per_s", "step_samples_per_s", "wall_s", "cpu_us_per_sample", "val_accuracy",
                    "val_accuracy_last"):
            s[f"{name}_{key}"] = round(_median([x[key] for x in rs]), 4 if "acc" in key else 1)
        s[f"{name}_val_accuracy_runs"] = [round(x["val_accuracy"], 4) for x in rs]
    for other in ("split", "central"):
        for key, tag in (("samples_per_s", "ratio"), ("step_samples_per_s", "step_ratio")):
            s[f"chain_vs_{other}_{tag}"] = round(s[f"chain_{key}"] / s[f"{other}_{key}"], 4)
            s[f"paired_chain_vs_{other}_{tag}"] = round(_median(
                [a[key] / b[key] for a, b in zip(runs["chain"], runs[other])]), 4)
        # CPU per sample: a cost, so chain / other (above 1: the chain costs more); steadier than wall time here
        s[f"chain_vs_{other}_cpu_ratio"] = round(s["chain_cpu_us_per_sample"] / s[f"{other}_cpu_us_per_sample"], 4)
    s["chain_val_accuracy_ok"] = (all(x["val_accuracy"] >= ACCURACY_GOAL for x in runs["chain"])
                                  if epochs is None else None)  # judged at the demo's epochs only
    s.update(runs=runs, epochs=runs["chain"][0]["epochs"], rounds=args.rounds, central_threads=CENTRAL_THREADS,
             node_threads=NODE_THREADS, quick=args.quick, loadavg={"before": load_before, "after": _loadavg()},
             wall_s=round(elapsed, 1))
    return s


def report(s: dict) -> None:
    print()
    print(f"medians over {s['rounds']} round(s), {s['epochs']} epochs; nodes 1 torch thread each, central 1 thread")
    print(f"{'variant':<8} {'samples/s':>10} {'steps alone':>12} {'wall s':>8} {'CPU us/sample':>14} {'val acc':>8} "
          f"{'last':>7}")
    for name in VARIANTS:
        print(f"{name:<8} {s[f'{name}_samples_per_s']:>10,.0f} {s[f'{name}_step_samples_per_s']:>12,.0f} "
              f"{s[f'{name}_wall_s']:>8.1f} {s[f'{name}_cpu_us_per_sample']:>14,.0f} {s[f'{name}_val_accuracy']:>8.4f} "
              f"{s[f'{name}_val_accuracy_last']:>7.4f}")
    print(f"chain / split {s['chain_vs_split_ratio']:.3f} (paired {s['paired_chain_vs_split_ratio']:.3f}; steps alone "
          f"{s['chain_vs_split_step_ratio']:.3f}); chain / central {s['chain_vs_central_ratio']:.3f} (paired "
          f"{s['paired_chain_vs_central_ratio']:.3f}; steps alone {s['chain_vs_central_step_ratio']:.3f})")
    print(f"CPU per sample, chain / split {s['chain_vs_split_cpu_ratio']:.3f}, chain / central "
          f"{s['chain_vs_central_cpu_ratio']:.3f} (above 1: the chain costs more)")
    ok = s["chain_val_accuracy_ok"]
    print(f"chain val accuracy >= {ACCURACY_GOAL} in every round: "
          f"{'not judged (not the demo epochs)' if ok is None else ok}; load average {s['loadavg']}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--central":
        return central_main(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A B C (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="instead of the demo's own (30)")
    ap.add_argument("--quick", action="store_true", help=f"1 round of {QUICK_EPOCHS} epochs")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--keep", metavar="DIR", help="keep every run's configs, data, logs and model here")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    if args.rounds < 1 or (args.epochs is not None and args.epochs < 1):
        ap.error("--rounds and --epochs must be >= 1")
    return bench_main("chain", lambda: run(args), report, BenchError)


if __name__ == "__main__":
    sys.exit(main())
