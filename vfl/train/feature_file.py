"""A party's float32 feature matrix on disk: one ``.npy`` file, written once, read a batch of rows at a time.

Why: a data holder with 1M rows x 392 features holds 1.5 GB of float32; in RAM that is 1.5 GB of anonymous memory
for the whole session. Written once to a file and memory-mapped, the rows live in the page cache (which the kernel can
drop and read again) and the node's own memory does not grow with the table.

- :func:`write_feature_file` writes it through :func:`vfl.files.atomic_write` (a hidden temporary in the same folder,
  fsync, one rename; mode 0600: it is the party's own data): a reader sees a complete file or none. The matrix is
  filled through a shared mapping of the temporary, and the pages already filled are unmapped as the readers report
  progress (``done``), so writing does not keep the file resident in this process either.
- :class:`FeatureFile` reads it. :meth:`FeatureFile.take` copies the rows of one batch out: with ``pread`` for a
  large file, so the pages read stay page cache (the kernel's, droppable) and never become the process's resident
  memory; a file up to ``resident_bytes`` (64 MiB) is simply memory-mapped, since all of it resident is small.

The file is a plain ``.npy`` (``numpy.load(path, mmap_mode="r")`` opens it too): float32, C order, shape ``[rows,
features]``, rows in the order of the party's table file.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import PRIVATE, atomic_write

__all__ = ["FeatureFile", "write_feature_file"]

_PAGE = mmap.PAGESIZE
#: files up to this size are memory-mapped for reading; and what writing keeps mapped at most
RESIDENT_BYTES = 64 << 20


def _header(shape: tuple[int, int]) -> bytes:
    """The .npy header (format 1.0/2.0, as numpy picks) of a float32 C-order array of ``shape``."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)  # the header numpy itself writes (padded to 64 bytes)
    return buf.getvalue()


def write_feature_file(path: Path, n_rows: int, n_features: int,
                       fill: Callable[[np.ndarray, Callable[[int], None]], None]) -> None:
    """Create ``path`` (float32 ``[n_rows, n_features]``) atomically, mode 0600; ``fill(matrix, done)`` writes it.

    ``matrix`` is a writable view of the new file; ``fill`` calls ``done(hi)`` once rows ``[0, hi)`` are final, and
    their pages are unmapped from this process (dirty pages stay in the page cache and reach the disk as usual). If
    ``fill`` raises, or the process dies, no file appears at ``path``."""
    head = _header((n_rows, n_features))
    row_bytes = n_features * 4
    size = len(head) + n_rows * row_bytes

    def write(tmp: str) -> None:
        with open(tmp, "r+b") as fh:
            fh.write(head)
            fh.flush()
            # the blocks are reserved before the mapping is written: a full disk is an OSError here (named by the
            # caller), not a SIGBUS in the middle of the fill
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fh.fileno(), 0, size)
            else:  # pragma: no cover - macOS: a sparse file
                fh.truncate(size)
            if n_rows * row_bytes == 0:
                fill(np.empty((n_rows, n_features), np.float32), lambda hi: None)
                return
            mm = mmap.mmap(fh.fileno(), size)
            try:
                matrix = np.frombuffer(mm, dtype=np.float32, count=n_rows * n_features,
                                       offset=len(head)).reshape(n_rows, n_features)
                released = [0]  # bytes of the mapping already unmapped (page-aligned)

                def done(hi: int) -> None:
                    end = (len(head) + hi * row_bytes) // _PAGE * _PAGE
                    if end - released[0] >= RESIDENT_BYTES or hi >= n_rows:
                        mm.madvise(mmap.MADV_DONTNEED, released[0], end - released[0])
                        released[0] = end

                fill(matrix, done)
                del matrix
                mm.flush()
            finally:
                try:
                    mm.close()
                except BufferError:  # pragma: no cover - a view escaped ``fill``: it goes with the process
                    pass

    atomic_write(path, write, mode=PRIVATE)


class FeatureFile:
    """A float32 ``.npy`` feature matrix on disk; ``take(rows)`` copies rows out (see the module doc).

    A file up to ``resident_bytes`` is memory-mapped (a small table reads as fast as from RAM, and all of it
    resident is still small). A larger one is read with ``pread``: one call per row, or one per block when the rows
    are sorted and dense (``Standardizer.fit``'s passes), into the batch's own array. Mapping it instead would keep
    what a batch touched resident in this process, and on a file system with large folios (ext4, xfs) a touched row
    maps its whole folio, up to 2 MB: a few hundred random batches map the whole file."""

    def __init__(self, path: Path, resident_bytes: int = RESIDENT_BYTES):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            with os.fdopen(os.dup(self._fd), "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"{self.path}: .npy format version {version} is not one this file is written in")
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
            size = os.fstat(self._fd).st_size
            if (dtype != np.float32 or fortran or len(shape) != 2
                    or size != offset + 4 * shape[0] * shape[1]):
                raise ValueError(f"{self.path}: not a complete float32 [rows, features] .npy file")
        except BaseException:
            os.close(self._fd)
            raise
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.float32)
        self._offset = offset
        self._row_bytes = 4 * self.shape[1]
        self._mm = None
        self._matrix = None
        if size <= resident_bytes and self.nbytes:
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self._matrix = np.frombuffer(self._mm, dtype=np.float32, count=self.shape[0] * self.shape[1],
                                         offset=offset).reshape(self.shape)

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A float32 copy of ``rows`` (file row numbers, any order): C-contiguous, writable, ``[len(rows), d]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row out of range [0, {self.shape[0]})")
        if self._matrix is not None or not self.nbytes:
            return self._matrix[rows] if self._matrix is not None else np.empty((len(rows), self.shape[1]), np.float32)
        if len(rows) > 1 and np.all(rows[1:] > rows[:-1]) and rows[-1] - rows[0] < 2 * len(rows):
            lo = int(rows[0])
            return self.block(lo, int(rows[-1]) + 1)[rows - lo]  # sorted and dense: one read for the block
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for k, r in enumerate(rows.tolist()):
            self._read(out[k], r)
        return out

    def block(self, lo: int, hi: int) -> np.ndarray:
        """A float32 copy of rows ``[lo, hi)``."""
        lo, hi = max(0, lo), min(self.shape[0], hi)
        if self._matrix is not None:
            return np.array(self._matrix[lo:hi])
        out = np.empty((max(0, hi - lo), self.shape[1]), np.float32)
        if out.size:
            self._read(out, lo)
        return out

    def _read(self, out: np.ndarray, row: int) -> None:
        """``out`` (C-contiguous) from the file, starting at ``row``; a short read is an error, not zeros."""
        want, done = out.nbytes, 0
        view = memoryview(out).cast("B")
        while done < want:
            got = os.preadv(self._fd, [view[done:]], self._offset + row * self._row_bytes + done)
            if got <= 0:
                raise OSError(f"{self.path}: the file ended early (was it changed while in use?)")
            done += got

    def __getitem__(self, key) -> np.ndarray:
        """``file[rows]`` / ``file[lo:hi]``: a copy, as :meth:`take` / :meth:`block` (numpy-like reads)."""
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            return self.block(lo, hi) if step == 1 else self.take(np.arange(lo, hi, step))
        return self.take(key)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole matrix as an in-memory array (only for small tables and tests: it reads every row)."""
        out = self.block(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        self._matrix = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # pragma: no cover - a view is still alive: the mapping goes with it
                pass
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
