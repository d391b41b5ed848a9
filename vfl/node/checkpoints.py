"""Checkpoint files of one party: written atomically, named by step, verified by digest on load.

Each party writes only its own segment: ``DIR/PARTY-step-STEP.pt`` (write to a temporary file, fsync, rename, so a
crash mid-write leaves the previous checkpoint intact). The label holder also writes ``DIR/manifest.json`` once every
party has confirmed a step, with every party's digest: that is the step a restarted run resumes from.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from ..files import atomic_write_bytes
from ..protocol.training_phase import CheckpointError

KEEP = 3  # checkpoint files kept per party (the manifest's step is always among them)


class Checkpointer:
    def __init__(self, directory: Path, party: str, run: str, model: str):
        self.dir = Path(directory)
        self.party = party
        self.run = run
        self.model = model

    def path(self, step: int) -> Path:
        return self.dir / f"{self.party}-step-{step}.pt"

    def save(self, state: dict, step: int, epoch: int) -> str:
        buf = io.BytesIO()
        meta = {"vfl_party": self.party, "vfl_run": self.run, "vfl_model": self.model, "vfl_step": step, "vfl_epoch": epoch}
        torch.save({**state, **meta}, buf)
        data = buf.getvalue()
        try:
            atomic_write_bytes(self.path(step), data)
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path(step)}: {exc.strerror}") from None
        self._prune(step)
        return hashlib.sha256(data).hexdigest()

    def _prune(self, newest: int) -> None:
        steps = sorted(
            int(p.name.rsplit("-", 1)[1][:-3])
            for p in self.dir.glob(f"{self.party}-step-*.pt")
            if p.name.rsplit("-", 1)[1][:-3].isdigit()
        )
        for step in steps[:-KEEP]:
            self.path(step).unlink(missing_ok=True)

    def load(self, step: int, digest: str | None) -> dict:
        path = self.path(step)
        try:
            data = path.read_bytes()
        except OSError:
            raise CheckpointError(
                f"no checkpoint of party {self.party!r} at step {step} in {self.dir}: the run cannot resume "
                "from there (start it afresh with a new run id)"
            ) from None
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path} does not match the digest recorded for step {step}: it was changed")
        state = torch.load(io.BytesIO(data), weights_only=False)
        if state.get("vfl_run") != self.run or state.get("vfl_model") != self.model:
            raise CheckpointError(f"{path} belongs to run {state.get('vfl_run')!r} / model {state.get('vfl_model')!r}")
        return state

    def commit(self, step: int, epoch: int, digests: dict[str, str]) -> None:
        manifest = {"run": self.run, "model": self.model, "step": step, "epoch": epoch, "digests": digests}
        try:
            atomic_write_bytes(self.dir / "manifest.json", json.dumps(manifest, sort_keys=True, indent=1).encode())
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.dir / 'manifest.json'}: {exc.strerror}") from None

    def latest(self) -> dict | None:
        """The label holder's manifest, if it belongs to this run and model."""
        try:
            manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("run") != self.run or manifest.get("model") != self.model:
            return None
        return manifest
