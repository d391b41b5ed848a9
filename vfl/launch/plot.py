"""`vfl plot`: learning curves of a run as a PNG, from the label holder's ``model/metrics.jsonl``.

One panel for the loss (training vs validation), one for the task's quality metrics (accuracy and ROC AUC for a
binary task, accuracy for a multiclass one, RMSE for regression), and, when the run was audited, one for the label
leakage: per data holder and epoch, the AUC of the norm and direction attacks on the gradients it was sent (0.5: the
gradients say nothing about the labels; 1: they give every label away), or the multiclass attack's accuracy. matplotlib is an optional extra (``vfl[plot]``);
it is used through the Agg canvas directly, so no GUI backend and no global pyplot state are touched.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..files import atomic_write
from ..errors import SetupError

DEFAULT_NAME = "learning-curves.png"
NEEDS_MATPLOTLIB = "needs matplotlib: pip install 'vfl[plot]'"

# (metric, label in the legend, colour); train curves are dashed, validation curves solid
QUALITY = [("accuracy", "accuracy", "tab:blue"), ("auc", "ROC AUC", "tab:orange"), ("rmse", "RMSE", "tab:purple")]
LOSS_COLOUR = "tab:red"
# the audit's figures (metrics.jsonl: figure -> {party: value}), with their legend label and line style
LEAK = [("leak_auc_norm", "norm attack AUC", "-"), ("leak_auc_direction", "direction attack AUC", "--"),
        ("leak_attack_accuracy", "attack accuracy", ":")]
LEAK_COLOURS = ["tab:green", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]


class PlotError(SetupError):
    """A problem worth one line: no metrics yet, a malformed file, matplotlib missing."""


class MissingMatplotlib(PlotError):
    def __init__(self) -> None:
        super().__init__(NEEDS_MATPLOTLIB)


def find_metrics(run_dir: Path) -> Path:
    """``RUN_DIR/model/metrics.jsonl``; a model folder or the file itself are accepted too."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    for candidate in (run_dir / "model" / "metrics.jsonl", run_dir / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run folder")
    raise PlotError(f"{run_dir / 'model' / 'metrics.jsonl'}: no metrics yet (the label holder writes one line per "
                    "finished epoch)")


def load_metrics(path: Path) -> list[dict]:
    """Epoch records in epoch order; a repeated epoch (a resumed run) keeps its last record."""
    by_epoch: dict[int, dict] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}: line {number} is not a JSON object")
        epoch = record.get("epoch", len(by_epoch) + 1)
        if not isinstance(epoch, int):
            raise PlotError(f"{path}: line {number}: epoch must be an integer")
        by_epoch[epoch] = record
    if not by_epoch:
        raise PlotError(f"{path}: no epochs recorded yet (the file is empty)")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _run_name(run_dir: Path, metrics_path: Path) -> str:
    """"vfl demo NAME" from the run's summary.json, else the run folder's name."""
    folder = metrics_path.resolve().parent
    if folder.name == "model":
        folder = folder.parent
    for candidate in (run_dir / "summary.json", folder / "summary.json"):
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("demo"):
            return f"vfl demo {data['demo']}  ({folder.name})"
    return f"vfl run {folder.name}"


def _series(epochs: list[dict], key: str) -> list[float]:
    out = []
    for record in epochs:
        v = record.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _has(epochs: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) for r in epochs)


def _last_finite(values: list[float]) -> float | None:
    for v in reversed(values):
        if math.isfinite(v):
            return v
    return None


def _leak_series(epochs: list[dict]) -> list[tuple[str, str, str, list[float]]]:
    """(party, figure key, label, values per epoch) of every audit figure recorded, parties in name order."""
    parties = sorted({str(p) for r in epochs for key, _, _ in LEAK if isinstance(r.get(key), dict) for p in r[key]})
    out = []
    for party in parties:
        for key, label, _ in LEAK:
            ys = []
            for record in epochs:
                v = record.get(key).get(party) if isinstance(record.get(key), dict) else None
                ys.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
            if any(math.isfinite(y) for y in ys):
                out.append((party, key, label, ys))
    return out


