"""The PSI engine's tasks on a Dask ``distributed`` cluster of the party's own hosts (``[psi].cluster``).

A party whose PSI outgrows one host's cores points ``[psi].cluster`` at a Dask scheduler it runs itself; the engine
then sends its hash-to-curve and exponentiation tasks (:mod:`vfl.psi._worker`, unchanged) there through
``distributed.Client`` instead of to a local process pool. The node still speaks the protocol alone: the workers
only compute, and their results come back to the node, which sends them.

What travels to the cluster: this party's own item bytes (its raw IDs, for hash-to-curve), the peer's blinded
points (to be exponentiated), and this party's PSI key. The key goes once per key, not per task: it is scattered to
every worker (``Client.scatter(broadcast=True, hash=False)``: a random Dask key name, not a hash of the secret) and
each task refers to it; a worker builds its X25519 object once and keeps it with the scattered key, so that it is
gone from the worker when the node releases the key (on :meth:`DaskPool.close`, or when Dask notices the node is
gone). The key travels
wrapped in :class:`_Secret`, whose ``repr`` hides it, and tasks never raise inside Dask (:func:`_run` hands the
exception back as a value), because a worker logs the arguments of a failed task -- the items and the key. Hence the
cluster must be the party's own, and ``tls://`` is the way to keep these bytes off the wire in clear.

Every wait is bounded: the connection (and the first worker) within ``timeout`` seconds, else
:class:`ClusterUnavailableError` naming the address and the way out (exit 2, before the session); each result
within ``timeout`` seconds, else :class:`ClusterFailedError`. A worker that dies mid-PSI is Dask's to handle: the
scheduler runs its tasks again on another worker (up to ``distributed.scheduler.allowed-failures`` times, then
``KilledWorker``, which becomes :class:`ClusterFailedError`). ``distributed`` is imported only here, and only when a
cluster is configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ExitCode, SetupError
from .errors import PsiError, PsiLocalError

__all__ = [
    "ClusterFailedError",
    "ClusterUnavailableError",
    "DaskPool",
    "check_cluster_address",
    "INSTALL_HINT",
]

INSTALL_HINT = "pip install 'vfl[dask]'"
SCHEMES = ("tcp", "tls")
_MAX_KEYS = 32  # scattered keys kept at once (the label holder runs one PSI per data holder, each with its own key)


class ClusterUnavailableError(PsiLocalError, SetupError):
    """``[psi].cluster`` is set but cannot be used: ``distributed`` is missing, or the scheduler cannot be reached or
    has no workers. Found before the session starts; fixed on this party's own machines."""

    code = "PSI_CLUSTER_UNAVAILABLE"
    exit_code = ExitCode.SETUP


class ClusterFailedError(PsiLocalError):
    """The cluster stopped giving results during a PSI (no result within the timeout, workers killed, the scheduler
    gone). This party's failure, never the peer's: the session ends with an error."""

    code = "PSI_CLUSTER_FAILED"


def check_cluster_address(value: object) -> str | None:
    """The problem with a ``[psi].cluster`` value, or None: it must be ``tcp://HOST:PORT`` or ``tls://HOST:PORT``
    (a Dask scheduler's address; an IPv6 host in brackets), nothing else."""
    want = "must be tcp://HOST:PORT or tls://HOST:PORT (a Dask scheduler you run), got"
    if not isinstance(value, str):
        return f"{want} {value!r}"
    if "://" not in value:
        return f"{want} {value!r} (no scheme)"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return f"{want} {value!r} (the port must be 1..65535)"
    if parts.scheme not in SCHEMES:
        return f"{want} {value!r} (scheme {parts.scheme!r})"
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return f"{want} {value!r} (no host)"
    if port is None or not 1 <= port <= 65535:
        return f"{want} {value!r} (no port; Dask's default is 8786)"
    if parts.path or parts.query or parts.fragment:
        return f"{want} {value!r} (nothing may follow the port)"
    return None


_TLS_SETTINGS = ("Dask's TLS settings on this machine (the distributed.comm.tls section of the Dask config: ca-file, "
                 "client.cert, client.key; e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
                 "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY)")


def _check_tls_settings(address: str) -> None:
    """A ``tls://`` cluster needs Dask's TLS settings; say so before making a ``Client`` (one that fails on a missing
    TLS context lingers at exit for twice its timeout)."""
    from distributed.security import Security

    try:
        context = Security().get_connection_args("client").get("ssl_context")
    except Exception as exc:  # noqa: BLE001 - a file missing or unreadable, a bad PEM
        raise ClusterUnavailableError(
            f"[psi].cluster = {address!r}: {_TLS_SETTINGS} do not load ({_first_line(exc)})"
        ) from None
    if context is None:
        raise ClusterUnavailableError(
            f"[psi].cluster = {address!r} needs {_TLS_SETTINGS}; or use a tcp:// address on a trusted network"
        )


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters): Dask's messages can run over many lines."""
    text = str(exc).strip()
    return type(exc).__name__ + (f": {text.splitlines()[0][:200]}" if text else "")


class _Secret:
    """The PSI key's raw bytes on their way to and inside the workers. ``repr`` never shows them (Dask prints the
    objects it handles in logs and on its dashboard). A worker builds the X25519 key object once, on first use, and
    keeps it here rather than in a module cache: Dask drops this object when the node releases the key (or
    disconnects, or dies), and the key object goes with it from the long-lived worker process."""

    __slots__ = ("raw", "_built")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._built: X25519PrivateKey | None = None

    def key(self) -> X25519PrivateKey:
        if self._built is None:
            self._built = X25519PrivateKey.from_private_bytes(self.raw)
        return self._built

    def __reduce__(self):  # only the bytes travel; each copy builds its own key object
        return (_Secret, (self.raw,))

    def __repr__(self) -> str:
        return "<PSI key: secret>"

    __str__ = __repr__

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return 64


