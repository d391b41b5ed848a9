"""The session config every party must agree on before data moves, its digest and its readable diff (PROTOCOL.md §6).

The digest makes agreement a single comparison; the diff makes disagreement fixable: a user told
``batch_size: label holder has 128, data holder has 64`` knows which file to edit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import msgpack

from ..privacy.spec import PrivacyError, PrivacySpec
from ..psi.buckets import AUTO as AUTO_BUCKETS
from ..psi.buckets import MAX_BUCKETS as MAX_PSI_BUCKETS
from .chain import Chain, Segment, chain_problem, segments_from_wire
from .codec import MAX_HEADER_DEPTH
from .errors import ErrorCode, RemoteProtocolError
from .messages import is_party_id, is_wire_int
from .precision import DEFAULT_PRECISION, PRECISIONS, CutPrecision
from .text import peer_text

MAX_DATA_HOLDERS = 64
MAX_CUT_WIDTH = 1 << 20
MAX_MODEL_FINGERPRINT = 256
#: ``window = "auto"`` (v1.6): the label holder picks the window once it has timed a few steps, up to ``max_window``
AUTO_WINDOW = "auto"
DEFAULT_MAX_WINDOW = 16
MAX_WINDOW = 1024


#: Deepest nesting ``digest_of`` canonicalises (the config map is level 1). A peer's config arrives in a header,
#: which the codec already bounds to ``MAX_HEADER_DEPTH`` levels, so this guards local callers and any later path.
MAX_CONFIG_DEPTH = MAX_HEADER_DEPTH

#: What ``config_diff`` puts in a diff, roughly in bytes: the diff goes back to the peer in an ERROR (as the diff
#: map and again as its message), so a peer's config with megabytes of unknown keys must not make that ERROR larger
#: than a header may be. Honest diffs (64 data holders with different ids) stay far below it.
DIFF_BUDGET = 16_384
#: a peer's value or path in a diff longer than this (as text) is shown cut, escaped (``peer_text``)
DIFF_TEXT_LIMIT = 80


def _canonical(value: Any, depth: int = 1) -> Any:
    """Maps with sorted keys, recursively but at most ``MAX_CONFIG_DEPTH`` deep, so equal configs pack equal."""
    if isinstance(value, (Mapping, list, tuple)) and depth > MAX_CONFIG_DEPTH:
        raise RemoteProtocolError(
            ErrorCode.BAD_FIELD, f"HELLO.config: nests deeper than {MAX_CONFIG_DEPTH} levels", ref="HELLO"
        )
    if isinstance(value, Mapping):
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth + 1) for v in value]
    return value


def digest_of(wire_config: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the canonical msgpack encoding of a session config map.

    Raises ``RemoteProtocolError(BAD_FIELD)`` for a config nested deeper than ``MAX_CONFIG_DEPTH``.
    """
    return hashlib.sha256(msgpack.packb(_canonical(wire_config), use_bin_type=True)).hexdigest()


