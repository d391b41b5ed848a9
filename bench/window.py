"""Accuracy and wall time of split training against the pipeline window W, between real node processes.

    .venv/bin/python bench/window.py                          # about 4 minutes on 2 idle cores (16 runs)
    .venv/bin/python bench/window.py --repeats 2 --others 1   # about 1 minute; too noisy to compare W = 1 and 2

The digits split of ``tests/node/test_convergence.py`` (scikit-learn's ``load_digits``: two data holders with 32
pixel columns each, the label holder with the labels only; bottoms 32-64-32, top 64-64-10, Adam lr 0.003, weight
decay 1e-4, 20 epochs, batch 32), trained by a label holder and two data holders started as ``vfl node`` processes
on 127.0.0.1, with the same seeds at every W. A fixed stratified quarter of the data set (450 rows) is given to no
party; the parties get the other 1347 rows (each drops 8 of its own), train on all of their aligned rows, and each
run's saved segments are scored on the held-out rows, so every run of every W is compared on the same rows.
W = 1 and the default window get ``--repeats`` runs, the other windows ``--others`` runs, interleaved
(1, 2, 4, 8, 1, 2, ...). Repeat ``r`` uses ``[train].seed = 5 + r`` at every window: the label holder draws its
schedule over a keyed-hash order of its own IDs, so a seed gives the same batches in every session, and every W is
averaged over the same batch orders (the batch order alone moves one run's accuracy by about 0.2-0.3 points).

Output: one line per run, a table, and as the last line one JSON object: ``accuracy`` (mean held-out accuracy per
W), ``accuracy_runs`` (per run), ``wall_s`` (mean wall time of one run per W: first node started to last node
exited, start-up, PSI and checkpoints included), ``wall_min_s`` (the fastest run per W: on a shared machine, steadier
than the mean), ``default_window`` (the default of ``prepare_session``),
``default_within_0_5pp`` (|mean accuracy at the default W - at W = 1| <= 0.5 percentage points),
``default_minus_w1_pp``, ``repeats`` (runs per W), ``n_held_out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.node.test_convergence import (  # noqa: E402
    DEFAULT_WINDOW,
    OTHER_REPEATS,
    PAIRED_REPEATS,
    TOLERANCE_PP,
    WINDOWS,
    window_repeats,
    window_sweep,
)


def _stop(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the node processes of the current run are stopped
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=PAIRED_REPEATS, help="runs of W = 1 and of the default window")
    ap.add_argument("--others", type=int, default=OTHER_REPEATS, help="runs of every other window")
    ap.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    ap.add_argument("--keep", metavar="DIR", help="write the runs (configs, CSVs, logs, segments) here and keep them")
    args = ap.parse_args()
    if 1 not in args.windows or DEFAULT_WINDOW not in args.windows:
        ap.error(f"--windows must include 1 and the default window {DEFAULT_WINDOW}")
    if args.repeats < 1 or args.others < 1:
        ap.error("--repeats and --others must be >= 1")
    signal.signal(signal.SIGTERM, _stop)
    repeats = window_repeats(tuple(args.windows), paired=args.repeats, others=args.others)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        result = window_sweep(folder, repeats, log=log)
    else:
        with tempfile.TemporaryDirectory(prefix="vfl-window-") as tmp:
            result = window_sweep(Path(tmp), repeats, log=log)

    table = result["windows"]
    delta_pp = result["default_minus_w1_pp"]
    print()
    print(f"digits: parties hold {result['n_parties_rows']} rows, held-out accuracy on {result['n_held_out']} others")
    print(f"{'W':>3}  {'runs':>4}  {'accuracy':>8}  {'std (pp)':>8}  {'wall s/run':>10}  {'fastest s':>9}  per run")
    for w, row in table.items():
        mark = "  <- default" if w == DEFAULT_WINDOW else ""
        runs = " ".join(f"{a:.4f}" for a in row["runs"])
        std = f"{100 * row['std']:.2f}" if len(row["runs"]) > 1 else "-"
        print(f"{w:>3}  {len(row['runs']):>4}  {row['accuracy']:>8.4f}  {std:>8}  {row['wall_s']:>10.1f}  "
              f"{row['wall_min_s']:>9.1f}  {runs}{mark}")
    print(f"default W={DEFAULT_WINDOW} minus W=1: {delta_pp:+.2f} percentage points")
    summary = {
        "accuracy": {str(w): round(row["accuracy"], 6) for w, row in table.items()},
        "accuracy_runs": {str(w): [round(a, 6) for a in row["runs"]] for w, row in table.items()},
        "wall_s": {str(w): round(row["wall_s"], 2) for w, row in table.items()},
        "wall_min_s": {str(w): round(row["wall_min_s"], 2) for w, row in table.items()},
        "default_window": DEFAULT_WINDOW,
        "default_within_0_5pp": abs(delta_pp) <= TOLERANCE_PP,
        "default_minus_w1_pp": round(delta_pp, 3),
        "repeats": {str(w): n for w, n in repeats.items()},
        "n_held_out": result["n_held_out"],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