def _run(fn: Callable[..., bytes], secret: _Secret, *args: Any) -> tuple[bool, object]:
    """On a worker: ``fn(key, *args)``, the outcome as a value (never raised inside Dask: see the module doc)."""
    try:
        return True, fn(secret.key(), *args)
    except PsiError as exc:  # e.g. a peer's point off the curve: the engine raises it in the node, index and all
        return False, exc
    except Exception as exc:  # noqa: BLE001 - a bug on the worker; its type and message only (always picklable)
        return False, ClusterFailedError(f"a PSI task failed on a Dask worker: {type(exc).__name__}: {exc}")


class DaskPool:
    """A connection to a Dask scheduler that runs engine tasks: ``submit(fn, key_raw, *args)`` -> a future,
    ``result(future)`` -> ``fn``'s value (or its exception), in the engine's bounded, in-order window.

    Connects at once (within ``timeout`` seconds) and waits up to ``timeout`` seconds for a first worker, so an
    unusable cluster is reported before the PSI starts."""

    def __init__(self, address: str, *, timeout: float) -> None:
        problem = check_cluster_address(address)
        if problem is not None:
            raise ValueError(f"cluster {problem}")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.address = address
        self.timeout = float(timeout)
        try:
            from distributed import Client
        except ImportError:
            raise ClusterUnavailableError(
                f"[psi].cluster = {address!r} needs the Dask distributed package on this machine: {INSTALL_HINT} "
                "(or remove [psi].cluster to use this machine's cores)"
            ) from None
        way_out = (f"start it on your own hosts (dask scheduler, then dask worker {address} --nthreads 1), fix "
                   "[psi].cluster, or remove [psi].cluster to use this machine's cores")
        if address.startswith("tls://"):
            _check_tls_settings(address)
            way_out = "check the scheduler's TLS certificate and Dask's TLS settings on this machine; " + way_out
        self._keys: OrderedDict[bytes, Any] = OrderedDict()  # key bytes -> the scattered _Secret's future
        try:
            self.client = Client(address, timeout=self.timeout, set_as_default=False)
        except Exception as exc:  # noqa: BLE001 - refused, timed out, a TLS handshake or TLS config error: one line
            raise ClusterUnavailableError(
                f"cannot reach the Dask scheduler at {address} ([psi].cluster) within {self.timeout:g} s "
                f"({_first_line(exc)}): {way_out}"
            ) from None
        try:
            self.client.wait_for_workers(1, timeout=self.timeout)
        except Exception:  # noqa: BLE001 - timed out (or the scheduler went away meanwhile)
            self.close()
            raise ClusterUnavailableError(
                f"the Dask scheduler at {address} ([psi].cluster) has no workers after {self.timeout:g} s: start "
                f"some on your own hosts (dask worker {address} --nthreads 1), or remove [psi].cluster"
            ) from None
        #: worker threads when we connected (the engine sizes its window from it)
        self.threads = max(1, sum(self.client.nthreads().values()))

    def _key_ref(self, raw: bytes) -> Any:
        ref = self._keys.get(raw)
        if ref is None:
            try:
                ref = self.client.scatter(_Secret(raw), broadcast=True, hash=False, timeout=self.timeout)
            except Exception as exc:  # noqa: BLE001 - no workers, scheduler gone: one clear error
                raise self._failed(exc) from None
            self._keys[raw] = ref
            while len(self._keys) > _MAX_KEYS:
                self._keys.popitem(last=False)  # dropping the future frees the key on the workers
        else:
            self._keys.move_to_end(raw)
        return ref

    def submit(self, fn: Callable[..., bytes], key_raw: bytes, *args: Any) -> Any:
        """``fn(key_raw, *args)`` on the cluster; pure=False gives a random task name (not a hash of our items)."""
        try:
            return self.client.submit(_run, fn, self._key_ref(key_raw), *args, pure=False)
        except ClusterFailedError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc) from None

    def result(self, future: Any, size: int) -> bytes:
        """The task's joined output, checked to be ``size`` bytes (a worker running another vfl version could
        return anything), or the task's exception."""
        try:
            ok, value = future.result(timeout=self.timeout)
        except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError):
            raise ClusterFailedError(
                f"no result from the Dask cluster at {self.address} ([psi].cluster) within {self.timeout:g} s: "
                "are its scheduler and workers still running?"
            ) from None
        except (Exception, asyncio.CancelledError, concurrent.futures.CancelledError) as exc:  # noqa: BLE001
            raise self._failed(exc) from None
        if not ok:
            raise value  # type: ignore[misc]
        if type(value) is not bytes or len(value) != size:
            got = f"{len(value)} bytes" if isinstance(value, bytes) else f"a {type(value).__name__}"
            raise ClusterFailedError(
                f"a worker of the Dask cluster at {self.address} ([psi].cluster) returned {got} where {size} bytes "
                "were due: do all workers run this node's vfl version?"
            )
        return value

    @staticmethod
    def cancel(future: Any) -> None:
        future.cancel()

    def _failed(self, exc: BaseException) -> ClusterFailedError:
        return ClusterFailedError(
            f"the Dask cluster at {self.address} ([psi].cluster) failed during the PSI: {_first_line(exc)}"
        )

    def close(self) -> None:
        """Release our scattered keys and tasks and disconnect (bounded; never raises)."""
        self._keys.clear()
        try:
            self.client.close(timeout=self.timeout)
        except Exception:  # noqa: BLE001 - the scheduler may already be gone
            pass
