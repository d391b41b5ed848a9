"""Checkpoint files of one party: written atomically, named by step, verified by digest on load.

Each party writes only its own segment: ``DIR/PARTY-step-STEP.pt`` (write to a temporary file, fsync, rename, so a
crash mid-write leaves the previous checkpoint intact). The label holder also writes ``DIR/manifest.json`` once every
party has confirmed a step, with every party's digest: that is the step a restarted run resumes from.

Checkpoints and trained segments share one file format (``dump_state`` / ``load_state``): a torch file of tensors
and plain values only, loaded with ``weights_only=True`` (a file handed over or changed by someone else cannot run
code when it is loaded), carrying ``vfl_digest``, a SHA-256 over its content, checked on every load (a damaged or
edited file is refused, not half-used). Files are created 0600: they hold model state.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import PRIVATE, atomic_write_bytes, remove_stale_temps
from ..errors import SetupError
from ..protocol.training_phase import CheckpointError
from .lifecycle import MANIFEST, read_manifest
from ..train.models import ModelError

KEEP = 3  # checkpoint files kept per party (the manifest's step is always among them)
DIGEST_KEY = "vfl_digest"  # the content digest inside every state file


class StateFileError(SetupError):
    """A state file cannot be used: damaged, edited, or holding objects that are not tensors or plain values.

    The message names the file and what is wrong; callers add the way out."""


_SCALARS = (str, bytes, int, float, bool, type(None))


def plain_state(value: Any, where: str = "state") -> Any:
    """``value`` as tensors and plain values only, which ``torch.load(weights_only=True)`` accepts.

    NumPy arrays become tensors (text arrays: lists), NumPy scalars Python numbers; anything else that is not a
    tensor, str, bytes, number, bool, None, list, tuple or dict raises ``TypeError`` naming where it is, so a state
    that could not be loaded safely is never written."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where}: a {value.layout} tensor cannot be saved; make it dense")
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OUSV":
            return plain_state(value.tolist(), where)
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        out = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
        for key, item in value.items():
            key = key.item() if isinstance(key, np.generic) else key
            if not isinstance(key, _SCALARS):
                raise TypeError(f"{where}: a key of type {type(key).__name__} cannot be saved; use str or int keys")
            out[key] = plain_state(item, f"{where}[{key!r}]")
        metadata = getattr(value, "_metadata", None)  # torch's state_dict versions, used by load_state_dict
        if metadata is not None and isinstance(out, collections.OrderedDict):
            out._metadata = plain_state(metadata, f"{where}._metadata")
        return out
    if isinstance(value, (list, tuple)):
        items = [plain_state(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be saved so that it loads with weights_only; "
        "convert it to tensors, lists, dicts or plain values"
    )


def state_digest(value: Any) -> str:
    """SHA-256 over a plain state's content: types, keys (in sorted order), values, tensor dtypes, shapes, bytes.

    Computed over the content, not the file's bytes, so it does not depend on how torch lays out the zip."""
    h = hashlib.sha256(b"vfl state digest v1\0")
    _feed(h, value)
    return h.hexdigest()


def _scalar_bytes(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"B1" if value else b"B0"
    if isinstance(value, int):
        return b"I%d;" % value
    if isinstance(value, float):
        return b"F" + struct.pack(">d", value)
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
        return b"S%d:" % len(value) + value
    if isinstance(value, bytes):
        return b"Y%d:" % len(value) + value
    raise TypeError(f"not a plain value: {type(value).__name__}")


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b"X%s;%s;" % (str(t.dtype).encode(), ",".join(map(str, t.shape)).encode()))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        items = sorted((_scalar_bytes(k), v) for k, v in value.items()) if value else []
        h.update(b"D%d;" % len(items))
        for key, item in items:
            h.update(key)
            _feed(h, item)
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            h.update(b"M")
            _feed(h, metadata)
    elif isinstance(value, (list, tuple)):
        h.update(b"%s%d;" % (b"L" if isinstance(value, list) else b"T", len(value)))
        for item in value:
            _feed(h, item)
    else:
        h.update(_scalar_bytes(value))


def dump_state(state: Mapping) -> bytes:
    """The bytes of a state file: ``state`` made plain (``plain_state``), with its ``vfl_digest``."""
    plain = plain_state(state)
    plain.pop(DIGEST_KEY, None)
    plain[DIGEST_KEY] = state_digest(plain)
    buf = io.BytesIO()
    torch.save(plain, buf)
    return buf.getvalue()


def load_state(data: bytes, path: str | Path) -> dict:
    """A state file's content, loaded with ``weights_only=True`` and checked against its ``vfl_digest``.

    Raises ``StateFileError`` naming ``path``: a file that is not a torch file of tensors and plain values (damaged,
    or holding other objects: refused, nothing in it runs), that has no digest, or whose content changed."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StateFileError(
            f"{path} is not a vfl state file of tensors and plain values: it is damaged, or holds other objects, "
            f"which are refused because loading them could run code ({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(state, dict):
        raise StateFileError(f"{path} is not a vfl state file: it holds a {type(state).__name__}, not a dict")
    digest = state.pop(DIGEST_KEY, None)
    if not isinstance(digest, str):
        raise StateFileError(f"{path} carries no {DIGEST_KEY}: it was not written by this vfl version, or was edited")
    if state_digest(state) != digest:
        raise StateFileError(f"{path} does not match its own {DIGEST_KEY}: the file was changed or damaged")
    return state


class Checkpointer:
    def __init__(self, directory: Path, party: str, run: str, model: str):
        self.dir = Path(directory)
        self.party = party
        self.run = run
        self.model = model
        self._swept: set[str] = set()  # which of our files' stale temporaries this process removed already
        if self.dir.is_dir():  # what a killed earlier process of this party left half-written
            self._sweep(f"{self.party}-step-*.pt")
        self.kept = self._read_kept()  # the step of the best epoch's checkpoint, spared by the pruning

    @property
    def _kept_path(self) -> Path:
        return self.dir / f"{self.party}-kept.json"

    def _read_kept(self) -> int | None:
        """A restarted process still spares the checkpoint an earlier one was told to keep ([train].keep = "best")."""
        try:
            value = json.loads(self._kept_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        step = value.get("step") if isinstance(value, dict) else None
        return step if type(step) is int and step >= 0 and value.get("run") == self.run else None

    def _sweep(self, name: str) -> None:
        if name not in self._swept:
            self._swept.add(name)
            remove_stale_temps(self.dir, name)

    def path(self, step: int) -> Path:
        return self.dir / f"{self.party}-step-{step}.pt"

    def save(self, state: dict, step: int, epoch: int, keep: bool = False) -> str:
        """Write the checkpoint of ``step``; returns the SHA-256 of the file (the label holder's manifest keeps it).

        ``keep``: the best epoch's weights so far ([train].keep = "best"): spared by the pruning until another
        checkpoint is kept instead (recorded in ``PARTY-kept.json``, so a restarted process spares it too)."""
        meta = {"vfl_party": self.party, "vfl_run": self.run, "vfl_model": self.model, "vfl_step": step, "vfl_epoch": epoch}
        data = dump_state({**state, **meta})
        try:
            atomic_write_bytes(self.path(step), data, mode=PRIVATE)
            if keep:
                self._sweep(self._kept_path.name)
                atomic_write_bytes(self._kept_path, json.dumps({"run": self.run, "step": step}).encode(), mode=PRIVATE)
                self.kept = step
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path(step)}: {exc.strerror}") from None
        self._prune(step)
        return hashlib.sha256(data).hexdigest()

    def _prune(self, newest: int) -> None:
        """Keep the ``KEEP`` latest checkpoints up to ``newest`` and the kept one; drop any at a later step.

        A file past the step just written belongs to a pipeline this run has left (a rollback) or to an earlier run
        in the same folder: no manifest will ever point there again, and kept it would outrank (and get) the new
        run's own checkpoints pruned. A kept step past it is forgotten for the same reason."""
        if self.kept is not None and self.kept > newest:
            self.kept = None
            self._kept_path.unlink(missing_ok=True)
        steps = sorted(
            int(p.name.rsplit("-", 1)[1][:-3])
            for p in self.dir.glob(f"{self.party}-step-*.pt")
            if p.name.rsplit("-", 1)[1][:-3].isdigit()
        )
        current = [s for s in steps if s <= newest]
        for step in current[:-KEEP] + [s for s in steps if s > newest]:
            if step != self.kept:
                self.path(step).unlink(missing_ok=True)

    def load(self, step: int, digest: str | None) -> dict:
        path = self.path(step)
        try:
            data = path.read_bytes()
        except OSError:
            raise CheckpointError(
                f"no checkpoint of party {self.party!r} at step {step} in {self.dir}: the run cannot resume "
                "from there (start it afresh: `vfl node --fresh`, or a new run id)"
            ) from None
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(
                f"{path} does not match the digest recorded for step {step}: it was changed; the run cannot resume "
                "from there (restore the file, or start afresh: `vfl node --fresh`, or a new run id)"
            )
        try:
            state = load_state(data, path)
        except StateFileError as exc:
            raise CheckpointError(
                f"{exc}; the run cannot resume from there (start afresh: `vfl node --fresh`, or a new run id)"
            ) from None
        if state.get("vfl_run") != self.run or state.get("vfl_model") != self.model:
            raise CheckpointError(f"{path} belongs to run {state.get('vfl_run')!r} / model {state.get('vfl_model')!r}")
        return state

    def restore(self, step: int, digest: str | None, apply: Callable[[dict, str], None]) -> None:
        """Load the checkpoint of ``step`` and ``apply(state, what)`` it to the segment.

        A checkpoint that does not fit the model this config builds (``apply`` raises ``ModelError``: the party's
        features or ``[model]`` changed since it was written) is a ``CheckpointError`` naming the party, the file,
        the layer and both shapes. It is raised before training starts, so nothing is written over a good model."""
        state = self.load(step, digest)
        path = self.path(step)
        try:
            apply(state, f"the checkpoint {path}")
        except ModelError as exc:
            raise CheckpointError(
                f"party {self.party!r} cannot resume from step {step}: {exc}. This party's data or [model] changed "
                "since the checkpoint was written: put them back to resume, or start afresh (`vfl node --fresh`, or a "
                "new run id)"
            ) from None

    def commit(self, step: int, epoch: int, digests: dict[str, str], best: dict | None = None) -> None:
        manifest = {"run": self.run, "model": self.model, "step": step, "epoch": epoch, "digests": digests}
        if best is not None:  # the best epoch so far ([train].keep = "best", patience): a resumed run goes on from it
            manifest["best"] = best
        self._write_manifest(manifest)

    def finish(self, epochs: int, kept_epoch: int | None = None) -> None:
        """The run is complete (every epoch trained, or stopped early; the label holder's segment saved): say so in
        the manifest, so a start on this folder does not silently train again (``lifecycle.label_holder_start``).
        ``kept_epoch`` (1-based): the epoch whose weights the segments hold, when not the last one."""
        manifest = self.latest()
        if manifest is not None:
            extra = {"kept_epoch": kept_epoch} if kept_epoch is not None else {}
            self._write_manifest({**manifest, "finished": True, "epochs": epochs, **extra})

    def _write_manifest(self, manifest: dict) -> None:
        self._sweep("manifest.json")  # only the label holder writes the manifest
        try:
            atomic_write_bytes(self.dir / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode())
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.dir / MANIFEST}: {exc.strerror}") from None

    def latest(self) -> dict | None:
        """The label holder's manifest, if it belongs to this run and model."""
        return read_manifest(self.dir, self.run, self.model)