def _epoch_ticks(last: int) -> list[int]:
    """1, then multiples of a round step, at most ~12 ticks."""
    step = next(s for s in (1, 5, 10, 25, 50, 100, 250, 500, 1000, 10**9) if last / s <= 12)
    return [1] + [t for t in range(step, last + 1, step) if t > 1]


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, dpi: int = 110) -> Path:
    """Write the learning curves of ``run_dir`` as a PNG (atomically); returns its path."""
    run_dir = Path(run_dir)
    metrics_path = find_metrics(run_dir)
    epochs = load_metrics(metrics_path)
    if run_dir.is_file():
        run_dir = run_dir.parent
    out_path = Path(out) if out is not None else run_dir / DEFAULT_NAME
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib() from None

    xs = [r["epoch"] if isinstance(r.get("epoch"), int) else i + 1 for i, r in enumerate(epochs)]  # 1-based
    quality = [(k, label, colour) for k, label, colour in QUALITY
               if _has(epochs, f"val_{k}") or _has(epochs, f"train_{k}")]
    regression = any(k == "rmse" for k, _, _ in quality)

    final = []
    for key, label in [*((k, lbl) for k, lbl, _ in quality), ("loss", "loss")]:
        v = _last_finite(_series(epochs, f"val_{key}"))
        if v is not None:
            final.append(f"{label} {v:.4f}")
    title = _run_name(run_dir, metrics_path)
    subtitle = (f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''}; final validation: "
                + (", ".join(final) if final else "none recorded"))

    leak = _leak_series(epochs)
    fig = Figure(figsize=(18 if leak else 12, 5.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=13)
    axes = list(fig.subplots(1, 3 if leak else 2))
    ax_loss, ax_q = axes[:2]
    marker = "o" if len(xs) <= 40 else None

    def curve(ax, key: str, label: str, colour: str) -> None:
        for split, style, name in (("train", "--", "training"), ("val", "-", "validation")):
            ys = _series(epochs, f"{split}_{key}")
            if any(math.isfinite(y) for y in ys):
                ax.plot(xs, ys, style, color=colour, marker=marker, markersize=3.5, linewidth=1.8,
                        alpha=0.75 if split == "train" else 1.0, label=f"{name} {label}")

    curve(ax_loss, "loss", "loss", LOSS_COLOUR)
    ax_loss.set_title("loss (mean squared error)" if regression else "loss (cross-entropy)", fontsize=12)
    ax_loss.set_ylabel("loss", fontsize=11)
    if quality:
        for key, label, colour in quality:
            curve(ax_q, key, label, colour)
        names = " and ".join(label for _, label, _ in quality)
        ax_q.set_title(f"{names} (higher is better)" if not regression else "RMSE (lower is better)", fontsize=12)
        ax_q.set_ylabel(names, fontsize=11)
        if not regression:
            low = min((y for k, _, _ in quality for s in ("train", "val") for y in _series(epochs, f"{s}_{k}")
                       if math.isfinite(y)), default=0.0)
            ax_q.set_ylim(max(0.0, low - 0.02), 1.005)
    else:
        ax_q.set_title("no quality metric recorded", fontsize=12)
    if leak:
        ax_leak = axes[2]
        parties = sorted({party for party, _, _, _ in leak})
        styles = {key: style for key, _, style in LEAK}
        for party, key, label, ys in leak:
            ax_leak.plot(xs, ys, styles[key], color=LEAK_COLOURS[parties.index(party) % len(LEAK_COLOURS)],
                         marker=marker, markersize=3.5, linewidth=1.8, label=f"{party} {label}")
        ax_leak.axhline(0.5, color="0.5", linewidth=1, linestyle=":")
        ax_leak.set_title("label leakage to each data holder (0.5: none)", fontsize=12)
        ax_leak.set_ylabel("attack AUC / accuracy on the gradients sent", fontsize=11)
        ax_leak.set_ylim(0.0 if any(k == "leak_attack_accuracy" for _, k, _, _ in leak) else 0.45, 1.02)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_xlim(0.5, max(xs) + 0.5)
        ax.set_xticks(_epoch_ticks(max(xs)))
        ax.grid(True, alpha=0.35)
        ax.tick_params(labelsize=10)
        if ax.lines:
            ax.legend(fontsize=10, loc="best", framealpha=0.9)
    fig.text(0.5, -0.01, "training: every batch's outputs before its update, pooled over the epoch; "
             "validation: the held-out rows after the epoch", ha="center", va="top", fontsize=9, color="0.35")

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a picture to share: the usual mode, not the temporary file's 0600

    atomic_write(out_path, write)
    return out_path
