"""Batch engine: hash-to-curve + encrypt and encrypt over large batches, on a process pool.

The hot path is per item ``X25519PublicKey.from_public_bytes`` + ``exchange`` (~30-40 us in C) and, for own items,
hash-to-curve (2 Legendre symbols on average). Everything else is batched: a task is one contiguous slice of the input
(a list of item bytes, or one joined ``n * 32`` bytes string) and returns one joined ``n * 32`` bytes string, so the
parent does no per-item work and IPC moves a few large buffers.

Memory stays bounded: per stream, at most ``max_inflight`` tasks of ``task_items`` items are queued or buffered at any
time; results are yielded in input order, chunk by chunk. ``workers=1`` runs inline (no pool, no pickling).
``cluster="tcp://HOST:8786"`` sends the same tasks to a Dask cluster of the party's own instead of a local pool
(:mod:`vfl.psi.cluster`; ``distributed`` is imported only then), with the same window and order.

Also here: :func:`encode_ids`, the canonical byte encoding of IDs (``str`` -> ``b"s:" + utf-8``, ``int`` ->
``b"i:" + decimal``), so ``"1"`` and ``1`` are different items and every party encodes the same ID identically.
"""

from __future__ import annotations

import multiprocessing
import numbers
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from . import _worker
from .cipher import PsiKey
from .curve import P, POINT_SIZE
from .errors import InvalidIdError, InvalidPointError, MalformedMessageError

__all__ = [
    "PsiEngine",
    "encode_ids",
    "check_points",
    "DEFAULT_TASK_ITEMS",
    "start_forkserver",
]

DEFAULT_TASK_ITEMS = 2048

_P_BYTES = np.frombuffer(P.to_bytes(32, "little"), dtype=np.uint8)


