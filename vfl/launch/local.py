"""Start several nodes on this machine, each as its own process, and watch them.

A convenience, not a coordinator: each node runs ``python -m vfl node --config FILE`` exactly as a user would from a
terminal. The launcher prefixes their logs, forwards Ctrl-C, waits, and exits non-zero naming any node that failed.
It then records the run in its folder: ``logs/NAME.log`` per node and ``summary.json`` (:func:`summarize_run`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from ..files import atomic_write_text

STOP_GRACE_S = 3.0  # then SIGKILL: a Ctrl-C never takes the launcher more than a few seconds
COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


@dataclass
class NodeProcess:
    name: str
    config: Path
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each line arrived (the launcher's monotonic clock)
    pump: threading.Thread | None = None


def node_command(config: Path, node_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "vfl", "node", "--config", str(config), *node_args]


def _pump(node: NodeProcess, stream: IO[str], write: Callable[[str], None], prefix: str) -> None:
    for line in stream:
        node.times.append(time.monotonic())
        node.lines.append(line)
        write(f"{prefix}{line}")


@dataclass
class LaunchResult:
    exit_codes: dict[str, int]
    wall_s: float
    logs: dict[str, list[str]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)  # per node: each log line's arrival
    summary: dict | None = None  # what summary.json says, when the run was recorded

    @property
    def failed(self) -> list[str]:
        return [name for name, code in self.exit_codes.items() if code != 0]


def launch(
    configs: list[tuple[str, Path]],
    *,
    out: IO[str] = sys.stderr,
    colour: bool | None = None,
    timeout_s: float | None = None,
    record: Path | None = None,
    started: float | None = None,
    node_args: list[str] | tuple[str, ...] = (),
) -> LaunchResult:
    """Run every (name, config) as a node process, in this order: the label holder first (it binds), then any
    segment holders, nearest to the label holder first (each binds for its inputs), then the data holders
    (:func:`start_order` sorts configs so). A node whose downstream is not up yet only waits (ZeroMQ reconnects).

    ``record``: the run folder for ``logs/`` and ``summary.json`` (default: the folder of the configs, when they
    share one). ``started``: a ``time.monotonic()`` taken when the command began, for ``wall_seconds``.
    ``node_args``: added to every node's command line (``--fresh`` / ``--resume``).
    """
    colour = out.isatty() if colour is None else colour
    width = max(len(name) for name, _ in configs)
    lock = threading.Lock()

    def write(text: str) -> None:
        with lock:
            out.write(text)
            out.flush()

    nodes: list[NodeProcess] = []
    began = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, (name, config) in enumerate(configs):
            proc = subprocess.Popen(
                node_command(config, node_args),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we forward it, so every node stops the same way
            )
            node = NodeProcess(name, config, proc)
            prefix = f"{name:<{width}} | "
            if colour:
                prefix = f"{COLOURS[i % len(COLOURS)]}{prefix}{RESET}"
            node.pump = threading.Thread(target=_pump, args=(node, proc.stdout, write, prefix), daemon=True)
            node.pump.start()
            nodes.append(node)
        while any(n.proc.poll() is None for n in nodes) and not stop.is_set():
            if timeout_s is not None and time.monotonic() - began > timeout_s:
                write(f"launcher: timeout after {timeout_s:g} s, stopping every node\n")
                break
            failed = [n for n in nodes if n.proc.poll() not in (None, 0)]
            if failed:  # the session cannot complete without it: do not leave the others waiting for their timeouts
                write(f"launcher: {failed[0].name} failed (exit {failed[0].proc.returncode}), stopping every node\n")
                break
            stop.wait(0.05)
    finally:
        stop_all(nodes, write)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for n in nodes:
        if n.pump is not None:
            n.pump.join(timeout=2)
    result = LaunchResult(
        {n.name: n.proc.returncode for n in nodes},
        time.monotonic() - began,
        {n.name: n.lines for n in nodes},
        {n.name: n.times for n in nodes},
    )
    folders = {Path(path).resolve().parent for _, path in configs}
    if record is None and len(folders) == 1:
        record = folders.pop()
    if record is not None:
        result.summary = record_run(record, result, configs[0][1], started=started)
    return result


def stop_all(nodes: list[NodeProcess], write: Callable[[str], None]) -> None:
    """SIGTERM every live node, then SIGKILL what is still there after ``STOP_GRACE_S``."""
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for n in nodes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            n.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            write(f"launcher: {n.name} did not stop within {STOP_GRACE_S:g} s, killing it\n")
            n.proc.kill()
            n.proc.wait()


# ------------------------------------------------------------------------------------------------- the record

_SENT = re.compile(r"\(exit (-?\d+); sent (\d+) bytes, received (\d+) bytes\)")
_ALIGNED = re.compile(r"rows aligned: (\d+)")
_TRAINING = re.compile(r"training on (\d+) aligned rows \((\d+) for validation\)")
_THROUGHPUT = re.compile(r"training throughput: (\d+) samples in ([\d.]+) s of training(: [\d,]+ samples/s)?")
_STEPS_ALONE = re.compile(r"; steps alone (?:\(no validation or checkpoints\) )?([\d.]+) s(: [\d,]+ samples/s)?")
_STARTED = re.compile(r"listening on ")


def _first(lines: list[str], pattern: re.Pattern) -> tuple[int, re.Match] | None:
    for i, line in enumerate(lines):
        m = pattern.search(line)
        if m:
            return i, m
    return None


def _last(lines: list[str], pattern: re.Pattern) -> re.Match | None:
    found = [m for m in map(pattern.search, lines) if m]
    return found[-1] if found else None


def _label_holder(label_holder_config: Path):
    from ..node.config import ConfigError, load_config

    try:
        return load_config(label_holder_config)
    except ConfigError:
        return None


def _role(cfg, party: str) -> str | None:
    """``party``'s role as the label holder's session config has it (None: no config, or a party it does not name)."""
    if cfg is None:
        return None
    if party == cfg.party:
        return cfg.role
    if cfg.session is not None and party in cfg.session.segments:
        return "segment_holder"
    if cfg.session is not None and party in cfg.session.cut_widths:
        return "data_holder"
    return None


def start_order(cfg) -> tuple:
    """Sort key of a node config for :func:`launch`: the label holder, then segment holders by their distance from
    it (nearest first), then data holders; by party id within each."""
    if cfg.is_label_holder:
        return (0, 0, cfg.party)
    if cfg.is_segment_holder:
        return (1, cfg.session.chain.depth(cfg.party), cfg.party)
    return (2, 0, cfg.party)


def _metrics_path(cfg) -> Path | None:
    output = cfg.train.output if cfg is not None and cfg.train is not None else None
    return output / "metrics.jsonl" if output is not None else None


#: the audit's per-epoch figures in metrics.jsonl, each a map party -> value (``vfl.train.segments.TorchTop``)
LEAK_KEYS = ("leak_auc_norm", "leak_auc_direction", "leak_attack_accuracy")


def leak_by_party(record: dict) -> dict[str, dict[str, float]]:
    """One epoch record's audit figures as party -> {figure: value} (empty when the run was not audited)."""
    out: dict[str, dict[str, float]] = {}
    for key in LEAK_KEYS:
        values = record.get(key)
        if isinstance(values, dict):
            for party, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(str(party), {})[key] = float(value)
    return dict(sorted(out.items()))


