"""The node's side of the PSI phase: read the ID column, check it, and write the aligned IDs.

Everything here happens before any network activity (reading, duplicate check) or after the protocol is done with
the rows (writing), so a bad file is reported as one line and never half-written.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..files import PRIVATE, atomic_write, remove_stale_temps
from ..errors import SetupError
from ..psi import DuplicateIdError, InvalidIdError, PsiEngine, encode_ids
from ..psi.exchange import prepare_items
from ..psi.items import ItemStore, decode_ids, encode_id_array, release_arrow_memory, take_items
from ..protocol.psi_phase import PsiPlan
from ..train.data import DataError, PartyTable, TableSpec, load_id_column, load_table
from .aligned import load_training_table
from .config import NodeConfig
from .spill import items_digest, scan_spill, spill_source


class AlignmentError(SetupError):
    """The party's IDs cannot go into a PSI (duplicates, unsupported values). One line for the user."""


@dataclass(frozen=True)
class PartyIds:
    """A party's IDs in file order, as their PSI encoding (an :class:`ItemStore`: compact, no Python object per ID).

    Why compact: a node holds its IDs for its whole run (the PSI's input, then the aligned output); as lists of
    Python objects (the IDs and their encodings) that was about 120 MiB per million IDs, more than the bucketed
    PSI's own working set. The native IDs are decoded from the items where they are needed (:attr:`ids`).
    """

    path: Path
    column: str
    items: ItemStore
    table: PartyTable | None = None  # the table (labels; features in the feature file) when the session trains
    #: indices of the distinct items (all of them unless [psi].dedupe dropped repeats), ``int64``: checked once
    unique_rows: np.ndarray | None = None

    @property
    def ids(self) -> list:
        """The native IDs (``int`` or ``str``) in file order: the table's when the session trains, else decoded from
        the items (a Python object each: for small sets and tests)."""
        return self.table.ids if self.table is not None else native_ids(self.items)


class StoredIds(Sequence):
    """A data holder's native IDs, decoded from its :class:`ItemStore` when asked for (``len`` costs nothing).

    Why: during training a data holder needs only how many rows it has; its IDs serve the PSI (the items) and the
    aligned file (written from the items). As a list of Python objects 10M string IDs held about 670 MiB of RAM
    for the whole training, more than the issue-16 budget of the training node (model + 300 MB)."""

    __slots__ = ("items",)

    def __init__(self, items: ItemStore) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return native_ids(self.items[i])
        return native_ids([self.items[i]])[0]


def native_ids(items: Sequence[bytes]) -> list:
    """``int`` / ``str`` of items encoded by ``encode_ids``, in order."""
    try:
        return decode_ids(ItemStore.from_items(items)).to_pylist()
    except ValueError:  # integers beyond int64, or mixed kinds: one at a time
        return [int(b[2:]) if b[:2] == b"i:" else b[2:].decode("utf-8") for b in items]


def load_ids(cfg: NodeConfig) -> PartyIds:
    """Read the configured ID column; duplicates are an error (count and an example) unless ``[psi].dedupe``.

    A session that does not train reads the ID column alone, as Arrow buffers encoded in bulk; a training session
    reads its table (it needs the labels and the feature file) and encodes the table's IDs."""
    data = cfg.data
    train = cfg.session.train
    spec = TableSpec(
        path=data.path,
        id_column=data.id_column,
        feature_columns=data.features if train else (),
        label_column=data.label_column if train and not cfg.session.predict else None,
    )
    # a data holder's IDs become its item store straight from Arrow (the label holder draws its schedule from its
    # IDs as Python objects); as a list first they were most of a 10M-row data holder's start-up peak
    as_items = None if cfg.is_label_holder else (lambda array, kind: StoredIds(encode_id_array(array, kind)))
    load = (load_table if not train
            else lambda s: load_training_table(s, cfg.train.output, cfg.party, id_items=as_items))
    table = None
    try:
        if not train and not cfg.session.predict:
            column = load_id_column(spec)
            items = ItemStore.from_items(encode_ids(column)) if isinstance(column, list) else encode_id_array(*column)
            del column
        else:
            if cfg.session.predict and data.label_column and data.features is None:
                try:  # a prediction file may still hold the label column: it must not become a feature
                    table = load(dataclasses.replace(spec, label_column=data.label_column))
                except DataError:
                    table = load(spec)
            else:
                table = load(spec)
            ids = table.ids
            items = ids.items if isinstance(ids, StoredIds) else ItemStore.from_items(encode_ids(ids))
        release_arrow_memory()  # what reading the table left in Arrow's pool (on this thread: see write_aligned)
    except DataError as exc:
        raise AlignmentError(str(exc)) from None
    except InvalidIdError as exc:
        raise AlignmentError(f"{data.path}: column {data.id_column!r}: {exc}") from None
    try:
        unique_rows = prepare_items(items, dedupe=cfg.psi.dedupe)
    except DuplicateIdError as exc:
        raise AlignmentError(
            f"{data.path}: column {data.id_column!r} has {exc.count} duplicate ID(s), e.g. "
            f"{exc.example.decode('utf-8', 'replace')[2:]!r}; remove them or set [psi].dedupe = true "
            "(keeps the first row of each ID)"
        ) from None
    if table is not None and not cfg.is_label_holder:  # the label holder draws its schedule from its IDs
        items, unique_rows = ids_on_disk(items, unique_rows, cfg.train.output, cfg.party)
        table = dataclasses.replace(table, ids=StoredIds(items))
    return PartyIds(path=data.path, column=data.id_column, items=items, table=table if train else None,
                    unique_rows=unique_rows)