def encode_ids(values: Iterable[object]) -> list[bytes]:
    """Canonical item bytes for IDs: ``str`` -> ``b"s:" + utf-8``, ``int`` -> ``b"i:" + decimal``.

    NumPy integers and strings count as ``int`` and ``str``. Anything else (``bool``, ``float``, ``bytes``, ``None``,
    a string that is not valid UTF-8 such as a lone surrogate) raises :class:`InvalidIdError`.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            return [b"i:%d" % v for v in values.tolist()]
        if values.dtype.kind == "U":
            return _encode_list(values.tolist())
        if values.dtype.kind != "O":
            raise InvalidIdError(f"IDs of dtype {values.dtype} have no canonical encoding (use str or int)")
        values = values.tolist()
    return _encode_list(values)


def _encode_list(values: Iterable[object]) -> list[bytes]:
    out: list[bytes] = []
    append = out.append
    for v in values:
        t = type(v)
        if t is str:
            try:
                append(b"s:" + v.encode("utf-8"))  # type: ignore[union-attr]
            except UnicodeEncodeError:
                raise InvalidIdError(f"ID {v!r} is not valid Unicode (lone surrogate?)") from None
        elif t is int:
            append(b"i:%d" % v)
        elif isinstance(v, bool) or isinstance(v, np.bool_):
            raise InvalidIdError(f"boolean ID {v!r} is ambiguous; use str or int")
        elif isinstance(v, str):
            try:
                append(b"s:" + str.encode(v, "utf-8"))
            except UnicodeEncodeError:
                raise InvalidIdError(f"ID {v!r} is not valid Unicode (lone surrogate?)") from None
        elif isinstance(v, numbers.Integral):
            append(b"i:%d" % int(v))
        else:
            raise InvalidIdError(f"ID {v!r} of type {t.__name__} has no canonical encoding (use str or int)")
    return out


def check_points(points: object, *, width: int = POINT_SIZE, what: str = "points") -> np.ndarray:
    """Validate a received array: ``uint8``, C-contiguous-able, shape ``[n, width]``; for ``width == 32`` also that
    every row is a canonical u-coordinate (top bit clear, u < p). Returns the array (contiguous). Vectorised."""
    if not isinstance(points, np.ndarray):
        raise MalformedMessageError(f"{what}: expected a numpy array, got {type(points).__name__}")
    if points.dtype != np.uint8:
        raise MalformedMessageError(f"{what}: expected dtype uint8, got {points.dtype}")
    if points.ndim != 2 or points.shape[1] != width:
        raise MalformedMessageError(f"{what}: expected shape [n, {width}], got {list(points.shape)}")
    points = np.ascontiguousarray(points)
    if width == POINT_SIZE and len(points):
        top = points[:, 31]
        bad = np.flatnonzero(top & 0x80)
        if len(bad):
            raise InvalidPointError(f"{what}: point at index {int(bad[0])} has the top bit set (non-canonical)")
        # u >= p  <=>  (top byte 0x7f, bytes 1..30 all 0xff, byte 0 >= 0xed) given the top bit is clear
        cand = np.flatnonzero(top == 0x7F)
        if len(cand):
            sub = points[cand]
            ge = np.all(sub[:, 1:31] == 0xFF, axis=1) & (sub[:, 0] >= _P_BYTES[0])
            if ge.any():
                i = int(cand[np.flatnonzero(ge)[0]])
                raise InvalidPointError(f"{what}: point at index {i} is not reduced (u >= 2^255 - 19)")
    return points


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the OS tells), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _default_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    # forkserver: no fork of a threaded parent (zmq, torch), cheap worker start after the first
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def start_forkserver(workers: int | None = None) -> None:
    """Start multiprocessing's forkserver (and its resource tracker) now, for a local pool of ``workers`` (None:
    every usable CPU; 1 runs inline and needs none).

    Why: both helpers are started by forking this process and exec'ing a fresh interpreter, and between the fork and
    the exec the child reports this process's peak RSS (``VmHWM``) as its own, so a per-process memory account of a
    node that had read millions of IDs counted them twice. Started before the node reads its IDs, the child copies
    a process at its import floor. The pool's workers are forked by the forkserver, never by this process."""
    if (workers if workers is not None else _usable_cpus()) <= 1:
        return
    if _default_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class _LocalPool:
    """The default backend: a ``ProcessPoolExecutor`` of this machine, the key's 32 bytes passed with every task over
    the pool's local pipe (each worker builds the key once and caches it, see :mod:`vfl.psi._worker`)."""

    def __init__(self, workers: int, ctx: multiprocessing.context.BaseContext | None) -> None:
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx or _default_context(), initializer=_worker.init_worker
        )

    def submit(self, fn: Callable[..., bytes], key_raw: bytes, *args: Any) -> Future:
        return self.pool.submit(fn, key_raw, *args)

    @staticmethod
    def result(future: Future, size: int) -> bytes:
        return future.result()  # our own child processes, running this very code

    @staticmethod
    def cancel(future: Future) -> None:
        future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class PsiEngine:
    """Runs the PSI crypto over batches, on ``workers`` processes (``workers=1``: inline, no pool) or on a Dask cluster.

    ``workers`` defaults to the CPUs this process may use. ``task_items`` items go to a worker at a time;
    ``max_inflight`` tasks at most are outstanding per stream (default ``max(32, 4 * workers)``), which bounds the
    memory and keeps the workers fed across chunk boundaries. Workers start with the ``forkserver`` method (no fork of
    a threaded parent), so like any multiprocessing child they import the main script: guard it with
    ``if __name__ == "__main__"``.

    ``cluster``: the address of a Dask scheduler (``tcp://HOST:PORT`` or ``tls://HOST:PORT``) that the party runs on
    its own hosts. The tasks then go there (``workers`` is ignored; the window is ``max(32, 4 * worker threads)``),
    connecting on :meth:`start` or first use; ``cluster_timeout`` bounds the connection, the wait for a first worker
    and every result (:mod:`vfl.psi.cluster`).

    One engine can serve several sessions and keys at once; it is not thread-safe (drive it from one thread).
    Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        task_items: int = DEFAULT_TASK_ITEMS,
        max_inflight: int | None = None,
        mp_context: str | multiprocessing.context.BaseContext | None = None,
        cluster: str | None = None,
        cluster_timeout: float = 30.0,
    ) -> None:
        if workers is None:
            workers = _usable_cpus()
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if task_items < 1:
            raise ValueError("task_items must be >= 1")
        if cluster_timeout <= 0:
            raise ValueError("cluster_timeout must be > 0")
        self.workers = int(workers)
        self.task_items = int(task_items)
        self._max_inflight = int(max_inflight) if max_inflight else None
        self.cluster = cluster
        self.cluster_timeout = float(cluster_timeout)
        self._ctx = multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
        self._pool: Any = None  # _LocalPool or cluster.DaskPool, made on first use
        self._closed = False

    @property
    def max_inflight(self) -> int:
        """Tasks at most outstanding per stream (on a cluster: from its worker threads once connected)."""
        if self._max_inflight:
            return self._max_inflight
        return max(32, 4 * (self.cluster_threads or self.workers))

    @property
    def cluster_threads(self) -> int | None:
        """The cluster's worker threads when we connected; None without a cluster or before connecting."""
        return self._pool.threads if self.cluster is not None and self._pool is not None else None

    # ------------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> PsiEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (waits for them; cancels queued tasks), or disconnect from the cluster."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _get_pool(self) -> Any:
        if self._closed:
            raise RuntimeError("PsiEngine is closed")
        if self._pool is None:
            if self.cluster is not None:
                from .cluster import DaskPool  # only a party with [psi].cluster imports distributed

                self._pool = DaskPool(self.cluster, timeout=self.cluster_timeout)
            else:
                self._pool = _LocalPool(self.workers, self._ctx)
        return self._pool

    def start(self) -> PsiEngine:
        """Start the worker processes (or connect to the cluster) now rather than on first use, so that timings
        exclude start-up and an unreachable cluster is reported before any session."""
        if self.cluster is not None:
            self._get_pool()
        elif self.workers > 1:
            pool = self._get_pool().pool
            for f in [pool.submit(_worker.init_worker) for _ in range(self.workers)]:
                f.result()
        return self

    # --------------------------------------------------------------------------------------------------- batches

    def hash_encrypt(self, items: Sequence[bytes], key: PsiKey, domain: bytes) -> np.ndarray:
        """``H(x)^k`` for all items, as a ``uint8 [n, 32]`` array in input order."""
        return _concat(self.iter_hash_encrypt(items, key, domain, chunk_size=max(len(items), 1)))

    def encrypt(self, points: np.ndarray, key: PsiKey, *, check_curve: bool = True) -> np.ndarray:
        """``P^k`` for a ``uint8 [n, 32]`` array of canonical points (see :func:`check_points`), same order.

        With ``check_curve`` every point must be on the main curve (a twist point raises :class:`InvalidPointError`);
        a small-order point always raises :class:`~vfl.psi.errors.LowOrderPointError`."""
        return _concat(self.iter_encrypt([points], key, check_curve=check_curve))

    def iter_hash_encrypt(
        self, items: Sequence[bytes], key: PsiKey, domain: bytes, chunk_size: int
    ) -> Iterator[np.ndarray]:
        """Yield ``H(x)^k`` chunk by chunk (``chunk_size`` rows each, the last one shorter), reading ahead."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        n = len(items)
        raw = key.raw
        step = self.task_items

        def tasks():
            for lo in range(0, n, chunk_size):
                hi = min(lo + chunk_size, n)
                yield [
                    (_worker.hash_encrypt_task, raw, (domain, list(items[a : min(a + step, hi)])), min(step, hi - a))
                    for a in range(lo, hi, step)
                ]

        return self._run_chunks(tasks())

    def iter_encrypt(
        self, chunks: Iterable[np.ndarray], key: PsiKey, *, check_curve: bool = True
    ) -> Iterator[np.ndarray]:
        """Yield ``P^k`` for each array in ``chunks`` (each ``uint8 [n, 32]``), in order, reading ahead."""
        raw = key.raw
        step = self.task_items

        def tasks():
            base = 0
            for arr in chunks:
                arr = check_points(arr)
                n = len(arr)
                buf = arr.tobytes()
                yield [
                    (_worker.encrypt_task, raw, (buf[a * 32 : min(a + step, n) * 32], check_curve, base + a),
                     min(step, n - a))
                    for a in range(0, n, step)
                ]
                base += n

        return self._run_chunks(tasks())

    # ------------------------------------------------------------------------------------------------- internals

    def _run_chunks(
        self, chunk_tasks: Iterator[list[tuple[Callable[..., bytes], bytes, tuple, int]]]
    ) -> Iterator[np.ndarray]:
        """Each element of ``chunk_tasks`` is the task list of one output chunk, each task ``(fn, key bytes, args,
        items)``; yield the chunks in order."""
        if self.workers == 1 and self.cluster is None:
            for tasks in chunk_tasks:
                yield _to_array(b"".join(fn(raw, *args) for fn, raw, args, _ in tasks))
            return

        pool = self._get_pool()
        limit = self.max_inflight

        def flat():
            for tasks in chunk_tasks:
                if not tasks:
                    yield None, None, None, True  # an empty chunk still yields an empty array
                    continue
                last = len(tasks) - 1
                for i, (fn, raw, args, n) in enumerate(tasks):
                    yield fn, raw, (args, n), i == last

        todo = flat()
        window: deque[tuple[Any, int, bool]] = deque()

        def top_up() -> None:
            while len(window) < limit:
                nxt = next(todo, None)
                if nxt is None:
                    return
                fn, raw, task, last = nxt
                if fn is None:
                    window.append((None, 0, last))
                else:
                    args, n = task
                    window.append((pool.submit(fn, raw, *args), n, last))

        parts: list[bytes] = []
        try:
            top_up()
            while window:
                fut, n, last = window.popleft()
                top_up()  # keep the workers fed while we wait
                if fut is not None:
                    parts.append(pool.result(fut, n * POINT_SIZE))
                if last:
                    out = _to_array(b"".join(parts))
                    parts = []
                    yield out
        finally:
            for fut, _, _ in window:
                if fut is not None:
                    pool.cancel(fut)


def _to_array(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8).reshape(-1, POINT_SIZE)


def _concat(chunks: Iterator[np.ndarray]) -> np.ndarray:
    parts = list(chunks)
    if not parts:
        return np.empty((0, POINT_SIZE), dtype=np.uint8)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts)
