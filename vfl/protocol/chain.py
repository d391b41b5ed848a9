"""The shape of a segment chain (PROTOCOL.md section 13): who feeds whom, and every width along the way.

A session config may name **segment holders** (v1.10): nodes with a model segment and no data, each fed by the cut
layers of its *inputs* (data holders or other segment holders). The topology is a forest whose roots feed the label
holder; everything a node needs to know about it (its downstream, its inputs and their widths, the route of a relayed
session) is computed here from the config every party agreed on, so no party has to be told by another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .messages import is_party_id, is_wire_int

#: at most this many segment holders in one session (as many as data holders)
MAX_SEGMENTS = 64
COMBINES = ("concat", "sum")


@dataclass(frozen=True)
class Segment:
    """One segment holder: its inputs in the order their cut layers are concatenated, its output width, and how
    the inputs are combined (``sum`` needs equal widths)."""

    inputs: tuple[str, ...]
    width: int
    combine: str = "concat"

    def to_wire(self) -> dict:
        return {"inputs": list(self.inputs), "width": self.width, "combine": self.combine}


def segments_from_wire(value: object) -> dict[str, Segment]:
    """A peer's ``segments`` map; ``ValueError`` naming the first thing wrong with it (the caller's BAD_FIELD)."""
    if type(value) is not dict or not value:
        raise ValueError("segments must be a non-empty map of segment holder -> {inputs, width, combine}")
    out: dict[str, Segment] = {}
    for name, spec in value.items():
        if type(spec) is not dict or set(spec) != {"inputs", "width", "combine"}:
            raise ValueError(f"segments.{str(name)[:64]} must be a map with exactly inputs, width and combine")
        inputs = spec["inputs"]
        if type(inputs) is not list or not all(type(p) is str for p in inputs):
            raise ValueError(f"segments.{str(name)[:64]}.inputs must be a list of party ids")
        out[name] = Segment(inputs=tuple(inputs), width=spec["width"], combine=spec["combine"])
    return out


def chain_problem(cut_widths: Mapping[str, int], segments: Mapping[str, Segment], max_width: int) -> str | None:
    """What is wrong with this topology, or None: ids, widths, each party an input of at most one segment, every
    segment fed, no cycle (so every party has a route to the label holder)."""
    if len(segments) > MAX_SEGMENTS:
        return f"segments names {len(segments)} segment holders; at most {MAX_SEGMENTS}"
    fed_by: dict[str, str] = {}
    for name, seg in segments.items():
        if not is_party_id(name):
            return f"segments: {str(name)[:64]!r} is not a valid party id"
        if name in cut_widths:
            return f"segments.{name}: {name!r} is also a data holder"
        if not isinstance(seg, Segment):
            return f"segments.{name} must be a Segment"
        if not (is_wire_int(seg.width) and 1 <= seg.width <= max_width):
            return f"segments.{name}.width must be an integer in 1..{max_width}"
        if seg.combine not in COMBINES:
            return f"segments.{name}.combine must be one of {', '.join(COMBINES)}"
        if not seg.inputs or len(seg.inputs) > len(cut_widths) + len(segments):
            return f"segments.{name}.inputs must name at least one data holder or segment holder"
        for p in seg.inputs:
            if p not in cut_widths and p not in segments:
                return f"segments.{name}.inputs: {str(p)[:64]!r} is neither a data holder nor a segment holder"
            if p in fed_by:
                return f"segments: {p!r} is an input of both {fed_by[p]!r} and {name!r} (at most one each)"
            fed_by[p] = name
        if seg.combine == "sum" and len({_width(p, cut_widths, segments) for p in seg.inputs}) > 1:
            return f"segments.{name}: combine = \"sum\" needs inputs of equal widths"
    for name in segments:  # follow each segment downstream: a cycle comes back to where it started
        seen, at = {name}, name
        while at in fed_by:
            at = fed_by[at]
            if at in seen:
                return f"segments: {name!r} feeds itself through {at!r} (a cycle)"
            seen.add(at)
    return None


def _width(party: str, cut_widths: Mapping[str, int], segments: Mapping[str, Segment]) -> int:
    return segments[party].width if party in segments else cut_widths[party]


@dataclass(frozen=True)
class Chain:
    """A checked topology (``chain_problem`` found nothing) and the questions every node asks of it."""

    cut_widths: Mapping[str, int]
    segments: Mapping[str, Segment]

    def width(self, party: str) -> int:
        """The cut-layer width ``party`` sends downstream."""
        return _width(party, self.cut_widths, self.segments)

    def downstream(self, party: str) -> str | None:
        """The segment holder ``party`` sends its FORWARDs to; None: the label holder."""
        for name, seg in self.segments.items():
            if party in seg.inputs:
                return name
        return None

    def inputs(self, segment: str | None) -> tuple[str, ...]:
        """The parties feeding ``segment`` (None: the label holder: every party that feeds no segment, sorted)."""
        if segment is not None:
            return self.segments[segment].inputs
        fed = {p for seg in self.segments.values() for p in seg.inputs}
        return tuple(sorted(p for p in (*self.cut_widths, *self.segments) if p not in fed))

    def input_widths(self, segment: str | None) -> dict[str, int]:
        return {p: self.width(p) for p in self.inputs(segment)}

    def route(self, party: str) -> tuple[str, ...]:
        """The segment holders a message from ``party`` to the label holder passes, nearest first."""
        out, at = [], self.downstream(party)
        while at is not None:
            out.append(at)
            at = self.downstream(at)
        return tuple(out)

    def relayed(self, party: str) -> bool:
        """``party``'s session with the label holder goes through segment holders (RELAY)."""
        return self.downstream(party) is not None

    def upstream(self, segment: str) -> tuple[str, ...]:
        """Every party behind ``segment`` (its inputs, their inputs, ...)."""
        out: list[str] = []
        todo = list(self.segments[segment].inputs)
        while todo:
            p = todo.pop(0)
            out.append(p)
            if p in self.segments:
                todo.extend(self.segments[p].inputs)
        return tuple(out)

    def hop_towards(self, segment: str, party: str) -> str | None:
        """The input of ``segment`` behind which ``party`` is (itself when it is a direct input); None: not behind."""
        for p in self.segments[segment].inputs:
            if p == party or (p in self.segments and party in self.upstream(p)):
                return p
        return None

    def lh_hop(self, party: str) -> str:
        """The label holder's direct input through which ``party``'s session arrives (``party`` itself if direct)."""
        route = self.route(party)
        return route[-1] if route else party

    def depth(self, party: str) -> int:
        """Hops from ``party`` to the label holder minus one: 0 for a direct input."""
        return len(self.route(party))