def _flatten(value: Any) -> dict[str, Any]:
    """Dotted path -> leaf for every leaf of nested maps; iterative, so no nesting depth can exhaust the stack."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        prefix, v = stack.pop()
        if isinstance(v, Mapping) and v:
            stack.extend((f"{prefix}.{k}" if prefix else str(k), v[k]) for k in v)
        else:
            out[prefix] = v
    return out


_MISSING = "<missing>"
#: what an absent leaf means, shown in a diff instead of '<missing>' (PROTOCOL.md §6: no ``privacy`` map is "none")
_ABSENT = {"privacy.defence": "none", "activation_precision": DEFAULT_PRECISION, "gradient_precision": DEFAULT_PRECISION}
#: the session config's precision fields (v1.6): absent means float32, so present means another precision
PRECISION_FIELDS = ("activation_precision", "gradient_precision")


def _shown(value: Any) -> Any:
    """A diff value as it may travel back: scalars and short strings unchanged, anything else as capped text."""
    if value is None or type(value) in (bool, int, float):
        return value
    if type(value) is str:
        return value if len(value) <= DIFF_TEXT_LIMIT else peer_text(value, DIFF_TEXT_LIMIT)
    return peer_text(repr(value), DIFF_TEXT_LIMIT)  # a header's value nests at most MAX_HEADER_DEPTH levels


def config_diff(ours: Mapping[str, Any], theirs: Mapping[str, Any], budget: int = DIFF_BUDGET) -> dict[str, list[Any]]:
    """Field path -> [our value, their value] for every leaf that differs (absent leaves show as '<missing>').

    Bounded for the ERROR it goes into: long values and paths are cut (``_shown``), and once about ``budget`` bytes
    are listed the rest is summed up under the path ``(more)``.
    """
    a, b = _flatten(ours), _flatten(theirs)
    out: dict[str, list[Any]] = {}
    used = 0
    paths = sorted(set(a) | set(b))
    for i, path in enumerate(paths):
        x, y = a.get(path, _MISSING), b.get(path, _MISSING)
        if x == y and type(a.get(path)) is type(b.get(path)):
            continue
        entry = [_shown(_ABSENT.get(path, x) if x is _MISSING else x),
                 _shown(_ABSENT.get(path, y) if y is _MISSING else y)]
        key = path if len(path) <= DIFF_TEXT_LIMIT else peer_text(path, DIFF_TEXT_LIMIT)
        used += len(key) + len(repr(entry)) + 32
        if used > budget:
            rest = sum(1 for p in paths[i:] if a.get(p, _MISSING) != b.get(p, _MISSING))
            out["(more)"] = ["<not shown>", f"{max(rest, 1)} more differing fields"]
            break
        out[key] = entry
    return out


def describe_diff(
    diff: Mapping[str, list[Any]], ours: str = "label holder", theirs: str = "data holder", sep: str = "; "
) -> str:
    return sep.join(f"{path}: {ours} has {a!r}, {theirs} has {b!r}" for path, (a, b) in diff.items())


@dataclass(frozen=True)
class SessionConfig:
    """Cut-layer widths per data holder, batch size, pipeline window, the model fingerprint and the training
    defence (``privacy``: every party applies or expects the same one, so it is agreed like the rest)."""

    cut_widths: Mapping[str, int]
    batch_size: int
    window: int | str  # an integer >= 1, or "auto" (v1.6: the label holder picks it, up to max_window)
    model: str
    psi: bool = False  # the session aligns rows with a private set intersection (v1.1)
    train: bool = False  # after the PSI, the session trains the split network (v1.2)
    predict: bool = False  # ... or, with train, only runs trained segments forward on the aligned rows (v1.2)
    privacy: PrivacySpec = PrivacySpec()  # the label-leakage defence of the training (v1.5); "none": absent on the wire
    max_window: int = DEFAULT_MAX_WINDOW  # the largest window "auto" may pick (on the wire only with "auto")
    #: the wire precision of the cut-layer activations and gradients (v1.6); "float32": absent on the wire
    activation_precision: str = DEFAULT_PRECISION
    gradient_precision: str = DEFAULT_PRECISION
    #: v1.8: the PSI runs in buckets: a fixed count K >= 2, or "auto" (the label holder picks K from the set sizes
    #: and the parties' memory budgets); 1, the unbucketed PSI of 1.1, is absent on the wire
    psi_buckets: int | str = 1
    #: v1.10: segment holders (section 13): name -> its inputs, output width and combine; empty: absent on the wire
    segments: Mapping[str, Segment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cut_widths", MappingProxyType(dict(self.cut_widths)))
        object.__setattr__(self, "segments", MappingProxyType(dict(self.segments)))
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if not (1 <= len(self.cut_widths) <= MAX_DATA_HOLDERS):
            return f"cut_widths must name 1..{MAX_DATA_HOLDERS} data holders"
        for party, width in self.cut_widths.items():
            if not is_party_id(party):
                return f"cut_widths: {party!r} is not a valid party id"
            if not (is_wire_int(width) and 1 <= width <= MAX_CUT_WIDTH):
                return f"cut_widths.{party} must be an integer in 1..{MAX_CUT_WIDTH}"
        if not (is_wire_int(self.batch_size) and self.batch_size >= 1):
            return "batch_size must be an integer >= 1"
        if self.window != AUTO_WINDOW and not (is_wire_int(self.window) and self.window >= 1):
            return "window must be an integer >= 1 or \"auto\""
        if not (is_wire_int(self.max_window) and 1 <= self.max_window <= MAX_WINDOW):
            return f"max_window must be an integer in 1..{MAX_WINDOW}"
        if type(self.model) is not str or not (1 <= len(self.model) <= MAX_MODEL_FINGERPRINT):
            return f"model must be a string of 1..{MAX_MODEL_FINGERPRINT} characters"
        if type(self.psi) is not bool or type(self.train) is not bool:
            return "psi and train must be true or false"
        if self.train and not self.psi:
            return "train = true needs psi = true (training runs on the aligned rows)"
        if type(self.predict) is not bool or (self.predict and not self.train):
            return "predict must be true or false, and needs train = true"
        if not isinstance(self.privacy, PrivacySpec):
            return "privacy must be a PrivacySpec"
        if self.privacy.defence != "none" and not self.train:
            return f"privacy (the training defence {self.privacy.defence!r}) needs train = true"
        if self.psi_buckets != AUTO_BUCKETS and not (
            is_wire_int(self.psi_buckets) and 1 <= self.psi_buckets <= MAX_PSI_BUCKETS
        ):
            return f"psi_buckets must be \"auto\" or an integer in 1..{MAX_PSI_BUCKETS}"
        if self.psi_buckets != 1 and not self.psi:
            return "psi_buckets needs psi = true"
        for name in PRECISION_FIELDS:
            if getattr(self, name) not in PRECISIONS:
                return f"{name} must be one of {', '.join(PRECISIONS)}, got {peer_text(repr(getattr(self, name)), 40)}"
        if self.segments:
            if not self.train:
                return "segments (segment holders) need train = true"
            return chain_problem(self.cut_widths, self.segments, MAX_CUT_WIDTH)
        return None

    @property
    def precision(self) -> CutPrecision:
        """The wire precision of each direction of the cut layer (section 11)."""
        return CutPrecision(activations=self.activation_precision, gradients=self.gradient_precision)

    @property
    def data_holders(self) -> tuple[str, ...]:
        return tuple(sorted(self.cut_widths))

    @property
    def segment_holders(self) -> tuple[str, ...]:
        return tuple(sorted(self.segments))

    @property
    def parties(self) -> tuple[str, ...]:
        """Every party with a session with the label holder: the data holders, then the segment holders."""
        return self.data_holders + self.segment_holders

    @property
    def chain(self) -> Chain:
        """The topology (without segments: every data holder feeds the label holder)."""
        return Chain(self.cut_widths, self.segments)

    @property
    def auto_window(self) -> bool:
        return self.window == AUTO_WINDOW

    @property
    def first_window(self) -> int:
        """The window every pipeline starts with: the configured one, or 1 until "auto" has chosen."""
        return 1 if self.auto_window else self.window

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "cut_widths": dict(sorted(self.cut_widths.items())),
            "batch_size": self.batch_size,
            "window": self.window,
            "model": self.model,
        }
        if self.auto_window:  # absent with a fixed window, so those sessions keep their digests
            wire["max_window"] = self.max_window
        if self.psi:  # absent means false, so a session without PSI has the same digest as in v1.0
            wire["psi"] = True
        if self.train:
            wire["train"] = True
        if self.predict:
            wire["predict"] = True
        privacy = self.privacy.to_wire()
        if privacy is not None:  # absent means none, so a session without a defence keeps its v1.4 digest
            wire["privacy"] = privacy
        for name in PRECISION_FIELDS:  # absent means float32, so a float32 session keeps its v1.5 digest
            if getattr(self, name) != DEFAULT_PRECISION:
                wire[name] = getattr(self, name)
        if self.psi_buckets != 1:  # absent means one bucket, so an unbucketed PSI keeps its v1.7 digest
            wire["psi_buckets"] = self.psi_buckets
        if self.segments:  # absent without segment holders, so a two-tier session keeps its v1.9 digest
            wire["segments"] = {name: self.segments[name].to_wire() for name in sorted(self.segments)}
        return wire

    @property
    def digest(self) -> str:
        return digest_of(self.to_wire())

    @classmethod
    def from_wire(cls, value: Any) -> "SessionConfig":
        """Parse a peer's config map; anything malformed is the peer's ``BAD_FIELD``."""
        if type(value) is not dict:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "HELLO.config must be a map", ref="HELLO")
        widths = value.get("cut_widths")
        if type(widths) is not dict:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "HELLO.config.cut_widths must be a map", ref="HELLO")
        for flag in ("psi", "train", "predict"):  # absent means false, so present means exactly true (section 6)
            if flag in value and value[flag] is not True:
                raise RemoteProtocolError(
                    ErrorCode.BAD_FIELD, f"HELLO.config.{flag} must be true when present (absent means false)", ref="HELLO"
                )
        if "max_window" in value and value.get("window") != AUTO_WINDOW:
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD, "HELLO.config.max_window is present but window is not \"auto\"", ref="HELLO"
            )
        for name in PRECISION_FIELDS:  # present means another precision than float32, so one config has one digest
            if name in value and (type(value[name]) is not str or value[name] not in PRECISIONS[1:]):
                raise RemoteProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"HELLO.config.{name} must be one of {', '.join(PRECISIONS[1:])} when present (absent means "
                    f"float32), got {peer_text(repr(value[name]), 40)}",
                    ref="HELLO",
                )
        if "psi_buckets" in value:  # present means bucketed, so one config has one digest
            pb = value["psi_buckets"]
            if pb != AUTO_BUCKETS and not (is_wire_int(pb) and 2 <= pb <= MAX_PSI_BUCKETS):
                raise RemoteProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"HELLO.config.psi_buckets must be \"auto\" or an integer in 2..{MAX_PSI_BUCKETS} when present "
                    f"(absent means one bucket), got {peer_text(repr(pb), 40)}",
                    ref="HELLO",
                )
        privacy = PrivacySpec()
        if "privacy" in value:
            privacy = _privacy_from_wire(value["privacy"])
        segments: dict = {}
        if "segments" in value:  # present means segment holders, so one config has one digest
            try:
                segments = segments_from_wire(value["segments"])
            except ValueError as exc:
                raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"HELLO.config.{exc}", ref="HELLO") from None
        try:
            return cls(
                cut_widths=widths,
                batch_size=value.get("batch_size"),
                window=value.get("window"),
                model=value.get("model"),
                psi=value.get("psi", False),
                train=value.get("train", False),
                predict=value.get("predict", False),
                privacy=privacy,
                max_window=value.get("max_window", DEFAULT_MAX_WINDOW),
                activation_precision=value.get("activation_precision", DEFAULT_PRECISION),
                gradient_precision=value.get("gradient_precision", DEFAULT_PRECISION),
                psi_buckets=value.get("psi_buckets", 1),
                segments=segments,
            )
        except ValueError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"HELLO.config: {exc}", ref="HELLO") from None


def _privacy_from_wire(value: Any) -> PrivacySpec:
    """A peer's ``privacy`` map (section 6): a defence other than none with exactly its parameters, as floats.

    Present means a defence: ``{"defence": "none"}`` is refused like ``psi: false``, so one session config has one
    encoding and one digest."""
    try:
        spec = PrivacySpec.from_wire(value)
    except PrivacyError as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_FIELD, f"HELLO.config.privacy: {peer_text(str(exc), 300)}", ref="HELLO"
        ) from None
    if spec.defence == "none":
        raise RemoteProtocolError(
            ErrorCode.BAD_FIELD, "HELLO.config.privacy must name a defence when present (absent means none)",
            ref="HELLO",
        )
    return spec
