"""Fault soak (issue 13): kill one random node at a random moment and start it again, many times.

Each run is a real three-party session on 127.0.0.1 (a label holder, two data holders, so a data holder's loss is a
partial failure) that trains with checkpoints every 5 steps. A seeded plan picks the node (label holder or a data
holder), the signal (``kill -9``, SIGTERM or SIGINT), the moment (during the join/PSI, or at a random point of a
random epoch, found from the label holder's log lines) and the restart delay (0-4 s); the killed node is then
started again with its same command.

Every run must either finish with a model (every node exits 0; every party's ``PARTY-segment.pt`` verifies against
its digest; ``metrics.jsonl`` parses and has exactly one line per epoch, with a validation accuracy) or end with a
clear error (a non-zero exit whose last log line says why, no traceback) within ``RUN_S``. At the bound every node
is killed and the run counts as a hang. No run may leave a ``*.tmp`` file, an unreadable segment, a segment of a
run that failed, or a ``metrics.jsonl`` that does not parse.

CI runs ``QUICK`` plans; ``pytest -m slow -s tests/node/test_fault_soak.py`` runs ``SOAK_RUNS`` and prints a table.
(The label holder ``kill -9`` -> restart -> same accuracy scenario, with its time bound, is
test_lifecycle_restart.py's [J1] test.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfl.node.training import read_segment

from .procs import Node, Nodes
from .test_training_nodes import resumable_session

EPOCHS = 4
PARTIES = ("bank", "dh1", "dh2")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
RUN_S = 150.0  # one run, first start to last exit, on a loaded 2-core box (an uninterrupted run takes ~10 s)
TRIGGER_S = 60.0  # how long to wait for the log line the plan kills at
PAUSED = 5
QUICK = [0, 4, 10]  # seeds CI runs: kill -9 the label holder, SIGTERM a data holder, kill -9 one in the PSI
SOAK_RUNS = 36  # 4 rounds of the 9 (node, signal) pairs


@dataclass(frozen=True)
class Plan:
    """One run's fault: ``node`` gets ``sig`` once the label holder logged ``trigger`` (+ ``jitter_s``), and is
    started again ``restart_after_s`` after it exited."""

    seed: int
    node: str
    sig: str
    trigger: str
    jitter_s: float
    restart_after_s: float

    @classmethod
    def draw(cls, seed: int) -> "Plan":
        rng = random.Random(seed)
        when = rng.choice(["psi"] + [f"epoch {e}: " for e in range(1, EPOCHS + 1)]
                          + [f"epoch {e} of {EPOCHS} done" for e in range(1, EPOCHS)])
        trigger = "PSI with data holder" if when == "psi" else when
        jitter = rng.uniform(0.0, 0.05) if when == "psi" else rng.uniform(0.0, 0.15)  # an epoch is ~0.3-0.5 s
        # node and signal cycle through all 9 pairs (seed % 9), so every pair is tried; the moment and delay are random
        node, sig = PARTIES[seed % 3], list(SIGNALS)[seed // 3 % 3]
        return cls(seed, node, sig, trigger, round(jitter, 3), round(rng.uniform(0.0, 4.0), 2))

    def __str__(self) -> str:
        return (f"seed {self.seed:3d}: {self.sig:4s} {self.node:4s} at {self.trigger.strip()!r}+{self.jitter_s:.2f}s, "
                f"restart after {self.restart_after_s:.1f}s")


@dataclass
class Outcome:
    plan: Plan
    #: "model", "clear error", "hang", "no fault" (the node had finished before its moment: nothing was killed), or
    #: "BAD: ..." (a corrupt or misleading file, a traceback, an error without a reason)
    result: str
    seconds: float
    detail: str = ""


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_files(root: Path, finished_ok: bool, epochs: int = EPOCHS) -> list[str]:
    """What is wrong with the files a run left (empty: nothing)."""
    problems = [f"leftover {p.relative_to(root)}" for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]
    model = root / "model"
    segments = {p: model / f"{p}-segment.pt" for p in PARTIES}
    for party, path in segments.items():
        if not path.exists():
            if finished_ok:
                problems.append(f"no {path.name} although every node exited 0")
            continue
        try:
            read_segment(path)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{path.name} does not verify: {exc}")
        if not finished_ok:
            problems.append(f"{path.name} exists although the run failed (it looks like a finished model)")
    metrics = model / "metrics.jsonl"
    if metrics.exists():
        try:
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        except ValueError as exc:
            return problems + [f"metrics.jsonl does not parse: {exc}"]
        seen = [m.get("epoch") for m in lines]
        if finished_ok and seen != list(range(1, epochs + 1)):  # counted from 1, as in the log
            problems.append(f"metrics.jsonl epochs {seen}, not one line per epoch")
        if finished_ok and not all(isinstance(m.get("val_accuracy"), float) for m in lines):
            problems.append("metrics.jsonl lacks val_accuracy")
    elif finished_ok:
        problems.append("no metrics.jsonl although every node exited 0")
    return problems


def check_logs(procs: list[Node]) -> list[str]:
    return [f"{p.log_path.name}: traceback" for p in procs if "Traceback" in p.output]


def run_plan(tmp: Path, plan: Plan) -> Outcome:
    """Start the session, kill and restart as planned, and judge how it ended."""
    configs = resumable_session(tmp, epochs=EPOCHS)
    began = time.monotonic()
    bound = began + RUN_S
    with Nodes(tmp) as nodes:
        first = {"bank": nodes.start(configs["bank"]), "dh2": nodes.start(configs["dh2"]),
                 "dh1": nodes.start(configs["dh1"])}
        lh, victim = first["bank"], first[plan.node]
        note = ""
        try:
            lh.wait_for(plan.trigger, timeout=TRIGGER_S)
        except AssertionError:
            note = f"no {plan.trigger!r} seen; "
        time.sleep(plan.jitter_s)
        phase = "training" if "training on" in lh.output else "join/PSI"
        final = dict(first)
        if victim.proc.poll() is not None:  # the moment came too late: nothing to kill, and nothing to restart
            note += f"no fault: {plan.node} had already exited {victim.proc.returncode}; "
        else:
            os.kill(victim.proc.pid, SIGNALS[plan.sig])
            try:
                code = victim.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a node that does not stop on a signal is a hang
                return Outcome(plan, "hang", time.monotonic() - began, f"{plan.node} did not stop on SIG{plan.sig}")
            expected = {-signal.SIGKILL} if plan.sig == "KILL" else {PAUSED}
            if code not in expected:
                note += f"the signalled {plan.node} exited {code}: {last_line(victim.output)[-120:]}; "
            time.sleep(plan.restart_after_s)
            final[plan.node] = nodes.start(configs[plan.node])
        codes: dict[str, int | None] = {}
        while time.monotonic() < bound and len(codes) < len(final):
            for name, p in final.items():
                if name not in codes and p.proc.poll() is not None:
                    codes[name] = p.proc.returncode
            time.sleep(0.1)
        seconds = time.monotonic() - began
        everyone = list(nodes.nodes)
        if len(codes) < len(final):
            running = sorted(set(final) - set(codes))
            return Outcome(plan, "hang", seconds, note + f"still running at {RUN_S:.0f} s: {running}; codes {codes}")
    ok = all(c == 0 for c in codes.values())
    problems = check_logs(everyone) + check_files(tmp, ok)
    if not ok:
        for name, c in codes.items():
            if c != 0 and not last_line(final[name].output):
                problems.append(f"{name} exited {c} without a reason")
    detail = note + f"killed during {phase}; exits {codes}"
    if not ok:
        detail += "; " + "; ".join(f"{n}: {last_line(final[n].output)[-160:]}" for n, c in codes.items() if c != 0)
    if problems:
        return Outcome(plan, "BAD: " + "; ".join(problems), seconds, detail)
    if note.startswith("no fault"):
        return Outcome(plan, "no fault", seconds, detail)
    return Outcome(plan, "model" if ok else "clear error", seconds, detail)


def test_the_quick_plans_cover_both_roles():
    assert {Plan.draw(s).node == "bank" for s in QUICK} == {True, False}


@pytest.mark.parametrize("seed", QUICK)
def test_a_node_killed_at_a_random_moment_and_restarted_ends_with_a_model_or_a_clear_error(tmp_path, seed):
    outcome = run_plan(tmp_path, Plan.draw(seed))
    assert outcome.result in ("model", "clear error", "no fault"), (str(outcome.plan), outcome.result, outcome.detail)


@pytest.mark.slow
def test_soak_many_random_kills_and_restarts(tmp_path_factory):
    outcomes = []
    for seed in range(SOAK_RUNS):
        plan = Plan.draw(seed)
        outcome = run_plan(tmp_path_factory.mktemp(f"soak{seed}"), plan)
        outcomes.append(outcome)
        print(f"{plan}  ->  {outcome.result}  ({outcome.seconds:.1f} s)  {outcome.detail}", flush=True)
    print("\n" + summary(outcomes))
    bad = [o for o in outcomes if o.result not in ("model", "clear error", "no fault")]
    assert not bad, "\n".join(f"{o.plan} -> {o.result}: {o.detail}" for o in bad)
    assert sum(o.result != "no fault" for o in outcomes) >= 30, "fewer than 30 runs had a fault: move the moments earlier"


def summary(outcomes: list[Outcome]) -> str:
    """Counts of results, overall, per signal and per killed node."""
    def count(group: list[Outcome]) -> str:
        kinds = ["model", "clear error", "hang", "no fault"]
        parts = [f"{k} {sum(o.result == k for o in group)}" for k in kinds]
        parts.append(f"bad {sum(o.result.startswith('BAD') for o in group)}")
        return f"{len(group):3d} runs: " + ", ".join(parts)

    rows = [f"all          {count(outcomes)}"]
    rows += [f"SIG{s:<9s} {count([o for o in outcomes if o.plan.sig == s])}" for s in SIGNALS]
    rows += [f"{n:<12s} {count([o for o in outcomes if o.plan.node == n])}" for n in PARTIES]
    rows.append(f"longest run {max(o.seconds for o in outcomes):.1f} s")
    return "\n".join(rows)


def test_a_data_holder_that_hears_the_pause_and_the_drop_at_once_waits_for_the_label_holder(tmp_path):
    """The label holder's BYE {pause} and the end of its connection reach a busy data holder together (here: it is
    stopped while the label holder pauses). The data holder must act on the BYE first and wait for the label holder;
    it used to see the drop first, rejoin, then read the old connection's BYE as the end of the session (exit 1)."""
    configs = resumable_session(tmp_path, epochs=EPOCHS)
    with Nodes(tmp_path) as nodes:
        lh, dh2, dh1 = (nodes.start(configs[p]) for p in ("bank", "dh2", "dh1"))
        lh.wait_for(f"epoch 1 of {EPOCHS} done", timeout=TRIGGER_S)
        os.kill(dh1.proc.pid, signal.SIGSTOP)
        try:
            os.kill(lh.proc.pid, signal.SIGTERM)
            assert lh.wait(timeout=20) == PAUSED, lh.output
            time.sleep(0.5)  # the BYE and the closed connection are both waiting at dh1 now
        finally:
            os.kill(dh1.proc.pid, signal.SIGCONT)
        dh1.wait_for("paused", timeout=10)
        time.sleep(1.0)
        assert dh1.proc.poll() is None, dh1.output
        restarted = nodes.start(configs["bank"])
        codes = {"bank": restarted.wait(timeout=RUN_S), "dh1": dh1.wait(timeout=30), "dh2": dh2.wait(timeout=30)}
        assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, (restarted.output, dh1.output, dh2.output)
    assert check_files(tmp_path, finished_ok=True) == []


