"""Where a training (or prediction) node keeps its feature matrix: one ``.npy`` file in ``[train].output``.

The node reads its table once, at start-up (before any network activity, so a bad value is still one line and exit
2), streaming its feature columns in blocks of rows into ``OUTPUT/PARTY-features-KEY.npy`` (float32, rows x features x
4 bytes, rows in the order of the party's table file; mode 0600, written atomically: see
:mod:`vfl.train.feature_file`). Training and prediction then read each batch's rows from it through the PSI's aligned
order (a row index in RAM), so neither the table nor the standardised features are ever whole in memory.

``KEY`` names what the file holds: a digest of the table file's identity and state (resolved path, device, inode,
size, modification and change times in ns) and of the column choice (ID, label and feature columns). A restarted
or resumed node with the same table finds the complete file under the same name and uses it without reading the
feature columns again; a changed table (or column choice) gives another name, so a stale file is never used, and a
file killed mid-write never got its name (only a hidden ``.NAME.*.tmp``, removed here). The file is kept after the
session, for the next start; this party's other ``PARTY-features-*.npy`` (an older table's) are removed once the
current one is in place. The alignment itself is not in the file: the PSI agrees a new row order in every run, and
the same file serves every order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..train.data import PartyTable, TableSpec, load_table
from ..files import remove_stale_temps  # not .checkpoints: that imports torch, which a PSI-only node never needs

__all__ = ["feature_path", "load_training_table"]

#: the layout of the file (bump when what it holds changes: an old file then gets another name)
FORMAT = 1


def feature_path(folder: Path, party: str, spec: TableSpec) -> Path:
    """``FOLDER/PARTY-features-KEY.npy`` for the table ``spec`` names, in its current state on disk."""
    st = os.stat(spec.path)
    identity = {
        "format": FORMAT,
        "path": str(Path(spec.path).resolve()),
        "device": st.st_dev,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,  # set by the kernel on every change: `touch -m` cannot hide an edit
        "id_column": spec.id_column,
        "label_column": spec.label_column,
        "feature_columns": None if spec.feature_columns is None else list(spec.feature_columns),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return Path(folder) / f"{party}-features-{key}.npy"


def load_training_table(spec: TableSpec, folder: Path, party: str, id_items=None) -> PartyTable:
    """The table with its features in this party's feature file in ``folder`` (reused when it is complete and
    current, written otherwise); the IDs and labels are read from the table file every time (``id_items``: as
    :func:`~vfl.train.data.load_table` takes it)."""
    folder = Path(folder)
    pattern = f"{party}-features-*.npy"
    if folder.is_dir():
        remove_stale_temps(folder, pattern)  # what a killed earlier start left half-written: never used
    path = feature_path(folder, party, spec) if spec.path.is_file() else None
    table = load_table(spec, features_to=path, id_items=id_items)
    for other in folder.glob(pattern) if folder.is_dir() else ():
        if other != path:
            other.unlink(missing_ok=True)  # an older table's: this party's feature file is the one above
    return table
