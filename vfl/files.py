"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

A reader (or a restarted node) sees the old file or the new one, never half of one; a crash mid-write leaves only
a hidden ``.NAME.*.tmp`` behind, which the next write of the same file does not trip over.

``mode=PRIVATE`` (0600) is for outputs holding raw IDs or model state (aligned IDs, predictions, checkpoints, trained
segments): the file is 0600 from its creation on (``mkstemp`` makes it so), never readable by others even for a
moment, and replacing an older, wider file narrows it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

PRIVATE = 0o600  # owner read/write only


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, mode: int | None = None) -> None:
    """``write(tmp_path)`` produces the content; then it becomes ``path`` in one rename.

    ``mode``: the file's permission bits (less the umask); None gives a normal file's (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, (0o666 if mode is None else mode) & ~_umask())  # mkstemp makes 0600; then the mode asked for
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write, mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(directory: Path, name: str) -> None:
    """Delete the hidden ``.NAME.*.tmp`` files (``name`` may be a glob) that an atomic write leaves when its process
    is killed mid-write (``kill -9``). Call it only for files no other live process writes: other parties write
    their own files in the same folder at the same time."""
    for stale in Path(directory).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
