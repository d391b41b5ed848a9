"""The node's bucket source for a bucketed PSI: spill files, and what a killed run leaves for a resume (v1.9).

Layout: ``<[psi] spill folder>/<party>/<pair>/`` per pairwise PSI, where ``<pair>`` is a hash of the pair's nonce
(the folder name does not show it):

- ``state.json``: what binds the folder to one PSI: run id, own party id, peer party id, the nonce, a digest of the
  party's ID set (its items in file order, so row numbers mean the same rows), K and the peer's set size;
- ``bucket-NNNNN.npz``: a bucket's items (``blob``, ``offsets``) and their row numbers (``rows``), until finished;
- ``result-NNNNN.npz``: a finished bucket's intersection rows in the joint order (``rows``), both parties' sizes in
  it and its digest (``meta``: own, peer; ``digest``: 32 bytes), which a resume announces and checks.

Every file is written atomically and is 0600 (raw IDs, or row numbers that point at them). A bucket whose result
file exists is finished; a resume keeps the contiguous finished buckets from 0, so a result file that a kill left
half-written cannot exist (atomic), and one that is unreadable ends the prefix. The folder outlives the node while
the PSI is unfinished, so that the same command resumes; it is removed once the rows are aligned (``remove_spill``),
and a folder bound to another run, party, ID set or nonce is removed when a PSI of this party starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import PRIVATE, atomic_write, atomic_write_bytes
from ..psi.buckets import DIGEST_BYTES, MAX_BUCKETS, EarlierRun, FinishedBucket, MemoryBuckets
from ..psi.exchange import MAX_ITEMS
from ..psi.items import ItemStore, release_arrow_memory, take_items
from .config import NodeConfig

STATE = "state.json"
FORMAT = 1
_ITEMS_BATCH = 1 << 16
_RESULT = re.compile(r"result-(\d{5})\.npz")
_TAG = re.compile(r"[0-9a-f]{16}")  # a pair folder's name (pair_tag)


def items_digest(items: Sequence[bytes], dedupe: bool) -> str:
    """A digest of a party's ID set as the PSI sees it: every item in file order (length-prefixed) and ``dedupe``.
    A resume needs the very same rows, so any change to the file (an ID added, removed, moved) changes it. The same
    digest from a list of bytes and from an :class:`ItemStore` (hashed from its blob, without a list)."""
    h = hashlib.blake2b(digest_size=32, person=b"vfl/psi/items1")
    h.update(b"dedupe" if dedupe else b"strict")
    store = items if isinstance(items, ItemStore) else None
    for lo in range(0, len(items), _ITEMS_BATCH):
        hi = min(lo + _ITEMS_BATCH, len(items))
        if store is not None:
            offsets = store.offsets[lo : hi + 1]
            h.update(np.diff(offsets).astype("<u4").tobytes())
            h.update(memoryview(store.blob[offsets[0] : offsets[-1]]))
        else:
            batch = items[lo:hi]
            h.update(np.fromiter((len(it) for it in batch), dtype="<u4", count=len(batch)).tobytes())
            h.update(b"".join(batch))
    return h.hexdigest()


def pair_tag(nonce: str) -> str:
    return hashlib.sha256(nonce.encode()).hexdigest()[:16]


def _read_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


class SpillBuckets(MemoryBuckets):
    """Every bucket's items go to their own file in ``folder`` when the PSI partitions them, and come back one
    bucket at a time, so the PSI's working set is one bucket's; every finished bucket goes to a result file, which
    a resume of the same PSI (``binding``: run, party, peer, nonce, ID set) starts after."""

    def __init__(self, items: Sequence[bytes], folder: Path, *, binding: dict | None = None, dedupe: bool = False,
                 unique_rows: np.ndarray | None = None) -> None:
        super().__init__(items, dedupe=dedupe, unique_rows=unique_rows)
        self.folder = folder
        self.binding = dict(binding or {})
        self.counts: np.ndarray | None = None
        self._earlier = self._find_earlier()

    # --------------------------------------------------------------------------------------------------- resume

    def _find_earlier(self) -> EarlierRun | None:
        if self.folder.is_symlink():  # never a folder this node made: partition() replaces the link, not its target
            return None
        state = _read_state(self.folder)
        if state is None or any(state.get(key) != value for key, value in self.binding.items()):
            return None
        k, peer_n = state.get("k"), state.get("peer_n_items")
        # the folder is only as trustworthy as the disk: anything out of range is no PSI this node could have run
        if type(k) is not int or type(peer_n) is not int or not 1 <= k <= MAX_BUCKETS or not 0 <= peer_n <= MAX_ITEMS:
            return None
        finished = []
        for b in range(k):
            done = self._read_finished(b, peer_n)
            if done is None:
                break  # not finished (or unreadable, or damaged): the finished prefix ends here
            finished.append(done)
        return EarlierRun(k=k, peer_n_items=peer_n, finished=tuple(finished)) if finished else None

    def _read_finished(self, b: int, peer_n: int) -> FinishedBucket | None:
        """Bucket ``b``'s result file as this node wrote it, or None: a file that is missing, is no npz, or whose
        arrays have other dtypes, shapes or ranges (truncated, edited, another program's) is not a finished bucket,
        so that the bucket is exchanged again instead of the node crashing or resuming with rows it never had."""
        try:
            with np.load(self._result_path(b)) as f:
                meta, digest, rows = f["meta"], f["digest"], f["rows"]
        except Exception:  # noqa: BLE001 - np.load raises OSError, ValueError, EOFError, BadZipFile, KeyError, ...
            return None
        ok = (
            meta.dtype == np.int64 and meta.shape == (2,)
            and digest.dtype == np.uint8 and digest.shape == (DIGEST_BYTES,)
            and rows.dtype == np.int64 and rows.ndim == 1
        )
        if not ok:
            return None
        own, peer = int(meta[0]), int(meta[1])
        n = len(self.items)
        if not (0 <= own <= n and 0 <= peer <= peer_n and len(rows) <= min(own, peer)):
            return None
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < n):
            return None
        return FinishedBucket(own_items=own, peer_items=peer, digest=digest.tobytes())

    # --------------------------------------------------------------------------------------------- the source

    def partition(self, key: bytes, k: int, keep: int = 0, peer_n_items: int = 0) -> np.ndarray:
        earlier = self._earlier
        counts = super().partition(key, k, keep, peer_n_items)
        self._earlier = earlier
        if self.folder.is_symlink():  # the files below are deleted and written: only in a folder of our own
            self.folder.unlink()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self.folder.iterdir():  # what this run does not keep of an earlier one
            kept = _RESULT.fullmatch(path.name)
            if path.name != STATE and not (kept and int(kept.group(1)) < keep):
                path.unlink(missing_ok=True)
        state = {"format": FORMAT, **self.binding, "k": int(k), "peer_n_items": int(peer_n_items)}
        atomic_write_bytes(self.folder / STATE, json.dumps(state, sort_keys=True).encode(), mode=PRIVATE)
        for b in range(keep, k):
            rows = self.grouping.bucket(b)
            items = ItemStore.from_items(take_items(self.items, rows))  # one gather when the items are a store
            atomic_write(self._bucket_path(b),
                         lambda tmp: _save_npz(tmp, rows=rows, offsets=items.offsets, blob=items.blob), mode=PRIVATE)
            del items
        self.grouping, self.counts = None, counts  # from here on the items of a bucket come from its file
        release_arrow_memory()  # the gathers' buffers
        return counts

    def bucket(self, b: int) -> tuple[Sequence[bytes], np.ndarray]:
        if self.counts is None:
            return super().bucket(b)
        with np.load(self._bucket_path(b)) as f:
            rows, offsets, blob = f["rows"], f["offsets"], f["blob"]
        return ItemStore(blob, offsets), rows  # compact: the exchange gathers and slices it without a list

    def commit(self, b: int, rows: np.ndarray, finished: FinishedBucket) -> None:
        meta = np.array([finished.own_items, finished.peer_items], dtype=np.int64)
        digest = np.frombuffer(finished.digest, dtype=np.uint8)
        rows = np.asarray(rows, dtype=np.int64)
        atomic_write(self._result_path(b), lambda tmp: _save_npz(tmp, rows=rows, meta=meta, digest=digest),
                     mode=PRIVATE)
        self._bucket_path(b).unlink(missing_ok=True)  # its items are no longer needed

    def result(self, b: int) -> np.ndarray:
        with np.load(self._result_path(b)) as f:
            return np.asarray(f["rows"], dtype=np.int64)

    def close(self) -> None:
        """The pair is done: nothing more in memory. Its files stay until the rows are aligned (a restart of a
        party before then resumes with every bucket finished); ``remove_spill`` removes them."""
        self.counts = None

    def _bucket_path(self, b: int) -> Path:
        return self.folder / f"bucket-{b:05d}.npz"

    def _result_path(self, b: int) -> Path:
        return self.folder / f"result-{b:05d}.npz"


def _save_npz(tmp: str, **arrays: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, **arrays)


# ----------------------------------------------------------------------------------------------------- the folder


def spill_folder(cfg: NodeConfig) -> Path | None:
    """This party's spill folder: parties sharing a folder (a local run) never share their files."""
    return None if cfg.psi.spill_dir is None else cfg.psi.spill_dir / cfg.party


def spill_source(cfg: NodeConfig, items: Sequence[bytes], digest: str, *, unique_rows: np.ndarray | None):
    """The PsiPlan's ``source``: one folder per pairwise PSI. Folders of this party for the same peer under another
    nonce (a PSI that is not resumed) are removed first: one pair's spilled IDs exist at most once."""
    base = spill_folder(cfg)
    assert base is not None

    def source(nonce: str, peer: str) -> SpillBuckets:
        folder = base / pair_tag(nonce)
        if base.is_dir():
            for other in _pair_folders(base):
                state = _read_state(other) if _own_dir(other) else None
                if other != folder and (state is None or state.get("peer") == peer):
                    _remove(other)
        binding = {"run": cfg.run, "party": cfg.party, "peer": peer, "nonce": nonce, "items": digest}
        return SpillBuckets(items, folder, binding=binding, dedupe=cfg.psi.dedupe, unique_rows=unique_rows)

    return source


def scan_spill(cfg: NodeConfig, digest: str) -> dict[str, str]:
    """[P19]: peer -> nonce of each pairwise PSI an earlier process of this run left with finished buckets (of
    this party and ID set; the label holder's WELCOME reuses the nonce). Anything else in the party's spill folder
    is removed: another run's, another ID set's, or a PSI that finished no bucket (only pair folders: a user's own
    files there, and whatever a symbolic link points at, are left alone)."""
    base = spill_folder(cfg)
    found: dict[str, tuple[int, str]] = {}
    if base is None or not base.is_dir():
        return {}
    for folder in _pair_folders(base):
        state = _read_state(folder) if _own_dir(folder) else None
        ok = (
            state is not None
            and state.get("run") == cfg.run
            and state.get("party") == cfg.party
            and state.get("items") == digest
            and isinstance(state.get("peer"), str)
            and isinstance(state.get("nonce"), str)
            and pair_tag(state["nonce"]) == folder.name
            and (folder / "result-00000.npz").exists()
        )
        if not ok:
            _remove(folder)
            continue
        peer, nonce = state["peer"], state["nonce"]
        finished = len(list(folder.glob("result-*.npz")))
        if peer in found and found[peer][0] >= finished:
            _remove(folder)
            continue
        if peer in found:
            _remove(base / pair_tag(found[peer][1]))
        found[peer] = (finished, nonce)
    return {peer: nonce for peer, (_, nonce) in found.items()}


def spill_size(cfg: NodeConfig) -> int:
    """Bytes in this party's spill folder (0 if none)."""
    base = spill_folder(cfg)
    if base is None or not base.is_dir():
        return 0
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def remove_spill(cfg: NodeConfig) -> None:
    """Remove this party's spill folder (raw IDs): once the rows are aligned nothing resumes from it."""
    folder = spill_folder(cfg)
    if folder is None:
        return
    if folder.is_symlink():  # a party folder the user put elsewhere: remove our pair folders in it, not the rest
        for pair in _pair_folders(folder):
            _remove(pair)
    else:
        _remove(folder)
    try:
        folder.parent.rmdir()  # the shared parent goes with the last party's folder
    except OSError:
        pass


def _pair_folders(base: Path) -> list[Path]:
    """The pair folders in a party's spill folder: only entries named as :func:`pair_tag` names them are the node's
    to read and remove; anything else there (a user's file or folder) is left alone."""
    try:
        return sorted(p for p in base.iterdir() if _TAG.fullmatch(p.name))
    except OSError:
        return []


def _own_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Remove a pair folder; a symbolic link in its place goes, never what it points at."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
