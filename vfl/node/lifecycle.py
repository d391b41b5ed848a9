"""Where a training run stands on disk, and the user's choice at start: resume it, or train it again from scratch.

A run's files, per party: in ``[train].output`` its segment ``PARTY-segment.pt`` (and, at the label holder,
``metrics.jsonl``); in ``[train].checkpoint_dir`` its checkpoints ``PARTY-step-N.pt`` (and, at the label holder,
``manifest.json``: the step every party confirmed, and ``"finished": true`` once the last epoch is trained and the
label holder's segment saved). The label holder decides where the session starts and tells the data holders in its
SCHEDULE (``first_step``); a data holder checks that against what it was told on its command line.

``vfl node`` (and ``vfl launch``) take one of three choices (``StartMode``):

- ``auto`` (default): resume an unfinished run from its checkpoint; refuse a finished one (exit 2, saying how to
  start afresh), so a finished model is never silently trained again.
- ``fresh``: train from epoch 1; this party's earlier results of the folder are first moved (never deleted) to
  ``OUTPUT/previous-TIME/``, and the log says where.
- ``resume``: there must be a checkpoint to resume from (exit 2 if there is none, or the run already finished).

Nothing here imports torch: the checks run before any model is built.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import SetupError
from ..files import atomic_write_text


class StartMode(str, enum.Enum):
    AUTO = "auto"
    FRESH = "fresh"
    RESUME = "resume"


class StartError(SetupError):
    """This party cannot start the way it was asked to (``--fresh``/``--resume``/a finished run). Exit 2."""


METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"


def read_manifest(checkpoint_dir: Path, run: str, model: str) -> dict | None:
    """The label holder's manifest, if there is one for this run and model (another run's is no resume point)."""
    try:
        manifest = json.loads((Path(checkpoint_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("run") != run or manifest.get("model") != model:
        return None
    return manifest


def checkpoint_files(checkpoint_dir: Path, party: str) -> list[Path]:
    return sorted(p for p in Path(checkpoint_dir).glob(f"{party}-step-*.pt") if p.name[len(party) + 6:-3].isdigit())


def run_files(cfg) -> list[Path]:
    """This party's files of a training run in its folders: what ``--fresh`` moves aside."""
    t = cfg.train
    files = [t.output / f"{cfg.party}-segment.pt"]
    if cfg.is_label_holder:
        files += [t.output / METRICS, t.checkpoint_dir / MANIFEST]
    files += checkpoint_files(t.checkpoint_dir, cfg.party) + [t.checkpoint_dir / f"{cfg.party}-kept.json"]
    return [f for f in files if f.is_file()]


def set_aside(cfg, files: list[Path], log: logging.Logger, why: str) -> Path | None:
    """Move ``files`` to ``OUTPUT/previous-TIME/`` (checkpoints into its ``checkpoints/``); returns that folder.

    Moved, never deleted: an earlier model is only ever replaced on purpose, and the user can take it back. Parties
    sharing one output folder that start within the same second share one ``previous-TIME/``."""
    if not files:
        return None
    out = cfg.train.output
    dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    for f in files:
        try:
            target = dest / f.relative_to(out)
        except ValueError:
            target = dest / "checkpoints" / f.name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # model state: owner only
        shutil.move(os.fspath(f), os.fspath(target))
    log.warning("%s: moved this party's earlier results (%d file%s) to %s", why, len(files),
                "" if len(files) == 1 else "s", dest)
    return dest


def fresh_command(cfg) -> str:
    return f"`vfl node --fresh --config {cfg.path}` (or `vfl launch FOLDER --fresh`)"


def label_holder_start(cfg, mode: StartMode, log: logging.Logger) -> dict | None:
    """The label holder's decision, before any network activity: the manifest to resume from, or None (step 0).

    Raises ``StartError`` for a finished run under ``auto``/``resume`` and for ``resume`` without a checkpoint."""
    t = cfg.train
    manifest = read_manifest(t.checkpoint_dir, cfg.run, cfg.session.model)
    finished = manifest is not None and manifest.get("finished") is True
    if mode is StartMode.FRESH:
        set_aside(cfg, run_files(cfg), log, f"--fresh: training run {cfg.run!r} from epoch 1")
        return None
    if finished:
        epochs = manifest.get("epochs", "all its")
        raise StartError(
            f"{cfg.path}: run {cfg.run!r} already finished ({epochs} epochs; its model and metrics are in "
            f"{t.output}), so there is nothing to resume. To train it again from scratch: {fresh_command(cfg)}; "
            f"the old results are then moved to {t.output}/previous-TIME/, not deleted"
        )
    if manifest is None:
        if mode is StartMode.RESUME:
            raise StartError(
                f"{cfg.path}: --resume, but there is no checkpoint of run {cfg.run!r} in {t.checkpoint_dir} to resume "
                f"from; start without --resume to train it from epoch 1"
            )
        stale = [f for f in (t.output / METRICS,) if f.is_file()]  # another run's history: it is not this run's
        set_aside(cfg, stale, log, f"run {cfg.run!r} starts from epoch 1")
        return None
    return manifest


def data_holder_check(cfg, mode: StartMode) -> None:
    """A data holder told ``--resume`` must hold checkpoints to resume from (it learns the step from the SCHEDULE)."""
    if mode is StartMode.RESUME and not checkpoint_files(cfg.train.checkpoint_dir, cfg.party):
        raise StartError(
            f"{cfg.path}: --resume, but there is no checkpoint of party {cfg.party!r} in {cfg.train.checkpoint_dir} "
            f"to resume from; start without --resume to follow the label holder"
        )


def trim_metrics(path: Path, completed_epochs: int) -> int:
    """Drop the lines of ``metrics.jsonl`` for epochs after ``completed_epochs`` (1-based numbers), atomically.

    A resume re-runs the epoch its checkpoint is in: without this its line (and any later one an interrupted run
    wrote) would be there twice. Returns how many lines were dropped. Lines that are not epoch records are kept."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            epoch = json.loads(line).get("epoch")
        except (ValueError, AttributeError):
            epoch = None
        if not (isinstance(epoch, int) and epoch > completed_epochs):
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
