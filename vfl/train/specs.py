"""The torch-free parts of a training config: the optimizer spec and the architecture fingerprint.

Checking a node config and writing the demo's configs need these, but not torch: importing torch costs seconds per
process, so ``vfl node --config`` validation and ``vfl demo`` must not pay for it before they have to. The torch
side of the optimizers lives in :mod:`vfl.train.optim`, loaded by :meth:`OptimizerSpec.build`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["OptimizerSpec", "canonical_json", "fingerprint"]


# --------------------------------------------------------------------------------------------------------- optimizers

#: the keys each kind takes, in the order error messages list them ([train].optimizer in a node config)
KIND_KEYS = {
    "sgd": ("kind", "lr", "momentum", "weight_decay", "nesterov"),
    "adam": ("kind", "lr", "betas", "eps", "weight_decay"),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OptimizerSpec:
    """One segment's optimizer: ``sgd`` (lr, momentum, weight_decay, nesterov) or ``adam`` (lr, betas, eps,
    weight_decay as L2, like ``torch.optim.Adam``). :meth:`build` returns :mod:`vfl.train.optim`'s implementation,
    which performs exactly the floating-point operations of torch's single-tensor (``foreach=False``) SGD and Adam,
    so every node, and the central reference, use the same arithmetic."""

    kind: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        """Every problem is a ``ValueError`` of one line naming the key and saying what it takes."""
        if self.kind not in KIND_KEYS:
            raise ValueError(f"unknown optimizer {self.kind!r}; use 'sgd' or 'adam'")
        if not (_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "eps"):
            value = getattr(self, name)
            if not (_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if type(self.nesterov) is not bool:
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        betas = self.betas
        if (isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2
                or not all(_number(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        # a key of the other kind would be silently ignored: refuse it unless it keeps its default
        for f in fields(self):
            if f.name not in KIND_KEYS[self.kind] and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} is not a key of {self.kind!r} (it takes {', '.join(KIND_KEYS[self.kind])})")
        if self.kind == "sgd" and self.nesterov and not self.momentum > 0:
            raise ValueError("nesterov needs momentum > 0")

    def build(self, params):
        """The optimizer over ``params`` (a :class:`vfl.train.optim.SGD` or :class:`vfl.train.optim.Adam`)."""
        from .optim import SGD, Adam

        if self.kind == "sgd":
            return SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                       nesterov=self.nesterov)
        return Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov, "betas": list(self.betas), "eps": self.eps}

    @classmethod
    def from_dict(cls, data) -> OptimizerSpec:
        """The spec of a config's table (``{kind = "adam", lr = 0.001}``) or of :meth:`to_dict`; a ``ValueError``
        naming an unknown key lists the keys the kind takes."""
        if not isinstance(data, Mapping):
            raise ValueError(f'must be a table like {{kind = "adam", lr = 0.001}}, got {data!r}')
        data = dict(data)
        kind = data.get("kind", cls.kind)
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            takes = KIND_KEYS.get(kind) if isinstance(kind, str) else None
            listed = f"{kind!r} takes {', '.join(takes)}" if takes else (
                "; ".join(f"{k!r} takes {', '.join(v)}" for k, v in KIND_KEYS.items()))
            raise ValueError(f"unknown key(s) {', '.join(unknown)} ({listed})")
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)


# -------------------------------------------------------------------------------------------------------- fingerprint


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"fingerprint keys must be strings, got {k!r}")
            out[k] = _canonical(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"fingerprint values must be finite, got {value!r}")
        return value
    if callable(getattr(value, "to_dict", None)):  # specs (MlpSpec, OptimizerSpec) by their config form
        return _canonical(value.to_dict())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _canonical(value.item())
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: {value!r}")


def canonical_json(description: Mapping) -> bytes:
    """UTF-8 JSON with sorted keys, no whitespace; tuples become lists, specs (``MlpSpec``) their ``to_dict()``."""
    return json.dumps(_canonical(description), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def fingerprint(description: Mapping) -> str:
    """Lowercase hex SHA-256 of :func:`canonical_json` (independent of dict key order, dependent on list order)."""
    return hashlib.sha256(canonical_json(description)).hexdigest()