def test_what_a_node_killed_mid_write_left_is_removed_by_its_next_run(tmp_path):
    """``kill -9`` during an atomic write leaves a hidden ``.NAME.*.tmp`` (the soak found a manifest's). The next run
    of that party removes its own leftovers (checkpoints, the label holder's manifest, the segment), and only its own:
    another party's temporary may be a write in progress."""
    configs = resumable_session(tmp_path, epochs=1)
    checkpoints, model = tmp_path / "model" / "checkpoints", tmp_path / "model"
    checkpoints.mkdir(parents=True)
    planted = [checkpoints / ".manifest.json.k1ll3d.tmp", checkpoints / ".bank-step-5.pt.k1ll3d.tmp",
               checkpoints / ".dh1-step-10.pt.k1ll3d.tmp", model / ".dh2-segment.pt.k1ll3d.tmp"]
    for path in planted:
        path.write_bytes(b"half a file")
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start(configs[p]) for p in PARTIES}
        codes = {p: n.wait(timeout=RUN_S) for p, n in procs.items()}
    assert codes == {p: 0 for p in PARTIES}, {p: n.output for p, n in procs.items()}
    assert [p.name for p in planted if p.exists()] == []
    assert check_files(tmp_path, finished_ok=True, epochs=1) == []


def test_a_data_holder_killed_in_the_psi_and_restarted_after_the_peer_timeout_rejoins(tmp_path):
    """A session that trains waits for a lost data holder in the PSI as it does in training ([L2], [X8]): one
    killed (-9) in the PSI and started again later than the peer timeout (3 s here) joins again and the run
    finishes. The session used to end at the peer timeout, and the restarted node waited out its handshake timeout."""
    configs = resumable_session(tmp_path, epochs=1)
    with Nodes(tmp_path) as nodes:
        lh, dh2, dh1 = (nodes.start(configs[p]) for p in ("bank", "dh2", "dh1"))
        lh.wait_for("PSI with data holder 'dh1'", timeout=TRIGGER_S)
        os.kill(dh1.proc.pid, signal.SIGKILL)
        dh1.wait(timeout=10)
        lh.wait_for("data holder 'dh1' has sent nothing", timeout=20)
        restarted = nodes.start(configs["dh1"])
        codes = {"bank": lh.wait(timeout=RUN_S), "dh1": restarted.wait(timeout=30), "dh2": dh2.wait(timeout=30)}
        assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, (lh.output, restarted.output, dh2.output)
    assert check_files(tmp_path, finished_ok=True, epochs=1) == []