def _kept_epoch(cfg, trained: int) -> int | None:
    """The epoch (1-based) whose weights the segments hold: the finished manifest's ``kept_epoch``, else the last."""
    from ..node.lifecycle import read_manifest

    if not trained:
        return None
    manifest = None
    if cfg is not None and cfg.train is not None:
        manifest = read_manifest(cfg.train.checkpoint_dir, cfg.run, cfg.session.model)
    kept = manifest.get("kept_epoch") if manifest is not None and manifest.get("finished") is True else None
    return kept if type(kept) is int and 1 <= kept <= trained else trained


def summarize_run(result: LaunchResult, label_holder_config: Path, *, started: float | None = None) -> dict:
    """What a run did, each figure named for what it covers.

    ``wall_seconds``: the whole command, from ``started`` (else the nodes' part) to this summary, so process start,
    PSI, training and exit; ``launch_seconds``: the nodes, from starting them to the last exit; ``psi_seconds``:
    from the label holder's first line to its "rows aligned" line (joins, handshakes, link check, PSI), by the
    launcher's clock on their arrival; ``train_samples`` / ``train_seconds`` / ``train_samples_per_second``: the
    label holder's own measure of its training phase (whole steps at their true size; validation and checkpoints
    inside the phase included; no rate over less than a second); ``train_step_seconds`` /
    ``train_step_samples_per_second``: the same samples over the steps alone (no validation, no checkpoints).
    ``parties``: each node's role (label_holder, data_holder, segment_holder), from the label holder's session config.
    ``epochs`` (trained) comes from the label holder's metrics.jsonl (one record per epoch); ``kept_epoch`` is the
    epoch whose weights the saved segments hold (the last one, or with ``[train].keep = "best"`` the one with the
    lowest validation loss, from the checkpoint manifest), and ``final`` that epoch's metrics. ``defence`` is the
    session's ``[privacy]`` defence as the nodes log it, ``window`` the pipeline window (with ``"auto"``: the one the
    label holder chose, as its metrics.jsonl records it), and ``leak`` the label-leakage audit of the last epoch
    trained, party -> {``leak_auc_norm``, ...}.
    """
    from .plot import PlotError, load_metrics

    lh = next(iter(result.logs), None)
    lines = result.logs.get(lh, []) if lh is not None else []
    times = result.times.get(lh, []) if lh is not None else []
    cfg = _label_holder(label_holder_config)
    metrics_path = _metrics_path(cfg)
    try:
        epochs = load_metrics(metrics_path) if metrics_path is not None and metrics_path.exists() else []
    except PlotError:
        epochs = []
    traffic = {}
    for party, party_lines in result.logs.items():
        m = _last(party_lines, _SENT)
        if m:
            traffic[party] = {"sent_bytes": int(m.group(2)), "received_bytes": int(m.group(3))}
    aligned = _last(lines, _ALIGNED)
    training = _last(lines, _TRAINING)
    throughput = _last(lines, _THROUGHPUT)
    psi_seconds = None
    start, end = _first(lines, _STARTED), _first(lines, _ALIGNED)
    if start is not None and end is not None and len(times) > end[0]:
        psi_seconds = round(times[end[0]] - times[start[0]], 3)
    train_samples = int(throughput.group(1)) if throughput else None
    train_seconds = float(throughput.group(2)) if throughput else None
    steps_alone = _STEPS_ALONE.search(throughput.string) if throughput else None
    step_seconds = float(steps_alone.group(1)) if steps_alone else None
    kept = _kept_epoch(cfg, len(epochs))
    final = next((e for e in epochs if e.get("epoch") == kept), epochs[-1] if epochs else {})
    return {
        "ok": bool(result.exit_codes) and all(code == 0 for code in result.exit_codes.values()),
        "exit_codes": result.exit_codes,
        "wall_seconds": round(time.monotonic() - started if started is not None else result.wall_s, 2),
        "launch_seconds": round(result.wall_s, 2),
        "psi_seconds": psi_seconds,
        "aligned_rows": int(aligned.group(1)) if aligned else None,
        "train_rows": int(training.group(1)) - int(training.group(2)) if training else None,
        "epochs": len(epochs),
        "kept_epoch": kept,
        "final": {k: v for k, v in final.items() if k not in ("epoch", "step") and k not in LEAK_KEYS},
        "train_samples": train_samples,
        "train_seconds": train_seconds,
        "train_samples_per_second": (round(train_samples / train_seconds, 1)
                                     if throughput and throughput.group(3) and train_seconds else None),
        "train_step_seconds": step_seconds,
        "train_step_samples_per_second": (round(train_samples / step_seconds, 1)
                                          if steps_alone and steps_alone.group(2) and step_seconds else None),
        "traffic": traffic,
        "window": (epochs[-1].get("window") if epochs and "window" in epochs[-1] else
                   cfg.session.window if cfg is not None else None),
        "defence": cfg.session.privacy.describe() if cfg is not None else None,
        "leak": leak_by_party(epochs[-1] if epochs else {}),
        "parties": {name: _role(cfg, name) for name in sorted(result.logs)},
        "logs": {name: f"logs/{name}.log" for name in result.logs},
    }


def record_run(folder: Path, result: LaunchResult, label_holder_config: Path, *, started: float | None = None,
               extra: dict | None = None) -> dict:
    """Write ``logs/NAME.log`` per node and ``summary.json`` into the run folder (each atomically); returns the
    summary. ``extra``: fields a caller adds (``vfl demo``: the data set's name and rows)."""
    folder = Path(folder)
    for name, lines in result.logs.items():
        atomic_write_text(folder / "logs" / f"{name}.log", "".join(lines))
    summary = {**summarize_run(result, label_holder_config, started=started), **(extra or {})}
    write_summary(folder, summary)
    return summary


def write_summary(folder: Path, summary: dict) -> None:
    atomic_write_text(Path(folder) / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