def ids_on_disk(items: ItemStore, unique_rows: np.ndarray, folder: Path, party: str) -> tuple[ItemStore, np.ndarray]:
    """A training data holder's ID encodings and distinct-row index, memory-mapped from a file in ``folder``.

    Why: the node keeps them for its whole run (a rejoin runs the PSI again from them), but training never reads
    them. In RAM they were about 29 bytes per row, 290 MiB at 10M rows: most of issue 16's budget for the training
    node (model + 300 MB of anonymous memory). Mapped, they are page cache, which the kernel reclaims when it needs
    the memory and reads back when a PSI touches them. The file is unlinked as soon as it is mapped (0600 while it
    has a name: raw IDs), so nothing stays on disk and nothing else can change it; a node killed in between leaves a
    hidden ``.PARTY-ids.*.tmp``, removed here at the next start."""
    folder = Path(folder)
    name = f"{party}-ids"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, name)
        mapped = [_mapped(a, folder, name) for a in (items.blob, items.offsets, unique_rows)]
    except OSError as exc:
        raise AlignmentError(
            f"cannot write this party's ID index to {folder}: {exc.strerror or exc}; free some disk space there or "
            "set [train].output to a folder with room (about 30 bytes per row)"
        ) from None
    return ItemStore(mapped[0], mapped[1]), mapped[2]


def _mapped(array: np.ndarray, folder: Path, name: str) -> np.ndarray:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        return np.load(tmp, mmap_mode="r", allow_pickle=False)
    finally:
        os.unlink(tmp)


def psi_plan(cfg: NodeConfig, ids: PartyIds, engine: PsiEngine) -> PsiPlan:
    """The PSI inputs. A bucketed PSI spills to files and may resume what an earlier process of this run left
    ([P19]): the label holder reuses the nonce of each such pair; a data holder finds its finished buckets once the
    WELCOME names the nonce."""
    source, nonces = None, {}
    if cfg.session.psi_buckets != 1:
        digest = items_digest(ids.items, cfg.psi.dedupe)
        source = spill_source(cfg, ids.items, digest, unique_rows=ids.unique_rows)
        nonces = scan_spill(cfg, digest)  # a data holder's resumable folder shows once the WELCOME names its nonce
        if not cfg.is_label_holder:
            nonces = {}
    return PsiPlan(
        items=ids.items,
        engine=engine,
        chunk_size=cfg.psi.chunk_size,
        dedupe=cfg.psi.dedupe,
        min_rows=cfg.psi.min_rows,
        buckets=cfg.session.psi_buckets,
        capacity=cfg.psi.capacity,
        source=source,
        resume_nonces=nonces,
    )


def write_aligned(path: Path, ids: PartyIds, rows: np.ndarray) -> None:
    """``row`` (0-based data row in the party's own file) and the ID, in the agreed order; written atomically, 0600
    (raw IDs: readable by the owner only)."""
    chosen = ItemStore.from_items(take_items(ids.items, rows))
    try:
        column = decode_ids(chosen) if len(chosen) else pa.array([])
    except ValueError:  # integers beyond int64: as Python objects, what Arrow makes of them
        column = pa.array(native_ids(chosen))
    del chosen
    table = pa.table({"row": pa.array(rows, type=pa.int64()), ids.column: column})
    atomic_write(path, lambda tmp: pacsv.write_csv(table, tmp), mode=PRIVATE)
    del table, column
    # Arrow's pool (mimalloc) keeps what the CSV writer freed, about 46 bytes a row (92 MiB at 2M rows), and gives
    # back only what the calling thread freed: so here, not in the training build's thread (release_heap)
    release_arrow_memory()
