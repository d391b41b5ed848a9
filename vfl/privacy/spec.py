"""Which training defence a run uses and with what parameters: parsed from a node's ``[privacy]`` table, carried in
the session config (so every party's digest and log names it), and checked strictly when a peer sends it.

Torch-free and numpy-free on purpose: :mod:`vfl.protocol.session` imports this module, and the protocol layer stays
light. The defences themselves live in one module each (:mod:`vfl.privacy.max_norm`, ...).
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from vfl.errors import ExitCode, VflError

__all__ = ["DEFENCES", "PARAMETERS", "PrivacyError", "PrivacySpec"]

#: every defence vfl knows, "none" first (the default: no key in the session config, the digest as before)
DEFENCES = ("none", "max_norm", "marvell", "label_dp", "gradient_noise")

#: (default, lowest value, whether the lowest value itself is allowed, what the parameter means)
_Param = tuple[float, float, bool, str]

#: defence -> parameter -> its rule; exactly the keys a defence takes, in the order ``describe`` shows them
PARAMETERS: Mapping[str, Mapping[str, _Param]] = MappingProxyType({
    "none": MappingProxyType({}),
    "max_norm": MappingProxyType({}),
    "marvell": MappingProxyType({
        "sumkl": (4.0, 0.0, False, "Li et al.'s sumKL budget per batch; smaller is more private and adds more noise"),
    }),
    "label_dp": MappingProxyType({
        "epsilon": (1.0, 0.0, False, "randomized-response epsilon; smaller flips more labels"),
    }),
    "gradient_noise": MappingProxyType({
        "clip": (1.0, 0.0, False, "per-row L2 clip C of the gradient"),
        "sigma": (1.0, 0.0, True, "noise multiplier: Gaussian noise of std sigma*C per coordinate"),
    }),
})

#: the tasks each defence works for (None: any task)
_TASKS: Mapping[str, tuple[str, ...] | None] = MappingProxyType({
    "none": None,
    "max_norm": None,
    "gradient_noise": None,
    "marvell": ("binary",),
    "label_dp": ("binary", "multiclass"),
})

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxdict = 6
_repr.maxlist = 6


def _shown(value: Any) -> str:
    """A value as printable, bounded text: a peer chooses it, so long or nested values are cut and control
    characters come out escaped (``repr``)."""
    return _repr.repr(value)


class PrivacyError(VflError, ValueError):
    """A ``[privacy]`` table or a peer's privacy config is not a valid defence spec. The message names the key, the
    value and the way out. From a local table the error is a setup problem (exit code 2); from a peer's config it
    fails the session (exit code 1)."""


def _number(value: Any) -> float | None:
    """``value`` as a finite float if it is an int or a float (never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _problems(defence: Any, params: Mapping[Any, Any], *, where: str, require_all: bool) -> tuple[list[str], dict]:
    """Every problem with ``defence`` and its ``params`` (as messages), and the params completed with defaults and
    made floats. ``where`` prefixes each message (``[privacy]`` or ``the peer's privacy config``)."""
    problems: list[str] = []
    if not isinstance(defence, str) or defence not in DEFENCES:
        problems.append(f"{where} defence = {_shown(defence)}: unknown; use one of {', '.join(DEFENCES)}")
        return problems, {}
    rules = PARAMETERS[defence]
    takes = ", ".join(rules) if rules else "no parameters"
    values: dict[str, float] = {}
    for key in params:
        if not isinstance(key, str) or key not in rules:
            owners = [d for d, r in PARAMETERS.items() if isinstance(key, str) and key in r]
            hint = f" (set defence = {owners[0]!r} to use {key})" if owners else ""
            problems.append(f"{where} {_shown(key)}: not a parameter of defence {defence!r}, which takes "
                            f"{takes}{hint}")
    for key, (default, low, low_ok, meaning) in rules.items():
        if key not in params:
            if require_all:
                problems.append(f"{where} {key}: missing; defence {defence!r} needs it ({meaning})")
            else:
                values[key] = default
            continue
        number = _number(params[key])
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        if number is None or number < low or (number == low and not low_ok):
            problems.append(f"{where} {key} = {_shown(params[key])}: must be a finite number {bound} ({meaning})")
        else:
            values[key] = number
    return problems, values


def _fail(problems: list[str], exit_code: int) -> PrivacyError:
    err = PrivacyError("; ".join(problems))
    err.exit_code = exit_code
    return err


@dataclass(frozen=True)
class PrivacySpec:
    """The defence and its parameters. ``params`` holds exactly the keys the defence takes (missing ones get their
    defaults, numbers become floats) and is read-only, so a spec can be shared and compared (``==``, ``hash``).

    Parameters and defaults: ``max_norm`` none; ``marvell`` ``sumkl`` [4.0]; ``label_dp`` ``epsilon`` [1.0];
    ``gradient_noise`` ``clip`` [1.0] and ``sigma`` [1.0]. Ranges: sumkl, epsilon, clip > 0; sigma >= 0; finite.
    """

    defence: str = "none"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping):
            raise _fail([f"privacy params must be a mapping, got {_shown(self.params)}"], ExitCode.FAILED)
        problems, values = _problems(self.defence, self.params, where="privacy", require_all=False)
        if problems:
            raise _fail(problems, ExitCode.FAILED)
        object.__setattr__(self, "params", MappingProxyType(values))

    def __hash__(self) -> int:
        return hash((self.defence, tuple(sorted(self.params.items()))))

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "PrivacySpec":
        """The spec of a node's ``[privacy]`` table (without the label holder's local key ``audit``): ``defence``
        (default "none") and the defence's parameters. Raises :class:`PrivacyError` (exit code 2) listing every
        problem: an unknown defence, a key the defence does not take (naming the keys it takes), a bad value."""
        if not isinstance(table, Mapping):
            raise _fail([f"[privacy] must be a table, got {_shown(table)}"], ExitCode.SETUP)
        params = {k: v for k, v in table.items() if k != "defence"}
        problems, values = _problems(table.get("defence", "none"), params, where="[privacy]", require_all=False)
        if problems:
            raise _fail(problems, ExitCode.SETUP)
        return cls(table.get("defence", "none"), values)

    def to_wire(self) -> dict[str, Any] | None:
        """The session config's ``privacy`` value: None for "none" (the key stays out, the digest unchanged), else
        ``{"defence": name, **params}`` with every parameter as a float."""
        if self.defence == "none":
            return None
        return {"defence": self.defence, **{k: float(v) for k, v in self.params.items()}}

    @classmethod
    def from_wire(cls, value: Any) -> "PrivacySpec":
        """The spec a peer sent in its session config (``None``: no privacy key, defence "none").

        Strict, because a peer chooses it: a map with str keys, ``defence`` one of :data:`DEFENCES` other than
        "none" (which is sent as no key), exactly the defence's parameters, each an int or float (not a bool),
        finite and in range. Anything else raises :class:`PrivacyError` naming what is wrong."""
        where = "the peer's privacy config:"
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise _fail([f"{where} must be a map, got {_shown(value)}"], ExitCode.FAILED)
        if "defence" not in value:
            raise _fail([f"{where} no key 'defence' (keys: {_shown(list(value))})"], ExitCode.FAILED)
        defence = value["defence"]
        if defence == "none":
            raise _fail([f"{where} defence 'none' is sent as no privacy key, not as a map"], ExitCode.FAILED)
        params = {k: v for k, v in value.items() if k != "defence"}
        problems, values = _problems(defence, params, where=where, require_all=True)
        if problems:
            raise _fail(problems, ExitCode.FAILED)
        return cls(defence, values)

    def describe(self) -> str:
        """For logs: ``none``, ``max_norm``, ``marvell (sumkl 4)``, ``gradient_noise (clip 1, sigma 1)``."""
        if not self.params:
            return self.defence
        return f"{self.defence} ({', '.join(f'{k} {v:g}' for k, v in self.params.items())})"

    def check_task(self, task: str) -> None:
        """Raise :class:`PrivacyError` (exit code 2) if the defence does not work for ``task``: marvell needs a
        binary task (it perturbs between two classes); label_dp needs class labels (binary or multiclass)."""
        tasks = _TASKS[self.defence]
        if tasks is not None and task not in tasks:
            raise _fail([f"[privacy] defence = {self.defence!r} needs a {' or '.join(tasks)} task, but the task "
                         f"is {task!r}; choose another defence (max_norm or gradient_noise work for any task)"],
                        ExitCode.SETUP)
